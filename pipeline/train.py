"""Train: one smp model per cross-validation fold, resumable, with out-of-fold predictions.

``run(cfg)`` trains ``cfg.train.fold`` (or every fold in turn when it is -1) from
the prepare artifact (``folds.csv`` + resized images, no JPEG decoding here).
Each fold writes under ``<cache>/train/<train_key>/fold<k>/`` (see docs/design.md):
``best.pt``, ``last.pt``, ``metrics.csv``, ``config.yaml``, ``curve.png``,
``oof/<id>.png``, ``oof/hist.npz``, ``oof.json`` and, last, ``manifest.json``.

- Key: the train parameters except fold/num_workers/device (they do not change
  results), the training data key (graph.train_data_key: train-side files and
  prepare parameters, not the test set) and CODE_VERSION. A changed config trains
  anew under a new key; a fold with a manifest is not trained again.
- Many processes: folds train in parallel (``make train FOLD=0`` and ``FOLD=1`` at once); a
  second process on the same fold waits for its lock, then reports it cached (pipeline.locks).
- :func:`train_fold` is the driver; its steps live where a newcomer would look:
  the loop, precision, accumulation and the non-finite guard in ``pipeline.loop``;
  the ``last.pt`` resume protocol and ``best.pt`` in ``pipeline.checkpoint``; DDP in
  ``pipeline.distributed``; device and precision in ``pipeline.precision``; the OOF
  histograms and threshold rule in ``pipeline.probmaps``.
- DDP: under ``torchrun --nproc_per_node N -m pipeline train ...`` (env
  WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel (gloo on CPU,
  nccl on CUDA), a DistributedSampler shards the training set, validation and
  OOF are sharded and reduced, and only rank 0 writes checkpoints, logs and
  ``oof/hist.npz`` (the ranks' histograms are gathered to it). Every rank writes
  the OOF PNGs of its own validation shard into the fold's ``oof/`` directory and
  every rank reads the prepare artifact and ``last.pt``/``best.pt``, so DDP
  over several nodes needs ``data.cache`` (and the data) on a filesystem that
  all nodes share; on one node this holds by itself.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from torch.utils.data import DistributedSampler

from . import cache, checkpoint, locks, runtime, tboard
from .config import Config, ConfigError, EpochShape, PipelineError, parse_progressive
from .graph import STAGES, Graph, params, recorded_hash
from .runtime import Runtime
from .data import SegDataset, SeededSampler, build_transform, cv2_single_thread, load_index, read_image
from .distributed import Dist, ShardSampler, all_sum, barrier, dist_close, dist_init, gather, sync_buffers, wrap
from .loop import (NonFiniteGuard, build_optimizer, build_scheduler, check_output_size, evaluate, make_loader,
                   predict_oof, train_one_epoch)
from .losses import BceDiceLoss, LovaszLoss
from .models import build_model, input_stats, model_kwargs
from .precision import autocast_factory
from .probmaps import DEFAULT_THRESHOLD, hist_dice

STAGE = "train"
CODE_VERSION = STAGES[STAGE].code


# ---------------------------------------------------------------------------- one fold

@dataclass
class Fold:
    """What the steps of one fold share (built by :func:`_setup`)."""
    cfg: Config
    k: int
    out: Path
    key: str
    d: Dist
    device: torch.device
    precision: str
    autocast: object              # zero-argument factory of autocast contexts
    height: int
    width: int

    @property
    def what(self) -> str:
        return f"fold {self.k}"

    def log(self, msg: str) -> None:
        if self.d.main:
            print(msg, flush=True)


@dataclass
class Data:
    train_df: pd.DataFrame
    val_df: pd.DataFrame
    sampler: SeededSampler
    train_dl: object
    val_dl: object
    steps_per_epoch: int


@dataclass
class Parts:
    """The model and everything that steps it; net is the DDP-wrapped model (or the model)."""
    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    loss_fn: torch.nn.Module
    guard: NonFiniteGuard
    stats: tuple
    meta: dict
    final_loss: torch.nn.Module          # the last train.loss_final_epochs epochs' loss (loss_fn without one)
    shapes: list[EpochShape]             # each epoch's training input (train.progressive)
    ema: object = None                   # timm ModelEmaV3 of the bare model (train.ema)


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


def _train_fold(cfg: Config, g: Graph, index: pd.DataFrame, k: int, d: Dist, out: Path) -> dict:
    """:func:`train_fold`'s work, under the fold's lock."""
    f = _setup(cfg, g, index, k, d, out)
    data = _data(f, index)
    parts = _build(f, data)
    progress = checkpoint.load_last(out, f.key, parts.model, parts.optimizer, parts.scheduler, parts.scaler,
                                    device=f.device, precision=f.precision, rank=d.rank, world=d.world,
                                    epochs=cfg.train.epochs, log=f.log, what=f.what, ema=parts.ema)
    parts.guard.total = progress.nonfinite
    if d.main:
        cache.write_text(out / "config.yaml", yaml.safe_dump(parts.meta["config"], sort_keys=False))
    parts.net = wrap(parts.model, f.device, d)
    if cfg.train.compile:   # inductor; the first steps pay the compile time; checkpoints hold the bare model
        parts.net = torch.compile(parts.net)
    if progress.start == 0:
        _log_start(f, data)
    if d.main:
        checkpoint.rewrite_logs(out, progress, cfg.train.epochs, _title(f))
    board = tboard.open_fold(cfg, out, d.main, progress.start)   # TensorBoard events (rank 0)
    for epoch in range(progress.start, cfg.train.epochs):
        _epoch(f, data, parts, progress, epoch, board)
    board.close()
    checkpoint.load_best(parts.model, out, f.what)
    summary = _oof(f, data, parts, progress, g.prepared_dir)
    barrier(d)
    return summary


def _cached(out: Path, k: int, d: Dist) -> dict:
    summary = cache.read_json(out / "oof.json")
    n = summary.get("world_size", d.world)
    note = f"; trained with {n} process(es), this run has {d.world}" if n != d.world else ""
    if d.main:
        print(f"fold {k}: cached ({out}){note}", flush=True)
    return summary


def _setup(cfg: Config, g: Graph, index: pd.DataFrame, k: int, d: Dist, out: Path) -> Fold:
    """Device, precision and the model size (from the first training image)."""
    device, precision = torch.device(d.device), d.precision     # the runtime context's
    first = index.loc[index["fold"] != k, "image"]
    if first.empty or (index["fold"] == k).sum() == 0:
        raise PipelineError(f"{g.prepared_dir / 'folds.csv'}: fold {k} leaves no training or no validation images")
    h, w = read_image(first.iloc[0]).shape[:2]
    return Fold(cfg, k, out, g.train_key, d, device, precision,
                autocast_factory(device, precision), h, w)


def _data(f: Fold, index: pd.DataFrame) -> Data:
    """The fold's split, datasets and loaders (training shuffled and sharded, validation sharded)."""
    t, k, d = f.cfg.train, f.k, f.d
    train_df = index[index["fold"] != k].reset_index(drop=True)
    val_df = index[index["fold"] == k].reset_index(drop=True)
    train_ds = SegDataset(train_df["image"], train_df["mask"], build_transform(t.augment))
    val_ds = SegDataset(val_df["image"], val_df["mask"], None)
    base = DistributedSampler(train_ds, num_replicas=d.world, rank=d.rank, shuffle=True, seed=t.seed + k)
    sampler = SeededSampler(base, seed=t.seed + k)
    # Full batches only (BatchNorm dislikes a tiny last batch), unless the set is smaller than one batch.
    train_dl = make_loader(train_ds, sampler, t.batch_size, t.num_workers, f.device,
                           drop_last=len(sampler) >= t.batch_size, seed=t.seed + k)
    val_dl = make_loader(val_ds, ShardSampler(len(val_ds), d.rank, d.world), t.batch_size, t.num_workers,
                         f.device, drop_last=False, seed=t.seed + k)
    steps_per_epoch = math.ceil(len(train_dl) / t.accum_steps)
    if t.max_train_steps > 0:
        steps_per_epoch = min(steps_per_epoch, t.max_train_steps)
    return Data(train_df, val_df, sampler, train_dl, val_dl, steps_per_epoch)


