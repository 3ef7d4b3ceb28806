"""Many processes, one cache: real concurrent processes on tiny data (pipeline.locks).

Processes are started together: each imports what it needs, says it is ready, and waits
for a start file, so their work overlaps for certain (without the locks, both processes of
a pair would do the work; the assertions below count who did). They are forked from the
session's pre-imported zygote (tests/_stage_runner.py), each a process of its own.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline import cache, locks, oof, predict, prepare, probmaps, synth, train, tta
from pipeline.graph import Graph
from pipeline import graph, testset
from pipeline.config import load
from pipeline.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]
H, W = 64, 96
PREPARE = {"prepare.height": H, "prepare.width": W, "prepare.n_folds": 2, "prepare.workers": 1}
TRAIN = {"train.arch": "Unet", "train.encoder": "tu-resnet18", "train.encoder_depth": 3,
         "train.decoder_channels": "32,16,8", "train.epochs": 1, "train.batch_size": 8, "train.num_workers": 0,
         "train.lr": 3e-3, "train.precision": "fp32", "tensorboard.enabled": False}

# Runs `body` in a fresh interpreter once `go` exists; `ready` tells the parent imports are done.
PRELUDE = """
import sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
{imports}
Path({ready!r}).touch()
while not Path({go!r}).exists():
    time.sleep(0.01)
{body}
"""


def _together(zygote, tmp_path: Path, imports: str, bodies: list[str], timeout: float = 600) -> list[str]:
    """Start one process per body, release them at the same moment; returns their outputs
    (stdout and stderr), asserting every process succeeded."""
    go = tmp_path / f"go{time.monotonic_ns()}"
    kids, ready = [], []
    env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for i, body in enumerate(bodies):
        ready.append(go.with_name(f"{go.name}.ready{i}"))
        code = PRELUDE.format(repo=str(REPO), imports=imports, ready=str(ready[-1]), go=str(go), body=body)
        kids.append(zygote.spawn([], code=code, cwd=REPO, env=env, merge=True))
    try:
        deadline = time.time() + timeout
        while not all(r.exists() for r in ready):
            assert time.time() < deadline and all(k.poll() for k in kids), \
                [k.wait().out[-3000:] for k in kids if not k.poll()]
            time.sleep(0.02)
        go.touch()
        results = [k.wait() for k in kids]
    finally:
        for k in kids:
            if k.result is None:
                if k.poll():
                    os.kill(k.pid, signal.SIGKILL)
                k.wait()
    for r in results:
        assert r.rc == 0, r.out[-4000:]
    return [r.out for r in results]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """2 train cars and 1 test car of 16 views at 64x96 (32 train pairs, 16 test images)."""
    return synth.generate(tmp_path_factory.mktemp("conc") / "raw", train_cars=2, test_cars=1, height=H, width=W,
                          seed=3, workers=1)


@pytest.fixture(scope="module")
def prepared(raw) -> tuple[Path, Path]:
    """(raw, cache) with the prepare artifact in the cache (made in this process)."""
    cache_root = raw.parent / "cache"
    prepare.run(load(None, {"data.raw": str(raw), "data.cache": str(cache_root), **PREPARE}))
    return raw, cache_root


def _argv(**over) -> list[str]:
    return [f"{k}={v}" for k, v in over.items()]


def _train_body(raw: Path, cache_root: Path, fold: int, seed: int) -> str:
    args = _argv(**{"data.raw": raw, "data.cache": cache_root, **PREPARE, **TRAIN, "train.fold": fold,
                    "train.seed": seed})
    return f"sys.exit(cli.main(['train', *{args!r}]))"


def _cfg(raw: Path, cache_root: Path, seed: int):
    return load(None, {"data.raw": str(raw), "data.cache": str(cache_root), **PREPARE, **TRAIN, "train.seed": seed})


# ---------------------------------------------------------------------------- train

def test_two_folds_at_once_both_finish_into_one_run(prepared, tmp_path, zygote):
    """`make train FOLD=0` and `FOLD=1` together: neither waits for the other, both folds are
    complete, the run's shared log holds both runs whole, and OOF pools both folds."""
    raw, cache_root = prepared
    outs = _together(zygote, tmp_path, "from pipeline import cli, train",
                     [_train_body(raw, cache_root, 0, seed=11), _train_body(raw, cache_root, 1, seed=11)])
    for k, out in enumerate(outs):
        assert "waiting for" not in out, out        # a fold's lock never blocks another fold
        assert out.count(f"fold {k} epoch 1/1: lr ") == 1 and f"fold {k}: OOF Dice" in out, out
    cfg = _cfg(raw, cache_root, seed=11)
    run = Graph(cfg).train_dir
    for k in (0, 1):
        d = run / f"fold{k}"
        assert cache.is_complete(d) and cache.read_manifest(d)["fold"] == k
        assert torch.load(d / "last.pt", map_location="cpu", weights_only=True)["fold"] == k
        assert not locks.record_path(locks.lock_path(cache_root, d)).exists()      # released: no holder record left
    log = (run / "train.log").read_text()                              # above the folds, appended by both
    assert log.count("=== ok") == 2 and log.count("python -m pipeline train") == 2
    assert all(f"fold {k}: OOF Dice" in log for k in (0, 1))
    summary = oof.run(cfg)
    assert summary["complete"] and sorted(summary["folds"]) == ["0", "1"] and summary["images"] == 32


