import re

import numpy as np
import pandas as pd
from PIL import Image

import pytest

from pipeline import rle, synth


def test_layout_formats_and_determinism(tmp_path):
    a = synth.generate(tmp_path / "a", train_cars=2, test_cars=1, height=64, width=96, seed=3, workers=1)
    b = synth.generate(tmp_path / "b", train_cars=2, test_cars=1, height=64, width=96, seed=3, workers=1)
    train = sorted(p.name for p in (a / "train").iterdir())
    assert len(train) == 32 and all(re.fullmatch(r"[0-9a-f]{12}_(0[1-9]|1[0-6])\.jpg", n) for n in train)
    assert len(list((a / "test").iterdir())) == 16
    for n in train:
        assert (a / "train" / n).read_bytes() == (b / "train" / n).read_bytes()

    masks = pd.read_csv(a / "train_masks.csv")
    assert list(masks.columns) == ["img", "rle_mask"] and sorted(masks.img) == train
    gif = Image.open(a / "train_masks" / train[0].replace(".jpg", "_mask.gif"))
    assert gif.format == "GIF" and gif.mode == "P" and gif.size == (96, 64)
    m = np.array(gif)
    assert set(np.unique(m)) == {0, 1}
    assert 0.05 < m.mean() < 0.6                      # a car, not the whole frame
    assert masks.set_index("img").rle_mask[train[0]] == rle.encode(m)

    meta = pd.read_csv(a / "metadata.csv")
    assert list(meta.columns) == ["id", "year", "make", "model", "trim1", "trim2"] and len(meta) == 3
    sub = pd.read_csv(a / "sample_submission.csv")
    assert list(sub.columns) == ["img", "rle_mask"] and (sub.rle_mask == "1 1").all()
    assert sorted(sub.img) == sorted(p.name for p in (a / "test").iterdir())


def test_silhouette_changes_with_view():
    p = synth.car_params(np.random.default_rng(0))
    _, side = synth.render(p, 5, 128, 192, np.random.default_rng(1))
    _, front = synth.render(p, 1, 128, 192, np.random.default_rng(1))
    side_w = np.ptp(np.flatnonzero(side.any(0)))
    front_w = np.ptp(np.flatnonzero(front.any(0)))
    assert side_w > 1.5 * front_w                      # side views are longer than front views


def test_car_pixels_differ_from_background():
    p = synth.car_params(np.random.default_rng(5))
    img, mask = synth.render(p, 3, 128, 192, np.random.default_rng(2))
    assert img.shape == (128, 192, 3) and img.dtype == np.uint8
    car = img[mask.astype(bool)].mean(0)
    back = img[~mask.astype(bool)].mean(0)
    assert np.abs(car - back).max() > 5


def _synth_cfg(raw):
    from pipeline import config
    return config.load(None, {"data.raw": str(raw), "synth.train_cars": 1, "synth.test_cars": 1,
                              "synth.image_height": 64, "synth.image_width": 96, "synth.workers": 1})


def test_run_writes_complete_set_then_leaves_it_alone(tmp_path, capsys):
    raw = tmp_path / "data" / "raw"
    synth.run(_synth_cfg(raw))
    assert (raw / "sample_submission.csv").is_file() and len(list((raw / "train").glob("*.jpg"))) == 16
    assert not list(raw.parent.glob(".*synth-tmp"))          # generated aside, renamed into place
    before = {p: p.stat().st_mtime_ns for p in raw.rglob("*")}
    synth.run(_synth_cfg(raw))                                # e.g. `make all` on existing (or real) data
    assert "already holds a dataset" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in raw.rglob("*")} == before


def test_run_refuses_a_folder_with_an_incomplete_dataset(tmp_path):
    from pipeline.errors import PipelineError
    raw = tmp_path / "raw"
    (raw / "train").mkdir(parents=True)
    (raw / "train" / "abc_01.jpg").write_bytes(b"user file")
    with pytest.raises(PipelineError, match="no complete dataset"):
        synth.run(_synth_cfg(raw))
    assert (raw / "train" / "abc_01.jpg").read_bytes() == b"user file"
