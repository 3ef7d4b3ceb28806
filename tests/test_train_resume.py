"""Resume: kill -9 in the middle of an epoch, rerun the same command: same final metrics as no kill.

Also what a resume restores or refuses: RNG states (this GPU's only), the GradScaler state of
another precision, another number of DDP processes, and the logs a kill may leave behind.
"""
from __future__ import annotations

import signal
from pathlib import Path

import random

import numpy as np
import pandas as pd
import pytest
import torch

from _train_helpers import make_prepared, tiny_cfg
from pipeline import cache, faults, train
from pipeline.runtime import Runtime
from pipeline.train import build, fold, resume, rng
from pipeline.graph import Graph
from pipeline.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = {"train.epochs": 2, "train.augment": "basic", "train.warmup_epochs": 0.5}
CLOCKS = ["seconds", "images_per_s"]
# Stochastic depth in the timm encoder (active from the first step: residual branches not
# zero-initialised), so the training draws from the global torch RNG and a resume that lost
# its RNG state would not reproduce the uninterrupted run.
STOCHASTIC = {"drop_path_rate": 0.2, "zero_init_last": False}

SCRIPT = """
import sys
sys.path[:0] = [{tests!r}, {repo!r}]
from _train_helpers import tiny_cfg
from pipeline import train
from pipeline.graph import Graph
from pipeline.train import build
_model_kwargs = build.model_kwargs
build.model_kwargs = lambda *a: {{**_model_kwargs(*a), **{extra!r}}}
cfg = tiny_cfg({cache!r}, **{overrides!r})
train.run(cfg, Graph(cfg, prepared={prepared!r}))
"""


def _stochastic(monkeypatch):
    real = build.model_kwargs
    monkeypatch.setattr(build, "model_kwargs", lambda *a: {**real(*a), **STOCHASTIC})


def test_kill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, capsys, monkeypatch, zygote):
    prepared = make_prepared(tmp_path / "prep")
    _stochastic(monkeypatch)
    # Uninterrupted reference, in this process, without DataLoader workers.
    ref_cfg = tiny_cfg(tmp_path / "ref", **OVERRIDES)
    train.run(ref_cfg, Graph(ref_cfg, prepared=prepared))
    ref_dir = Graph(ref_cfg, prepared=prepared).fold_dir(0)

    # Same config in another cache, with 2 workers (a run-only knob), killed by SIGKILL at
    # epoch 2, micro-batch 2 (2 micro-batches per epoch: the 4th micro-batch's kill point). A
    # process of its own, forked from the session's pre-imported zygote (tests/_stage_runner.py).
    overrides = {**OVERRIDES, "train.num_workers": 2}
    script = SCRIPT.format(tests=str(REPO / "tests"), repo=str(REPO), cache=str(tmp_path / "run"),
                           overrides=overrides, prepared=str(prepared), extra=STOCHASTIC)
    proc = zygote.run([], code=script, env={faults.KILL_ENV: "train.batch:4"})
    assert proc.rc == -signal.SIGKILL, proc.err[-2000:]
    cfg = tiny_cfg(tmp_path / "run", **overrides)
    out = Graph(cfg, prepared=prepared).fold_dir(0)
    assert out.parent.name == ref_dir.parent.name          # num_workers is not in the key
    assert not cache.is_complete(out)
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=True)["epoch"] == 0
    assert len(pd.read_csv(out / "metrics.csv")) == 1

    # Rerun the same command: resumes after epoch 1 and finishes.
    capsys.readouterr()
    train.run(cfg, Graph(cfg, prepared=prepared))
    assert "resuming after epoch 1 of 2" in capsys.readouterr().out
    assert cache.is_complete(out)
    # Exactly: every column but the clocks, and every weight of best.pt and last.pt.
    got, want = (pd.read_csv(d / "metrics.csv").drop(columns=CLOCKS) for d in (out, ref_dir))
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    for name in ("best.pt", "last.pt"):
        a = torch.load(out / name, map_location="cpu", weights_only=True)["model"]
        b = torch.load(ref_dir / name, map_location="cpu", weights_only=True)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), name
    assert cache.read_json(out / "oof.json")["dice_original"] == \
        pytest.approx(cache.read_json(ref_dir / "oof.json")["dice_original"], abs=1e-4)
    # The premise: this model's training draws random numbers (else the equalities above
    # would hold with a broken RNG restore too) ...
    from pipeline.models import load_checkpoint
    model, meta = load_checkpoint(out / "best.pt")
    assert meta["model_kwargs"]["drop_path_rate"] == 0.2
    model.train()
    x = torch.randn(2, 3, 64, 96)
    assert not torch.equal(model(x), model(x))
    # ... and the resumed run ends in the uninterrupted run's RNG states.
    got_rng = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["rng"]
    want_rng = torch.load(ref_dir / "last.pt", map_location="cpu", weights_only=True)["rng"]
    assert len(got_rng) == len(want_rng) == 1
    assert torch.equal(got_rng[0]["torch"], want_rng[0]["torch"])
    assert got_rng[0]["python"] == want_rng[0]["python"]
    assert all(np.array_equal(a, b) for a, b in zip(got_rng[0]["numpy"], want_rng[0]["numpy"]))


