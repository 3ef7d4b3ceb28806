"""Test-time augmentation as data: each view a name, the axes it flips or the factor it scales by.

A view's ``forward`` maps an image batch (N, C, H, W) to what the model sees; ``inverse``
maps the model's per-pixel output for that view (N, 1, H', W') back onto the
original pixel grid (N, 1, H, W). Both act on each image independently, so a
batch may be split anywhere (``max_forward``) without changing the result.

Spec strings (``predict.tta``): a comma list of ``none``, ``hflip``, ``vflip``,
``hvflip``, ``scale<S>`` (e.g. ``scale0.75``). ``none`` (the identity) is always
included once, first, so ``tta=hflip`` means {identity, hflip}.

What is exact and what is not:

- Flips (``hflip``, ``vflip``, ``hvflip``) are exact: each is its own inverse,
  ``inverse(forward(x)) == x`` bit for bit, and every prediction goes back to
  the pixel it was made for.
- ``scale<S>`` is approximate, in two ways. (1) The view's size is S times the
  input's, rounded to the encoder stride (32) per axis, so the factor per axis
  is not exactly S and the aspect ratio can change: 1280x1920 at 0.75 ->
  960x1440 (exact), 320x480 -> 256x352 (0.80, 0.73), 64x96 -> 64x64 (1.0, 0.67).
  (2) The inverse is a bilinear resize back (antialiased when it shrinks), not
  a true inverse: ``inverse(forward(m))`` is a low-passed ``m`` (a constant comes back
  exactly, a sharp 0/1 edge is smeared over a few pixels, symmetrically: tests/test_tta.py
  checks the first, docs/accuracy.md gives the sizes). The scaled view's prediction is
  therefore slightly softer at the car's edges than the flips'; it is averaged with them,
  never used alone.
"""
from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass

from .errors import ConfigError

STRIDE = 32
# name -> the image axes it flips ((N, C, H, W): -1 = width, -2 = height). Each flip is its own inverse.
FLIPS: dict[str, tuple[int, ...]] = {"none": (), "hflip": (-1,), "vflip": (-2,), "hvflip": (-2, -1)}
SCALE_RANGE = (0.25, 4.0)


@dataclass(frozen=True)
class TTA:
    """One view as data: the axes it flips and the factor it scales by (one of the two)."""
    name: str
    flip: tuple[int, ...] = ()
    scale: float = 1.0  # views with the same scale share one batched forward pass

    def forward(self, x):
        """(N, C, H, W) -> what the model sees."""
        import torch
        import torch.nn.functional as F
        if self.flip:
            return torch.flip(x, self.flip)
        if self.scale != 1.0:
            return F.interpolate(x, size=scaled_size(x.shape[-2:], self.scale), mode="bilinear",
                                 align_corners=False, antialias=self.scale < 1)
        return x

    def inverse(self, y, size=None):
        """The model's (N, 1, H', W') output for this view -> the original (H, W) grid."""
        import torch
        import torch.nn.functional as F
        if self.flip:
            return torch.flip(y, self.flip)
        if self.scale != 1.0:
            return F.interpolate(y, size=tuple(size), mode="bilinear", align_corners=False,
                                 antialias=y.shape[-2] > size[0])
        return y


def scaled_size(size: tuple[int, int], s: float) -> tuple[int, int]:
    """(H, W) scaled by s and rounded to a positive multiple of the encoder stride."""
    return tuple(max(STRIDE, int(round(v * s / STRIDE)) * STRIDE) for v in size)


def view(name: str) -> TTA:
    """A view by name: ``none``, ``hflip``, ``vflip``, ``hvflip`` or ``scale<S>``."""
    if name in FLIPS:
        return TTA(name, FLIPS[name])
    if name.startswith("scale"):
        try:
            s = float(name[len("scale"):])
        except ValueError:
            s = -1.0
        if not SCALE_RANGE[0] <= s <= SCALE_RANGE[1]:
            raise ConfigError(f"predict.tta: bad scale '{name}' (use e.g. scale0.75, factor in [0.25, 4])")
        return TTA(f"scale{s:g}", scale=s)
    close = difflib.get_close_matches(name, list(FLIPS), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"predict.tta: unknown transform '{name}'{hint}. Valid: {', '.join(FLIPS)}, scale<S>")


@functools.lru_cache(maxsize=None)
def parse(spec: str) -> tuple[TTA, ...]:
    """``predict.tta``: 'hflip,scale0.75' -> (none, hflip, scale0.75): identity first, duplicates
    dropped, order kept (the typed value of the key)."""
    names_ = ["none"] + [n.strip() for n in (spec or "").split(",") if n.strip()]
    out, seen = [], set()
    for n in names_:
        t = view(n)
        if t.name not in seen:
            seen.add(t.name)
            out.append(t)
    return tuple(out)


def names(ttas: list[TTA]) -> list[str]:
    return [t.name for t in ttas]


def view_names(spec: str) -> list[str]:
    """``predict.tta`` -> the names of its views, in order (what predict's key hashes)."""
    return names(parse(spec))


def check_max_forward(max_forward: int) -> None:
    """predict.max_forward: images per forward pass, 0 = no limit."""
    if max_forward < 0:
        raise ConfigError(f"predict.max_forward={max_forward}: must be >= 0 (0 = all views of a batch at once)")


def _chunks(n_views: int, n: int, max_forward: int):
    """Split the n_views * n images of one scale group (view-major: view v, image i at v * n + i)
    into consecutive runs of at most max_forward (0 = one run). Yields lists of (view, i0, i1)
    pieces, one list per forward pass."""
    total = n_views * n
    step = max_forward if max_forward > 0 else total
    for a in range(0, total, step):
        b = min(a + step, total)
        pieces = []
        for v in range(a // n, (b - 1) // n + 1):
            i0, i1 = max(a - v * n, 0), min(b - v * n, n)
            pieces.append((v, i0, i1))
        yield pieces


def predict_proba(model, x, ttas: list[TTA], max_forward: int = 0):
    """x: (N, 3, H, W) normalised images. Returns (N, 1, H, W) float32: mean sigmoid over the views.

    Views of the same scale are concatenated into one batch (N * k images) so the model runs
    once per distinct scale, not once per view. ``max_forward`` > 0 caps the images per model
    call: the concatenated views are cut into runs of at most that many (a run may span two
    views), so memory is bounded whatever the batch size and TTA; 0 = no cap. Each view's
    inputs are built per run, so a large N * k never exists as one input tensor either.
    """
    import torch
    check_max_forward(max_forward)
    with torch.no_grad():
        return _predict_proba(model, x, ttas, max_forward)


def _predict_proba(model, x, ttas: list[TTA], max_forward: int):
    import torch
    n, size = x.shape[0], tuple(x.shape[-2:])
    total = torch.zeros((n, 1) + size, dtype=torch.float32, device=x.device)
    for s in sorted({t.scale for t in ttas}):
        group = [t for t in ttas if t.scale == s]
        for pieces in _chunks(len(group), n, max_forward):
            views = torch.cat([group[v].forward(x[i0:i1]) for v, i0, i1 in pieces], 0)
            prob = torch.sigmoid(model(views).float())
            for (v, i0, i1), p in zip(pieces, prob.split([i1 - i0 for _, i0, i1 in pieces], 0)):
                total[i0:i1] += group[v].inverse(p, size)
    return total / len(ttas)
