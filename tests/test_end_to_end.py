"""The whole pipeline on a tiny synthetic set, through the same CLI that `make` calls."""
import gzip
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline import rle, synth

REPO = Path(__file__).resolve().parents[1]

TINY = ["prepare.height=64", "prepare.width=96", "n_folds=2", "epochs=1", "train.batch_size=8",
        "train.num_workers=0", "predict.num_workers=0", "prepare.workers=1", "submit.workers=1",
        "encoder=resnet18", "encoder_weights=none", "tta=hflip"]


def _stage(stage: str, tmp_path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline", stage, "--config", str(REPO / "configs" / "default.yaml"),
           f"data.raw={tmp_path / 'raw'}", f"data.cache={tmp_path / 'cache'}",
           f"data.submissions={tmp_path / 'subs'}", *TINY, *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{stage} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("e2e")
    # 4 train cars so that each of 2 folds holds 2 whole cars; 96x64 images.
    synth.generate(tmp_path / "raw", train_cars=4, test_cars=1, height=64, width=96, seed=1, workers=1)
    logs = {s: _stage(s, tmp_path) for s in ("prepare", "train", "predict", "submit")}
    return tmp_path, logs


def test_submission_matches_sample_and_decodes(e2e):
    tmp_path, _ = e2e
    sub_path = tmp_path / "subs" / "submission.csv"
    if not sub_path.exists():
        sub_path = tmp_path / "subs" / "submission.csv.gz"
    opener = gzip.open if sub_path.suffix == ".gz" else open
    with opener(sub_path, "rt") as f:
        assert f.readline().strip() == "img,rle_mask"
    sub = pd.read_csv(sub_path, keep_default_na=False)
    sample = pd.read_csv(tmp_path / "raw" / "sample_submission.csv")
    assert list(sub.img) == list(sample.img)
    for r in sub.rle_mask:
        m = rle.decode(r, (64, 96))
        assert m.shape == (64, 96)


def test_second_prepare_is_cached(e2e):
    tmp_path, _ = e2e
    again = _stage("prepare", tmp_path)
    assert "cached" in again.stdout.lower()


def test_rerun_train_is_cached(e2e):
    tmp_path, _ = e2e
    again = _stage("train", tmp_path)
    assert "cached" in again.stdout.lower()
