"""Out-of-fold summary (``make oof``): overall OOF Dice at original size and the best threshold.

Reads every finished fold's ``oof/hist.npz`` (per-image histograms of the
original-size probability over true and over all pixels, written by train), so
Dice at any threshold costs no image I/O, even for 5088 full-size masks. Writes
``<train run dir>/oof_summary.json`` with ``dice`` (at 0.5), ``best_threshold``,
``dice_at_best``, per-fold Dice, the threshold curve, and which folds are missing.
"""
from __future__ import annotations

from . import cache
from .config import Config
from .graph import Graph
from .probmaps import pool_oof


def run(cfg: Config, graph: Graph | None = None) -> dict:
    g = graph or Graph(cfg)
    root = g.train_dir
    cache.sweep_temps([root])      # a killed run's oof_summary.json temp
    g.require_finished()           # names the runs the cache holds when this one has no fold
    summary = pool_oof({k: g.fold_dir(k) for k in g.folds})
    cache.write_json(root / "oof_summary.json", summary)
    for k, f in summary["folds"].items():
        print(f"fold {k}: OOF Dice {f['dice']:.4f} at original size, {f['dice_model']:.4f} at model size "
              f"({f['images']} images)")
    note = f"  (folds missing: {summary['folds_missing']})" if summary["folds_missing"] else ""
    print(f"OOF Dice {summary['dice']:.4f} at threshold 0.50; best threshold {summary['best_threshold']:.2f} "
          f"-> {summary['dice_at_best']:.4f} over {summary['images']} images{note} -> {root / 'oof_summary.json'}")
    return summary
