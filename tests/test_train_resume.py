"""kill -9 in the middle of an epoch, rerun the same command: same final metrics as no kill."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from _train_helpers import make_prepared, tiny_cfg
from pipeline import cache, train

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = {"train.epochs": 2, "train.augment": "basic", "train.warmup_epochs": 0.5}
COMPARED = ["epoch", "lr", "train_loss", "val_loss", "val_dice", "nonfinite", "best"]

SCRIPT = """
import sys
sys.path[:0] = [{tests!r}, {repo!r}]
from _train_helpers import tiny_cfg
from pipeline import train
train.run(tiny_cfg({cache!r}, **{overrides!r}), prepared_dir={prepared!r})
"""


def test_kill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, capsys):
    prepared = make_prepared(tmp_path / "prep")
    # Uninterrupted reference, in this process, without DataLoader workers.
    ref_cfg = tiny_cfg(tmp_path / "ref", **OVERRIDES)
    train.run(ref_cfg, prepared_dir=prepared)
    ref_dir = train.fold_dir(ref_cfg, 0, prepared)

    # Same config in another cache, with 2 workers (a run-only knob), killed by SIGKILL at
    # epoch 2, micro-batch 2.
    overrides = {**OVERRIDES, "train.num_workers": 2}
    script = SCRIPT.format(tests=str(REPO / "tests"), repo=str(REPO), cache=str(tmp_path / "run"),
                           overrides=overrides, prepared=str(prepared))
    env = {**os.environ, train.KILL_ENV: "1:1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    cfg = tiny_cfg(tmp_path / "run", **overrides)
    out = train.fold_dir(cfg, 0, prepared)
    assert out.parent.name == ref_dir.parent.name          # num_workers is not in the key
    assert not cache.is_complete(out)
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=False)["epoch"] == 0
    assert len(pd.read_csv(out / "metrics.csv")) == 1

    # Rerun the same command: resumes after epoch 1 and finishes.
    capsys.readouterr()
    train.run(cfg, prepared_dir=prepared)
    assert "resuming after epoch 1 of 2" in capsys.readouterr().out
    assert cache.is_complete(out)
    got, want = pd.read_csv(out / "metrics.csv"), pd.read_csv(ref_dir / "metrics.csv")
    pd.testing.assert_frame_equal(got[COMPARED], want[COMPARED], check_exact=False, rtol=1e-5)
    a = torch.load(out / "best.pt", map_location="cpu", weights_only=False)["model"]
    b = torch.load(ref_dir / "best.pt", map_location="cpu", weights_only=False)["model"]
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert cache.read_json(out / "oof.json")["dice_original"] == \
        pytest.approx(cache.read_json(ref_dir / "oof.json")["dice_original"], abs=1e-4)
