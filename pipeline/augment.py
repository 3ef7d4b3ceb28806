"""Training augmentations as a registry: component name -> albumentations transform, presets as lists.

``train.augment`` is a preset (``none``, ``basic``, ``strong``) or a comma list of components;
:func:`parse` turns it into a tuple of component names once, at config load (torch-free, no
albumentations import), and :func:`build_transform` builds the pipeline from that tuple.
Geometric transforms move image and mask together (mask with nearest neighbour); the output
size equals the input size.
"""
from __future__ import annotations

import difflib
import functools
from typing import Callable

from .errors import ConfigError

PRESETS = {"none": (), "basic": ("hflip", "ssr", "bc"), "strong": ("hflip", "ssr_strong", "bc", "hsv")}


def _affine(scale, translate, rotate, p):
    def make(A, cv2):
        return A.Affine(scale=scale, translate_percent=translate, rotate=rotate, p=p,
                        border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0)
    return make


# name -> factory(albumentations module, cv2 module) -> transform
COMPONENTS: dict[str, Callable] = {
    "hflip": lambda A, cv2: A.HorizontalFlip(p=0.5),
    "vflip": lambda A, cv2: A.VerticalFlip(p=0.5),
    "ssr": _affine((0.9, 1.1), (-0.0625, 0.0625), (-10, 10), 0.5),
    "ssr_strong": _affine((0.8, 1.2), (-0.1, 0.1), (-15, 15), 0.7),
    "bc": lambda A, cv2: A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
    "hsv": lambda A, cv2: A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=10, p=0.5),
}


@functools.lru_cache(maxsize=None)
def parse(spec: str) -> tuple[str, ...]:
    """'basic' or 'hflip,ssr,bc' -> component names; an unknown name is a ConfigError naming the key."""
    spec = spec.strip()
    names = PRESETS[spec] if spec in PRESETS else tuple(s.strip() for s in spec.split(",") if s.strip())
    bad = [n for n in names if n not in COMPONENTS]
    if bad:
        close = difflib.get_close_matches(bad[0], [*COMPONENTS, *PRESETS], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"train.augment: unknown {bad}{hint}. Presets: {', '.join(PRESETS)}; "
                          f"components: {', '.join(COMPONENTS)}")
    return names


def build_transform(names: tuple[str, ...]):
    """albumentations Compose of the parsed components, or None for no augmentation."""
    if not names:
        return None
    import albumentations as A
    import cv2
    return A.Compose([COMPONENTS[n](A, cv2) for n in names])
