"""Dice, as Kaggle scored Carvana: the mean over images of per-image Dice.

Convention: an image whose true and predicted masks are both empty scores 1. Every Dice of the
pipeline (per image, per batch, per threshold of the OOF histograms, the scorer's, inspect's,
the validation fold's) is :func:`dice_from_counts` of its pixel counts; the differentiable soft
Dice of the training loss is in ``pipeline/losses.py``. Masks come in binary: thresholding a
probability map is ``probmaps.binarize``.
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


def counts(pred: np.ndarray, true: np.ndarray) -> tuple[int, int, int]:
    """(|P∩T|, |P|, |T|) of two masks of one shape (nonzero = car)."""
    p, t = np.asarray(pred, bool), np.asarray(true, bool)
    return int(np.count_nonzero(p & t)), int(np.count_nonzero(p)), int(np.count_nonzero(t))


def dice(pred: np.ndarray, true: np.ndarray) -> float:
    """pred, true: (H, W) masks (nonzero = car). 2|P∩T| / (|P|+|T|); 1.0 when both are empty."""
    return float(dice_from_counts(*counts(pred, true)))


def dice_batch(pred, true) -> np.ndarray:
    """pred, true: (N, ...) masks (nonzero = car), one image per row. Returns (N,) float64 Dice."""
    p = np.asarray(pred, bool).reshape(len(pred), -1)
    t = np.asarray(true, bool).reshape(len(true), -1)
    return dice_from_counts((p & t).sum(1), p.sum(1), t.sum(1))
