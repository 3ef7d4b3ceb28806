"""TensorBoard events per fold: ``<fold dir>/tb/`` (``make tensorboard`` serves the cache).

The fold driver makes three calls (``pipeline/train/fold.py``):

    board = tboard.open_fold(cfg, out, main=d.main, start_epoch=start)
    board.epoch(row, model, val_ds, autocast=..., device=..., channels_last=..., stats=...)  # per epoch
    board.close()

Per epoch (step = the 1-based epoch): ``loss/train``, ``loss/val``, ``dice/val``, ``lr``,
``speed/images_per_s``, ``time/epoch_s``, ``nonfinite``. Every ``tensorboard.overlay_every``
epochs: ``val/overlays``, a strip of ``tensorboard.overlay_images`` fixed validation images
(evenly spaced over the fold's validation set) at model size with the true outline, the
predicted outline (p > 0.5) and the wrong pixels tinted (``pipeline/overlay.py``).

Logging never changes training: the overlay forward runs in eval mode under no_grad (no
BatchNorm update, no RNG draw), on rank 0 only, after the epoch's checkpoint is written.
A resumed fold opens the writer with ``purge_step`` = the first epoch it trains, so events
of an epoch that was being repeated are replaced, not doubled. Time spent here is counted
in ``seconds`` (benchmarks/bench_tboard.py reports it against the epoch time).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from . import overlay

SUBDIR = "tb"
MIN_TILE_H = 160


class FoldBoard:
    """One fold's event writer; every method is a no-op when disabled (or not rank 0)."""

    def __init__(self, log_dir: str | Path | None, overlay_every: int = 2, overlay_images: int = 4,
                 purge_step: int | None = None):
        self.writer = None
        self.overlay_every, self.overlay_images = max(0, overlay_every), max(0, overlay_images)
        self.seconds = 0.0                       # all time spent here
        self.timing = {"open": 0.0, "scalars": 0.0, "overlays": 0.0, "n_overlays": 0}
        if log_dir is None:
            return
        t0 = time.perf_counter()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:     # logging must not stop training: say so once and go on
            print(f"warning: TensorBoard events off ({e}); `pip install tensorboard` or tensorboard.enabled=false",
                  file=sys.stderr)
            return
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)
        self.timing["open"] = time.perf_counter() - t0
        self.seconds += self.timing["open"]

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def epoch(self, row: dict, model=None, val_ds=None, **predict_kw) -> None:
        """Log one epoch's metrics row (``pipeline.train.logs.METRIC_COLUMNS``) and, when due, the overlays."""
        if self.writer is None:
            return
        t0 = time.perf_counter()
        step = int(row["epoch"])
        for tag, key in (("loss/train", "train_loss"), ("loss/val", "val_loss"), ("dice/val", "val_dice"),
                         ("lr", "lr"), ("speed/images_per_s", "images_per_s"), ("time/epoch_s", "seconds"),
                         ("nonfinite", "nonfinite")):
            if key in row:
                self.writer.add_scalar(tag, float(row[key]), step)
        self.writer.flush()     # visible in TensorBoard now, not after the writer's 120 s timer
        t1 = time.perf_counter()
        self.timing["scalars"] += t1 - t0
        if (model is not None and val_ds is not None and self.overlay_every and self.overlay_images
                and step % self.overlay_every == 0):
            strip = overlay_strip(model, val_ds, self.overlay_images, **predict_kw)
            self.writer.add_image("val/overlays", strip, step, dataformats="HWC")
            self.writer.flush()
            self.timing["overlays"] += time.perf_counter() - t1
            self.timing["n_overlays"] += 1
        self.seconds += time.perf_counter() - t0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def open_fold(cfg, fold_dir: str | Path, main: bool = True, start_epoch: int = 0) -> FoldBoard:
    """The fold's board (``<fold_dir>/tb``) per ``cfg.tensorboard``; disabled off rank 0."""
    tb = cfg.tensorboard
    if not (tb.enabled and main):
        return FoldBoard(None)
    return FoldBoard(Path(fold_dir) / SUBDIR, tb.overlay_every, tb.overlay_images,
                     purge_step=start_epoch + 1 if start_epoch > 0 else None)


def overlay_strip(model, val_ds, n: int, *, autocast, device, channels_last: bool = True, stats=None,
                  height: int | None = None) -> np.ndarray:
    """(h, n * w, 3) uint8: ``n`` fixed validation images with true/predicted outlines and errors.

    val_ds items: (image (H, W, 3) uint8 tensor, mask (H, W) uint8 tensor, i). The images are
    evenly spaced over the set (the same ones every epoch). Each tile is ``height`` pixels tall,
    default the model size but at least MIN_TILE_H (a 64x96 tile would be unreadable).
    """
    import torch
    from .data import to_device
    idx = np.unique(np.linspace(0, len(val_ds) - 1, min(n, len(val_ds))).round().astype(int))
    items = [val_ds[int(i)] for i in idx]
    images = torch.stack([it[0] for it in items])
    was = model.training
    model.eval()
    with torch.no_grad():
        x, _ = to_device(images, None, device, channels_last, *([stats] if stats is not None else []))
        with autocast():
            logits = model(x)
        pred = (logits.float()[:, 0] > 0).cpu().numpy()      # p > 0.5
    model.train(was)
    tiles = []
    for (img, mask, _), p in zip(items, pred):
        photo, true = img.numpy(), mask.numpy() > 0
        h = height or max(photo.shape[0], MIN_TILE_H)
        w = round(photo.shape[1] * h / photo.shape[0])
        tiles.append(overlay.render(photo, true, p, (h, w), thickness=1))
    return np.concatenate(tiles, 1)
