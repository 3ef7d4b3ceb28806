"""Error pictures: a photo with the true and predicted outlines and the wrong pixels tinted.

Pure numpy/cv2 (no matplotlib, no torch), shared by ``make inspect`` (pipeline/inspect.py)
and the TensorBoard overlays (pipeline/tboard.py). All images are RGB uint8.

Colours (:data:`LEGEND`): true outline green, predicted outline magenta, car pixels the
model missed (false negatives) tinted orange, background it called car (false positives)
tinted blue. Outlines are traced once on the full-size masks (``cv2.findContours``) and
scaled, so a crop shows no false outline along its own border.
"""
from __future__ import annotations

import cv2
import numpy as np

TRUE_RGB = (0, 230, 0)
PRED_RGB = (255, 0, 255)
MISSED_RGB = (255, 150, 0)
EXTRA_RGB = (0, 140, 255)
LEGEND = (("true outline", TRUE_RGB), ("predicted outline", PRED_RGB),
          ("missed car (FN)", MISSED_RGB), ("extra (FP)", EXTRA_RGB))
TINT_ALPHA = 0.6


def contours(mask: np.ndarray) -> list[np.ndarray]:
    """Outer and inner outlines of a (H, W) binary mask: a list of (n, 1, 2) int (x, y) arrays."""
    cs, _ = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    return list(cs)


def render(photo: np.ndarray, true: np.ndarray, pred: np.ndarray, size: tuple[int, int],
           box: tuple[int, int, int, int] | None = None, thickness: int = 2,
           true_contours: list | None = None, pred_contours: list | None = None) -> np.ndarray:
    """The picture of one image's errors, resized to ``size`` = (height, width).

    photo: (H, W, 3) uint8 RGB; true, pred: (H, W) bool. box: (x0, y0, x1, y1) to show
    only that part (a zoomed crop), None = the whole image. The box (or image) is scaled to fit
    ``size`` keeping its aspect and centred on black. Wrong pixels are tinted at the output
    scale by their coverage (so a one-pixel sliver still shows when the image is shrunk).
    Returns (height, width, 3) uint8.
    """
    H, W = true.shape
    x0, y0, x1, y1 = box or (0, 0, W, H)
    out_h, out_w = size
    s = min(out_w / (x1 - x0), out_h / (y1 - y0))
    w, h = max(1, round((x1 - x0) * s)), max(1, round((y1 - y0) * s))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    img = cv2.resize(photo[y0:y1, x0:x1], (w, h), interpolation=interp).astype(np.float32)
    for wrong, rgb in ((true & ~pred, MISSED_RGB), (pred & ~true, EXTRA_RGB)):
        cov = cv2.resize(wrong[y0:y1, x0:x1].astype(np.float32), (w, h), interpolation=interp)
        a = (np.clip(cov * 2.0, 0.0, 1.0) * TINT_ALPHA)[..., None]
        img = img * (1 - a) + np.asarray(rgb, np.float32) * a
    img = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    for cs, rgb in ((true_contours if true_contours is not None else contours(true), TRUE_RGB),
                    (pred_contours if pred_contours is not None else contours(pred), PRED_RGB)):
        # Pixel centres (x + 0.5) scale to output pixel centres; cv2 clips what falls outside.
        scaled = [np.round((c.astype(np.float32) - (x0, y0) + 0.5) * s - 0.5).astype(np.int32) for c in cs]
        cv2.drawContours(img, scaled, -1, rgb, thickness, lineType=cv2.LINE_AA)
    canvas = np.zeros((out_h, out_w, 3), np.uint8)
    top, left = (out_h - h) // 2, (out_w - w) // 2
    canvas[top:top + h, left:left + w] = img
    return canvas


def error_box(true: np.ndarray, pred: np.ndarray, aspect: float, frac: float = 1 / 3
              ) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1): the window of width/height ``aspect``, ``frac`` of the image tall,
    holding the most wrong pixels (true XOR pred); None when nothing is wrong.

    The densest window, not the largest connected error: on a good model the errors are
    slivers along the whole outline, which connect into one region as large as the car;
    the window with the most of them is where it fails worst (an antenna, a wheel, the sill
    over its shadow), shown about 1/frac times larger. Ties go to the top-left window.
    """
    wrong = (true != pred).astype(np.uint8)
    if not wrong.any():
        return None
    H, W = wrong.shape
    bh = max(1, min(H, round(min(H, W / aspect) * frac)))
    bw = max(1, min(W, round(bh * aspect)))
    ii = cv2.integral(wrong).astype(np.int64)            # (H + 1, W + 1) cumulative sums
    sums = ii[bh:, bw:] - ii[:-bh, bw:] - ii[bh:, :-bw] + ii[:-bh, :-bw]
    y0, x0 = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(x0), int(y0), int(x0 + bw), int(y0 + bh)


def put_text(img: np.ndarray, lines: list[str], height: int, scale: float = 0.5) -> np.ndarray:
    """A (height, width, 3) white caption strip with ``lines`` in black, stacked above ``img``."""
    strip = np.full((height, img.shape[1], 3), 255, np.uint8)
    step = height // max(1, len(lines))
    for i, line in enumerate(lines):
        cv2.putText(strip, line, (4, step * i + step - 6), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return np.concatenate([strip, img], 0)


def legend_strip(width: int, height: int = 28, extra: str = "") -> np.ndarray:
    """A (height, width, 3) strip naming the four colours (and ``extra`` text after them)."""
    strip = np.full((height, width, 3), 255, np.uint8)
    x = 6
    for name, rgb in LEGEND:
        cv2.rectangle(strip, (x, 7), (x + 14, height - 7), rgb, -1)
        cv2.putText(strip, name, (x + 19, height - 9), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        x += 19 + cv2.getTextSize(name, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)[0][0] + 18
    if extra:
        cv2.putText(strip, extra, (x, height - 9), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def grid(tiles: list[np.ndarray], cols: int) -> np.ndarray:
    """Tiles of one shape, row by row, ``cols`` per row (the last row padded white)."""
    h, w = tiles[0].shape[:2]
    rows = -(-len(tiles) // cols)
    out = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        out[r * h:(r + 1) * h, c * w:(c + 1) * w] = t
    return out
