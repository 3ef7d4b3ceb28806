"""Device and precision: one rule for train and predict (``train.device`` / ``predict.device``,
``train.precision`` / ``predict.precision``).

What ``precision: auto`` means on a device:

- CUDA: fp16 autocast (train adds a GradScaler).
- CPU: bf16 autocast where oneDNN has bf16 kernels for the CPU, else fp32. oneDNN's rule
  (``ideep::has_bf16_type_support``) is an effective ISA of AVX-512 core or newer: native
  bf16 on AVX512-BF16 / AMX CPUs, AVX-512 emulation on older AVX-512 ones; AVX2-only CPUs get
  fp32, because without oneDNN's kernels bf16 is emulated and many times slower (the timings:
  docs/accuracy.md, "Measurements behind the code"). An explicit ``bf16`` / ``fp16`` / ``fp32``
  is always taken as given.
"""
from __future__ import annotations

import functools
import os

import torch

from .config import PRECISIONS, check_choice

from .errors import ConfigError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}   # resolved name -> autocast dtype
CHOICES = PRECISIONS
# "1"/"0" overrides the CPU check (tests exercise both branches; users on odd hardware can force it).
CPU_BF16_ENV = "PIPELINE_CPU_BF16"


@functools.lru_cache(maxsize=None)
def _onednn_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):   # a build without oneDNN: no fast bf16 path either
        return False


def cpu_has_fast_bf16() -> bool:
    """True where bf16 autocast is native on this CPU (see the module docstring)."""
    forced = os.environ.get(CPU_BF16_ENV, "")
    return forced == "1" if forced in ("0", "1") else _onednn_bf16()


def resolve_device(name: str, key: str = "device", local_rank: int | None = None) -> torch.device:
    """auto | cpu | cuda | cuda:N -> a torch.device; ConfigError naming ``key`` for anything else,
    or for CUDA where there is none. ``local_rank`` (a DDP process) picks that process's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"{key}='{name}': choose auto, cpu or cuda")
    if device_type(name, key) == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={name}: CUDA is not available here")
        if local_rank is not None:
            return torch.device("cuda", local_rank)
    return torch.device(name)


def device_type(device: str | torch.device, key: str = "device") -> str:
    """'cpu' or 'cuda' (...) for a device or a device setting, without needing the device:
    submit resolves the predictions' directory on a machine that may not have the GPU predict used."""
    if isinstance(device, torch.device):
        return device.type
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(device).type
    except RuntimeError:
        raise ConfigError(f"{key}='{device}': not a device (auto, cpu, cuda, cuda:1, ...)") from None


def resolve_precision(precision: str, device: str | torch.device, key: str = "precision") -> str:
    """'auto' | 'fp32' | 'bf16' | 'fp16' on a device (or device type / setting) -> 'fp32', 'bf16' or 'fp16'."""
    check_choice(key, precision, CHOICES)
    if precision != "auto":
        return precision
    if device_type(device) == "cuda":
        return "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast(device_type: str, precision: str):
    """The autocast context for a resolved precision on 'cpu' / 'cuda': bf16 or fp16 autocast,
    or a disabled one for fp32 (one context type, so callers need no branch)."""
    dtype = DTYPES[precision]
    return torch.autocast(device_type=device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


def autocast_factory(device: torch.device, precision: str):
    """A zero-argument factory of autocast contexts (fp32: disabled ones), built once per run."""
    return functools.partial(autocast, device.type, precision)
