"""BCE + soft Dice for binary segmentation (smp.losses), and a torch per-image Dice metric.

The soft Dice is computed per image and averaged over the batch (Carvana is
scored by mean per-image Dice). Per-image terms also make the loss of a batch
the mean of its micro-batches' losses, which gradient accumulation relies on;
smp's binary DiceLoss pools the whole batch into one score, so the batch is
presented to smp's multilabel DiceLoss as one sample with N channels.
"""
from __future__ import annotations

import torch
from torch import nn


class BceDiceLoss(nn.Module):
    """logits, target: (N, 1, H, W); target in {0, 1}. Returns a scalar (float32).

    loss = bce_weight * mean BCE + dice_weight * mean over images of (1 - soft Dice).
    Images whose target is empty contribute 0 to the Dice term (smp's convention).
    """

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0):
        super().__init__()
        import segmentation_models_pytorch as smp
        self.bce_weight, self.dice_weight = float(bce_weight), float(dice_weight)
        self.bce = smp.losses.SoftBCEWithLogitsLoss()
        self.dice = smp.losses.DiceLoss(mode="multilabel", from_logits=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # fp32 for the reductions over ~10^5-10^6 pixels, whatever the autocast dtype.
        logits, target = logits.float(), target.float()
        loss = logits.new_zeros(())
        if self.bce_weight:
            loss = loss + self.bce_weight * self.bce(logits, target)
        if self.dice_weight:
            n = logits.shape[0]
            loss = loss + self.dice_weight * self.dice(logits.reshape(1, n, -1), target.reshape(1, n, -1))
        return loss


@torch.no_grad()
def dice_per_image(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hard Dice at probability 0.5 (logit 0). logits, target: (N, 1, H, W). Returns (N,) float64.

    Same convention as ``pipeline.metrics.dice_batch``: both empty -> 1.
    """
    p = (logits.reshape(logits.shape[0], -1) > 0)
    t = target.reshape(target.shape[0], -1) > 0.5
    inter = (p & t).sum(1).double()
    denom = (p.sum(1) + t.sum(1)).double()
    return torch.where(denom == 0, torch.ones_like(denom), 2 * inter / denom.clamp_min(1))
