"""The training loop: optimizer, schedule, the non-finite guard, one epoch, evaluation, OOF maps.

- Precision: one code path. ``autocast`` is a factory built once from (device,
  precision) by ``precision.autocast_factory``: fp16 + GradScaler on CUDA (unscaled
  before clipping), bf16 on a CPU with native bf16, else fp32.
- Accumulation: ``need_update`` marks the last micro-batch of a group, including
  a final partial group; each loss is divided by its group's actual size.
- Non-finite values: a non-finite loss drops its group's update; without a
  GradScaler (bf16, fp32) so does a non-finite total gradient norm with a
  finite loss (optimizer.step would write NaN into the weights). Both are
  counted (``nonfinite``), and ``max_nonfinite`` of them with no update between
  stop the fold with an error. With fp16 the GradScaler skips inf/NaN
  gradients itself (routine while its scale calibrates): not counted as
  non-finite, nor as updates.
- DDP: the caller passes the wrapped model to :func:`train_one_epoch` and the bare
  one to :func:`evaluate` / :func:`predict_oof`, whose loaders are sharded
  (``pipeline.distributed``).
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import cache
from .config import SCHEDULERS, ConfigError, PipelineError
from .data import read_mask, to_device
from .distributed import Dist, all_finite, is_ddp, unwrap
from .geometry import row_geometry, to_original
from .losses import dice_per_image
from .models import IMAGENET_STATS
from .probmaps import DEFAULT_THRESHOLD, hist_dice, prob_hist

# Fault injection for the kill -9 resume test: "EPOCH:STEP" (0-based) sends SIGKILL to this process.
KILL_ENV = "PIPELINE_TRAIN_KILL_AT"


# ---------------------------------------------------------------------------- optimizer and schedule

def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; biases and norm weights (1-d tensors) get no weight decay."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int, steps_per_epoch: int,
                    warmup_epochs: float, min_lr_ratio: float):
    """Stepped once per optimizer update. cosine: linear warmup then cosine to lr*min_lr_ratio.

    onecycle: torch's OneCycleLR peaking at lr after warmup_epochs (30% of the run when 0).
    """
    total_steps = max(1, total_steps)
    warmup = min(total_steps - 1, round(warmup_epochs * steps_per_epoch))
    if name == "none":
        return None
    if name == "cosine":
        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if name == "onecycle":
        pct = warmup / total_steps if warmup > 0 else 0.3
        max_lr = [g["lr"] for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps,
                                                   pct_start=min(max(pct, 0.01), 0.99))
    raise ConfigError(f"train.scheduler='{name}': choose one of {', '.join(SCHEDULERS)}")


class NonFiniteGuard:
    """Counts dropped updates: non-finite losses and non-finite gradients (agreed across ranks).

    ``limit`` of them with no successful update between (``updated``) stop the fold.
    """

    WHAT = {"loss": "loss was non-finite", "gradient": "gradients were non-finite (with a finite loss)"}

    def __init__(self, limit: int, d: Dist, device: torch.device):
        self.limit, self.d, self.device = max(1, limit), d, device
        self.total = 0
        self.in_a_row = 0
        self.where = ""

    def ok(self, loss: torch.Tensor) -> bool:
        """loss: a scalar tensor. False (and counted) when it is not finite on some rank."""
        return self._check(torch.isfinite(loss.detach()).all(), "loss")

    def grads_ok(self, total_norm: torch.Tensor) -> bool:
        """total_norm: the scalar gradient norm. False (and counted) when it is not finite."""
        return self._check(torch.isfinite(total_norm.detach()).all(), "gradient")

    def updated(self) -> None:
        """An optimizer step was applied: the run of dropped updates is over."""
        self.in_a_row = 0

    def _check(self, finite: torch.Tensor, what: str) -> bool:
        # Agreed across ranks: every rank must skip together, or DDP's gradient all-reduce hangs.
        if all_finite(finite, self.d):
            return True
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise PipelineError(f"{self.where}: {self.WHAT[what]} for {self.in_a_row} batches in a row "
                                f"({self.total} in all); lower train.lr, use train.precision=fp32, "
                                f"or check the data")
        return False


def optimizer_update(model: torch.nn.Module, optimizer, scaler, grad_clip: float, guard: NonFiniteGuard) -> bool:
    """Clip and apply the accumulated gradients. Returns True when the optimizer stepped.

    With an enabled GradScaler (fp16) the scaler finds inf/NaN gradients itself, skips the
    step and lowers its scale (routine while the scale calibrates): neither applied nor
    counted as non-finite. Without one (bf16, fp32) nothing else would catch them: a finite
    loss can still give inf/NaN gradients, clip_grad_norm_ then returns NaN and
    optimizer.step() writes NaN into every weight. So the total gradient norm (the one
    clipping uses; computed even when grad_clip is 0) is checked, and a non-finite one
    drops the step and is counted by ``guard`` like a non-finite loss. Under DDP the
    gradients, hence the norm, are the all-reduced ones, the same on every rank.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if scaler.is_enabled():
        if grad_clip > 0:
            scaler.unscale_(optimizer)     # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        return scaler.get_scale() >= scale     # a skipped step (inf/NaN found) lowers the scale
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if not guard.grads_ok(norm):
        return False
    if grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
    optimizer.step()
    return True


