"""Random generator states of one training process: seeding, saving into last.pt, restoring.

A resumed fold continues with the generators of the process that was killed, so it draws
what an uninterrupted run would have drawn (dropout, drop-path, augmentation seeds).
"""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict:
    """Python, NumPy and torch CPU generator states, plus the CUDA generator of ``device`` only.

    Only this process's GPU: get_rng_state_all() would create a CUDA context on every visible
    GPU from every DDP rank, and its list could not be restored where fewer GPUs are visible.

    python: random.getstate(), (3, 625 ints, None); numpy: ("MT19937", int64 tensor (624,) of the
    uint32 keys, pos, has_gauss, cached_gaussian) - a tensor, not NumPy's ndarray, which the
    weights-only loader refuses; torch, cuda: uint8 tensors.
    """
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore :func:`rng_state`. Checkpoints before train-3 hold a list (every visible GPU's
    state): the entry of this process's GPU is used, and none when that GPU was not there."""
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]     # keys: a tensor (an ndarray in checkpoints before safe loading)
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):
        i = device.index if device.index is not None else torch.cuda.current_device()
        cuda = cuda[i] if i < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