def _build(f: Fold, data: Data) -> Parts:
    """Seed, then the model (output size checked), optimizer, schedule, scaler, loss and guard."""
    t, k, d = f.cfg.train, f.k, f.d
    checkpoint.seed_everything(t.seed + 1000 * k + d.rank)
    kwargs = model_kwargs(t.encoder_depth, t.decoder_channels, t.input_scale)
    model = build_model(t.arch, t.encoder, t.encoder_weights, **kwargs).to(f.device)
    check_output_size(model, f.height, f.width, f.device, f"{t.arch}/{t.encoder} with {kwargs}")
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, t.lr, t.weight_decay)
    spe = data.steps_per_epoch
    scheduler = build_scheduler(optimizer, t.scheduler, spe * t.epochs, spe, t.warmup_epochs, t.min_lr_ratio)
    scaler = torch.amp.GradScaler(f.device.type, enabled=f.precision == "fp16")
    stats = input_stats(t.encoder, t.encoder_weights)   # predict normalises as training did
    fold_cfg = dataclasses.replace(f.cfg, train=dataclasses.replace(t, fold=k)).to_dict()
    meta = {"arch": t.arch, "encoder": t.encoder, "model_kwargs": kwargs, "height": f.height, "width": f.width,
            "input_stats": stats, "config": fold_cfg, "train_key": f.key, "fold": k, "code_version": CODE_VERSION,
            "world_size": d.world, "precision": f.precision, "device_type": f.device.type}
    loss_fn = BceDiceLoss(t.bce_weight, t.dice_weight, t.boundary_weight)
    ema = None
    if t.ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=t.ema_decay, use_warmup=True)   # warmed up: short runs average too
    return Parts(model, model, optimizer, scheduler, scaler, loss_fn, NonFiniteGuard(t.max_nonfinite, d, f.device),
                 stats, meta, LovaszLoss() if t.loss_final == "lovasz" else loss_fn,
                 parse_progressive(t.progressive, t.epochs, (f.height, f.width)), ema)


