"""The whole pipeline on a tiny synthetic set, through the same CLI that `make` calls.

Each stage is a process of its own running ``python -m pipeline``'s ``cli.main(argv)``, forked from
the session's pre-imported zygote (tests/_stage_runner.py) rather than a fresh interpreter each."""
import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import geometry, probmaps, rle, synth
from pipeline.validate import check_submission, read_ids, sizes_from

REPO = Path(__file__).resolve().parents[1]

TINY = ["prepare.height=64", "prepare.width=96", "n_folds=2", "epochs=1", "train.batch_size=8",
        "train.num_workers=0", "predict.num_workers=0", "prepare.workers=1", "submit.workers=1",
        "encoder=resnet18", "encoder_weights=none", "tta=hflip"]


def _stage(zygote, stage: str, tmp_path, *extra: str):
    argv = [stage, "--config", str(REPO / "configs" / "default.yaml"), f"data.raw={tmp_path / 'raw'}",
            f"data.cache={tmp_path / 'cache'}", f"data.submissions={tmp_path / 'subs'}", *TINY, *extra]
    proc = zygote.run(argv)
    assert proc.rc == 0, f"{stage} failed:\n{proc.out[-3000:]}\n{proc.err[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, zygote):
    tmp_path = tmp_path_factory.mktemp("e2e")
    # 4 train cars so that each of 2 folds holds 2 whole cars; 120x80 images, the model sees 96x64,
    # so the submission is right only if submit maps each prediction back to its image's own size.
    synth.generate(tmp_path / "raw", train_cars=4, test_cars=1, height=80, width=120, seed=1, workers=1)
    logs = {s: _stage(zygote, s, tmp_path) for s in ("prepare", "train", "predict")}
    # A one-epoch model's maps can sit on one side of 0.5: threshold at their median instead, so the
    # masks are about half car and a mask at the wrong size cannot pass for the right one.
    maps = np.concatenate([probmaps.read_prob(p).ravel() for p in (tmp_path / "cache" / "predict").glob("*/*.png")])
    logs["submit"] = _stage(zygote, "submit", tmp_path, f"submit.threshold={np.median(maps) / 255:.6f}")
    return tmp_path, logs


def _submission(tmp_path) -> Path:
    sub_path = tmp_path / "subs" / "submission.csv"
    return sub_path if sub_path.exists() else tmp_path / "subs" / "submission.csv.gz"


def test_submission_matches_sample_and_decodes(e2e):
    tmp_path, _ = e2e
    sub_path = _submission(tmp_path)
    opener = gzip.open if sub_path.suffix == ".gz" else open
    with opener(sub_path, "rt") as f:
        assert f.readline().strip() == "img,rle_mask"
    sub = pd.read_csv(sub_path, keep_default_na=False)
    sample = pd.read_csv(tmp_path / "raw" / "sample_submission.csv")
    assert list(sub.img) == list(sample.img)
    side = json.loads((tmp_path / "subs" / "submission.json").read_text())
    folds = [m["predictions"] for m in side["models"]]
    assert len(folds) == 2
    for img, code in zip(sub.img, sub.rle_mask):
        with Image.open(tmp_path / "raw" / "test" / img) as im:       # the size each row must describe
            w, h = im.size
        assert (h, w) == (80, 120)
        got = rle.decode(code, (h, w))
        # Independently: the folds' mean map taken back to the JPEG's size and thresholded.
        mean = np.mean([probmaps.read_prob(probmaps.prob_path(d, Path(img).stem)).astype(np.float32)
                        for d in folds], axis=0)
        want = geometry.to_original(mean, (h, w)) > side["threshold"] * 255
        assert 0.05 < want.mean() < 0.95, "a trivial mask cannot tell sizes apart"
        assert (got == want).mean() > 0.995, f"{img}: the mask is not the prediction at {w}x{h}"


def test_submission_passes_the_validator(e2e):
    tmp_path, _ = e2e
    rep = check_submission(_submission(tmp_path), read_ids(tmp_path / "raw" / "sample_submission.csv"),
                              sizes_from(images_dir=tmp_path / "raw" / "test"))
    assert rep.ok and rep.problems == [], rep.summary()


def test_second_prepare_is_cached(e2e, zygote):
    tmp_path, _ = e2e
    again = _stage(zygote, "prepare", tmp_path)
    assert "cached" in again.out.lower()


def test_rerun_train_is_cached(e2e, zygote):
    tmp_path, _ = e2e
    again = _stage(zygote, "train", tmp_path)
    assert "cached" in again.out.lower()
