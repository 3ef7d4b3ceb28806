"""Dice, as Kaggle scored Carvana: the mean over images of per-image Dice.

Convention: an image whose true and predicted masks are both empty scores 1.
"""
from __future__ import annotations

import numpy as np


def dice_from_counts(inter, pred, true):
    """Dice from pixel counts, elementwise: 2 inter / (pred + true), 1 where both are empty.

    inter, pred, true: arrays (NumPy or torch) of the same shape; the one formula every
    Dice in the pipeline reduces to (per image, per threshold, per histogram bin)."""
    denom = pred + true
    if hasattr(denom, "clamp_min"):       # torch: stays on its device, float64 like the NumPy path
        denom = denom.double()
        return (2 * inter.double() / denom.clamp_min(1)).where(denom > 0, denom.new_ones(()))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom == 0, 1.0, 2.0 * np.asarray(inter) / np.maximum(denom, 1)).astype(np.float64)


def dice(pred: np.ndarray, true: np.ndarray) -> float:
    """pred, true: (H, W) binary masks. 2|A∩B| / (|A|+|B|); 1.0 when both are empty."""
    p = np.asarray(pred).astype(bool)
    t = np.asarray(true).astype(bool)
    denom = int(p.sum()) + int(t.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / denom


def dice_batch(prob, true, threshold: float = 0.5) -> np.ndarray:
    """prob: (N, H, W) or (N, 1, H, W) probabilities; true: same shape, binary. Returns (N,) Dice."""
    p = np.asarray(prob) > threshold
    t = np.asarray(true).astype(bool)
    p = p.reshape(p.shape[0], -1)
    t = t.reshape(t.shape[0], -1)
    inter = np.logical_and(p, t).sum(1)
    denom = p.sum(1) + t.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(denom == 0, 1.0, 2.0 * inter / np.maximum(denom, 1))
    return d.astype(np.float64)