# ---------------------------------------------------------------------------- what a resume restores

class Stop(Exception):
    pass


def _stop_at_epoch(monkeypatch, epoch: int):
    """run_epoch raises Stop when it reaches ``epoch`` (0-based): a crash after the epochs before."""
    real = fold.run_epoch

    def run(f, data, parts, progress, plan, board):
        if plan.epoch == epoch:
            raise Stop
        return real(f, data, parts, progress, plan, board)
    monkeypatch.setattr(fold, "run_epoch", run)


def test_cpu_checkpoint_resumes_with_an_enabled_grad_scaler(tmp_path, monkeypatch, capsys):
    """last.pt from a CPU run (disabled GradScaler, state {}) resumed where precision=auto means
    fp16 (CUDA): the enabled scaler starts fresh instead of failing on the empty state."""
    monkeypatch.setenv("PIPELINE_CPU_BF16", "0")     # auto = fp32 on this CPU, whatever the machine
    prepared = make_prepared(tmp_path / "prep")
    cfg = tiny_cfg(tmp_path / "cache", **{"train.epochs": 2})
    with monkeypatch.context() as m:
        _stop_at_epoch(m, 1)
        with pytest.raises(Stop):
            train.run(cfg, Graph(cfg, prepared=prepared))
    out = Graph(cfg, prepared=prepared).fold_dir(0)
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert last["scaler"] == {} and last["precision"] == "fp32" and last["world_size"] == 1
    capsys.readouterr()
    train.run(cfg, Graph(cfg, prepared=prepared), rt=Runtime(device="cpu", precision="fp16"))   # as on CUDA
    log = capsys.readouterr().out
    assert "resuming after epoch 1 of 2" in log
    assert "was trained in fp32 on cpu, this run uses fp16 on cpu" in log
    assert cache.is_complete(out)
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert last["precision"] == "fp16" and last["scaler"]["scale"] > 0     # the enabled scaler's own state
    # The helper: an empty state is skipped, a real one loaded.
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    resume.load_scaler_state(scaler, {})
    assert scaler.get_scale() == 8.0
    resume.load_scaler_state(scaler, last["scaler"])
    assert scaler.get_scale() == last["scaler"]["scale"]


def test_resume_under_another_world_size_is_an_error(tmp_path, capsys):
    """steps_per_epoch and the schedule depend on the process count: say what was used and how to go on."""
    prepared = make_prepared(tmp_path / "prep")
    cfg = tiny_cfg(tmp_path / "cache")
    out = Graph(cfg, prepared=prepared).fold_dir(0)
    out.mkdir(parents=True)
    key = Graph(cfg, prepared=prepared).train_key
    torch.save({"train_key": key, "world_size": 2, "rng": [{}, {}], "epoch": 0}, out / "last.pt")
    with pytest.raises(PipelineError, match=r"last.pt was trained with 2 process\(es\) but this run has 1; .*"
                                            r"resume with NPROC=2 \(`make train-ddp NPROC=2`\), or remove .*fold0"):
        train.run(cfg, Graph(cfg, prepared=prepared))
    # Checkpoints before train-3 carry no world_size: one RNG state per rank tells it.
    torch.save({"train_key": key, "rng": [{}, {}, {}], "epoch": 0}, out / "last.pt")
    with pytest.raises(PipelineError, match=r"trained with 3 process\(es\)"):
        train.run(cfg, Graph(cfg, prepared=prepared))
    with pytest.raises(PipelineError, match=r"trained with 1 process\(es\) but this run has 2; .*resume with "
                                            r"`make train` \(no DDP\)"):
        resume.check_resume_world({"world_size": 1}, 2, out / "last.pt", out)
    resume.check_resume_world({"world_size": 2}, 2, out / "last.pt", out)
    # A finished fold from another process count stays cached, with a note.
    (out / "last.pt").unlink()
    cache.write_json(out / "oof.json", {"fold": 0, "world_size": 2})
    cache.write_manifest(out, stage="train", key=key, params={}, inputs={}, outputs={})
    capsys.readouterr()
    assert train.run(cfg, Graph(cfg, prepared=prepared)) == [{"fold": 0, "world_size": 2}]
    assert f"fold 0: cached ({out}); trained with 2 process(es), this run has 1" in capsys.readouterr().out