def _kill_point() -> tuple[int, int] | None:
    spec = os.environ.get(KILL_ENV, "")
    if not spec:
        return None
    e, s = spec.split(":")
    return int(e), int(s)


# ---------------------------------------------------------------------------- one epoch, evaluation

def make_loader(ds, sampler, batch_size: int, num_workers: int, device: torch.device, drop_last: bool, seed: int):
    # Its own generator: the loader's base-seed draw must not consume the global torch RNG
    # (dropout/drop-path use it), or a resumed run would diverge from an uninterrupted one.
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=device.type == "cuda", drop_last=drop_last,
                      persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))


def resize_batch(x: torch.Tensor, y: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (N, 3, H, W) normalised float, y: (N, 1, H, W) {0, 1} -> the same at ``hw``.

    Images: antialiased bilinear (what INTER_AREA does when shrinking); masks: area mean
    thresholded at 0.5, so the edge lands where the image's edge does (as prepare resizes).
    """
    x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)
    y = (F.interpolate(y, size=hw, mode="area") >= 0.5).to(y.dtype)
    return x.contiguous(memory_format=torch.channels_last), y


def crop_offsets(n: int, full: int, size: int, generator: torch.Generator) -> list[int]:
    """``n`` window starts in [0, full - size]: the window's centre uniform over the whole side,
    the window then moved inside the image.

    Uniform starts would show the image's borders almost never (row 0 only when the start is 0:
    1 in 225 windows of 288 in 512), and a model trained so paints the studio floor in a corner
    it has not seen; here every start at a border has probability size / (2 * full).
    """
    centres = torch.randint(0, full, (n,), generator=generator)
    return (centres - size // 2).clamp(0, full - size).tolist()


def crop_batch(x: torch.Tensor, y: torch.Tensor, hw: tuple[int, int],
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (N, 3, H, W), y: (N, 1, H, W) -> (N, 3, h, w), (N, 1, h, w): one random crop per image
    (:func:`crop_offsets`, drawn from ``generator`` on the CPU), the same window in image and mask."""
    (h, w), (H, W) = hw, x.shape[-2:]
    tops = crop_offsets(x.shape[0], H, h, generator)
    lefts = crop_offsets(x.shape[0], W, w, generator)
    xs = torch.stack([x[i, :, t:t + h, l:l + w] for i, (t, l) in enumerate(zip(tops, lefts))])
    ys = torch.stack([y[i, :, t:t + h, l:l + w] for i, (t, l) in enumerate(zip(tops, lefts))])
    return xs.contiguous(memory_format=torch.channels_last), ys


def _inputs(batch, device: torch.device, channels_last: bool, stats: tuple, size,
            crop_rng: torch.Generator | None) -> tuple:
    """A loader batch -> (x, y) on ``device`` at ``size`` when given: random crops of that size
    when ``crop_rng`` is given, else resized (progressive resizing)."""
    x, y = to_device(batch[0], batch[1], device, channels_last, stats)
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        x, y = crop_batch(x, y, size, crop_rng) if crop_rng is not None else resize_batch(x, y, size)
    return x, y


