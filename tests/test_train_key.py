"""The train key follows the training data, not the test set or where the raw folder lives."""
from __future__ import annotations

import shutil
from pathlib import Path

from _train_helpers import tiny_cfg
from pipeline import prepare, synth
from pipeline.graph import Graph

H, W = 64, 96


def _cfg(raw: Path, cache: Path):
    return tiny_cfg(cache, **{"data.raw": str(raw), "prepare.workers": 1})


def test_test_set_and_raw_path_do_not_change_the_train_key(tmp_path):
    raw = synth.generate(tmp_path / "raw", train_cars=2, test_cars=1, height=H, width=W, seed=3, workers=1)
    cache = tmp_path / "cache"
    cfg = _cfg(raw, cache)
    first = prepare.run(cfg)
    key = Graph(cfg).train_key

    # A larger test set (and its sample rows) is a new prepare artifact but the same training data.
    img = sorted((raw / "test").glob("*.jpg"))[0]
    shutil.copy2(img, raw / "test" / "0123456789ab_01.jpg")
    with open(raw / "sample_submission.csv", "a") as f:
        f.write("0123456789ab_01.jpg,1 1\n")
    second = prepare.run(cfg)
    assert second != first
    assert Graph(cfg).train_key == key

    # The same files at another path (mtimes kept, as rsync -a or cp -p keep them): same key.
    moved = Path(shutil.copytree(raw, tmp_path / "elsewhere" / "raw"))
    cfg_moved = _cfg(moved, cache)
    assert prepare.run(cfg_moved) not in (first, second)   # test paths are absolute in test_index.csv
    assert Graph(cfg_moved).train_key == key

    # A changed train image is new training data.
    victim = sorted((moved / "train").glob("*.jpg"))[0]
    victim.write_bytes(img.read_bytes())
    prepare.run(cfg_moved)
    assert Graph(cfg_moved).train_key != key
