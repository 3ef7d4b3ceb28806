"""Probability maps and the threshold rule: NumPy and cv2 only (no torch, no stage).

``<fold dir>/<id>.png`` holds uint8 = round(255 p) at model size (predict's maps,
train's OOF maps). Submit's worker processes read them, take the fold mean, map it
back to each image's own size (``geometry.to_original``) and threshold it with
:func:`threshold_level`; train's OOF histograms (:func:`prob_hist`) count pixels by
the same rule, and oof's threshold search reads them back (:func:`hist_dice`), so
the OOF Dice at t is the Dice submit gets at t. Free of torch so those workers stay
small.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import cv2
import numpy as np

from . import cache
from .config import PipelineError


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


def write_prob(path: str | Path, prob_u8: np.ndarray) -> None:
    """Write one (h, w) uint8 map (255 = 1.0) atomically: predict's maps and train's OOF maps alike."""
    cache.write_png(path, prob_u8, level=1)


def read_prob(path: str | Path) -> np.ndarray:
    """(h, w) uint8 probability map (255 = 1.0) written by this stage."""
    p = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if p is None:
        raise PipelineError(f"{path}: cannot read probability map (missing or corrupt; rerun `make predict`)")
    return p


DEFAULT_THRESHOLD = 0.5        # submit's threshold without an OOF summary; OOF Dice is reported at it
THRESHOLDS = np.round(np.arange(0.30, 0.7001, 0.01), 2)   # the OOF threshold search grid (oof stage)


def resolve_threshold(fixed: float, run_dir: str | Path) -> dict:
    """The threshold every consumer of a run's maps uses, and its provenance: ``fixed`` when >= 0
    (``submit.threshold``), else the run's ``oof_summary.json`` best threshold, else the default.

    Returns ``threshold``, ``threshold_source`` and, from an OOF summary, ``oof_complete`` and
    ``oof_folds_missing`` (a threshold tuned on some folds only is worth knowing about)."""
    if fixed >= 0:
        return {"threshold": float(fixed), "threshold_source": "config submit.threshold"}
    summary = Path(run_dir) / "oof_summary.json"
    if summary.is_file():
        data = cache.read_json(summary)
        if "best_threshold" not in data:
            raise PipelineError(f"{summary}: no 'best_threshold' key")
        # Summaries written before oof recorded completeness say nothing: None, not a guess.
        return {"threshold": float(data["best_threshold"]), "threshold_source": str(summary),
                "oof_complete": data.get("complete"), "oof_folds_missing": data.get("folds_missing")}
    return {"threshold": DEFAULT_THRESHOLD, "threshold_source": "default (no oof_summary.json)"}


def binarize(prob255: np.ndarray, threshold: float) -> np.ndarray:
    """(H, W) bool mask: ``prob255 > threshold_level(threshold)`` (see :func:`threshold_level`)."""
    return prob255 > threshold_level(threshold)


def threshold_level(threshold: float) -> np.float32:
    """The uint8-scale level of a probability threshold: the mask is ``prob255 > threshold_level(t)``.

    prob255 is a stored map (round(255 p)) or its fold mean, resized (float32, 0..255). One rule
    for submit (``submit.ensemble_mask``) and the OOF histograms (:func:`prob_hist`), so the
    OOF Dice at t is the Dice submit gets at t, also for pixels exactly at a level: at t = 0.6 a
    stored 153 is not positive (153 > 153.0 is false). Rounding to 6 decimals first drops
    float64 noise (0.02 * 255 = 5.1000000000000005), so the level is the one the threshold
    means whatever arithmetic produced the threshold.
    """
    return np.float32(round(float(threshold) * 255.0, 6))


OOF_BINS = 200   # original-size Dice histograms resolve thresholds to 1/200


@functools.lru_cache(maxsize=4)
def _levels(bins: int) -> tuple[np.ndarray, np.ndarray]:
    """threshold_level(j / bins) for j = 0..bins, with a sentinel before (lo) and after (hi)."""
    levels = np.array([threshold_level(j / bins) for j in range(bins + 1)], np.float32)
    inf = np.array([np.inf], np.float32)
    return np.concatenate([-inf, levels]), np.concatenate([levels, inf])


def prob_hist(prob255: np.ndarray, true: np.ndarray, bins: int = OOF_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Histograms for Dice at every threshold j/bins without keeping the maps.

    prob255: (H, W) probabilities on the uint8 scale, 0..255 (a stored map, or its
    ``geometry.to_original`` resize: exactly what submit thresholds); true: (H, W) {0, 1}.
    Pixel value b = the number of levels ``threshold_level(j / bins)`` below v,
    so b > j exactly when v > threshold_level(j / bins), submit's own test at t = j/bins.
    Returns (pos, all): (bins + 1,) int64 counts of b over true pixels and over all pixels.
    """
    lo, hi = _levels(bins)
    v = np.asarray(prob255, np.float32).ravel()
    # b = searchsorted(levels, v, "left") capped at bins, ~6x faster: levels are ~255 j / bins,
    # so ceil(v * bins / 255) is within one of b, and one comparison each way corrects it.
    b = np.ceil(v * np.float32(bins / 255.0))
    np.clip(b, 0, bins, out=b)
    b = b.astype(np.int32)
    b -= lo[b] >= v          # lo[b] = level b - 1: v is not above it
    b += hi[b] < v           # hi[b] = level b: v is above it
    t = np.asarray(true).ravel() > 0
    return np.bincount(b[t], minlength=bins + 1), np.bincount(b, minlength=bins + 1)


