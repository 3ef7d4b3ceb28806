"""The optimizer (AdamW) and the learning-rate schedule, stepped once per optimizer update."""
from __future__ import annotations

import math

import torch

from ..config import check_choice


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; biases and norm weights (1-d tensors) get no weight decay."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def _cosine(optimizer, total_steps: int, warmup: int, min_lr_ratio: float):
    """Linear warmup, then cosine to lr * min_lr_ratio."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _onecycle(optimizer, total_steps: int, warmup: int, min_lr_ratio: float):
    """torch's OneCycleLR peaking at lr after the warmup (30% of the run without one)."""
    pct = warmup / total_steps if warmup > 0 else 0.3
    max_lr = [g["lr"] for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps,
                                               pct_start=min(max(pct, 0.01), 0.99))


# train.scheduler: name -> factory(optimizer, total_steps, warmup_steps, min_lr_ratio); "none" = constant.
SCHEDULES = {"cosine": _cosine, "onecycle": _onecycle, "none": lambda *args: None}


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int, steps_per_epoch: int,
                    warmup_epochs: float, min_lr_ratio: float):
    """The schedule ``name`` (:data:`SCHEDULES`), stepped once per optimizer update; None = constant."""
    check_choice("train.scheduler", name, tuple(SCHEDULES))    # config.load checked it; direct calls too
    total_steps = max(1, total_steps)
    warmup = min(total_steps - 1, round(warmup_epochs * steps_per_epoch))
    return SCHEDULES[name](optimizer, total_steps, warmup, min_lr_ratio)
