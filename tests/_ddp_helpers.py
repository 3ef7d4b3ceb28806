"""torchrun launches shared by test_ddp.py and test_multinode.py (a tiny fold, gloo on CPU).

The 2-process single-node run is made once per session (``single_node``) and serves both
files: the DDP checks and the reference that a two-node run must equal.

The model's BatchNorm layers keep no running statistics in these runs (they normalise with
the batch's own, in eval mode too, see ``no_running_stats``). Under DDP each rank normalises
its own micro-batch, which a single process reproduces with the same micro-batches, but the
running statistics are rank 0's alone (DDP broadcasts rank 0's buffers), so a model with
them validates differently from one process that saw every micro-batch. Without them, DDP
must reproduce the single process's run: losses, weights and validation metrics.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from _train_helpers import make_prepared, tiny_cfg

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# One epoch of 8 training images, micro-batches of 1, 2 per update and rank: 2 updates of 1x2x2.
OVERRIDES = {"train.epochs": 1, "train.batch_size": 1, "train.accum_steps": 2, "train.precision": "fp32"}

SCRIPT = """
import builtins, io, json, os, sys
sys.path[:0] = [{tests!r}, {repo!r}]
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from _ddp_helpers import no_running_stats
from _train_helpers import tiny_cfg
from pipeline import train
from pipeline.graph import Graph
from pipeline.train import build
no_sync, entered = DDP.no_sync, []
DDP.no_sync = lambda self: entered.append(1) or no_sync(self)   # count the accumulate-locally micro-batches
real_build = build.build_model
build.build_model = lambda *a, **k: no_running_stats(real_build(*a, **k))
# Every file this rank writes: opened for writing, renamed into place, or torch.save'd.
writes, _open, _replace, _save = [], builtins.open, os.replace, torch.save
def rec(p):
    writes.append(os.path.abspath(os.fspath(p)) if isinstance(p, (str, os.PathLike)) else repr(p))
def open_(file, mode="r", *a, **k):
    if any(c in mode for c in "wax+"):
        rec(file)
    return _open(file, mode, *a, **k)
builtins.open = io.open = open_
os.replace = lambda src, dst, *a, **k: (rec(dst), _replace(src, dst, *a, **k))[1]
torch.save = lambda obj, f, *a, **k: (rec(f), _save(obj, f, *a, **k))[1]
cfg = tiny_cfg({cache!r}, **{overrides!r})
summary = train.run(cfg, Graph(cfg, prepared={prepared!r}))
rank = os.environ['RANK']
with _open(f"writes-{{rank}}.json", "w") as fh:
    json.dump(writes, fh)
print(f"rank {{rank}} of {{os.environ['WORLD_SIZE']}} done ({{len(entered)}} no_sync): {{summary}}", flush=True)
"""


def no_running_stats(model: torch.nn.Module) -> torch.nn.Module:
    """BatchNorm without running statistics: batch statistics in training and in eval (see the
    module docstring). Checkpoints of such a model hold no BN buffers."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """One launch: its directory, cache, prepared data and the launchers' output."""

    def __init__(self, root: Path):
        self.root = root
        self.prepared = make_prepared(root / "prep")
        self.cache = root / "cache"
        self.script = root / "ddp_train.py"
        self.script.write_text(SCRIPT.format(tests=str(TESTS), repo=str(REPO), cache=str(self.cache),
                                             overrides=OVERRIDES, prepared=str(self.prepared)))
        self.stdout = ""

    def cfg(self):
        return tiny_cfg(self.cache, **OVERRIDES)

    def writes(self, rank: int) -> list[str]:
        return json.loads((self.root / f"writes-{rank}.json").read_text())


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def launch_single_node(root: Path) -> Run:
    """torchrun --standalone --nproc_per_node 2: two processes on this machine."""
    run = Run(root)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(run.script)], env=_env(), capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run.stdout = proc.stdout
    return run


def launch_two_nodes(root: Path) -> Run:
    """Two torchrun agents, as on two machines: --nnodes 2 --nproc-per-node 1 each, --node-rank 0
    and 1, meeting at a c10d rendezvous on 127.0.0.1 (the agent that binds the port hosts it)."""
    run = Run(root)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(i), "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"t13-{port}",
                               str(run.script)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=root) for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-3000:] + err[-3000:]
    run.stdout = "".join(out for out, _ in outs)
    return run


_SINGLE: dict = {}


def single_node(tmp_path_factory) -> Run:
    """The 2-process single-node run, launched once per test session."""
    if "run" not in _SINGLE:
        _SINGLE["run"] = launch_single_node(tmp_path_factory.mktemp("ddp1node"))
    return _SINGLE["run"]
