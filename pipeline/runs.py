"""Runs: a leaderboard of every trained run in the cache (``make runs``).

Reads ``<cache>/train/<key>/fold<k>/`` only (config.yaml, manifest.json, metrics.csv,
oof/hist.npz): nothing is recomputed but the pooled OOF Dice, from the finished folds'
histograms exactly as ``make oof`` pools them (``probmaps.pool_oof``), so the table is right
even where ``make oof`` was not rerun after the last fold.

Columns: key, arch, encoder, size (HxW, fit), epochs, weights, folds (``done/n`` plus each
unfinished fold as ``fold k: epoch e/E``), oof_dice (at 0.5), oof_dice_best and threshold
(the best on the OOF grid), train_min (training minutes over the folds, from metrics.csv),
date (the last fold's finish, or the last epoch of an unfinished one). Sorted by OOF Dice,
best first; runs without a finished fold last.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import pandas as pd
import yaml

from . import cache
from .graph import run_folds
from .probmaps import pool_oof
from .errors import PipelineError

COLUMNS = ["key", "arch", "encoder", "size", "epochs", "weights", "folds", "oof_dice", "oof_dice_best", "threshold",
           "train_min", "date"]


def _metrics(d: Path) -> pd.DataFrame:
    p = d / "metrics.csv"
    try:
        return pd.read_csv(p) if p.is_file() else pd.DataFrame()
    except (pd.errors.ParserError, pd.errors.EmptyDataError):
        return pd.DataFrame()


def run_row(run: Path) -> dict | None:
    """One leaderboard row for ``<cache>/train/<key>``; None when it holds no fold."""
    folds = run_folds(run)
    if not folds:
        return None
    cfg_path = next((d / "config.yaml" for _, d in sorted(folds.items()) if (d / "config.yaml").is_file()), None)
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path else {}
    t, p = cfg.get("train", {}), cfg.get("prepare", {})
    n_folds = int(p.get("n_folds", max(folds) + 1))
    done, unfinished, minutes, stamps = [], [], 0.0, []
    for k, d in sorted(folds.items()):
        m = _metrics(d)
        if "seconds" in m:
            minutes += float(m["seconds"].sum()) / 60
        man = cache.read_manifest(d)
        if man is not None:
            done.append(k)
            stamps.append(man.get("finished_at", ""))
        else:
            epochs_done = len(m) if "epoch" in m else 0
            state = "OOF" if epochs_done >= int(t.get("epochs", 0) or 0) > 0 else f"epoch {epochs_done}/{t.get('epochs', '?')}"
            unfinished.append(f"fold {k}: {state}")
            files = [f for f in d.iterdir() if f.is_file()]
            if files:     # its last write: the last epoch, or the start when no epoch has ended
                last = max(f.stat().st_mtime for f in files)
                stamps.append(time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(last)))
    oof = {}
    if done:
        try:
            oof = pool_oof({k: run / f"fold{k}" for k in range(n_folds)})
        except (PipelineError, OSError, KeyError, ValueError) as e:
            unfinished.append(f"OOF unreadable: {e}")
    folds_txt = f"{len(done)}/{n_folds}" + ("; " + ", ".join(unfinished) if unfinished else "")
    return {"key": run.name, "arch": t.get("arch", "?"), "encoder": t.get("encoder", "?"),
            "size": f"{p.get('height', '?')}x{p.get('width', '?')} {p.get('fit', 'stretch')}",
            "epochs": t.get("epochs", ""), "weights": t.get("encoder_weights", ""), "folds": folds_txt,
            "oof_dice": oof.get("dice", math.nan), "oof_dice_best": oof.get("dice_at_best", math.nan),
            "threshold": oof.get("best_threshold", math.nan), "train_min": round(minutes, 1),
            "date": max(stamps) if stamps else ""}


def leaderboard(cache_root: str | Path) -> pd.DataFrame:
    """Every run under ``<cache_root>/train``, best OOF Dice first (runs without one last)."""
    root = Path(cache_root) / "train"
    rows = [r for d in sorted(root.glob("*")) if d.is_dir() for r in [run_row(d)] if r is not None] \
        if root.is_dir() else []
    df = pd.DataFrame(rows, columns=COLUMNS)
    return df.sort_values(["oof_dice", "oof_dice_best", "key"], ascending=[False, False, True],
                          na_position="last").reset_index(drop=True)


def format_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "(no trained runs)"
    show = df.copy()
    for c in ("oof_dice", "oof_dice_best"):
        show[c] = show[c].map(lambda v: "-" if v != v else f"{v:.4f}")
    show["threshold"] = show["threshold"].map(lambda v: "-" if v != v else f"{v:.2f}")
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_colwidth", 60):
        return show.to_string(index=False)


def main(argv: list[str] | None = None) -> int:
    """scripts/runs.py [--config F] [--csv FILE] [key=value ...]: print the leaderboard."""
    import argparse
    import sys
    from .config import load
    from .errors import ConfigError
    ap = argparse.ArgumentParser(prog="make runs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", "-c", default=None, help="YAML experiment file (only data.cache is read)")
    ap.add_argument("--csv", help="also write the table to this CSV file")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. data.cache=/path/to/cache")
    a = ap.parse_intermixed_args(argv)
    try:
        cfg = load(a.config, a.overrides)
        df = leaderboard(cfg.data.cache)
    except (ConfigError, PipelineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"runs in {Path(cfg.data.cache) / 'train'}:")
    print(format_table(df))
    if a.csv:
        cache.write_text(a.csv, df.to_csv(index=False))
        print(f"-> {a.csv}")
    return 0