SLOW_EPOCH = """
from pipeline.train import step
real_epoch = step.train_epoch
def slow_epoch(*args, **kwargs):  # the holder's epoch lasts well past the other process's start
    time.sleep(3)
    return real_epoch(*args, **kwargs)
step.train_epoch = slow_epoch
"""


def test_same_fold_twice_trains_once_the_other_waits_then_finds_it_cached(prepared, tmp_path, zygote):
    raw, cache_root = prepared
    # Without the slow epoch, a starved second process could reach the lock after the first had
    # finished (then it finds the fold cached without waiting, and the test cannot see the wait).
    outs = _together(zygote, tmp_path, "from pipeline import cli, train\n" + SLOW_EPOCH,
                     [_train_body(raw, cache_root, 0, seed=12), _train_body(raw, cache_root, 0, seed=12)])
    both = "".join(outs)
    assert both.count("fold 0 epoch 1/1: lr ") == 1, both              # exactly one process trained
    waited = [o for o in outs if "waiting for" in o]
    assert len(waited) == 1, both
    lines = [ln for ln in waited[0].splitlines() if "waiting for" in ln]
    assert all(ln.startswith("train fold 0: waiting for ") for ln in lines), lines
    # The waiter may poll between the holder's acquire and its record (first line: "a process
    # that has not written its record yet"); the holder's 3 s epoch leaves polls that name it.
    line = next((ln for ln in lines if "fold0.lock held by pid " in ln), None)
    assert line is not None, lines
    assert f"on host {socket.gethostname()}" in line
    assert "fold 0: cached" in waited[0] and "epoch 1/1" not in waited[0]
    out = Graph(_cfg(raw, cache_root, seed=12)).fold_dir(0)
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 0 and len(last["history"]) == 1 and cache.is_complete(out)
    assert len(pd.read_csv(out / "metrics.csv")) == 1


# ---------------------------------------------------------------------------- prepare and predict

