"""A fold's human-readable records: ``metrics.csv`` (one row per epoch) and ``curve.png``.

Written by rank 0 after every epoch, before ``last.pt`` (see :mod:`pipeline.train.resume`).
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from .. import cache

# val_dice: the raw weights; val_dice_ema: their EMA (empty without train.ema); size: the epoch's
# training input (train.progressive).
METRIC_COLUMNS = ["epoch", "lr", "train_loss", "val_loss", "val_dice", "val_dice_ema", "size", "seconds",
                  "images_per_s", "nonfinite", "best"]


def write_logs(out: Path, history: list[dict], title: str) -> None:
    write_metrics(out / "metrics.csv", history)
    write_curve(out / "curve.png", history, title)


def write_metrics(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: row.get(k, "") for k in METRIC_COLUMNS})   # older runs' rows lack the newer columns
    cache.write_text(path, buf.getvalue())


def write_curve(path: Path, history: list[dict], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    a.plot(ep, [h["val_loss"] for h in history], "o-", label="val")
    a.set_xlabel("epoch"), a.set_ylabel("BCE + Dice loss"), a.legend()
    b.plot(ep, [h["val_dice"] for h in history], "o-", color="C2", label="raw")
    ema = [h.get("val_dice_ema", float("nan")) for h in history]
    if not all(v != v for v in ema):    # any EMA score (NaN != NaN)
        b.plot(ep, ema, "s--", color="C3", label="EMA")
        b.legend()
    b.set_xlabel("epoch"), b.set_ylabel("val Dice (p > 0.5)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with cache.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