def _log_start(f: Fold, data: Data) -> None:
    t, d = f.cfg.train, f.d
    n_img = min(len(data.train_dl), data.steps_per_epoch * t.accum_steps) * t.batch_size * d.world
    f.log(f"fold {f.k}: {len(data.train_df)} train / {len(data.val_df)} val images at {f.height}x{f.width}, "
          f"{t.arch}/{t.encoder}, {f.precision}{' channels_last' if t.channels_last else ''}, {d.world} process(es), "
          f"{data.steps_per_epoch} updates/epoch of {t.batch_size}x{t.accum_steps}x{d.world} "
          f"({n_img} images/epoch) -> {f.out}")


def _title(f: Fold) -> str:
    return f"fold {f.k} {f.cfg.train.arch}/{f.cfg.train.encoder} [{f.key}]"


def _crop_seed(seed: int, epoch: int, rank: int) -> int:
    """The crop offsets' seed of one epoch on one rank: fixed by (seed, epoch, rank), so a
    resumed epoch draws the windows an uninterrupted run would have."""
    return (seed * 1_000_003 + epoch) * 1_009 + rank


def _epoch(f: Fold, data: Data, parts: Parts, progress: checkpoint.Progress, epoch: int, board) -> None:
    """Train one epoch, validate (every ``train.val_every`` epochs and the last), record the
    metrics row, save (rank 0) and log."""
    t, d, device = f.cfg.train, f.d, f.device
    t0 = time.perf_counter()
    parts.guard.where = f"fold {f.k} epoch {epoch + 1}"
    data.sampler.set_epoch(epoch)
    final = bool(t.loss_final) and epoch >= t.epochs - t.loss_final_epochs
    shape = parts.shapes[epoch]
    tr = train_one_epoch(parts.net, data.train_dl, parts.final_loss if final else parts.loss_fn, parts.optimizer,
                         parts.scheduler, parts.scaler, autocast=f.autocast, device=device,
                         accum_steps=t.accum_steps, grad_clip=t.grad_clip, channels_last=t.channels_last,
                         guard=parts.guard, max_steps=t.max_train_steps, epoch=epoch, progress=d.main,
                         desc=f"fold {f.k} epoch {epoch + 1}/{t.epochs}", stats=parts.stats,
                         size=(shape.h, shape.w),
                         crop_seed=_crop_seed(t.seed, epoch, d.rank) if shape.crop else None,
                         ema=parts.ema, ema_step=epoch * data.steps_per_epoch)
    loss_sum, scored, seen_img, seconds = all_sum(
        [tr["loss"] * tr["scored"] if tr["scored"] else 0.0, tr["scored"], tr["images"], tr["seconds"]], d, device)
    validate = (epoch + 1) % t.val_every == 0 or epoch + 1 == t.epochs
    v_loss, v_dice, v_n, ema_dice = float("nan"), float("nan"), 1.0, float("nan")
    if validate:
        # The bare model: ranks hold different numbers of validation batches, and DDP's forward
        # would expect matching collectives.
        sync_buffers(parts.model, d)
        ev = evaluate(parts.model, data.val_dl, parts.loss_fn, autocast=f.autocast, device=device,
                      channels_last=t.channels_last, stats=parts.stats)
        v_loss, v_dice, v_n = all_sum([ev["loss_sum"], ev["dice_sum"], ev["n"]], d, device)
        ema_dice = _score_ema(f, data, parts)
    row = {"epoch": epoch + 1, "lr": tr["lr"], "train_loss": loss_sum / scored if scored else float("nan"),
           "val_loss": v_loss / v_n, "val_dice": v_dice / v_n, "val_dice_ema": ema_dice,
           "size": str(shape), "seconds": time.perf_counter() - t0,
           "images_per_s": seen_img / max(seconds / d.world, 1e-9), "nonfinite": tr["nonfinite"], "best": False}
    use_ema = ema_dice > row["val_dice"]      # False without EMA (NaN compares False)
    score = ema_dice if use_ema else row["val_dice"]
    if score > progress.best:      # NaN (an epoch not validated) is never best
        progress.best, row["best"] = score, True
    progress.history.append(row)
    progress.nonfinite = parts.guard.total
    rngs = gather(checkpoint.rng_state(device), d)
    if d.main:
        checkpoint.save_epoch(f.out, parts.meta, parts.model.state_dict(), parts.optimizer, parts.scheduler,
                              parts.scaler, rngs, epoch, progress, _title(f),
                              ema_state=parts.ema.module.state_dict() if parts.ema is not None else None,
                              best_is_ema=use_ema)
        board.epoch(row, parts.model if validate else None, data.val_dl.dataset, autocast=f.autocast, device=device,
                    channels_last=t.channels_last, stats=parts.stats)   # scalars every epoch, overlays every few
    barrier(d)
    f.log(f"fold {f.k} epoch {epoch + 1}/{t.epochs}: lr {row['lr']:.2e}  train loss {row['train_loss']:.4f}  "
          f"val loss {row['val_loss']:.4f}  val Dice {row['val_dice']:.4f}"
          + (f"  EMA {ema_dice:.4f}" if parts.ema is not None else "")
          + f"{' *' if row['best'] else ''}  {row['size']}  {row['seconds']:.1f}s  {row['images_per_s']:.1f} img/s"
          + (f"  non-finite {row['nonfinite']}" if row["nonfinite"] else ""))


