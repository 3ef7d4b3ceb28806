"""The epoch plan: per epoch, what the network trains on, with which loss, and what is scored.

:func:`plan_epochs` turns the config into one :class:`EpochPlan` per epoch:

- the training input (``train.progressive``, parsed by ``schedule.parse_progressive``): whole
  images resized on the fly (``256:2``: :func:`resize_batch`), random crops at the prepared
  scale (``c288:2``: :func:`crop_batch`), or the prepared size;
- the loss: BCE + Dice, or ``train.loss_final`` for the last ``train.loss_final_epochs``;
- whether the epoch is scored on the validation fold (every ``train.val_every``-th epoch and
  always the last), and whether the EMA weights are scored beside the raw ones.

:class:`Inputs` applies an epoch's input rule to each loader batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..schedule import EpochShape, parse_progressive
from ..data import MEAN, STD, to_device

BASE_LOSS = "bce_dice"


@dataclass(frozen=True)
class EpochPlan:
    epoch: int                  # 0-based
    shape: EpochShape           # the training input: (h, w), resized or cropped
    loss: str                   # BASE_LOSS or train.loss_final
    scored: bool                # validation Dice (and loss) computed after this epoch
    score_ema: bool             # the EMA weights scored too
    crop_seed: int | None       # the crop windows' seed on this rank (crop epochs only)

    def crop_rng(self) -> torch.Generator | None:
        """A fresh generator of this epoch's crop windows: a resumed epoch draws the same ones."""
        return None if self.crop_seed is None else torch.Generator().manual_seed(self.crop_seed)


def plan_epochs(t, full_hw: tuple[int, int], rank: int = 0) -> list[EpochPlan]:
    """``t``: the config's train section; ``full_hw``: the prepared (h, w); ``rank``: this process's."""
    shapes = parse_progressive(t.progressive, t.epochs, full_hw)
    plans = []
    for e, shape in enumerate(shapes):
        final = bool(t.loss_final) and e >= t.epochs - t.loss_final_epochs
        scored = (e + 1) % t.val_every == 0 or e + 1 == t.epochs
        plans.append(EpochPlan(e, shape, t.loss_final if final else BASE_LOSS, scored, scored and t.ema,
                               crop_seed(t.seed, e, rank) if shape.crop else None))
    return plans


def crop_seed(seed: int, epoch: int, rank: int) -> int:
    """The crop offsets' seed of one epoch on one rank: fixed by (seed, epoch, rank), so a
    resumed epoch draws the windows an uninterrupted run would have."""
    return (seed * 1_000_003 + epoch) * 1_009 + rank


@dataclass
class Inputs:
    """Loader batch -> (x (N, 3, h, w) normalised float, y (N, 1, h, w) float in [0, 1]) on ``device``,
    at ``shape`` when given and different from the batch's own: random crops drawn from
    ``crop_rng`` for a crop shape, else resized (targets thresholded at 0.5 there, soft ones
    too). ``target_max``: the loader's value of p = 1 (255 beside pseudo-labels' soft targets)."""
    device: torch.device
    channels_last: bool = True
    stats: tuple = (MEAN, STD)
    shape: EpochShape | None = None
    crop_rng: torch.Generator | None = None
    target_max: int = 1

    def __call__(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = to_device(batch[0], batch[1], self.device, self.channels_last, self.stats)
        if self.target_max != 1:
            y = y * (1.0 / self.target_max)
        if self.shape is not None and tuple(x.shape[-2:]) != (self.shape.h, self.shape.w):
            hw = (self.shape.h, self.shape.w)
            x, y = crop_batch(x, y, hw, self.crop_rng) if self.shape.crop else resize_batch(x, y, hw)
        return x, y


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