def test_rng_state_touches_only_this_gpu(monkeypatch):
    """Only the process's own CUDA generator is saved and restored (get/set_rng_state_all would make
    a CUDA context on every GPU from every rank and fail on fewer GPUs); old lists still load."""
    calls = []

    def every_gpu(*a, **k):
        raise AssertionError("every GPU's RNG touched")
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", every_gpu)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", every_gpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state",
                        lambda device="cuda": calls.append(("get", device)) or torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": calls.append(("set", int(s[0]), device)))
    cpu_state = rng.rng_state(torch.device("cpu"))
    assert "cuda" not in cpu_state and calls == []            # a CPU run leaves the GPUs alone
    gpu1 = torch.device("cuda", 1)
    state = rng.rng_state(gpu1)
    assert calls == [("get", gpu1)]
    want = (random.random(), np.random.random(), torch.rand(1))
    rng.set_rng_state(state, gpu1)
    assert calls[-1] == ("set", 7, gpu1)
    assert (random.random(), np.random.random(), torch.rand(1)) == want
    # Before train-3: every visible GPU's state; this GPU's entry is the one.
    old = [torch.tensor([v], dtype=torch.uint8) for v in (10, 11, 12)]
    rng.set_rng_state({**state, "cuda": old}, gpu1)
    assert calls[-1] == ("set", 11, gpu1)
    n = len(calls)
    rng.set_rng_state({**state, "cuda": old[:1]}, gpu1)     # that GPU was not there: left as seeded
    rng.set_rng_state(cpu_state, gpu1)                      # a CPU checkpoint: nothing to restore
    rng.set_rng_state(state, torch.device("cpu"))           # a GPU checkpoint on a CPU
    assert len(calls) == n


def test_logs_are_written_before_last_pt(tmp_path, monkeypatch, capsys):
    """A kill between the logs and last.pt repeats the epoch; a fold with nothing left to train
    rewrites the logs from last.pt's history: metrics.csv is never a row short."""
    prepared = make_prepared(tmp_path / "prep")
    cfg = tiny_cfg(tmp_path / "cache", **{"train.epochs": 2})
    out = Graph(cfg, prepared=prepared).fold_dir(0)
    real = cache.atomic_path
    saves = []

    def atomic_path(path, *a, **k):
        if str(path).endswith("last.pt"):
            saves.append(path)
            if len(saves) == 2:
                raise Stop       # killed just before the second epoch's last.pt
        return real(path, *a, **k)
    with monkeypatch.context() as m:
        m.setattr(cache, "atomic_path", atomic_path)
        with pytest.raises(Stop):
            train.run(cfg, Graph(cfg, prepared=prepared))
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=True)["epoch"] == 0
    assert pd.read_csv(out / "metrics.csv")["epoch"].tolist() == [1, 2]     # already there
    capsys.readouterr()
    train.run(cfg, Graph(cfg, prepared=prepared))
    assert "resuming after epoch 1 of 2" in capsys.readouterr().out
    want = pd.read_csv(out / "metrics.csv")
    assert want["epoch"].tolist() == [1, 2] and cache.is_complete(out)
    # Killed after the last last.pt (e.g. during OOF), logs lost: the resume has no epoch to run.
    for name in ("manifest.json", "metrics.csv", "curve.png"):
        (out / name).unlink()
    train.run(cfg, Graph(cfg, prepared=prepared))
    assert "resuming after epoch 2 of 2" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_csv(out / "metrics.csv"), want)
    assert (out / "curve.png").is_file() and cache.is_complete(out)