def test_same_prepare_key_twice_builds_once(raw, tmp_path, zygote):
    args = _argv(**{"data.raw": raw, "data.cache": tmp_path / "cache", **PREPARE})
    body = f"sys.exit(cli.main(['prepare', *{args!r}]))"
    outs = _together(zygote, tmp_path, "from pipeline import cli, prepare", [body, body])
    built = [o for o in outs if "32 train pairs (32 processed, 0 reused)" in o]
    waited = [o for o in outs if "waiting for" in o]
    assert len(built) == 1 and len(waited) == 1 and built[0] is not waited[0], outs
    assert "prepare: cached, nothing to do" in waited[0] and "processed" not in waited[0]
    assert cache.is_complete(Graph(load(None, {"data.raw": str(raw),
                                                              "data.cache": str(tmp_path / "cache"), **PREPARE})).prepare_dir)


SLOW_PNG = """
real = predict.write_prob
def slow(path, prob):  # the work (8 x 0.25 s) outlasts the other's first poll (the holder may not have
    time.sleep(0.25)   # written its record yet) and its next one, locks.POLL_S later, names the holder
    real(path, prob)
predict.write_prob = slow
"""


def test_same_predict_shard_twice_predicts_once(prepared, tmp_path, zygote):
    raw, cache_root = prepared
    from pipeline.models import build_model
    torch.manual_seed(0)
    model = build_model("Unet", "resnet18", "none", encoder_depth=3, decoder_channels=[32, 16, 8])
    ckpt = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "arch": "Unet", "encoder": "resnet18", "height": H, "width": W,
                "model_kwargs": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}, "config": {}, "epoch": 0,
                "best_score": 0.0}, ckpt)
    index_csv = Graph(load(None, {"data.raw": str(raw), "data.cache": str(cache_root), **PREPARE})).prepared_dir \
        / "test_index.csv"
    body = (SLOW_PNG + f"index = testset.read_test_index({str(index_csv)!r})\n"
            f"predict.predict_fold(index, {str(ckpt)!r}, {str(tmp_path / 'cache')!r}, tta.parse('hflip'), "
            "shard=(1, 2), batch_size=1, num_workers=0, precision='fp32', progress=False)")
    outs = _together(zygote, tmp_path, "from pipeline import predict, testset, tta", [body, body])
    assert sorted(o.count(": 8 predicted, 0 cached (shard 1/2)") for o in outs) == [0, 1], outs
    waited = [o for o in outs if "waiting for" in o]
    assert len(waited) == 1 and ": 0 predicted, 8 cached (shard 1/2)" in waited[0], outs
    assert "predict shard 1/2: waiting for " in waited[0] and ".shard1of2.lock held by pid " in waited[0]
    fold_dir = graph.predict_dir(tmp_path / "cache", graph.file_sha16(ckpt), tta.names(tta.parse("hflip")), "fp32")
    index = testset.read_test_index(index_csv)
    assert probmaps.done_ids(fold_dir) == set(index["id"].iloc[1::2])


# ---------------------------------------------------------------------------- the lock itself

HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from pipeline.locks import stage_lock
from pipeline.graph import Graph
from pipeline import graph, testset
with stage_lock({path!r}, "holder"):
    print("held", flush=True)
    time.sleep({hold})
"""


def _hold(path: Path, hold: float = 120) -> subprocess.Popen:
    """A process holding ``path``'s lock for ``hold`` seconds (returned once it holds it)."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER.format(repo=str(REPO), path=str(path), hold=hold)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_lock_of_a_killed_holder_is_taken_over(tmp_path):
    """kill -9 leaves the lock file and a holder record naming a dead pid: the next process takes
    the lock at once (the kernel released the flock), says whose it was, and writes its own record."""
    path = tmp_path / "fold0.lock"
    holder = _hold(path)
    assert locks.read_holder(path)["pid"] == holder.pid
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert path.exists() and locks.read_holder(path)["pid"] == holder.pid    # what a kill -9 leaves behind
    lines = []
    t0 = time.monotonic()
    with locks.stage_lock(path, "train fold 0", log=lines.append, timeout=30):
        assert time.monotonic() - t0 < 5
        rec = locks.read_holder(path)
        assert rec["pid"] == os.getpid() and rec["host"] == socket.gethostname() and rec["what"] == "train fold 0"
    assert len(lines) == 1 and lines[0].startswith(f"train fold 0: taking over {path}: its last holder, "
                                                   f"pid {holder.pid} on host {socket.gethostname()}")
    assert "exited without removing its record (stale)" in lines[0]
    assert not locks.record_path(path).exists()          # released cleanly: no record


