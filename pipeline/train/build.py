"""What one fold trains with: its context (:func:`context`), data and loaders (:func:`data`), and the
model with the parts that step it (:func:`parts`)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..config import Config

from ..errors import ConfigError, PipelineError
from ..augment import build_transform
from ..data import Joined, PseudoImages, SegDataset, SeededSampler, read_image
from ..distributed import Dist, ShardSampler
from ..graph import STAGES
from ..losses import FINAL_LOSSES, BceDiceLoss
from ..arch import model_kwargs
from ..models import build_model, input_stats
from ..precision import autocast_factory
from .optim import build_optimizer, build_scheduler
from .plan import BASE_LOSS
from .rng import seed_everything
from ..pseudo import SCALE, PseudoSet
from .step import NonFiniteGuard, Stepper

CODE_VERSION = STAGES["train"].code


@dataclass
class Fold:
    """Fold ``k`` of one run: where it writes (``out``), its key, processes, device and model size."""
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

    @property
    def title(self) -> str:
        return f"fold {self.k} {self.cfg.train.arch}/{self.cfg.train.encoder} [{self.key}]"

    def log(self, msg: str) -> None:
        if self.d.main:
            print(msg, flush=True)


@dataclass
class Data:
    train_df: pd.DataFrame
    val_df: pd.DataFrame
    sampler: SeededSampler
    train_dl: DataLoader
    val_dl: DataLoader
    steps_per_epoch: int          # optimizer updates per epoch
    pseudo: PseudoSet | None = None   # the test images trained on beside train_df (train.pseudo)

    @property
    def target_max(self) -> int:
        """The training targets' value of p = 1: pseudo.SCALE beside soft targets, else 1."""
        return SCALE if self.pseudo is not None else 1


@dataclass
class Parts:
    """The bare model and what trains it (``step.net`` is the model as trained: DDP, compiled)."""
    model: torch.nn.Module
    step: Stepper
    losses: dict                  # plan.loss name -> loss module; BASE_LOSS also scores validation
    stats: tuple                  # the encoder's input (mean, std)
    meta: dict                    # what best.pt / last.pt record beside the weights


def context(cfg: Config, index: pd.DataFrame, k: int, d: Dist, out: Path, key: str, prepared: Path) -> Fold:
    """Device and precision (the runtime's) and the model size (from the first training image)."""
    device, precision = torch.device(d.device), d.precision
    first = index.loc[index["fold"] != k, "image"]
    if first.empty or (index["fold"] == k).sum() == 0:
        raise PipelineError(f"{prepared / 'folds.csv'}: fold {k} leaves no training or no validation images")
    h, w = read_image(first.iloc[0]).shape[:2]
    return Fold(cfg, k, out, key, d, device, precision, autocast_factory(device, precision), h, w)


def make_loader(ds, sampler, batch_size: int, num_workers: int, device: torch.device, drop_last: bool,
                seed: int) -> DataLoader:
    # Its own generator: the loader's base-seed draw must not consume the global torch RNG
    # (dropout/drop-path use it), or a resumed run would diverge from an uninterrupted one.
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=device.type == "cuda", drop_last=drop_last,
                      persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))


def data(f: Fold, index: pd.DataFrame, pseudo: PseudoSet | None = None) -> Data:
    """The fold's split, datasets and loaders (training shuffled and sharded, validation sharded).
    ``pseudo``: test images with soft targets, trained on after the labelled ones (whose masks
    are then scaled to the maps' 0..255)."""
    t, k, d = f.cfg.train, f.k, f.d
    train_df = index[index["fold"] != k].reset_index(drop=True)
    val_df = index[index["fold"] == k].reset_index(drop=True)
    transform = build_transform(f.cfg.spec("train.augment"))
    if pseudo is None:
        train_ds = SegDataset(train_df["image"], train_df["mask"], transform)
    else:
        train_ds = Joined(SegDataset(train_df["image"], train_df["mask"], transform, mask_scale=SCALE),
                          PseudoImages(pseudo.frame, f.height, f.width, transform))
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
    return Data(train_df, val_df, sampler, train_dl, val_dl, steps_per_epoch, pseudo)


def parts(f: Fold, data: Data) -> Parts:
    """Seed, then the model (output size checked), optimizer, schedule, scaler, losses and EMA."""
    t, k, d = f.cfg.train, f.k, f.d
    seed_everything(t.seed + 1000 * k + d.rank)
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
    confidence = t.pseudo_confidence if t.pseudo else 0.0
    losses = {BASE_LOSS: BceDiceLoss(t.bce_weight, t.dice_weight, t.boundary_weight, confidence)}
    if t.loss_final:
        losses[t.loss_final] = FINAL_LOSSES[t.loss_final]()
    ema = None
    if t.ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=t.ema_decay, use_warmup=True)   # warmed up: short runs average too
    step = Stepper(model, optimizer, scheduler, scaler, NonFiniteGuard(t.max_nonfinite, d), f.autocast, f.device,
                   t.accum_steps, t.grad_clip, ema)
    return Parts(model, step, losses, stats, meta)


@torch.no_grad()
def check_output_size(model: torch.nn.Module, h: int, w: int, device: torch.device, what: str = "model") -> None:
    """One forward of a blank (1, 3, h, w) image: the logits must be (1, 1, h, w).

    Some smp architectures ignore encoder_depth in their upsampling (FPN with
    encoder_depth=3 returns 4x the input size); fail before training, not at the loss.
    """
    was = model.training
    model.eval()
    y = model(torch.zeros(1, 3, h, w, device=device))
    model.train(was)
    if tuple(y.shape) != (1, 1, h, w):
        raise ConfigError(f"{what}: output {tuple(y.shape)} for a (1, 3, {h}, {w}) input; this "
                          "architecture does not support these options (try encoder_depth=5)")


def log_start(f: Fold, data: Data) -> None:
    t, d = f.cfg.train, f.d
    n_img = min(len(data.train_dl), data.steps_per_epoch * t.accum_steps) * t.batch_size * d.world
    extra = f" + {len(data.pseudo.frame)} pseudo-labelled test images ({data.pseudo.maps_dir})" if data.pseudo else ""
    f.log(f"fold {f.k}: {len(data.train_df)} train{extra} / {len(data.val_df)} val images at {f.height}x{f.width}, "
          f"{t.arch}/{t.encoder}, {f.precision}{' channels_last' if t.channels_last else ''}, {d.world} process(es), "
          f"{data.steps_per_epoch} updates/epoch of {t.batch_size}x{t.accum_steps}x{d.world} "
          f"({n_img} images/epoch) -> {f.out}")