def train_one_epoch(model: torch.nn.Module, loader, loss_fn, optimizer, scheduler, scaler, *,
                    autocast, device: torch.device, accum_steps: int = 1, grad_clip: float = 0.0,
                    channels_last: bool = True, guard: NonFiniteGuard, max_steps: int = 0,
                    epoch: int = 0, progress: bool = False, desc: str = "", stats: tuple = IMAGENET_STATS,
                    size: tuple[int, int] | None = None, crop_seed: int | None = None, ema=None,
                    ema_step: int = 0) -> dict:
    """One pass over ``loader`` (batches of (images (N,H,W,3) uint8, masks (N,H,W) uint8, ...)).

    Optimizer updates every ``accum_steps`` micro-batches and after the last one;
    ``max_steps`` > 0 caps the number of updates. ``size``: train at this (H, W) instead
    (progressive resizing, :func:`resize_batch`), or on random crops of that size when
    ``crop_seed`` is given (:func:`crop_batch`, windows from a generator with that seed);
    ``ema``: a timm ModelEmaV3 of the bare model, updated after every applied update (its step: ``ema_step`` + updates so far). Returns
    {loss (mean over the images whose loss was finite), images, seconds, updates (steps applied),
    nonfinite (updates dropped for a non-finite loss or gradient), lr (of the last applied update)}.
    """
    model.train()
    n = len(loader)
    if max_steps > 0:
        n = min(n, max_steps * accum_steps)
    full = (n // accum_steps) * accum_steps   # micro-batches in complete groups
    ddp = is_ddp(model)
    kill = _kill_point()
    crop_rng = None if crop_seed is None else torch.Generator().manual_seed(crop_seed)
    loss_sum, images, seen, updates, nonfinite0 = 0.0, 0, 0, 0, guard.total
    lr = optimizer.param_groups[0]["lr"]
    group_bad = False
    optimizer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    bar = tqdm(total=n, desc=desc, unit="batch", leave=False, disable=not progress, mininterval=1.0)
    for i, batch in enumerate(loader):
        if i >= n:
            break
        if kill is not None and kill == (epoch, i):
            os.kill(os.getpid(), signal.SIGKILL)
        need_update = (i + 1) % accum_steps == 0 or i + 1 == n
        group = accum_steps if i < full else n - full
        images += batch[0].shape[0]
        if not group_bad:   # a group with a non-finite loss is dropped whole: no more work on it
            x, y = _inputs(batch, device, channels_last, stats, size, crop_rng)
            value = _backward(model, x, y, loss_fn, autocast, scaler, guard, group, ddp and not need_update)
            group_bad = value is None
            if not group_bad:
                loss_sum, seen = loss_sum + value * x.shape[0], seen + x.shape[0]
        if need_update:
            used = _end_group(model, optimizer, scheduler, scaler, grad_clip, guard, apply=not group_bad,
                              ema=ema, ema_step=ema_step + updates + 1)
            if used is not None:
                lr, updates = used, updates + 1
            group_bad = False
        bar.update(1)
        if progress and (i % 5 == 4 or i + 1 == n):
            el = time.perf_counter() - t0
            bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.4f}", img_s=f"{images / max(el, 1e-9):.1f}",
                            refresh=False)
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"loss": loss_sum / seen if seen else float("nan"), "images": images, "scored": seen, "lr": lr,
            "seconds": time.perf_counter() - t0, "updates": updates, "nonfinite": guard.total - nonfinite0}


def _backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, autocast, scaler,
              guard: NonFiniteGuard, group: int, no_sync: bool) -> float | None:
    """Forward, loss and backward (scaled by 1/group) of one micro-batch; returns its loss, or
    None when the loss is not finite on some rank (then nothing is backpropagated). ``no_sync``:
    micro-batches before the update only accumulate locally; DDP all-reduces on the last."""
    with model.no_sync() if no_sync else contextlib.nullcontext():
        with autocast():
            logits = model(x)
        loss = loss_fn(logits, y)
        if not guard.ok(loss):
            return None
        scaler.scale(loss / group).backward()
        return loss.item()


