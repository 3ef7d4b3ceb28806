"""The fold driver: one fold from its lock to its manifest, in named steps.

:func:`train_fold` takes the fold's lock (or reports it cached); :func:`_train_fold` builds
the fold's parts, restores ``last.pt``, runs each planned epoch (:func:`run_epoch`: train,
score, record, save) and ends with the OOF maps of the best weights.
"""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from .. import cache, locks, tboard
from ..config import Config
from ..distributed import Dist, all_sum, barrier, gather, wrap
from ..graph import Graph
from . import build, oofmaps, resume, scoring, step
from .plan import EpochPlan, Inputs, plan_epochs
from .rng import rng_state
from ..pseudo import pseudo_set
from .build import Data, Fold, Parts


def train_fold(cfg: Config, g: Graph, index: pd.DataFrame, k: int, d: Dist) -> dict:
    """Train fold ``k`` (or resume it, or report it cached). Returns the fold summary (oof.json).

    One process (one DDP job) trains a fold at a time: another waits for its lock
    (pipeline.locks; under DDP rank 0 holds it for every rank), then finds the fold cached.
    """
    out = g.fold_dir(k)
    # Under DDP every decision is rank 0's (another job may finish the fold between two ranks' checks).
    agree = (lambda value: gather(value, d)[0]) if d.active else None
    if (agree or bool)(cache.is_complete(out)):
        return _cached(out, k, d)
    with locks.stage_lock(locks.lock_path(cfg.data.cache, out), f"train fold {k}", main=d.main, agree=agree):
        if (agree or bool)(cache.is_complete(out)):     # trained by the process this one waited for
            return _cached(out, k, d)
        cache.sweep_temps([out, out / "oof"])      # temps of killed runs (never a live rank's)
        return _train_fold(cfg, g, index, k, d, out)


def _cached(out: Path, k: int, d: Dist) -> dict:
    summary = cache.read_json(out / "oof.json")
    n = summary.get("world_size", d.world)
    note = f"; trained with {n} process(es), this run has {d.world}" if n != d.world else ""
    if d.main:
        print(f"fold {k}: cached ({out}){note}", flush=True)
    return summary


def _train_fold(cfg: Config, g: Graph, index: pd.DataFrame, k: int, d: Dist, out: Path) -> dict:
    """:func:`train_fold`'s work, under the fold's lock."""
    f = build.context(cfg, index, k, d, out, g.train_key, g.prepared_dir)
    data = build.data(f, index, pseudo_set(g, k))
    parts = build.parts(f, data)
    plans = plan_epochs(cfg.train, (f.height, f.width), d.rank)
    progress = resume.load_last(out, f.key, parts.model, parts.step, device=f.device, precision=f.precision,
                                rank=d.rank, world=d.world, epochs=cfg.train.epochs, log=f.log, what=f.what)
    parts.step.guard.total = progress.nonfinite
    if d.main:
        cache.write_text(out / "config.yaml", yaml.safe_dump(parts.meta["config"], sort_keys=False))
    parts.step.net = wrap(parts.model, f.device, d)
    if cfg.train.compile:   # inductor; the first steps pay the compile time; checkpoints hold the bare model
        parts.step.net = torch.compile(parts.step.net)
    if progress.start == 0:
        build.log_start(f, data)
    if d.main:
        resume.rewrite_logs(out, progress, cfg.train.epochs, f.title)
    board = tboard.open_fold(cfg, out, d.main, progress.start)   # TensorBoard events (rank 0)
    for plan in plans[progress.start:]:
        run_epoch(f, data, parts, progress, plan, board)
    board.close()
    resume.load_best(parts.model, out, f.what)
    summary = oofmaps.write_oof(f, data, parts, progress, g.prepared_dir)
    barrier(d)
    return summary


def run_epoch(f: Fold, data: Data, parts: Parts, progress: resume.Progress, plan: EpochPlan, board) -> None:
    """Train one epoch as planned, score it when planned, record the metrics row, save (rank 0), log."""
    t, d = f.cfg.train, f.d
    t0 = time.perf_counter()
    parts.step.guard.where = f"fold {f.k} epoch {plan.epoch + 1}"
    data.sampler.set_epoch(plan.epoch)
    inputs = Inputs(f.device, t.channels_last, parts.stats, plan.shape, plan.crop_rng(), data.target_max)
    tr = step.train_epoch(parts.step, data.train_dl, parts.losses[plan.loss], inputs, max_updates=t.max_train_steps,
                          ema_step=plan.epoch * data.steps_per_epoch,
                          desc=f"fold {f.k} epoch {plan.epoch + 1}/{t.epochs}" if d.main else None)
    loss_sum, scored, seen_img, seconds = all_sum(
        [tr.loss * tr.scored if tr.scored else 0.0, tr.scored, tr.images, tr.seconds], d, f.device)
    val_loss, val_dice, ema_dice = scoring.score_epoch(f, data, parts, plan)
    row = {"epoch": plan.epoch + 1, "lr": tr.lr, "train_loss": loss_sum / scored if scored else float("nan"),
           "val_loss": val_loss, "val_dice": val_dice, "val_dice_ema": ema_dice, "size": str(plan.shape),
           "seconds": time.perf_counter() - t0, "images_per_s": seen_img / max(seconds / d.world, 1e-9),
           "nonfinite": tr.nonfinite, "best": False}
    use_ema = ema_dice > val_dice      # False without EMA (NaN compares False)
    score = ema_dice if use_ema else val_dice
    if score > progress.best:          # NaN (an epoch not scored) is never best
        progress.best, row["best"] = score, True
    progress.history.append(row)
    progress.nonfinite = parts.step.guard.total
    rngs = gather(rng_state(f.device), d)
    if d.main:
        resume.save_epoch(f.out, parts.meta, parts.model.state_dict(), parts.step, rngs, plan.epoch, progress,
                          f.title, best_is_ema=use_ema)
        board.epoch(row, parts.model if plan.scored else None, data.val_dl.dataset, autocast=f.autocast,
                    device=f.device, channels_last=t.channels_last, stats=parts.stats)   # overlays every few
    barrier(d)
    _log_epoch(f, row, parts.step.ema is not None)


def _log_epoch(f: Fold, row: dict, ema: bool) -> None:
    f.log(f"fold {f.k} epoch {row['epoch']}/{f.cfg.train.epochs}: lr {row['lr']:.2e}  "
          f"train loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}  val Dice {row['val_dice']:.4f}"
          + (f"  EMA {row['val_dice_ema']:.4f}" if ema else "")
          + f"{' *' if row['best'] else ''}  {row['size']}  {row['seconds']:.1f}s  {row['images_per_s']:.1f} img/s"
          + (f"  non-finite {row['nonfinite']}" if row["nonfinite"] else ""))
