"""Local scoring gives known answers (hand-computed Dice, empty-vs-empty = 1) and real-data sanity."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import rle
from pipeline.errors import PipelineError
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
    assert not res.partial and res.n_masks == 3
    # Anything predicted on an empty truth scores 0.
    res = score_submission(write_sub(tmp_path, [("a_01.jpg", "8 5"), ("a_02.jpg", "1 1"), ("a_03.jpg", "1 12")]),
                           d, workers=1)
    assert res.per_image[1] == ("a_02.jpg", 0.0)


def test_errors_name_the_line(tmp_path, masks):
    d, _ = masks
    with pytest.raises(PipelineError, match=r"line 3 \(a_01.jpg\): invalid rle_mask"):
        score_submission(write_sub(tmp_path, [("a_02.jpg", ""), ("a_01.jpg", "20 10"), ("a_03.jpg", "")]), d,
                         workers=1)


PERFECT = [("a_01.jpg", "8 4 14 4"), ("a_02.jpg", ""), ("a_03.jpg", "1 24")]   # the true masks' RLE


def test_incomplete_submission_is_refused_naming_what_is_wrong(tmp_path, masks):
    """A mean over the rows present would inflate the score (drop a badly predicted image, repeat a good one)."""
    d, _ = masks
    perfect = score_submission(write_sub(tmp_path, PERFECT), d, workers=1)
    assert perfect.mean_dice == 1.0
    bad_01 = [("a_01.jpg", "1 1")] + PERFECT[1:]
    with pytest.raises(PipelineError, match=r"1 of 3 true masks' images have no row, e\.g\. a_01\. .*--partial"):
        score_submission(write_sub(tmp_path, PERFECT[1:]), d, workers=1)
    with pytest.raises(PipelineError, match=r"1 image\(s\) have more than one row, e\.g\. a_02 \(lines 3, 5\)"):
        score_submission(write_sub(tmp_path, bad_01 + [("a_02.jpg", "")]), d, workers=1)
    with pytest.raises(PipelineError, match=r"1 row\(s\) have no true mask, e\.g\. line 5 \(zz_01\.jpg\)"):
        score_submission(write_sub(tmp_path, bad_01 + [("zz_01.jpg", "")]), d, workers=1)
    # All three at once, in one message.
    with pytest.raises(PipelineError, match=r"have no row.*more than one row.*no true mask"):
        score_submission(write_sub(tmp_path, PERFECT[1:] + [("a_02.jpg", ""), ("zz.jpg", "")]), d, workers=1)


def test_partial_scores_the_intersection_and_says_so(tmp_path, masks):
    d, _ = masks
    rows = [("a_01.jpg", "1 1"), ("a_02.jpg", ""), ("a_02.jpg", "1 24"), ("zz_01.jpg", "1 1")]   # a_03 missing
    res = score_submission(write_sub(tmp_path, rows), d, workers=1, partial=True)
    assert res.partial and res.n_images == 2 and res.n_masks == 3
    assert res.per_image == [("a_01.jpg", 0.0), ("a_02.jpg", 1.0)]          # first row of a_02 only
    assert "a_03" in res.coverage_problems and "zz_01" in res.coverage_problems
    assert res.to_dict()["partial"] is True
    full = score_submission(write_sub(tmp_path, PERFECT), d, workers=1, partial=True)
    assert not full.partial and full.n_images == 3                         # complete: nothing to say


def test_real_masks_cli(tmp_path, shared_data):
    """carvana512 test masks: their own RLE scores 1, an all-empty submission scores 0 (cars everywhere);
    6 rows against the whole folder of 496 are refused, or scored with --partial and said loudly."""
    import shutil
    masks_dir = shared_data / "carvana512" / "test_masks"
    files = sorted(masks_dir.glob("*_mask.gif"))[:6]
    if not files:
        pytest.skip("no carvana512 test masks")
    six = tmp_path / "six_masks"
    six.mkdir()
    for f in files:
        shutil.copy(f, six / f.name)
    imgs = [f.name.replace("_mask.gif", ".jpg") for f in files]
    exact = write_sub(tmp_path, [(i, rle.encode(np.array(Image.open(f)))) for i, f in zip(imgs, files)])
    cmd = [sys.executable, str(REPO / "scripts" / "score.py"), str(exact)]
    out = subprocess.run(cmd + [str(six), "--workers", "2"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "mean Dice 1.000000 over 6 images (" in out.stdout and "PARTIAL" not in out.stdout
    refused = subprocess.run(cmd + [str(masks_dir), "--workers", "1"], capture_output=True, text=True)
    n = len(list(masks_dir.glob("*_mask.gif")))
    assert refused.returncode == 2 and f"{n - 6} of {n} true masks' images have no row" in refused.stderr
    part = subprocess.run(cmd + [str(masks_dir), "--workers", "1", "--partial"], capture_output=True, text=True)
    assert part.returncode == 0, part.stderr
    assert f"PARTIAL SCORE: 6 of {n} true masks' images scored" in part.stdout and "PARTIAL" in part.stderr
    assert "mean Dice 1.000000 over 6 images (PARTIAL)" in part.stdout
    empty = tmp_path / "empty.csv"
    empty.write_text("img,rle_mask\n" + "".join(f"{i},\n" for i in imgs))
    assert score_submission(empty, six, workers=1).mean_dice == 0.0


def test_read_mask_reads_gifs_by_colour_and_pngs_as_stored(tmp_path):
    import cv2
    from pipeline.probmaps import read_mask
    a = np.zeros((4, 6), np.uint8)
    a[1:3, 1:5] = 1
    save_gif(tmp_path / "a.gif", a)
    assert np.array_equal(read_mask(tmp_path / "a.gif") > 0, a > 0)
    # A writer that reorders the palette: index 0 is white (car), index 1 black.
    im = Image.fromarray(1 - a, mode="P")
    im.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    im.save(tmp_path / "swapped.gif")
    assert np.array_equal(read_mask(tmp_path / "swapped.gif") > 0, a > 0)
    for values in (a, a * 255):
        cv2.imwrite(str(tmp_path / "m.png"), values)
        got = read_mask(tmp_path / "m.png")
        assert got.dtype == np.uint8 and np.array_equal(got, values)      # as stored: prepare's {0, 1}
    with pytest.raises(PipelineError, match="cannot read mask"):
        read_mask(tmp_path / "missing.png")
