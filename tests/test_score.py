"""Local scoring gives known answers (hand-computed Dice, empty-vs-empty = 1) and real-data sanity."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import rle
from pipeline.config import PipelineError
from pipeline.score import score_submission

REPO = Path(__file__).resolve().parents[1]


def save_gif(path, mask):
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    im.save(path)


@pytest.fixture
def masks(tmp_path):
    d = tmp_path / "masks"
    d.mkdir()
    a = np.zeros((4, 6), np.uint8)
    a[1:3, 1:5] = 1                                   # 8 pixels
    save_gif(d / "a_01_mask.gif", a)
    save_gif(d / "a_02_mask.gif", np.zeros((4, 6), np.uint8))   # empty true mask
    save_gif(d / "a_03_mask.gif", np.ones((4, 6), np.uint8))    # 24 pixels
    return d, {"a_01.jpg": a, "a_02.jpg": np.zeros((4, 6), np.uint8), "a_03.jpg": np.ones((4, 6), np.uint8)}


def write_sub(tmp_path, rows):
    p = tmp_path / "sub.csv"
    p.write_text("img,rle_mask\n" + "".join(f"{i},{r}\n" for i, r in rows))
    return p


def test_perfect_submission_scores_one(tmp_path, masks):
    d, truth = masks
    res = score_submission(write_sub(tmp_path, [(i, rle.encode(m)) for i, m in truth.items()]), d, workers=1)
    assert res.mean_dice == 1.0 and res.n_images == 3


def test_hand_computed(tmp_path, masks):
    d, _ = masks
    # a_01: predict row 1 cols 1..5 (5 px, row-major pixels 8..12 -> "8 5"); overlap 4 -> 2*4/(5+8) = 8/13.
    # a_02: predict nothing for an empty truth -> 1 (empty-vs-empty convention).
    # a_03: predict the first 12 pixels of a full 24-pixel truth -> 2*12/36 = 2/3.
    rows = [("a_01.jpg", "8 5"), ("a_02.jpg", ""), ("a_03.jpg", "1 12")]
    res = score_submission(write_sub(tmp_path, rows), d, workers=1)
    want = [8 / 13, 1.0, 2 / 3]
    assert [v for _, v in res.per_image] == pytest.approx(want)
    assert res.mean_dice == pytest.approx(np.mean(want))
    # Anything predicted on an empty truth scores 0.
    res = score_submission(write_sub(tmp_path, [("a_02.jpg", "1 1")]), d, workers=1)
    assert res.mean_dice == 0.0


def test_errors_name_the_line(tmp_path, masks):
    d, _ = masks
    with pytest.raises(PipelineError, match=r"line 2 \(zz_01.jpg\): no true mask"):
        score_submission(write_sub(tmp_path, [("zz_01.jpg", "")]), d, workers=1)
    with pytest.raises(PipelineError, match=r"line 2 \(a_01.jpg\): invalid rle_mask"):
        score_submission(write_sub(tmp_path, [("a_01.jpg", "20 10")]), d, workers=1)


def test_real_masks_cli(tmp_path, shared_data):
    """carvana512 test masks: their own RLE scores 1, an all-empty submission scores 0 (cars everywhere)."""
    masks_dir = shared_data / "carvana512" / "test_masks"
    files = sorted(masks_dir.glob("*_mask.gif"))[:6]
    if not files:
        pytest.skip("no carvana512 test masks")
    imgs = [f.name.replace("_mask.gif", ".jpg") for f in files]
    exact = write_sub(tmp_path, [(i, rle.encode(np.array(Image.open(f)))) for i, f in zip(imgs, files)])
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "score.py"), str(exact), str(masks_dir),
                          "--workers", "2"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "mean Dice 1.000000 over 6 images" in out.stdout
    empty = tmp_path / "empty.csv"
    empty.write_text("img,rle_mask\n" + "".join(f"{i},\n" for i in imgs))
    assert score_submission(empty, masks_dir, workers=1).mean_dice == 0.0
