"""Out-of-fold summary (``make oof``): overall OOF Dice at original size and the best threshold.

Reads every finished fold's ``oof/hist.npz`` (per-image histograms of the
original-size probability over true and over all pixels, written by train), so
Dice at any threshold costs no image I/O, even for 5088 full-size masks. Writes
``<train run dir>/oof_summary.json`` with ``dice`` (at 0.5), ``best_threshold``,
``dice_at_best``, per-fold Dice, the threshold curve, and which folds are missing.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from . import cache, prepare
from .config import Config, PipelineError
from .probmaps import DEFAULT_THRESHOLD, THRESHOLDS, hist_dice
from .train import run_dir


def fold_numbers(prepared: Path) -> list[int]:
    folds = prepared / "folds.csv"
    if not folds.is_file():
        raise PipelineError(f"{folds}: missing (run `make prepare` first)")
    return sorted(pd.read_csv(folds)["fold"].unique().tolist())


def summarize(fold_dirs: dict[int, Path], thresholds=THRESHOLDS) -> dict:
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


def run(cfg: Config, prepared_dir: str | Path | None = None) -> dict:
    prepared = prepare.locate(cfg, prepared_dir)
    root = run_dir(cfg, prepared)
    folds = fold_numbers(prepared)
    cache.sweep_temps([root])      # a killed run's oof_summary.json temp
    summary = summarize({k: root / f"fold{k}" for k in folds})
    cache.write_json(root / "oof_summary.json", summary)
    for k, f in summary["folds"].items():
        print(f"fold {k}: OOF Dice {f['dice']:.4f} at original size, {f['dice_model']:.4f} at model size "
              f"({f['images']} images)")
    note = f"  (folds missing: {summary['folds_missing']})" if summary["folds_missing"] else ""
    print(f"OOF Dice {summary['dice']:.4f} at threshold 0.50; best threshold {summary['best_threshold']:.2f} "
          f"-> {summary['dice_at_best']:.4f} over {summary['images']} images{note} -> {root / 'oof_summary.json'}")
    return summary
