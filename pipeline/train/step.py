"""The training step: forward, loss, backward and the optimizer update, over one epoch's batches.

:func:`train_epoch` reads top to bottom as one epoch of steps; :func:`apply_update` is the
update it calls at the end of each accumulation group.

- Precision: one code path. ``Stepper.autocast`` is a factory built once from (device,
  precision) by ``precision.autocast_factory``: fp16 + GradScaler on CUDA (unscaled
  before clipping), bf16 on a CPU with native bf16, else fp32.
- Accumulation: micro-batches are taken in groups of ``accum_steps``, the last group of an
  epoch possibly shorter; each loss is divided by its own group's size, and the update
  follows the group's last micro-batch.
- Non-finite values: a non-finite loss drops its group's update; without a GradScaler
  (bf16, fp32) so does a non-finite total gradient norm with a finite loss (optimizer.step
  would write NaN into the weights). Both are counted (:class:`NonFiniteGuard`), and
  ``max_nonfinite`` of them with no update between stop the fold with an error. With fp16
  the GradScaler skips inf/NaN gradients itself (routine while its scale calibrates): not
  counted as non-finite, nor as updates.
- DDP: ``Stepper.net`` is the wrapped model; micro-batches before a group's last one
  accumulate locally (``no_sync``), the last one's backward all-reduces.
- Kill point ``train.batch`` (:mod:`pipeline.faults`) before every micro-batch, for the
  kill -9 resume tests.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .. import faults
from ..errors import PipelineError
from ..distributed import Dist, all_finite, is_ddp, unwrap


class NonFiniteGuard:
    """Counts dropped updates: non-finite losses and non-finite gradients (agreed across ranks).

    ``limit`` of them with no successful update between (``updated``) stop the fold.
    """

    WHAT = {"loss": "loss was non-finite", "gradient": "gradients were non-finite (with a finite loss)"}

    def __init__(self, limit: int, d: Dist):
        self.limit, self.d = max(1, limit), d
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


@dataclass
class Stepper:
    """Everything that turns micro-batches into weight updates.

    ``net``: the model as trained (DDP-wrapped and/or compiled, or the bare model);
    ``autocast``: a zero-argument factory of autocast contexts; ``scheduler``: stepped after
    every group (None: constant rate); ``ema``: a timm ModelEmaV3 of the bare model, updated
    after every applied update."""
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    guard: NonFiniteGuard
    autocast: object
    device: torch.device
    accum_steps: int = 1
    grad_clip: float = 0.0
    ema: object = None


@dataclass
class EpochResult:
    """``loss``: mean over the images whose loss was finite (``scored`` of them); ``images``: all
    images seen; ``updates``: optimizer steps applied; ``nonfinite``: updates dropped for a
    non-finite loss or gradient; ``lr``: the rate of the last applied update."""
    loss: float
    images: int
    scored: int
    lr: float
    seconds: float
    updates: int
    nonfinite: int


def train_epoch(s: Stepper, batches, loss_fn, inputs, *, max_updates: int = 0, ema_step: int = 0,
                desc: str | None = None) -> EpochResult:
    """One pass over ``batches`` (loader items (images (N, H, W, 3) uint8, masks (N, H, W) uint8, ...)).

    ``inputs``: loader item -> (x (N, 3, h, w) float, y (N, 1, h, w) float) on the device
    (:class:`pipeline.train.plan.Inputs`); ``loss_fn``: (logits, y) -> scalar. ``max_updates``
    > 0 caps the updates; ``ema_step``: the EMA's step count before this epoch; ``desc``: show
    a progress bar with this title.
    """
    s.net.train()
    n = len(batches) if max_updates <= 0 else min(len(batches), max_updates * s.accum_steps)
    full = (n // s.accum_steps) * s.accum_steps       # micro-batches in complete groups
    local = s.net.no_sync if is_ddp(s.net) else contextlib.nullcontext
    loss_sum, images, scored, updates, nonfinite0 = 0.0, 0, 0, 0, s.guard.total
    lr = s.optimizer.param_groups[0]["lr"]
    dropped = False                     # this group's loss was non-finite: skip the rest of the group
    s.optimizer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    bar = tqdm(total=n, desc=desc, unit="batch", leave=False, disable=desc is None, mininterval=1.0)
    for i, batch in enumerate(batches):
        if i >= n:
            break
        faults.point("train.batch")
        last = (i + 1) % s.accum_steps == 0 or i + 1 == n      # the group's last micro-batch
        group = s.accum_steps if i < full else n - full         # its group's size
        images += batch[0].shape[0]
        if not dropped:
            x, y = inputs(batch)
            with contextlib.nullcontext() if last else local():  # all-reduce on the group's last backward
                with s.autocast():
                    logits = s.net(x)
                loss = loss_fn(logits, y)
                dropped = not s.guard.ok(loss)
                if not dropped:
                    s.scaler.scale(loss / group).backward()
                    loss_sum, scored = loss_sum + loss.item() * x.shape[0], scored + x.shape[0]
        if last:
            if not dropped and apply_update(s):
                lr = s.optimizer.param_groups[0]["lr"]     # the rate this update used (the schedule steps below)
                updates += 1
                s.guard.updated()
                if s.ema is not None:
                    s.ema.update(unwrap(s.net), step=ema_step + updates)
            s.optimizer.zero_grad(set_to_none=True)
            _schedule_step(s.scheduler)
            dropped = False
        bar.update(1)
        if desc is not None and (i % 5 == 4 or i + 1 == n):
            bar.set_postfix(loss=f"{loss_sum / max(scored, 1):.4f}",
                            img_s=f"{images / max(time.perf_counter() - t0, 1e-9):.1f}", refresh=False)
    bar.close()
    if s.device.type == "cuda":
        torch.cuda.synchronize(s.device)
    return EpochResult(loss_sum / scored if scored else float("nan"), images, scored, lr, time.perf_counter() - t0,
                       updates, s.guard.total - nonfinite0)


def apply_update(s: Stepper) -> bool:
    """Clip and apply the accumulated gradients. Returns True when the optimizer stepped.

    With an enabled GradScaler (fp16) the scaler finds inf/NaN gradients itself, skips the
    step and lowers its scale: neither applied nor counted as non-finite. Without one (bf16,
    fp32) nothing else would catch them: a finite loss can still give inf/NaN gradients,
    clip_grad_norm_ then returns NaN and optimizer.step() writes NaN into every weight. So
    the total gradient norm (the one clipping uses; computed even when grad_clip is 0) is
    checked, and a non-finite one drops the step and is counted like a non-finite loss.
    Under DDP the gradients, hence the norm, are the all-reduced ones, the same on every rank.
    """
    params = [p for p in s.net.parameters() if p.grad is not None]
    if s.scaler.is_enabled():
        if s.grad_clip > 0:
            s.scaler.unscale_(s.optimizer)     # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        scale = s.scaler.get_scale()
        s.scaler.step(s.optimizer)
        s.scaler.update()
        return s.scaler.get_scale() >= scale     # a skipped step (inf/NaN found) lowers the scale
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if not s.guard.grads_ok(norm):
        return False
    if s.grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, s.grad_clip, norm)
    s.optimizer.step()
    return True


def _schedule_step(scheduler) -> None:
    if scheduler is None:
        return
    # The schedule advances even over a skipped update, which torch warns about: intended here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
        scheduler.step()
