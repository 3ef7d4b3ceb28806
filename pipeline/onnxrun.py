"""Run an export folder with onnxruntime: its model card, one session per fold, the fold mean.

An export folder (``make export``, ``pipeline/export.py``) holds the model card :data:`CARD`
(format :data:`CARD_FORMAT`) and per fold an ONNX file with input :data:`INPUT`, (N, 3, H, W)
float32 normalised RGB, and output :data:`OUTPUT`, (N, 1, H, W) logits. This module reads the
card, opens the sessions and turns model-size pixels into predict's probabilities and submit's
mask; the export stage checks its ONNX files through the same :func:`session` and
:func:`probabilities`, so what it checks is what the cutout runner runs.

NumPy, onnxruntime and the torch-free ``geometry``, ``probmaps`` and ``tta`` only: the cutout
runner imports this without torch.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import probmaps
from .errors import PipelineError
from .geometry import to_model, to_original
from .tta import FLIPS

CARD = "model.json"
CARD_FORMAT = "carvana-export-1"
INPUT, OUTPUT = "input", "logits"
# The TTA views the runner implements: predict's flips (each its own inverse, so a view's map goes
# back exactly). A scale view would need predict's resize, so an export that lists one is refused.
VIEWS: dict[str, tuple[int, ...]] = FLIPS


@dataclass
class Model:
    """An export folder, ready to run: one onnxruntime session per fold and the card's rules."""
    folder: Path
    card: dict
    sessions: list
    weights: list[float]
    height: int
    width: int
    fit: str
    mean255: np.ndarray           # (3, 1, 1) float32: mean * 255 (data.to_device's arithmetic)
    std255: np.ndarray            # (3, 1, 1) float32: std * 255
    views: list[str]
    threshold: float
    input_name: str = INPUT
    seconds_to_load: float = 0.0


# ---------------------------------------------------------------------------- the card

def _card_error(folder: Path, what: str) -> PipelineError:
    return PipelineError(f"{folder / CARD}: {what}")


