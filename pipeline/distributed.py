"""DDP plumbing for train: the process group, reductions across ranks, sharding, unwrap.

Under ``torchrun --nproc_per_node N -m pipeline train ...`` (env WORLD_SIZE > 1) train
joins a process group (gloo on CPU, nccl on CUDA); everything here is the identity in
one process, so train has a single code path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .runtime import Runtime


@dataclass(frozen=True)
class Dist(Runtime):
    """The runtime context of a training process, and whether it made the process group."""
    owns_group: bool = False     # this run initialised the process group (and destroys it)


def dist_init(rt: Runtime) -> Dist:
    """Join the torchrun process group when the runtime has several processes (gloo on CPU,
    nccl on CUDA)."""
    owns = False
    if rt.active and not dist.is_initialized():
        if rt.device_type == "cuda":
            torch.cuda.set_device(rt.local_rank)
        dist.init_process_group("nccl" if rt.device_type == "cuda" else "gloo")
        owns = True
    return Dist(rt.rank, rt.world, rt.local_rank, rt.device, rt.precision, owns)


def dist_close(d: Dist) -> None:
    """Destroy the process group when this run made it."""
    if d.owns_group:
        dist.destroy_process_group()


def all_sum(values: list[float], d: Dist, device: torch.device) -> list[float]:
    """Sum floats over ranks (identity in one process)."""
    if not d.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_finite(finite: torch.Tensor, d: Dist) -> bool:
    """finite: a scalar bool tensor. True when it is true on every rank (all ranks get the same answer)."""
    finite = finite.to(torch.float32).reshape(1)
    if d.active:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def gather(obj, d: Dist) -> list:
    """Every rank's ``obj``, in rank order (a list of one in one process)."""
    if not d.active:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def sync_buffers(model: torch.nn.Module, d: Dist) -> None:
    """Give every rank rank 0's BatchNorm statistics (the ones the checkpoint holds)."""
    if d.active:
        for b in model.buffers():
            dist.broadcast(b, 0)


def wrap(model: torch.nn.Module, device: torch.device, d: Dist) -> torch.nn.Module:
    """The model in DistributedDataParallel under DDP, else the model itself."""
    if not d.active:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under torch.compile's wrapper and/or DistributedDataParallel."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def is_ddp(model: torch.nn.Module) -> bool:
    """DDP, possibly inside torch.compile's wrapper (which forwards no_sync to it)."""
    return isinstance(getattr(model, "_orig_mod", model), torch.nn.parallel.DistributedDataParallel)


class ShardSampler(Sampler):
    """Indices rank, rank + world, ... of range(n): every index once across ranks, no padding."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.idx = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.idx)

    def __len__(self):
        return len(self.idx)
