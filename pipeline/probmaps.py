"""Probability maps and the threshold rule: NumPy and cv2 only (no torch, no stage).

``<fold dir>/<id>.png`` holds uint8 = round(255 p) at model size (predict's maps, train's
OOF maps): written by :func:`write_prob`, read by :func:`read_prob`, listed by
:func:`done_ids`. :func:`fold_mean` takes maps back to an image's own size (:func:`mean_map`
over folds, then ``geometry.to_original``), :func:`binarize` thresholds them by
:func:`threshold_level` at the threshold :func:`resolve_threshold` picks, and :func:`read_mask`
reads the true masks they are scored against (``pipeline.metrics``). Train's OOF histograms
(:func:`prob_hist`) count pixels by the same rule and :func:`hist_dice` reads them back, so the
OOF Dice at t is the Dice submit gets at t. Submit's worker processes import this module.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import cv2
import numpy as np

from . import cache
from .errors import PipelineError
from .geometry import to_original
from .metrics import dice_from_counts


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


def mean_map(maps) -> np.ndarray:
    """(h, w) float32 0..255: the mean of (h, w) uint8 maps (an iterable, one per fold), summed in
    order, times 1 / n: the uint8-scale mean is resized and thresholded in that scale (one float
    pass less than rescaling to 0..1)."""
    acc, n = None, 0
    for m in maps:
        acc = m.astype(np.float32) if acc is None else acc + m
        n += 1
    return acc * (1.0 / n)


def fold_mean(maps, size: tuple[int, int], geom: dict | None = None) -> np.ndarray:
    """(H, W) float32 0..255: :func:`mean_map` of the maps at the original size.

    size: (H, W) of the image; geom: its placement in the model input (``geometry.row_geometry``;
    None = stretch)."""
    return to_original(mean_map(maps), size, geom)


def read_mask(path: str | Path) -> np.ndarray:
    """(H, W) uint8 labels of a mask file, 0 = background (``> 0`` is the car).

    8-bit grey PNGs as stored (prepare writes {0, 1}; Kaggle-style {0, 255} too); GIFs and other
    palette images through their colours, not their indices (a GIF writer may reorder the palette:
    a mask that is all car can come back as index 0); other modes as PIL reads them; ``.npy`` as
    saved. The strict decode of raw train masks, with its checks, is ``ingest.decode_mask``."""
    path = str(path)
    if path.endswith(".npy"):
        return np.load(path)
    m = None if path.lower().endswith(".gif") else cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if m is not None and m.ndim == 2 and m.dtype == np.uint8:
        return m
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L") if im.mode == "P" else im)
    except (OSError, ValueError) as e:
        raise PipelineError(f"{path}: cannot read mask ({type(e).__name__}: {e})") from None


DEFAULT_THRESHOLD = 0.5        # submit's threshold without an OOF summary; OOF Dice is reported at it
THRESHOLDS = np.round(np.arange(0.30, 0.7001, 0.01), 2)   # the threshold search grid (OOF and multi-run searches)


FIXED_SOURCE = "config submit.threshold"


def resolve_threshold(fixed: float, run_dir: str | Path | None = None, search: dict | None = None) -> dict:
    """The threshold every consumer of a run's maps uses, and its provenance: ``fixed`` when >= 0
    (``submit.threshold``); else the tuned one: ``search`` (a multi-run choice, ``ensemble.choose``:
    its ``threshold`` and ``path``) or the run's ``oof_summary.json`` best threshold; else the default.

    Returns ``threshold``, ``threshold_source`` and, from an OOF summary, ``oof_complete`` and
    ``oof_folds_missing`` (a threshold tuned on some folds only is worth knowing about)."""
    if fixed >= 0:
        return {"threshold": float(fixed), "threshold_source": FIXED_SOURCE}
    if search is not None:
        return {"threshold": float(search["threshold"]), "threshold_source": f"ensemble OOF search {search['path']}"}
    summary = Path(run_dir) / "oof_summary.json" if run_dir is not None else None
    if summary is not None and summary.is_file():
        data = cache.read_json(summary)
        if "best_threshold" not in data:
            raise PipelineError(f"{summary}: no 'best_threshold' key")
        # Summaries written before oof recorded completeness say nothing: None, not a guess.
        return {"threshold": float(data["best_threshold"]), "threshold_source": str(summary),
                "oof_complete": data.get("complete"), "oof_folds_missing": data.get("folds_missing")}
    return {"threshold": DEFAULT_THRESHOLD, "threshold_source": "default (no oof_summary.json)"}


def threshold_grid(fixed: float) -> np.ndarray:
    """The thresholds a search tries: :data:`THRESHOLDS`, or only ``fixed`` when it is >= 0."""
    return THRESHOLDS if fixed < 0 else np.array([fixed])


def binarize(prob255: np.ndarray, threshold: float) -> np.ndarray:
    """(H, W) bool mask: ``prob255 > threshold_level(threshold)`` (see :func:`threshold_level`)."""
    return prob255 > threshold_level(threshold)


def threshold_level(threshold: float) -> np.float32:
    """The uint8-scale level of a probability threshold: the mask is ``prob255 > threshold_level(t)``.

    prob255 is a stored map (round(255 p)) or its fold mean, resized (float32, 0..255). One rule
    for submit (:func:`binarize`) and the OOF histograms (:func:`prob_hist`), so the
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
    return dice_from_counts(pos_gt[:, j + 1], all_gt[:, j + 1], pos.sum(1, keepdims=True))


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
