"""Probability maps on disk: the torch-free half of the predict stage.

``<fold dir>/<id>.png`` holds uint8 = round(255 p) at model size. Submit's worker
processes read them, take the fold mean and map it back to each image's own size
with :func:`to_original`; keeping this module free of torch keeps those workers
small (no torch import per worker).
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from . import prepare
from .config import PipelineError
from .prepare import GEOM_COLS

__all__ = ["GEOM_COLS", "prob_path", "done_ids", "to_uint8", "read_prob", "stretch_geometry", "row_geometry",
           "to_original", "threshold_level"]


def prob_path(fold_dir: str | Path, image_id: str) -> Path:
    return Path(fold_dir) / f"{image_id}.png"


def done_ids(fold_dir: str | Path) -> set[str]:
    """Ids with a finished probability file (temp files start with '.', so they never count)."""
    try:
        with os.scandir(fold_dir) as it:
            return {e.name[:-4] for e in it if e.name.endswith(".png") and not e.name.startswith(".")}
    except FileNotFoundError:
        return set()


def to_uint8(prob: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> uint8 round(255 p) (the on-disk format, as for OOF)."""
    return np.clip(np.rint(np.asarray(prob, np.float32) * 255.0), 0, 255).astype(np.uint8)


def read_prob(path: str | Path) -> np.ndarray:
    """(h, w) uint8 probability map (255 = 1.0) written by this stage."""
    p = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if p is None:
        raise PipelineError(f"{path}: cannot read probability map (missing or corrupt; rerun `make predict`)")
    return p


def stretch_geometry(height: int, width: int) -> dict:
    """prepare's geometry record for fit=stretch (the whole image resized to height x width)."""
    return {"scaled_height": height, "scaled_width": width, "pad_top": 0, "pad_left": 0}


def row_geometry(row, height: int, width: int) -> dict:
    """The test index row's geometry (prepare's GEOM_COLS), or stretch when the index has none."""
    if all(k in row and row[k] == row[k] for k in GEOM_COLS):  # present and not NaN
        return {k: int(row[k]) for k in GEOM_COLS}
    return stretch_geometry(height, width)


def to_original(prob: np.ndarray, size: tuple[int, int], geom: dict | None = None) -> np.ndarray:
    """Model-size probabilities (h, w) -> (H, W) = the test image's own size.

    Inverts prepare's placement exactly (``prepare.to_original``: crop the
    padding of fit=pad, then bilinear resize); geom None means fit=stretch.
    Returns float32 in the input's scale (uint8 maps come back as 0..255 floats).
    """
    p = np.asarray(prob)
    geom = geom or stretch_geometry(*p.shape[:2])
    return prepare.to_original(p, tuple(size), geom)


def threshold_level(threshold: float) -> np.float32:
    """The uint8-scale level of a probability threshold: the mask is ``prob255 > threshold_level(t)``.

    prob255 is a stored map (round(255 p)) or its fold mean, resized (float32, 0..255). One rule
    for submit (``submit.ensemble_mask``) and the OOF histograms (``train.prob_hist``), so the
    OOF Dice at t is the Dice submit gets at t, also for pixels exactly at a level: at t = 0.6 a
    stored 153 is not positive (153 > 153.0 is false). Rounding to 6 decimals first drops
    float64 noise (0.02 * 255 = 5.1000000000000005), so the level is the one the threshold
    means whatever arithmetic produced the threshold.
    """
    return np.float32(round(float(threshold) * 255.0, 6))
