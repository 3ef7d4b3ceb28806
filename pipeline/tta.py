"""Test-time augmentation as data: a list of (forward, inverse) pairs.

``forward`` maps an image batch (N, C, H, W) to what the model sees; ``inverse``
maps the model's per-pixel output for that view (N, 1, H', W') back onto the
original pixel grid (N, 1, H, W). Flips are their own inverse; ``scaleS``
resizes by ``S`` (rounded to the encoder stride of 32) and back.

Spec strings (``predict.tta``): a comma list of ``none``, ``hflip``, ``vflip``,
``hvflip``, ``scale<S>`` (e.g. ``scale0.75``). ``none`` (the identity) is always
included once, first, so ``tta=hflip`` means {identity, hflip}.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .config import ConfigError

STRIDE = 32


@dataclass(frozen=True)
class TTA:
    name: str
    forward: Callable[[torch.Tensor], torch.Tensor] = field(compare=False)
    inverse: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor] = field(compare=False)
    scale: float = 1.0  # views with the same scale share one batched forward pass


def _flip(dims: tuple[int, ...]) -> Callable:
    return lambda x, size=None: torch.flip(x, dims)


def scaled_size(size: tuple[int, int], s: float) -> tuple[int, int]:
    """(H, W) scaled by s and rounded to a positive multiple of the encoder stride."""
    return tuple(max(STRIDE, int(round(v * s / STRIDE)) * STRIDE) for v in size)


def _scale(s: float) -> tuple[Callable, Callable]:
    def fwd(x):
        return F.interpolate(x, size=scaled_size(x.shape[-2:], s), mode="bilinear", align_corners=False,
                             antialias=s < 1)

    def inv(y, size):
        return F.interpolate(y, size=tuple(size), mode="bilinear", align_corners=False,
                             antialias=y.shape[-2] > size[0])
    return fwd, inv


def _make(name: str) -> TTA:
    if name == "none":
        return TTA("none", lambda x: x, lambda y, size=None: y)
    if name == "hflip":
        return TTA(name, _flip((-1,)), _flip((-1,)))
    if name == "vflip":
        return TTA(name, _flip((-2,)), _flip((-2,)))
    if name == "hvflip":
        return TTA(name, _flip((-2, -1)), _flip((-2, -1)))
    if name.startswith("scale"):
        try:
            s = float(name[len("scale"):])
        except ValueError:
            s = -1.0
        if not 0.25 <= s <= 4.0:
            raise ConfigError(f"predict.tta: bad scale '{name}' (use e.g. scale0.75, factor in [0.25, 4])")
        fwd, inv = _scale(s)
        return TTA(f"scale{s:g}", fwd, inv, scale=s)
    raise ConfigError(f"predict.tta: unknown transform '{name}'. Valid: none, hflip, vflip, hvflip, scale<S>")


def parse(spec: str) -> list[TTA]:
    """'hflip,scale0.75' -> [none, hflip, scale0.75]: identity first, duplicates dropped, order kept."""
    names = ["none"] + [n.strip() for n in (spec or "").split(",") if n.strip()]
    out, seen = [], set()
    for n in names:
        t = _make(n)
        if t.name not in seen:
            seen.add(t.name)
            out.append(t)
    return out


def names(ttas: list[TTA]) -> list[str]:
    return [t.name for t in ttas]


@torch.no_grad()
def predict_proba(model: torch.nn.Module, x: torch.Tensor, ttas: list[TTA]) -> torch.Tensor:
    """x: (N, 3, H, W) normalised images. Returns (N, 1, H, W) float32: mean sigmoid over the views.

    Views of the same scale are concatenated into one batch (N * k images) so the model runs
    once per distinct scale, not once per view.
    """
    n, size = x.shape[0], tuple(x.shape[-2:])
    total = torch.zeros((n, 1) + size, dtype=torch.float32, device=x.device)
    for s in sorted({t.scale for t in ttas}):
        group = [t for t in ttas if t.scale == s]
        views = torch.cat([t.forward(x) for t in group], 0)
        prob = torch.sigmoid(model(views).float())
        for t, p in zip(group, prob.split(n, 0)):
            total += t.inverse(p, size)
    return total / len(ttas)
