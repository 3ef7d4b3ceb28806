"""Training losses for binary segmentation (smp.losses).

- :class:`BceDiceLoss`: BCE + soft Dice, the default; ``boundary_weight`` > 0 up-weights the
  BCE of pixels near the mask edge (Carvana's errors are almost all there).
- :class:`LovaszLoss`: the Lovasz hinge per image (smp), a direct surrogate of IoU/Dice for a
  final phase of training (``train.loss_final=lovasz``).

The soft Dice is computed per image and averaged over the batch (Carvana is
scored by mean per-image Dice). Per-image terms also make the loss of a batch
the mean of its micro-batches' losses, which gradient accumulation relies on;
smp's binary DiceLoss pools the whole batch into one score, so the batch is
presented to smp's multilabel DiceLoss as one sample with N channels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


BOUNDARY_PX = 3          # half-width of the edge band that boundary_weight up-weights


def _running_max(x: torch.Tensor, px: int, dim: int) -> torch.Tensor:
    """The max over each position's window of 2 px + 1 along ``dim`` (-1 or -2), outside ignored."""
    n = x.shape[dim]
    padded = F.pad(x, (px, px, 0, 0) if dim == -1 else (0, 0, px, px), value=float("-inf"))
    out = padded.narrow(dim, 0, n)
    for i in range(1, 2 * px + 1):
        out = torch.maximum(out, padded.narrow(dim, i, n))
    return out


def dilate(x: torch.Tensor, px: int) -> torch.Tensor:
    """(..., H, W) -> (..., H, W): the max over each pixel's (2 px + 1) square, pixels outside the
    image ignored. Equals ``F.max_pool2d(x, 2 px + 1, stride=1, padding=px)``, computed as 2 x 2 px
    elementwise maxima of shifted views (the square is a row window after a column window),
    which is cheaper than max_pool2d on a CPU."""
    return _running_max(_running_max(x, px, -1), px, -2)


def edge_band(target: torch.Tensor, px: int = BOUNDARY_PX) -> torch.Tensor:
    """(N, 1, H, W) {0, 1} -> (N, 1, H, W) float {0, 1}: pixels within ``px`` of the mask edge
    (dilation minus erosion with a (2 px + 1) square), on both sides of it."""
    target = target.float()
    return dilate(target, px) + dilate(-target, px)


class BceDiceLoss(nn.Module):
    """logits, target: (N, 1, H, W); target in [0, 1] ({0, 1} labels, soft pseudo-labels).
    Returns a scalar (float32).

    loss = bce_weight * weighted mean BCE + dice_weight * mean over images of (1 - soft Dice).
    The BCE weight of a pixel is 1 + boundary_weight within BOUNDARY_PX of the mask edge, else 1
    (weighted mean: the loss scale stays that of plain BCE). Images whose target is empty
    contribute 0 to the Dice term (smp's convention). ``confidence`` c > 0.5 leaves out the
    pixels whose target lies in (1 - c, c) (a teacher's unsure ones) from both terms.
    """

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, boundary_weight: float = 0.0,
                 confidence: float = 0.0):
        super().__init__()
        import segmentation_models_pytorch as smp
        self.bce_weight, self.dice_weight = float(bce_weight), float(dice_weight)
        self.boundary_weight, self.confidence = float(boundary_weight), float(confidence)
        self.bce = smp.losses.SoftBCEWithLogitsLoss()
        self.dice = smp.losses.DiceLoss(mode="multilabel", from_logits=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # fp32 for the reductions over ~10^5-10^6 pixels, whatever the autocast dtype.
        logits, target = logits.float(), target.float()
        loss = logits.new_zeros(())
        keep = None
        if self.confidence:
            keep = ((target <= 1.0 - self.confidence) | (target >= self.confidence)).float()
            # A left-out pixel reads as a sure 0 in both maps (the Dice term's sums skip it) and
            # passes no gradient; its BCE weight is 0 below.
            logits = torch.where(keep > 0, logits, torch.full_like(logits, -1e4))
            target = target * keep
        if self.bce_weight and (self.boundary_weight or keep is not None):
            w = 1.0 + self.boundary_weight * edge_band(target) if self.boundary_weight else torch.ones_like(target)
            w = w if keep is None else w * keep
            bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            loss = loss + self.bce_weight * (bce * w).sum() / w.sum().clamp_min(1.0)
        elif self.bce_weight:
            loss = loss + self.bce_weight * self.bce(logits, target)
        if self.dice_weight:
            n = logits.shape[0]
            loss = loss + self.dice_weight * self.dice(logits.reshape(1, n, -1), target.reshape(1, n, -1))
        return loss


class LovaszLoss(nn.Module):
    """Lovasz hinge, per image, averaged over the batch (smp's binary LovaszLoss, per_image=True).

    logits, target: (N, 1, H, W). A per-image mean keeps the loss of a batch the mean of its
    micro-batches' losses (gradient accumulation) and matches Carvana's mean per-image score.
    """

    def __init__(self):
        super().__init__()
        import segmentation_models_pytorch as smp
        self.lovasz = smp.losses.LovaszLoss(mode="binary", per_image=True, from_logits=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.lovasz(logits.float(), target.float())


# train.loss_final: name -> the loss of the last train.loss_final_epochs epochs ("" = BCE + Dice to the end).
FINAL_LOSSES = {"lovasz": LovaszLoss}
