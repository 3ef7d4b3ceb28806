"""``train.progressive``: the grammar of each epoch's training input (whole images resized, or crops).

Torch-free, so the config checks it at load time; the training wing's epoch plan
(``pipeline.train.plan``) turns it into batches.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

from .errors import ConfigError


class EpochShape(NamedTuple):
    """One epoch's training input: (h, w) of each batch, ``crop`` True for random crops of the
    prepared images at their own resolution, False for the whole image resized to (h, w)."""
    h: int
    w: int
    crop: bool = False

    def __str__(self) -> str:
        return f"{'c' if self.crop else ''}{self.h}x{self.w}"


class Item(NamedTuple):
    """One ``SIZE:EPOCHS`` item of ``train.progressive``."""
    h: int
    w: int
    crop: bool
    epochs: int


@functools.lru_cache(maxsize=None)
def parse(spec: str) -> tuple[Item, ...]:
    """``train.progressive`` -> its items, checked for syntax and sides (the typed value of the key).

    spec: comma list of ``SIZE:EPOCHS`` where SIZE is ``S`` (square) or ``HxW``, each side a
    multiple of 32: the whole image resized to SIZE, e.g. ``"256:2,384:1"``. A ``c`` before SIZE
    (``c320:2``) trains on random SIZE crops of the prepared images instead: the network sees
    the objects at their own scale (edges as sharp as at inference) for a fraction of the full
    size's cost. "" -> no item: every epoch at the prepared size.
    """
    items = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            size, n = part.split(":")
            crop = size.lower().startswith("c")
            size = size[1:] if crop else size
            h, w = (int(v) for v in size.lower().split("x")) if "x" in size.lower() else (int(size), int(size))
            n = int(n)
        except ValueError:
            raise ConfigError(f"train.progressive='{spec}': expected SIZE:EPOCHS items like 256:2, "
                              f"320x480:1 or c320:2 (crops), got '{part}'") from None
        if h % 32 or w % 32 or h < 32 or w < 32 or n < 1:
            raise ConfigError(f"train.progressive='{spec}': '{part}' needs sides that are multiples of 32 "
                              f"and at least 1 epoch")
        items.append(Item(h, w, crop, n))
    return tuple(items)


def parse_progressive(spec: str, epochs: int, full_hw: tuple[int, int]) -> list[EpochShape]:
    """``train.progressive`` -> each epoch's training input (:class:`EpochShape`).

    The epochs after the listed items train on whole images at ``full_hw`` (the prepared size;
    validation is always there). Resized epochs must leave at least the last epoch at the
    prepared scale; crops keep that scale, so crop items may cover every epoch.
    """
    shapes: list[EpochShape] = []
    for it in parse(spec):
        if it.crop and (it.h > full_hw[0] or it.w > full_hw[1]):
            raise ConfigError(f"train.progressive='{spec}': crop 'c{it.h}x{it.w}' is larger than the prepared "
                              f"{full_hw[0]}x{full_hw[1]} images")
        shapes += [EpochShape(it.h, it.w, it.crop)] * it.epochs
    if len(shapes) > epochs or (len(shapes) == epochs and not shapes[-1].crop):
        raise ConfigError(f"train.progressive='{spec}' covers {len(shapes)} epochs but train.epochs={epochs}: "
                          f"leave at least the last epoch at the prepared size (or end on a crop item)")
    return shapes + [EpochShape(*full_hw)] * (epochs - len(shapes))
