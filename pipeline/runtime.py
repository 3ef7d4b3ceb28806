"""The runtime context of one command: which process this is among how many, and where it runs.

Read once, by the command line, from torchrun's environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``) and handed to the stages, so no stage reads the environment itself.
Device and precision are resolved per stage from the stage's own keys
(``train.device``/``train.precision``, ``predict.device``/``predict.precision``) by
:func:`resolve`; that needs torch, so it is imported there and nowhere else here.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from typing import Mapping

from .config import value
from .errors import ConfigError


@dataclass(frozen=True)
class Runtime:
    rank: int = 0
    world: int = 1
    local_rank: int | None = None    # this process's GPU on its node under torchrun, else None
    device: str = "cpu"              # resolved device ("cpu", "cuda", "cuda:1") of the stage
    precision: str = "fp32"          # resolved precision of the stage: fp32 | bf16 | fp16

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes logs, manifests and shared files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process (torchrun)."""
        return self.world > 1

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]


def from_env(env: Mapping[str, str] | None = None) -> Runtime:
    """(rank, world, local rank) under torchrun (WORLD_SIZE > 1), else one process."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Runtime()
    return Runtime(rank=int(env.get("RANK", "0")), world=world, local_rank=int(env.get("LOCAL_RANK", "0")))


# The stage's device and precision keys; stages without a model run on the predict settings (submit
# resolves the precision the maps were made in, without needing that device).
DEVICE_KEYS = {"train": ("train.device", "train.precision")}
DEFAULT_KEYS = ("predict.device", "predict.precision")


def resolve(cfg, stage: str, base: Runtime | None = None) -> Runtime:
    """``base`` (default: :func:`from_env`) with the device and precision of ``stage`` resolved.

    The device is only resolved (and CUDA checked) for the stages that run a model; the
    others learn the precision alone, by device type, as the maps they read were made."""
    from . import precision as P     # torch: only for this resolution
    base = base or from_env()
    dev_key, prec_key = DEVICE_KEYS.get(stage, DEFAULT_KEYS)
    setting, prec_setting = value(cfg, dev_key), value(cfg, prec_key)
    if stage in ("train", "predict", "export"):
        device = str(P.resolve_device(setting, dev_key, base.local_rank))
    else:
        device = P.device_type(setting, dev_key)
    return replace(base, device=device, precision=P.resolve_precision(prec_setting, device, prec_key))


@functools.lru_cache(maxsize=None)
def parse_shard(spec: str) -> tuple[int, int]:
    """``predict.shard``: '' -> (0, 1); 'i/N' -> (i, N) with 0 <= i < N (shards are numbered from 0)."""
    if not spec:
        return 0, 1
    try:
        i, n = (int(p) for p in spec.split("/"))
    except ValueError:
        raise ConfigError(f"predict.shard='{spec}': expected i/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"predict.shard='{spec}': need 0 <= i < N (shards are numbered 0..N-1)")
    return i, n