def test_live_holder_is_named_and_a_remote_one_comes_with_the_command_to_remove_it(tmp_path):
    path = tmp_path / "k.lock"
    holder = _hold(path)
    try:
        lines = []
        with pytest.raises(PipelineError, match=rf"{path} is held by pid {holder.pid} on host "
                                                rf"{socket.gethostname()} since .* \(holder\); gave up after 0.3 s"):
            with locks.stage_lock(path, "prepare k", log=lines.append, timeout=0.3, poll=0.05):
                pass
        assert lines == [f"prepare k: waiting for {path} held by {locks.describe(path, locks.read_holder(path))}"]
        # The same holder seen from another host's record: its pid cannot be checked from here.
        cache.write_json(locks.record_path(path), {**locks.read_holder(path), "host": "node-b"})
        with pytest.raises(PipelineError, match=f"on host node-b .*another host.* rm -f {path} {path}.json"):
            with locks.stage_lock(path, "prepare k", log=lines.append, timeout=0.1, poll=0.05):
                pass
    finally:
        holder.kill()
        holder.wait()


class _Agree:
    """all_gather_object(...)[0] for two threads standing in for two DDP ranks."""

    def __init__(self):
        self.barrier, self.value, self.rounds = threading.Barrier(2, timeout=30), None, 0

    def __call__(self, state, main: bool):
        if main:
            self.value, self.rounds = state, self.rounds + 1
        self.barrier.wait()          # rank 0 has published
        value = self.value
        self.barrier.wait()          # every rank has read it before the next round
        return value


def _ranks(path: Path, **kw) -> tuple[list, _Agree, list[threading.Thread]]:
    agree, events = _Agree(), []

    def rank(main: bool):
        try:
            with locks.stage_lock(path, "train fold 0", main=main, agree=lambda s: agree(s, main), poll=0.05,
                                  log=lambda m: events.append(("log", main, m)), **kw):
                events.append(("in", main, time.monotonic()))
        except PipelineError as e:
            events.append(("error", main, str(e)))

    threads = [threading.Thread(target=rank, args=(m,)) for m in (True, False)]
    for t in threads:
        t.start()
    return events, agree, threads


def test_ddp_ranks_share_rank0s_hold_and_wait_or_give_up_together(tmp_path):
    """Under DDP only rank 0 touches the lock; the other ranks follow its outcome each poll, so
    they wait together (no collective blocks for long) and enter, or fail, together."""
    path = tmp_path / "fold0.lock"
    holder = _hold(path, hold=1.0)
    held = time.monotonic()            # the holder releases 1 s after it said "held"
    events, agree, threads = _ranks(path)
    for t in threads:
        t.join(30)
    holder.wait()
    entered = [e for e in events if e[0] == "in"]
    assert sorted(e[1] for e in entered) == [False, True] and all(e[2] >= held + 0.8 for e in entered)
    assert agree.rounds > 1                                     # they polled together while held
    logs = [e for e in events if e[0] == "log"]
    assert len(logs) == 1 and logs[0][1] is True and "waiting for" in logs[0][2]    # rank 0 speaks once

    holder = _hold(path)
    try:
        events, agree, threads = _ranks(path, timeout=0.3)
        for t in threads:
            t.join(30)
        errors = [e for e in events if e[0] == "error"]
        assert sorted(e[1] for e in errors) == [False, True] and errors[0][2] == errors[1][2]
        assert f"held by pid {holder.pid}" in errors[0][2] and not [e for e in events if e[0] == "in"]
    finally:
        holder.kill()
        holder.wait()
