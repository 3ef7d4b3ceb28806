"""kill -9 then the same command: bit-identical to an uninterrupted run, in the setting of a report
of one resumed run in eleven that drifted (docs/reliability.md, "Resume").

That setting: precision=auto (bf16 where oneDNN has native bf16, else fp32), two DataLoader
workers, augmentation, TensorBoard with its overlay forward pass, and a model whose training
draws from the global torch RNG (stochastic depth), so a lost or late-captured RNG state shows.
Every run, the reference included, is its own process (forked from the session's pre-imported
zygote, tests/_stage_runner.py, as ``python -c SCRIPT`` would run it). The kill lands in the widest window a
"kill soon after the first metrics.csv row" can hit: every file of epoch 2 is written (metrics.csv
with two rows, curve.png, best.pt when epoch 2 is the best) but last.pt is still epoch 1's. The
mid-epoch kill is tests/test_train_resume.py's. Compared exactly: every metrics.csv column but
the clocks, and every tensor of best.pt's and last.pt's weights.
"""
from __future__ import annotations

import signal
from pathlib import Path

import pandas as pd
import torch

from _train_helpers import make_prepared, tiny_cfg
from pipeline import faults
from pipeline.graph import Graph

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = {"train.epochs": 2, "train.augment": "basic", "train.num_workers": 2, "train.warmup_epochs": 0.5,
             "train.precision": "auto", "tensorboard.enabled": True, "tensorboard.overlay_every": 2}
STOCHASTIC = {"drop_path_rate": 0.2, "zero_init_last": False}
CLOCKS = ["seconds", "images_per_s"]
BEFORE_LAST = "TEST_KILL_BEFORE_LAST_PT"      # SIGKILL just before the n-th last.pt is written

SCRIPT = """
import os, signal, sys
sys.path[:0] = [{tests!r}, {repo!r}]
from _train_helpers import tiny_cfg
from pipeline import cache, train
from pipeline.graph import Graph
from pipeline.train import build
_model_kwargs = build.model_kwargs
build.model_kwargs = lambda *a: {{**_model_kwargs(*a), **{extra!r}}}
_n, _atomic_path = [0], cache.atomic_path
def _kill_before_last(path, *a, **k):   # by name: the lock record and best.pt-when-best shift write counts
    if str(path).endswith("last.pt"):
        _n[0] += 1
        if str(_n[0]) == os.environ.get({before_last!r}):
            os.kill(os.getpid(), signal.SIGKILL)
    return _atomic_path(path, *a, **k)
cache.atomic_path = _kill_before_last
cfg = tiny_cfg({cache!r}, **{overrides!r})
train.run(cfg, Graph(cfg, prepared={prepared!r}))
"""


def _run(zygote, cache: Path, prepared: Path, env: dict | None = None):
    script = SCRIPT.format(tests=str(REPO / "tests"), repo=str(REPO), cache=str(cache), overrides=OVERRIDES,
                           prepared=str(prepared), extra=STOCHASTIC, before_last=BEFORE_LAST)
    return zygote.run([], code=script, env=env, unset=(faults.KILL_ENV, faults.TRACE_ENV, BEFORE_LAST))


def _fold(cache: Path, prepared: Path) -> Path:
    cfg = tiny_cfg(cache, **OVERRIDES)
    return Graph(cfg, prepared=prepared).fold_dir(0)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_kill_before_last_pt_then_rerun_is_bit_identical(tmp_path, zygote):
    prepared = make_prepared(tmp_path / "prep")
    ref_run = _run(zygote, tmp_path / "ref", prepared)
    assert ref_run.rc == 0, ref_run.err[-3000:]
    ref = _fold(tmp_path / "ref", prepared)

    killed = _run(zygote, tmp_path / "run", prepared, {BEFORE_LAST: "2"})
    assert killed.rc == -signal.SIGKILL, killed.err[-3000:]
    out = _fold(tmp_path / "run", prepared)
    assert _load(out / "last.pt")["epoch"] == 0                   # still epoch 1's (0-based) ...
    assert len(pd.read_csv(out / "metrics.csv")) == 2              # ... while epoch 2's logs are written
    best2 = bool(pd.read_csv(ref / "metrics.csv")["best"].astype(bool)[1])
    assert _load(out / "best.pt")["epoch"] == (2 if best2 else 1)   # best.pt counts from 1

    again = _run(zygote, tmp_path / "run", prepared)
    assert again.rc == 0, again.err[-3000:]
    assert "resuming after epoch 1 of 2" in again.out
    got, want = (pd.read_csv(d / "metrics.csv").drop(columns=CLOCKS) for d in (out, ref))
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    for name in ("best.pt", "last.pt"):
        a, b = _load(out / name)["model"], _load(ref / name)["model"]
        assert a.keys() == b.keys()
        differ = [k for k in b if not torch.equal(a[k], b[k])]
        assert not differ, f"{name}: {len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"
