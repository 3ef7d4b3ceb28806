"""Faults other than kill -9 (tests/test_kill_points.py): temp sweeps, disk full, GPU out of memory,
and `make clean-cache` on a non-default cache."""
from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from _stage_runner import REPO
from pipeline import cache, predict, probmaps, synth, tta
from pipeline.errors import PipelineError

TINY = ["prepare.height=32", "prepare.width=64", "n_folds=2", "epochs=1", "train.batch_size=8",
        "train.arch=Unet", "train.encoder=tu-resnet18", "train.encoder_depth=3", "train.decoder_channels=32,16,8",
        "encoder_weights=none", "train.fold=0", "predict.folds=0", "train.num_workers=0", "predict.num_workers=0",
        "prepare.workers=1", "tta=hflip", "tensorboard.enabled=false"]


# ---------------------------------------------------------------------------- temp files of killed writers

def _temp(d: Path, name: str, host: str, pid: int | str, age_s: float = 0) -> Path:
    p = d / f".{name}.tmp.{host}-{pid}.ab_cd12e{Path(name).suffix}"
    p.write_bytes(b"half")
    if age_s:
        t = time.time() - age_s
        os.utime(p, (t, t))
    return p


def test_sweep_removes_dead_writers_and_stale_temps_only(tmp_path):
    """A temp is swept when its writer (this host, by pid) is gone or it is older than the limit;
    a live writer's temp, this process's own, and ordinary files stay."""
    dead = subprocess.Popen(["true"])
    dead.wait()                                           # reaped: the pid names no process now
    live = subprocess.Popen(["sleep", "60"])
    try:
        host, other = cache._HOST, "0" * 8 if cache._HOST != "0" * 8 else "1" * 8
        keep = [_temp(tmp_path, "a.png", host, live.pid),                  # a concurrent writer
                _temp(tmp_path, "b.png", host, os.getpid(), age_s=9999),   # this process, however old
                _temp(tmp_path, "c.png", other, 1, age_s=10),              # another host's, recent
                tmp_path / "d.png", tmp_path / ".hidden"]
        keep[-2].write_bytes(b"x")
        keep[-1].write_bytes(b"x")
        legacy_new = tmp_path / ".e.json.tmp.k2j3h4g5.json"                # the naming before pids
        legacy_new.write_bytes(b"x")
        keep.append(legacy_new)
        gone = [_temp(tmp_path, "f.png", host, dead.pid),                  # its writer was killed
                _temp(tmp_path, "g.png", other, 1, age_s=cache.STALE_TEMP_S + 60),
                _temp(tmp_path, "h.png", host, live.pid, age_s=cache.STALE_TEMP_S + 60)]
        legacy_old = tmp_path / ".i.json.tmp.k2j3h4g5.json"
        legacy_old.write_bytes(b"x")
        t = time.time() - cache.STALE_TEMP_S - 60
        os.utime(legacy_old, (t, t))
        gone.append(legacy_old)
        assert cache.sweep_temps([tmp_path, tmp_path / "missing"]) == len(gone)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in keep)
    finally:
        live.kill()
        live.wait()


def test_atomic_temp_is_named_for_its_writer_and_survives_a_sweep(tmp_path):
    target = tmp_path / "x.npz"
    with cache.atomic_path(target) as tmp:
        m = cache._TEMP.fullmatch(tmp.name)
        assert m and m["host"] == cache._HOST and int(m["pid"]) == os.getpid() and tmp.suffix == ".npz"
        tmp.write_bytes(b"data")
        assert cache.sweep_temps([tmp_path]) == 0 and tmp.exists()      # a live writer's temp stays
    assert target.read_bytes() == b"data" and [p.name for p in tmp_path.iterdir()] == ["x.npz"]


# ---------------------------------------------------------------------------- disk full / file-size limit

def _no_room_error(err: str, where: Path) -> Path:
    """The stage's stderr holds one 'error: <path>: write failed (...)' line and no traceback;
    returns that path, which must lie under ``where``."""
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    assert "write failed (File too large)" in lines[0] and "rerun" in lines[0], lines[0]
    path = Path(lines[0][len("error: "):].split(": write failed")[0])
    assert where in path.parents, f"{path} is not under {where}"
    assert not path.exists(), f"{path}: a file was left under the final name"
    return path