def _end_group(model: torch.nn.Module, optimizer, scheduler, scaler, grad_clip: float, guard: NonFiniteGuard,
               apply: bool, ema=None, ema_step: int = 0) -> float | None:
    """Close an accumulation group: its update unless ``apply`` is False (a non-finite loss),
    the EMA's update after an applied one, then the schedule's step. Returns the learning rate
    the update used, or None when no update was applied."""
    lr = None
    if apply and optimizer_update(model, optimizer, scaler, grad_clip, guard):
        lr = optimizer.param_groups[0]["lr"]     # the rate this update used (the scheduler steps below)
        guard.updated()
        if ema is not None:
            ema.update(unwrap(model), step=ema_step)
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:   # the schedule advances even over a skipped step
        with warnings.catch_warnings():   # ...which torch warns about; intended here
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            scheduler.step()
    return lr


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, loss_fn, *, autocast, device: torch.device,
             channels_last: bool = True, stats: tuple = IMAGENET_STATS) -> dict:
    """Validation sums over this rank's shard: {loss_sum, dice_sum, n} (per-image Dice at p > 0.5)."""
    model.eval()
    loss_sum, dice_sum, n = 0.0, 0.0, 0
    for images, masks, _ in loader:
        x, y = to_device(images, masks, device, channels_last, stats)
        with autocast():
            logits = model(x)
        loss_sum += loss_fn(logits, y).item() * x.shape[0]
        dice_sum += dice_per_image(logits.float(), y).sum().item()
        n += x.shape[0]
    return {"loss_sum": loss_sum, "dice_sum": dice_sum, "n": n}


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


# ---------------------------------------------------------------------------- out-of-fold maps

def oof_one(q: np.ndarray, mask_small: np.ndarray, row: dict, out_png: Path) -> tuple:
    """Write one OOF map and score it. q: (h, w) uint8 = round(255 p) at model size.

    The original-size map is made exactly as submit makes it from one fold's map (uint8
    scale float32, ``geometry.to_original``), so the histograms give submit's Dice.
    """
    ok, buf = cv2.imencode(".png", q)
    if not ok:
        raise PipelineError(f"PNG encoding failed for {out_png}")
    cache.write_bytes(out_png, buf.tobytes())
    qf = q.astype(np.float32)
    dice_model = float(hist_dice(*prob_hist(qf, mask_small), [DEFAULT_THRESHOLD])[0, 0])
    full = read_mask(row["mask_full"])
    oh, ow = int(row["orig_height"]), int(row["orig_width"])
    if full.shape != (oh, ow):
        raise PipelineError(f"{row['mask_full']}: mask is {full.shape[1]}x{full.shape[0]} but the index says "
                            f"{ow}x{oh}")
    pos, all_ = prob_hist(to_original(qf, (oh, ow), row_geometry(row, *q.shape[:2])), full)
    return row["id"], dice_model, pos, all_


@torch.no_grad()
def predict_oof(model: torch.nn.Module, val: pd.DataFrame, loader, out_dir: Path, *, autocast,
                device: torch.device, channels_last: bool = True, stats: tuple = IMAGENET_STATS) -> list[tuple]:
    """Predict this rank's validation shard; write ``out_dir/<id>.png``; score at both sizes.

    Returns [(id, dice at model size, pos hist, all hist at original size)] (see prob_hist).
    """
    model.eval()
    rows = val.to_dict("records")
    out, pending = [], []
    with ThreadPoolExecutor(max_workers=2) as pool:   # PNG I/O and full-size resizes overlap the model
        for images, masks, idx in loader:
            x, _ = to_device(images, None, device, channels_last, stats)
            with autocast():
                logits = model(x)
            q = (torch.sigmoid(logits.float())[:, 0] * 255).round_().to(torch.uint8).cpu().numpy()
            for j, i in enumerate(idx.tolist()):
                r = rows[i]
                pending.append(pool.submit(oof_one, q[j], masks[j].numpy(), r, out_dir / f"{r['id']}.png"))
            while len(pending) > 64:
                out.append(pending.pop(0).result())
        out += [f.result() for f in pending]
    return out
