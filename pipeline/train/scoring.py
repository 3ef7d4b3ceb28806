"""Scoring on the validation fold after an epoch: loss and hard Dice (p > 0.5) of the raw weights,
and the Dice of their EMA. Never touches the training trajectory (eval mode, no_grad, no RNG)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..data import MEAN, STD, to_device
from ..distributed import all_sum, sync_buffers
from ..metrics import dice_from_counts
from .plan import BASE_LOSS, EpochPlan

if TYPE_CHECKING:      # the fold's parts, built by build (types only: build imports the step)
    from .build import Data, Fold, Parts


def hard_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice at probability 0.5 (logit 0) per image. logits, target: (N, 1, H, W) -> (N,) float64;
    both masks empty -> 1."""
    p = logits.reshape(logits.shape[0], -1) > 0
    t = target.reshape(target.shape[0], -1) > 0.5
    return dice_from_counts((p & t).sum(1), p.sum(1), t.sum(1))


@torch.no_grad()
def val_sums(model: torch.nn.Module, loader, loss_fn, *, autocast, device: torch.device,
             channels_last: bool = True, stats: tuple = (MEAN, STD)) -> dict:
    """Sums over this rank's validation shard: {loss_sum, dice_sum, n} (per-image hard Dice)."""
    model.eval()
    loss_sum, dice_sum, n = 0.0, 0.0, 0
    for images, masks, _ in loader:
        x, y = to_device(images, masks, device, channels_last, stats)
        with autocast():
            logits = model(x)
        loss_sum += loss_fn(logits, y).item() * x.shape[0]
        dice_sum += hard_dice(logits.float(), y).sum().item()
        n += x.shape[0]
    return {"loss_sum": loss_sum, "dice_sum": dice_sum, "n": n}


def score_epoch(f: Fold, data: Data, parts: Parts, plan: EpochPlan) -> tuple[float, float, float]:
    """(val loss, val Dice, EMA val Dice) over every rank's shard; NaN for what the plan leaves out."""
    nan = float("nan")
    if not plan.scored:
        return nan, nan, nan
    # The bare model: ranks hold different numbers of validation batches, and DDP's forward
    # would expect matching collectives.
    sync_buffers(parts.model, f.d)
    v = _sums(f, data, parts, parts.model)
    v_loss, v_dice, v_n = all_sum([v["loss_sum"], v["dice_sum"], v["n"]], f.d, f.device)
    ema_dice = nan
    if plan.score_ema:
        sync_buffers(parts.step.ema.module, f.d)
        e = _sums(f, data, parts, parts.step.ema.module)
        dice_sum, n = all_sum([e["dice_sum"], e["n"]], f.d, f.device)
        ema_dice = dice_sum / n
    return v_loss / v_n, v_dice / v_n, ema_dice


def _sums(f: Fold, data: Data, parts: Parts, model: torch.nn.Module) -> dict:
    return val_sums(model, data.val_dl, parts.losses[BASE_LOSS], autocast=f.autocast, device=f.device,
                    channels_last=f.cfg.train.channels_last, stats=parts.stats)