def hist_dice(pos: np.ndarray, all_: np.ndarray, thresholds) -> np.ndarray:
    """Per-image Dice at each threshold from :func:`prob_hist` counts.

    pos, all_: (N, bins + 1); thresholds: (T,) in [0, 1). Returns (N, T); both-empty -> 1.
    """
    pos, all_ = np.atleast_2d(pos).astype(np.int64), np.atleast_2d(all_).astype(np.int64)
    bins = pos.shape[1] - 1
    j = np.floor(np.asarray(thresholds, dtype=np.float64) * bins + 1e-9).astype(np.int64)
    # Suffix sums: count of b > j is the sum over bins j+1..bins.
    pos_gt = np.concatenate([np.cumsum(pos[:, ::-1], 1)[:, ::-1], np.zeros((len(pos), 1), np.int64)], 1)
    all_gt = np.concatenate([np.cumsum(all_[:, ::-1], 1)[:, ::-1], np.zeros((len(all_), 1), np.int64)], 1)
    tp, pred, true = pos_gt[:, j + 1], all_gt[:, j + 1], pos.sum(1, keepdims=True)
    denom = pred + true
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom == 0, 1.0, 2.0 * tp / np.maximum(denom, 1))


def pool_oof(fold_dirs: dict[int, Path], thresholds=THRESHOLDS) -> dict:
    """Pool the finished folds' OOF histograms. fold_dirs: fold -> its directory."""
    done = {k: d for k, d in fold_dirs.items() if cache.is_complete(d)}
    missing = sorted(set(fold_dirs) - set(done))
    if not done:
        raise PipelineError(f"no finished fold under {next(iter(fold_dirs.values())).parent} "
                            f"(run `make train` first)")
    per_fold, ids, pos, all_ = {}, [], [], []
    for k, d in sorted(done.items()):
        h = np.load(d / "oof" / "hist.npz")
        fd = hist_dice(h["pos"], h["all"], [DEFAULT_THRESHOLD])[:, 0]
        info = cache.read_json(d / "oof.json")
        per_fold[str(k)] = {"images": int(len(fd)), "dice": float(fd.mean()),
                            "dice_model": float(info["dice_model"])}
        ids += h["ids"].tolist()
        pos.append(h["pos"])
        all_.append(h["all"])
    if len(set(ids)) != len(ids):
        raise PipelineError("an image appears in more than one fold's OOF predictions (folds.csv changed?)")
    grid = hist_dice(np.concatenate(pos), np.concatenate(all_), np.asarray(thresholds)).mean(0)
    at_half = float(hist_dice(np.concatenate(pos), np.concatenate(all_), [DEFAULT_THRESHOLD]).mean())
    best = int(np.argmax(grid))
    return {"dice": at_half, "best_threshold": float(thresholds[best]), "dice_at_best": float(grid[best]),
            "images": len(ids), "folds": per_fold, "folds_missing": missing, "complete": not missing,
            "curve": {f"{t:.2f}": float(v) for t, v in zip(thresholds, grid)}}
