"""Carvana run-length encoding.

Carvana's RLE is 1-indexed ``start length`` pairs over the mask flattened row
by row (C order). An empty mask encodes to the empty string (Kaggle's scorer
reads an empty ``rle_mask`` as an empty mask).
"""
from __future__ import annotations

import numpy as np


def encode(mask: np.ndarray) -> str:
    """mask: (H, W) bool/uint8, nonzero = car. Returns 'start length ...' (1-indexed)."""
    flat = np.asarray(mask).reshape(-1).astype(bool)
    # Pad with background on both ends so every run has a rising and a falling edge.
    padded = np.concatenate(([False], flat, [False]))
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = edges[0::2], edges[1::2]
    pairs = np.empty(2 * len(starts), dtype=np.int64)
    pairs[0::2] = starts + 1
    pairs[1::2] = ends - starts
    return " ".join(map(str, pairs.tolist()))


def decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`encode`. shape: (H, W). Returns (H, W) uint8 in {0, 1}."""
    h, w = shape
    out = np.zeros(h * w, dtype=np.uint8)
    if isinstance(rle, str) and rle.strip():
        nums = np.asarray(rle.split(), dtype=np.int64)
        if nums.size % 2:
            raise ValueError(f"RLE has an odd number of values ({nums.size})")
        starts, lengths = nums[0::2] - 1, nums[1::2]
        if (starts < 0).any() or (lengths <= 0).any() or (starts + lengths > h * w).any():
            raise ValueError(f"RLE runs fall outside a {h}x{w} mask")
        for s, n in zip(starts.tolist(), lengths.tolist()):
            out[s:s + n] = 1
    return out.reshape(h, w)