def _score_ema(f: Fold, data: Data, parts: Parts) -> float:
    """Validation Dice of the EMA weights (NaN without train.ema), scored like the raw ones."""
    if parts.ema is None:
        return float("nan")
    sync_buffers(parts.ema.module, f.d)
    ev = evaluate(parts.ema.module, data.val_dl, parts.loss_fn, autocast=f.autocast, device=f.device,
                  channels_last=f.cfg.train.channels_last, stats=parts.stats)
    dice_sum, n = all_sum([ev["dice_sum"], ev["n"]], f.d, f.device)
    return dice_sum / n


def _oof(f: Fold, data: Data, parts: Parts, progress: checkpoint.Progress, prepared: Path) -> dict:
    """Out-of-fold: the best checkpoint on this fold's validation images; rank 0 writes
    oof/hist.npz, oof.json and, last, the manifest. Returns the summary ({} on other ranks)."""
    t, k, d, out = f.cfg.train, f.k, f.d, f.out
    results = predict_oof(parts.model, data.val_df, data.val_dl, out / "oof", autocast=f.autocast, device=f.device,
                          channels_last=t.channels_last, stats=parts.stats)
    results = [r for part in gather(results, d) for r in part]
    if not d.main:
        return {}
    results.sort(key=lambda r: r[0])
    ids = [r[0] for r in results]
    pos, all_ = np.stack([r[2] for r in results]), np.stack([r[3] for r in results])
    with cache.atomic_path(out / "oof" / "hist.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, ids=np.array(ids), pos=pos.astype(np.int64), all=all_.astype(np.int64))
    dice_orig = hist_dice(pos, all_, [DEFAULT_THRESHOLD])[:, 0]
    summary = {"fold": k, "images": len(ids), "dice_model": float(np.mean([r[1] for r in results])),
               "dice_original": float(dice_orig.mean()), "threshold": DEFAULT_THRESHOLD,
               "best_epoch_val_dice": progress.best, "epochs": t.epochs, "nonfinite": parts.guard.total,
               "height": f.height, "width": f.width, "world_size": d.world, "precision": f.precision}
    cache.write_json(out / "oof.json", summary)
    # predict reads best.pt's hash from here while the file is unchanged (recorded, not recomputed)
    cache.write_manifest(out, stage=STAGE, key=f.key, params=params(f.cfg, STAGE),
                         inputs={"prepare": str(prepared), "fold": k},
                         outputs={"best": "best.pt", "last": "last.pt", "metrics": "metrics.csv",
                                  "curve": "curve.png", "oof": "oof/", "oof_summary": "oof.json"},
                         config=parts.meta["config"],
                         extra={"fold": k, "oof": summary, "hashes": {"best.pt": recorded_hash(out / "best.pt")}})
    f.log(f"fold {k}: OOF Dice {summary['dice_model']:.4f} at {f.height}x{f.width}, {summary['dice_original']:.4f} "
          f"at original size ({len(ids)} images) -> {out}")
    return summary


# ---------------------------------------------------------------------------- the stage

def check_config(cfg: Config) -> None:
    """Fail fast, before any data is read: the names only the model and augmentation libraries
    know (config.load has checked the ranges)."""
    from .data import parse_augment
    from .models import check_names
    t = cfg.train
    check_names(t.arch, t.encoder)
    parse_augment(t.augment)
    model_kwargs(t.encoder_depth, t.decoder_channels, t.input_scale)


def run(cfg: Config, graph: Graph | None = None, rt: Runtime | None = None) -> list[dict]:
    """Train the configured fold(s) of the prepare artifact ``graph`` resolves."""
    check_config(cfg)
    g = graph or Graph(cfg)
    prepared = g.prepared_dir
    index = load_index(prepared)
    folds = sorted(index["fold"].unique().tolist())
    if cfg.train.fold >= 0 and cfg.train.fold not in folds:
        raise ConfigError(f"train.fold={cfg.train.fold}: {prepared / 'folds.csv'} has folds {folds}")
    todo = folds if cfg.train.fold < 0 else [cfg.train.fold]
    d = dist_init(rt or runtime.resolve(cfg, STAGE))
    try:
        with cv2_single_thread():
            return [train_fold(cfg, g, index, k, d) for k in todo]
    finally:
        dist_close(d)
