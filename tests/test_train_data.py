"""Training data: the prepare index contract, reproducible augmentation, device batches."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, SequentialSampler

from _train_helpers import make_prepared
from pipeline import augment, data
from pipeline.errors import ConfigError, PipelineError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("prep") / "p", cars=2, views=4)


def test_load_index_joins_folds_and_resolves_paths(prepared):
    df = data.load_index(prepared)
    assert len(df) == 8 and set(df["fold"]) == {0, 1}
    assert all(p.startswith(str(prepared)) for p in df["image"])
    # folds.csv wins over a stale fold column in train_index.csv.
    idx = pd.read_csv(prepared / "train_index.csv")
    idx["fold"] = 7
    alt = prepared.parent / "stale"
    alt.mkdir(exist_ok=True)
    idx.to_csv(alt / "train_index.csv", index=False)
    pd.read_csv(prepared / "folds.csv").to_csv(alt / "folds.csv", index=False)
    assert set(data.load_index(alt)["fold"]) == {0, 1}


def test_load_index_errors_name_the_file(prepared, tmp_path):
    with pytest.raises(PipelineError, match="train_index.csv: missing"):
        data.load_index(tmp_path)
    pd.read_csv(prepared / "train_index.csv").drop(columns=["mask_full"]).to_csv(tmp_path / "train_index.csv")
    pd.read_csv(prepared / "folds.csv").to_csv(tmp_path / "folds.csv", index=False)
    with pytest.raises(PipelineError, match=r"train_index.csv: missing columns \['mask_full'\]"):
        data.load_index(tmp_path)
    idx = pd.read_csv(prepared / "train_index.csv")
    idx.to_csv(tmp_path / "train_index.csv", index=False)
    pd.read_csv(prepared / "folds.csv").iloc[1:].to_csv(tmp_path / "folds.csv", index=False)
    with pytest.raises(PipelineError, match="folds.csv: no fold for 1 images"):
        data.load_index(tmp_path)


def test_augment_spec():
    assert augment.parse("basic") == ("hflip", "ssr", "bc")
    assert augment.parse("none") == () and augment.build_transform(augment.parse("none")) is None
    assert augment.parse("vflip, hsv") == ("vflip", "hsv")
    with pytest.raises(ConfigError, match=r"unknown \['cutmix'\]"):
        augment.parse("hflip,cutmix")


def _epoch(ds, sampler, workers):
    dl = DataLoader(ds, batch_size=3, sampler=sampler, num_workers=workers)
    return [(x.clone(), y.clone(), i.clone()) for x, y, i in dl]


def test_augmentation_is_seeded_per_sample_not_per_worker(prepared):
    df = data.load_index(prepared)
    ds = data.SegDataset(df["image"], df["mask"], augment.build_transform(augment.parse("strong")))
    sampler = data.SeededSampler(SequentialSampler(ds), seed=5)
    sampler.set_epoch(1)
    a, b = _epoch(ds, sampler, 0), _epoch(ds, sampler, 2)
    for (xa, ya, ia), (xb, yb, ib) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(xa, xb) and torch.equal(ya, yb)
    sampler.set_epoch(2)
    c = _epoch(ds, sampler, 0)
    assert any(not torch.equal(xa, xc) for (xa, _, _), (xc, _, _) in zip(a, c))   # a new epoch, new draws
    # Geometry moves image and mask together; masks stay binary.
    plain = data.SegDataset(df["image"], df["mask"], None)
    assert all(set(torch.unique(y).tolist()) <= {0, 1} for _, y, _ in c)
    x0, y0, _ = plain[0]
    assert x0.shape == a[0][0][0].shape and x0.dtype == torch.uint8 and y0.shape == (64, 96)


def test_to_device_layout_and_normalisation():
    img = torch.zeros(2, 4, 6, 3, dtype=torch.uint8)
    img[..., 0] = 255
    mask = torch.ones(2, 4, 6, dtype=torch.uint8)
    x, y = data.to_device(img, mask, torch.device("cpu"), channels_last=True)
    assert x.shape == (2, 3, 4, 6) and x.is_contiguous(memory_format=torch.channels_last)
    assert y.shape == (2, 1, 4, 6) and y.dtype == torch.float32
    # The published ImageNet statistics, written out: a typo in data.MEAN/STD must not pass.
    assert data.MEAN == (0.485, 0.456, 0.406) and data.STD == (0.229, 0.224, 0.225)
    want = [(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225]
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), want, rtol=1e-5)
    x2, none = data.to_device(img, None, torch.device("cpu"), channels_last=False)
    assert none is None and x2.is_contiguous() and torch.equal(x2, x)
    half = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))          # tf_efficientnet_lite0: 0..255 -> -1..1
    x3, _ = data.to_device(img, None, torch.device("cpu"), stats=half)
    np.testing.assert_allclose(x3[0, :, 0, 0].numpy(), [1.0, -1.0, -1.0], rtol=1e-6)


def test_to_device_builds_normalisation_tensors_once(monkeypatch):
    """mean/std are made once per (device, stats), not per batch (a blocking host->device copy on CUDA)."""
    img = torch.randint(0, 256, (2, 4, 6, 3), dtype=torch.uint8)
    stats = ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    want, _ = data.to_device(img, None, torch.device("cpu"), stats=stats)   # may build them
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    for _ in range(3):
        got, _ = data.to_device(img, None, torch.device("cpu"), stats=[list(stats[0]), list(stats[1])])
        assert torch.equal(got, want)
    assert made == []
    # Other stats are another entry, with their own values.
    other, _ = data.to_device(img, None, torch.device("cpu"), stats=((0.7, 0.2, 0.3), (0.4, 0.5, 0.6)))
    assert len(made) == 2 and not torch.equal(other[:, 0], want[:, 0]) and torch.equal(other[:, 1:], want[:, 1:])