def read_card(folder: str | Path) -> dict:
    """The model card of an export folder, or PipelineError saying why it cannot be used."""
    folder = Path(folder)
    p = folder / CARD
    if not p.is_file():
        raise PipelineError(f"{folder}: not an export folder (no {CARD}; make one with `make export`)")
    try:
        card = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _card_error(folder, f"cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        got = card.get("format") if isinstance(card, dict) else type(card).__name__
        raise _card_error(folder, f"format {got!r}, this runner reads {CARD_FORMAT!r} (re-export with `make export`)")
    return card


def check_views(views: list[str], where: str) -> list[str]:
    """The card's TTA views, or PipelineError naming one the runner does not implement."""
    bad = [v for v in views if v not in VIEWS]
    if bad:
        raise PipelineError(f"{where}: TTA view(s) {', '.join(bad)} are not supported by the cutout runner "
                            f"(it runs {', '.join(VIEWS)}); re-export with e.g. ARGS=\"predict.tta=hflip\"")
    return list(views)


def _rules(folder: Path, card: dict) -> dict:
    """The card's fields :class:`Model` needs, checked (PipelineError naming what is wrong)."""
    try:
        inp, geo, folds = card["input"], card["geometry"], card["folds"]
        rules = {"weights": [float(f["weight"]) for f in folds], "height": int(geo["height"]),
                 "width": int(geo["width"]), "fit": str(geo["fit"]),
                 "views": check_views(list(card["tta"]), str(folder / CARD)),
                 "threshold": float(card["threshold"]["value"]), "input_name": str(inp.get("name", INPUT))}
        mean, std = (np.asarray(inp[k], np.float32) for k in ("mean", "std"))
        files = [folder / f["onnx"] for f in folds]
    except (KeyError, TypeError, ValueError) as e:
        raise _card_error(folder, f"incomplete or malformed ({type(e).__name__}: {e})") from None
    if not folds or mean.shape != (3,) or std.shape != (3,) or rules["fit"] not in ("stretch", "pad"):
        raise _card_error(folder, "needs at least one fold, 3 means and stds, and fit stretch or pad")
    weights = rules["weights"]
    if abs(sum(weights) - 1.0) > 1e-6 or min(weights) < 0:
        raise _card_error(folder, f"fold weights {weights} must be >= 0 and sum to 1")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise _card_error(folder, f"names ONNX files that are missing: {', '.join(missing)}")
    scale = np.float32(255.0)
    return {**rules, "files": files, "mean255": (mean * scale).reshape(3, 1, 1),
            "std255": (std * scale).reshape(3, 1, 1)}


# ---------------------------------------------------------------------------- sessions

def session(path: str | Path, threads: int = 0):
    """An onnxruntime CPU session for one ONNX file, or PipelineError naming the file.

    threads: onnxruntime intra-op threads (0 = its default, every core)."""
    import onnxruntime as ort      # here, not at import: reading a card needs no runtime
    so = ort.SessionOptions()
    if threads > 0:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:   # onnxruntime's own exception types (Fail, InvalidGraph, ...)
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise PipelineError(f"{path}: onnxruntime cannot load it ({msg})") from None


def load_model(folder: str | Path, threads: int = 0) -> Model:
    """Open an export folder: its card checked, one onnxruntime CPU session per fold."""
    t0 = time.time()
    folder = Path(folder)
    card = read_card(folder)
    rules = _rules(folder, card)
    sessions = [session(f, threads) for f in rules.pop("files")]
    return Model(folder, card, sessions, seconds_to_load=time.time() - t0, **rules)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Logits of any shape -> float32 probabilities of that shape."""
    return (1.0 / (1.0 + np.exp(-z.astype(np.float32)))).astype(np.float32)


def probabilities(sess, batch: np.ndarray, input_name: str = INPUT) -> np.ndarray:
    """(N, 1, H, W) float32 sigmoid of the network's logits for a (N, 3, H, W) float32 batch."""
    return sigmoid(sess.run(None, {input_name: np.ascontiguousarray(batch)})[0])


# ---------------------------------------------------------------------------- pixels -> mask

def model_input(model: Model, pixels: np.ndarray, geom: dict) -> np.ndarray:
    """(3, H, W) float32: ``to_model`` of (h, w, 3) uint8 RGB ``pixels`` placed by ``geom``
    (``geometry.geometry``), normalised as training normalised them."""
    x = to_model(pixels, geom, model.height, model.width)
    x = np.ascontiguousarray(x.transpose(2, 0, 1)).astype(np.float32)
    return (x - model.mean255) / model.std255


def fold_probs(sess, input_name: str, x: np.ndarray, views: list[str]) -> np.ndarray:
    """(H, W) float32: the mean over the views of sigmoid(logits) for one fold and a (3, H, W)
    input (predict_proba's arithmetic: each view's map flipped back, summed in view order,
    divided by the count)."""
    batch = np.stack([np.flip(x, VIEWS[v]) if VIEWS[v] else x for v in views])
    total = np.zeros(x.shape[1:], np.float32)
    for v, p in zip(views, probabilities(sess, batch, input_name)):
        total += np.flip(p[0], VIEWS[v]) if VIEWS[v] else p[0]
    return total / np.float32(len(views))


def prob255(model: Model, x: np.ndarray) -> np.ndarray:
    """(H, W) float32 0..255 at model size for a (3, H, W) input: the fold mean of the folds'
    uint8 maps. Equal weights (what export writes) are submit's ``probmaps.mean_map``; other
    weights in the card give the weighted sum."""
    maps = [probmaps.to_uint8(fold_probs(s, model.input_name, x, model.views)) for s in model.sessions]
    if len(set(model.weights)) == 1:
        return probmaps.mean_map(maps)
    return sum(m.astype(np.float32) * np.float32(w) for m, w in zip(maps, model.weights))


def predict_mask(model: Model, pixels: np.ndarray, geom: dict, size: tuple[int, int]) -> np.ndarray:
    """(h, w) bool at ``size`` = (h, w), the photo's own: submit's rule on the fold mean of
    (h', w', 3) uint8 RGB ``pixels`` (the photo, or its half-size decode) placed by ``geom``."""
    prob = to_original(prob255(model, model_input(model, pixels, geom)), size, geom)
    return probmaps.binarize(prob, model.threshold)
