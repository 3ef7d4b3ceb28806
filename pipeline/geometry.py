"""Where an image sits in the model input, and the way back: one mapping for every stage.

``prepare.fit``: ``stretch`` resizes every image to height x width (aspect not kept); ``pad``
scales to fit inside and centre-pads with zeros (1280x1918 -> 1280x1920 pads one column each
side, no resampling). Each image's placement is the record {scaled_height, scaled_width,
pad_top, pad_left} (:data:`GEOM_COLS`, columns of the prepare indexes). :func:`to_model` applies it
(prepare for train images, predict for test images) and :func:`to_original` inverts it
(train's OOF maps, submit's masks), so train and test pixels are made the same way.

NumPy and cv2 only: submit's worker processes import it without torch.
"""
from __future__ import annotations

import cv2
import numpy as np

from .config import FITS

from .errors import ConfigError

GEOM_COLS = ["scaled_height", "scaled_width", "pad_top", "pad_left"]


def geometry(orig_h: int, orig_w: int, height: int, width: int, fit: str) -> dict:
    """Where an orig_h x orig_w image lands in the height x width model input.

    Returns {scaled_height, scaled_width, pad_top, pad_left}: the image is resized
    to scaled_height x scaled_width and placed at (pad_top, pad_left); the rest is 0.
    """
    if fit == "stretch":
        return stretch_geometry(height, width)
    if fit != "pad":
        raise ConfigError(f"prepare.fit='{fit}': choose one of {', '.join(FITS)}")
    s = min(height / orig_h, width / orig_w)
    sh, sw = min(height, round(orig_h * s)), min(width, round(orig_w * s))
    return {"scaled_height": sh, "scaled_width": sw, "pad_top": (height - sh) // 2, "pad_left": (width - sw) // 2}


def stretch_geometry(height: int, width: int) -> dict:
    """The geometry record of fit=stretch (the whole image resized to height x width)."""
    return {"scaled_height": height, "scaled_width": width, "pad_top": 0, "pad_left": 0}


def row_geometry(row, height: int | None = None, width: int | None = None) -> dict | None:
    """An index row's geometry (GEOM_COLS, ints), for every stage that reads an index.

    A row without one (indexes written before fit=pad existed) is stretch: to height x width
    when given, else None, which :func:`to_original` reads as stretch from the map's own size."""
    if all(k in row and row[k] == row[k] for k in GEOM_COLS):  # present and not NaN
        return {k: int(row[k]) for k in GEOM_COLS}
    return stretch_geometry(height, width) if height is not None else None


def jpeg_reduction(orig_h: int, orig_w: int, geom: dict) -> int:
    """1 or 2: the scale at which to decode an orig_h x orig_w JPEG bound for ``geom``.

    libjpeg can decode at half size by scaling in the DCT domain (``IMREAD_REDUCED_COLOR_2``):
    less decode CPU and a 4x smaller INTER_AREA input, which matters where decoding competes
    with the model for a few CPU cores. It is used only when the image is at least 3x the model
    size per side, so INTER_AREA still downscales >= 1.5x after it. Prepare and predict both
    decode through this rule, so training and test pixels are made the same way.
    """
    sh, sw = int(geom["scaled_height"]), int(geom["scaled_width"])
    return 2 if orig_h >= 3 * sh and orig_w >= 3 * sw else 1


def to_model(arr: np.ndarray, geom: dict, height: int, width: int,
             interpolation: int = cv2.INTER_AREA) -> np.ndarray:
    """(h, w[, C]) original -> (height, width[, C]) model input, per ``geometry``."""
    sh, sw, top, left = (int(geom[k]) for k in GEOM_COLS)
    out = arr if arr.shape[:2] == (sh, sw) else cv2.resize(arr, (sw, sh), interpolation=interpolation)
    if (sh, sw) != (height, width):
        out = cv2.copyMakeBorder(out, top, height - sh - top, left, width - sw - left, cv2.BORDER_CONSTANT, value=0)
    return out


def to_original(prob: np.ndarray, orig_hw: tuple[int, int], geom: dict | None = None) -> np.ndarray:
    """(height, width) model-size map -> (orig_h, orig_w) float32: crop the padding, resize back.

    Exact inverse of ``to_model``'s placement (geom None = fit=stretch); the resize back is
    bilinear. Returns float32 in the input's scale (uint8 maps come back as 0..255 floats).
    """
    prob = np.asarray(prob)
    geom = geom or stretch_geometry(*prob.shape[:2])
    sh, sw, top, left = (int(geom[k]) for k in GEOM_COLS)
    crop = np.asarray(prob[top:top + sh, left:left + sw], dtype=np.float32)
    h, w = tuple(orig_hw)
    return crop if crop.shape == (h, w) else cv2.resize(crop, (w, h), interpolation=cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, geom: dict, height: int, width: int) -> np.ndarray:
    """(h, w) {0,1} -> (height, width) {0,1}: area-average the 0/255 mask, threshold at half.

    Area averaging then thresholding keeps a smooth, binary boundary (nearest
    neighbour would alias it).
    """
    return (to_model(mask * np.uint8(255), geom, height, width) >= 128).astype(np.uint8)
