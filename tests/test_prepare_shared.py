"""Prepare on real Carvana files from ../shared/data (skipped when absent).

A small raw dir of symlinks keeps it fast: two real 512x512 cars from carvana512 plus the
real full-resolution 1918x1280 image and mask, and four carvana512 test images with a
sample_submission.csv subset.
"""
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import prepare, rle
from pipeline.cache import read_json
from pipeline.probmaps import read_mask
from pipeline.config import load

GOLDEN = "879735 20 881650 26 883315 92 883564 30 885208"   # Kaggle train_masks.csv, 00087a6bd4dc_04


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, dst)


@pytest.fixture
def real_raw(shared_data, tmp_path) -> Path:
    c512, full = shared_data / "carvana512", shared_data / "carvana_fullres"
    if not (c512 / "train").is_dir() or not (full / "train").is_dir():
        pytest.skip("carvana512 / carvana_fullres not present")
    raw = tmp_path / "raw"
    cars = sorted({p.name[:12] for p in (c512 / "train").glob("*.jpg")} - {"00087a6bd4dc"})[:2]
    for car in cars:
        for v in range(1, 17):
            _link(c512 / "train" / f"{car}_{v:02d}.jpg", raw / "train" / f"{car}_{v:02d}.jpg")
            _link(c512 / "train_masks" / f"{car}_{v:02d}_mask.gif", raw / "train_masks" / f"{car}_{v:02d}_mask.gif")
    _link(full / "train" / "00087a6bd4dc_04.jpg", raw / "train" / "00087a6bd4dc_04.jpg")
    _link(full / "train_masks" / "00087a6bd4dc_04_mask.gif", raw / "train_masks" / "00087a6bd4dc_04_mask.gif")
    tests = sorted(p.name for p in (c512 / "test").glob("*.jpg"))[:4]
    for name in tests:
        _link(c512 / "test" / name, raw / "test" / name)
    # Sample order differs from file order on purpose: test_index must follow the sample.
    pd.DataFrame({"img": tests[::-1], "rle_mask": "1 1"}).to_csv(raw / "sample_submission.csv", index=False)
    _link(full / "metadata.csv", raw / "metadata.csv")
    return raw


def test_prepare_real_files(real_raw, tmp_path):
    cfg = load(None, {"data.raw": str(real_raw), "data.cache": str(tmp_path / "cache"), "prepare.height": 256,
                      "prepare.width": 384, "prepare.n_folds": 2, "prepare.workers": 1})
    res = prepare.execute(cfg)
    report = read_json(res.dir / "prepare_report.json")
    assert report["issues"] == [], report["issues"]
    idx = pd.read_csv(res.dir / "train_index.csv").set_index("id")
    assert len(idx) == 33
    row = idx.loc["00087a6bd4dc_04"]
    assert (row.orig_height, row.orig_width) == (1280, 1918)
    full = read_mask(res.dir / row.mask_full)
    gif = np.asarray(Image.open(real_raw / "train_masks" / "00087a6bd4dc_04_mask.gif"))
    assert np.array_equal(full, gif)
    assert rle.encode(full).startswith(GOLDEN)
    assert read_mask(res.dir / row["mask"]).shape == (256, 384)
    assert (idx.loc[idx.index != "00087a6bd4dc_04", "orig_height"] == 512).all()
    test = pd.read_csv(res.dir / "test_index.csv")
    assert list(test.img) == list(pd.read_csv(real_raw / "sample_submission.csv").img)
    assert (test.orig_height == 512).all() and (test.orig_width == 512).all()


def test_half_size_jpeg_decode_of_a_real_car_matches_the_full_decode(shared_data):
    """The real 1918x1280 photo at the CPU demo size 128x192: decoding at half size (what prepare
    and predict do there) changes the model input by well under one grey level on average."""
    import numpy as np

    from pipeline.data import read_image
    from pipeline.geometry import geometry, jpeg_reduction, to_model
    path = str(shared_data / "carvana_fullres" / "train" / "00087a6bd4dc_04.jpg")
    g = geometry(1280, 1918, 128, 192, "stretch")
    assert jpeg_reduction(1280, 1918, g) == 2
    half, full = read_image(path, 2), read_image(path)
    assert half.shape == (640, 959, 3) and full.shape == (1280, 1918, 3)
    diff = np.abs(to_model(half, g, 128, 192).astype(int) - to_model(full, g, 128, 192).astype(int))
    assert diff.mean() < 0.2 and np.percentile(diff, 99) <= 2


def test_strict_jpeg_check_on_real_photos(shared_data):
    """Every real carvana512 JPEG and the real 1918x1280 photo pass the strict check (no false
    alarms on Carvana's encoder), and the full-size photo with 4 KB zeroed mid-stream is caught,
    though cv2 decodes it."""
    import cv2

    from pipeline.ingest import BadFile, check_jpeg_data
    c512, full = shared_data / "carvana512", shared_data / "carvana_fullres"
    if not (c512 / "train").is_dir():
        pytest.skip("carvana512 not present")
    paths = sorted((c512 / "train").glob("*.jpg")) + sorted((c512 / "test").glob("*.jpg"))
    assert len(paths) >= 2000
    for p in paths:
        check_jpeg_data(p.read_bytes())
    data = (full / "train" / "00087a6bd4dc_04.jpg").read_bytes()
    check_jpeg_data(data)
    mid = len(data) // 2
    bad = data[:mid] + bytes(4096) + data[mid + 4096:]
    assert cv2.imdecode(np.frombuffer(bad, np.uint8), cv2.IMREAD_COLOR).shape == (1280, 1918, 3)
    with pytest.raises(BadFile, match="Corrupt JPEG data") as e:
        check_jpeg_data(bad)
    assert e.value.kind == "corrupt"