def _limit_fsize(n: int):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)    # else the kernel kills the writer
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, resource.RLIM_INFINITY))
    return pre


def _argv(tmp: Path, stage: str) -> list[str]:
    return [stage, "--config", str(REPO / "configs" / "default.yaml"), f"data.raw={tmp / 'raw'}",
            f"data.cache={tmp / 'cache'}", f"data.submissions={tmp / 'subs'}", *TINY]


def _temps(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if ".tmp." in p.name]


def test_file_size_limit_mid_write_then_rerun(tmp_path, zygote):
    """RLIMIT_FSIZE (SIGXFSZ ignored, so a write past it fails with EFBIG) in prepare, train and
    predict: exit 2 with a one-line error naming the file, no file under that name, no manifest,
    no temp; the same command without the limit then completes."""
    synth.generate(tmp_path / "raw", train_cars=2, test_cars=1, height=40, width=80, seed=5, workers=1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    # prepare as a plain `python -m pipeline` process: the limit falls on the first resized image
    # (a 32x64 RGB PNG is ~4 KB; the full-size {0,1} mask before it is smaller).
    proc = subprocess.run([sys.executable, "-m", "pipeline", *_argv(tmp_path, "prepare")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, preexec_fn=_limit_fsize(1024))
    assert proc.returncode == 2, proc.stderr[-3000:]
    bad = _no_room_error(proc.stderr, tmp_path / "cache" / "prepare")
    assert bad.suffix == ".png"
    assert not list((tmp_path / "cache" / "prepare").rglob("manifest.json")) and not _temps(tmp_path / "cache")
    z = zygote      # the session's (tests/_stage_runner.py): forked children, real rlimits and exit codes
    ok = z.run(_argv(tmp_path, "prepare"))
    assert ok.rc == 0 and list((tmp_path / "cache" / "prepare").glob("*/manifest.json")), ok.err[-3000:]

    # train: 1 MB passes config.yaml, then best.pt (torch.save, ~2.8 MB) hits the limit.
    r = z.run(_argv(tmp_path, "train"), fsize=1 << 20)
    assert r.rc == 2, r.err[-3000:]
    bad = _no_room_error(r.err, tmp_path / "cache" / "train")
    assert bad.name == "best.pt"
    assert not (bad.parent / "manifest.json").exists() and not _temps(tmp_path / "cache")
    r = z.run(_argv(tmp_path, "train"))
    assert r.rc == 0 and (bad.parent / "manifest.json").is_file(), r.err[-3000:]

    # predict: 200 bytes stop its first write, meta.json (~0.6 KB: paths, names, sizes).
    r = z.run(_argv(tmp_path, "predict"), fsize=200)
    assert r.rc == 2, r.err[-3000:]
    bad = _no_room_error(r.err, tmp_path / "cache" / "predict")
    assert bad.name == "meta.json"
    assert not list((tmp_path / "cache" / "predict").rglob("manifest.json")) and not _temps(tmp_path / "cache")
    r = z.run(_argv(tmp_path, "predict"))
    assert r.rc == 0 and list((tmp_path / "cache" / "predict").glob("*/manifest.json")), r.err[-3000:]


# ---------------------------------------------------------------------------- GPU out of memory in predict

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny checkpoint (train's keys) and 6 test JPEGs with their index."""
    from pipeline.models import build_model
    d = tmp_path_factory.mktemp("oom")
    torch.manual_seed(0)
    model = build_model("Unet", "resnet18", "none", encoder_depth=3, decoder_channels=[32, 16, 8])
    ckpt = d / "best.pt"
    torch.save({"model": model.state_dict(), "arch": "Unet", "encoder": "resnet18", "height": 32, "width": 64,
                "model_kwargs": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]},
                "config": {}, "epoch": 0, "best_score": 0.0}, ckpt)
    rng, rows = np.random.default_rng(0), []
    for k in range(6):
        img = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
        img[10:30, 15:45] = (200, 30, 30)
        p = d / f"car{k:02d}_{k + 1:02d}.jpg"
        cv2.imwrite(str(p), img)
        rows.append({"img": p.name, "id": p.stem, "path": str(p), "orig_height": 40, "orig_width": 60})
    return ckpt, pd.DataFrame(rows)


def _oom_above(monkeypatch, limit: int) -> list[int]:
    """The model raises torch.cuda.OutOfMemoryError for calls of more than ``limit`` images (as a GPU
    would); returns the list of call sizes that ran."""
    from pipeline import models
    real, calls = models.load_checkpoint, []

    def load(path, device="cpu"):
        model, meta = real(path, device)
        forward = model.forward

        def fits(x):
            if x.shape[0] > limit:
                raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate for {x.shape[0]} images")
            calls.append(x.shape[0])
            return forward(x)
        model.forward = fits
        return model, meta
    monkeypatch.setattr(models, "load_checkpoint", load)
    return calls


def test_predict_halves_the_batch_on_gpu_out_of_memory(small, tmp_path, monkeypatch):
    ckpt, index = small
    ttas = tta.parse("hflip")                         # 2 views: a batch of 4 is one call of 8 images
    kw = dict(batch_size=4, num_workers=0, precision="fp32", progress=False)
    ref = predict.predict_fold(index, ckpt, tmp_path / "ref", ttas, log=lambda m: None, **kw)
    calls, lines = _oom_above(monkeypatch, 2), []
    got = predict.predict_fold(index, ckpt, tmp_path / "oom", ttas, log=lines.append, **kw)
    halvings = [ln for ln in lines if "out of GPU memory" in ln]
    assert halvings == ["predict: out of GPU memory at 8 images per model call; halved to 4 (as "
                        "predict.max_forward=4), retrying the batch",
                        "predict: out of GPU memory at 4 images per model call; halved to 2 (as "
                        "predict.max_forward=2), retrying the batch"]
    assert calls and max(calls) == 2 and sum(calls) == 2 * len(index)      # every view of every image, once
    assert got.maps_dir.name == ref.maps_dir.name and got.predicted == len(index)
    for i in index["id"]:
        a = probmaps.read_prob(probmaps.prob_path(ref.maps_dir, i)).astype(int)
        b = probmaps.read_prob(probmaps.prob_path(got.maps_dir, i)).astype(int)
        assert np.abs(a - b).max() <= 1, i        # fp32 sums in another order, as with predict.max_forward
    # Nothing fits, not even one image: a one-line PipelineError, not a retry loop.
    _oom_above(monkeypatch, 0)
    with pytest.raises(PipelineError, match=r"out of GPU memory with one \(32, 64\) image per model call"):
        predict.predict_fold(index, ckpt, tmp_path / "none", ttas, log=lambda m: None, **kw)


# ---------------------------------------------------------------------------- make clean-cache

@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_clean_cache_removes_the_configured_cache(tmp_path):
    """`make clean-cache` removes data.cache as CONFIG/ARGS (or CACHE=) resolve it, not data/cache."""
    default = REPO / "data" / "cache"
    had_default = default.exists()
    for how, var in (("args", lambda d: f"ARGS=data.cache={d}"), ("cache", lambda d: f"CACHE={d}")):
        d = tmp_path / how / "cache"
        (d / "prepare").mkdir(parents=True)
        (d / "prepare" / "x").write_text("x")
        (tmp_path / how / "keep").write_text("x")
        out = subprocess.run(["make", "-s", "clean-cache", var(d)], cwd=REPO, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        assert not d.exists() and (tmp_path / how / "keep").exists(), out.stdout
    assert default.exists() == had_default
    # A bad key: the config error, exit 2, nothing removed.
    d = tmp_path / "bad"
    d.mkdir()
    out = subprocess.run(["make", "-s", "clean-cache", f"ARGS=data.cache={d} data.bogus=1"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "unknown config key 'data.bogus'" in out.stderr and d.exists()
