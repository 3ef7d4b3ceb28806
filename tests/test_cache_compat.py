"""A cache made before the module split (commit 8b5a234) is found cached after it.

Every stage finds its artifacts by key: prepare's (params, CODE_VERSION, raw file
fingerprints), train's (params, training data, CODE_VERSION) and predict's directory
name (checkpoint hash, TTA, resolved precision, CODE_VERSION). The expected values
below were computed by the code of commit 8b5a234 (before the split) on the same
inputs, built here deterministically: raw files with fixed bytes and mtimes (prepare's
key reads names, sizes and mtimes only; the absolute raw path, which also enters it,
is checked separately and replaced by a constant), and the train tests' tiny prepare
artifact (train_index.csv and folds.csv bytes are deterministic). Equal keys mean the
same directories, so an old cache reruns nothing.
"""
import os

import pytest

from _train_helpers import make_prepared, tiny_cfg
from pipeline import cache, config, layout, prepare, tta
from pipeline.graph import Graph
from pipeline import graph

MTIME_NS = 1_600_000_000_000_000_000
RAW_FILES = {"train/0cdf5b5d0ce1_01.jpg": b"a" * 100, "train/0cdf5b5d0ce1_02.jpg": b"b" * 120,
             "train_masks/0cdf5b5d0ce1_01_mask.gif": b"c" * 50, "train_masks/0cdf5b5d0ce1_02_mask.gif": b"d" * 60,
             "test/11111111aaaa_01.jpg": b"e" * 70, "train_masks.csv": b"img,rle_mask\n",
             "sample_submission.csv": b"img,rle_mask\n11111111aaaa_01.jpg,1 1\n"}

# From commit 8b5a234 (before the split), on the inputs of this file.
OLD_PREPARE = {"stretch": "149c5c9919d8", "pad": "936928f77855"}
OLD_TRAIN_DATA = "488257272efff2ce"
OLD_TRAIN = {"tiny": "6d8552f03a9c", "default": "b9f38c0ed030", "fp32_2ep": "2a7370596f71"}
OLD_PREDICT = {("hflip", "fp32"): "42afe441", ("hflip", "bf16"): "7f18d143", ("hflip", "fp16"): "7385210f",
               ("none", "fp32"): "abfd8344", ("none", "bf16"): "a8dc053e", ("none", "fp16"): "166aba32",
               ("hflip,vflip,scale0.75", "fp32"): "1531323a", ("hflip,vflip,scale0.75", "bf16"): "94e72f73",
               ("hflip,vflip,scale0.75", "fp16"): "faf2de65"}


def _raw(root):
    for i, (rel, data) in enumerate(sorted(RAW_FILES.items())):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.utime(p, ns=(MTIME_NS + i, MTIME_NS + i))
    return root


@pytest.mark.parametrize("fit", ["stretch", "pad"])
def test_prepare_key_is_unchanged(tmp_path, fit):
    raw = _raw(tmp_path / "raw")
    cfg = config.load(None, {"data.raw": str(raw), "data.cache": str(tmp_path / "cache"), "prepare.fit": fit})
    inputs = graph.raw_inputs(layout.scan(cfg))
    assert inputs["raw"] == str(raw.resolve())
    key = cache.stage_key(graph.params(cfg, 'prepare'), prepare.CODE_VERSION, {**inputs, "raw": "RAW"})
    assert key == OLD_PREPARE[fit]
    assert Graph(cfg).prepare_dir.name == cache.stage_key(graph.params(cfg, 'prepare'), prepare.CODE_VERSION, inputs)


@pytest.mark.parametrize("name, overrides", [("tiny", {}), ("default", None),
                                             ("fp32_2ep", {"train.precision": "fp32", "train.epochs": 2})])
def test_train_key_and_fold_dir_are_unchanged(tmp_path, name, overrides):
    prepared = make_prepared(tmp_path / "prep")
    cache_root = tmp_path / "cache"
    cfg = (tiny_cfg(cache_root, **overrides) if overrides is not None
           else config.load(None, {"data.cache": str(cache_root)}))
    assert graph.train_data_key(prepared) == OLD_TRAIN_DATA
    assert Graph(cfg, prepared=prepared).train_key == OLD_TRAIN[name]
    assert Graph(cfg, prepared=prepared).fold_dir(1) == cache_root / "train" / OLD_TRAIN[name] / "fold1"


@pytest.mark.parametrize("spec, precision", sorted(OLD_PREDICT))
def test_predict_dir_is_unchanged(tmp_path, spec, precision):
    d = graph.predict_dir(tmp_path, "0123456789abcdef", tta.names(tta.parse(spec)), precision)
    assert d == tmp_path / "predict" / f"0123456789abcdef-{OLD_PREDICT[spec, precision]}"


def test_the_old_predict_autocast_key_still_resolves_the_same_dir(tmp_path, capsys):
    """predict.autocast (the name before predict.precision) is accepted with one warning line and
    lands in predict.precision, so an old command line finds its predictions."""
    old = config.load(None, {"predict.autocast": "fp32"})
    err = capsys.readouterr().err
    assert old.predict.precision == "fp32" and err.count("\n") == 1 and "deprecated" in err
    assert config.load(None, ["autocast=bf16"]).predict.precision == "bf16"


def test_the_old_key_works_in_yaml(tmp_path, capsys):
    f = tmp_path / "old.yaml"
    f.write_text("predict:\n  autocast: fp16\n")
    assert config.load(f).predict.precision == "fp16"
    assert "'predict.autocast' is deprecated" in capsys.readouterr().err
