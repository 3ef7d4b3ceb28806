"""RLE: Carvana order (1-indexed, row by row), known answers, round trips, the real golden prefix."""
from pathlib import Path

import numpy as np
import pytest

from pipeline import rle

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
GOLDEN_MASK = SHARED / "carvana_fullres" / "train_masks" / "00087a6bd4dc_04_mask.gif"


def kaggle_kernel(img):
    """The common Kaggle kernel, kept here as an independent reference."""
    pixels = img.flatten().astype(np.uint8)
    pixels = np.concatenate([[0], pixels, [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def test_hand_computed_row_major():
    # Flattened row by row: 0 1 1 | 0 0 1 | 1 1 1 -> runs start at pixels 2 (len 2) and 6 (len 4).
    m = np.array([[0, 1, 1], [0, 0, 1], [1, 1, 1]], dtype=np.uint8)
    assert rle.encode(m) == "2 2 6 4"
    # Column-major order would give a different answer; make sure it is not what we produce.
    assert rle.encode(m) != rle.encode(m.T.copy())


def test_edges_full_and_empty():
    assert rle.encode(np.zeros((4, 5), np.uint8)) == ""
    assert rle.encode(np.ones((4, 5), bool)) == "1 20"
    m = np.zeros((1, 130), bool)
    m[0, 0] = m[0, 63] = m[0, 64] = m[0, 129] = True   # runs across the 64-bit word boundary
    assert rle.encode(m) == "1 1 64 2 130 1"
    assert not rle.decode("", (4, 5)).any()
    assert not rle.decode(float("nan"), (4, 5)).any()


def test_nonbinary_dtypes_mean_nonzero():
    m = np.array([[0, 255, 3], [0, 0, 0]], np.uint8)
    assert rle.encode(m) == "2 2"
    assert rle.encode(m.astype(np.float32) * 0.5) == "2 2"


@pytest.mark.parametrize("shape", [(1, 1), (7, 9), (64, 96), (31, 65), (128, 191)])
@pytest.mark.parametrize("density", [0.02, 0.5, 0.98])
def test_round_trip_random(shape, density):
    rng = np.random.default_rng(hash((shape, density)) % 2**32)
    m = rng.random(shape) < density
    s = rle.encode(m)
    assert s == kaggle_kernel(m)
    np.testing.assert_array_equal(rle.decode(s, shape), m.astype(np.uint8))


def test_decode_rejects_bad_input():
    with pytest.raises(ValueError):
        rle.decode("1 2 3", (2, 2))
    with pytest.raises(ValueError):
        rle.decode("3 5", (2, 2))


@pytest.mark.skipif(not GOLDEN_MASK.is_file(), reason="shared Carvana data not present")
def test_golden_prefix_real_mask():
    from PIL import Image
    m = np.array(Image.open(GOLDEN_MASK))
    assert m.shape == (1280, 1918) and set(np.unique(m)) <= {0, 1}
    s = rle.encode(m)
    assert s.startswith("879735 20 881650 26 883315 92 883564 30 885208")
    assert s == kaggle_kernel(m)
    np.testing.assert_array_equal(rle.decode(s, m.shape), m)
