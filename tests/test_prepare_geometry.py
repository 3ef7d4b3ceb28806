"""The model-input mapping prepare records, and its inverse (known answers)."""
import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.geometry import geometry, resize_mask, row_geometry, to_model, to_original


def test_pad_kaggle_size_to_1920_is_one_column_each_side():
    g = geometry(1280, 1918, 1280, 1920, "pad")
    assert g == {"scaled_height": 1280, "scaled_width": 1918, "pad_top": 0, "pad_left": 1}


def test_pad_scales_to_fit_then_centres():
    g = geometry(1280, 1918, 512, 512, "pad")
    # 1918 -> 512 sets the scale; 1280 * 512 / 1918 = 341.7 -> 342 rows, centred in 512.
    assert g == {"scaled_height": 342, "scaled_width": 512, "pad_top": 85, "pad_left": 0}


def test_stretch_is_plain_resize():
    assert geometry(1280, 1918, 640, 960, "stretch") == {"scaled_height": 640, "scaled_width": 960,
                                                          "pad_top": 0, "pad_left": 0}


def test_unknown_fit_is_a_config_error():
    with pytest.raises(ConfigError, match="prepare.fit"):
        geometry(10, 10, 32, 32, "crop")


def test_pad_round_trip_is_exact_without_scaling():
    rng = np.random.default_rng(0)
    prob = rng.random((40, 62)).astype(np.float32)
    g = geometry(40, 62, 40, 64, "pad")          # like 1280x1918 -> 1280x1920
    assert g == {"scaled_height": 40, "scaled_width": 62, "pad_top": 0, "pad_left": 1}
    model = to_model(prob, g, 40, 64)
    assert model.shape == (40, 64)
    assert model[:, 0].sum() == 0 and model[:, 63].sum() == 0
    assert np.array_equal(model[:, 1:63], prob)
    assert np.array_equal(to_original(model, (40, 62), g), prob)


@pytest.mark.parametrize("fit", ["stretch", "pad"])
def test_mask_round_trip_keeps_shape_and_is_close(fit):
    yy, xx = np.mgrid[:128, :192]
    mask = (((yy - 64) / 40) ** 2 + ((xx - 96) / 70) ** 2 <= 1).astype(np.uint8)
    g = geometry(128, 192, 64, 64, fit)
    small = resize_mask(mask, g, 64, 64)
    assert small.shape == (64, 64) and set(np.unique(small)) == {0, 1}
    back = to_original(small.astype(np.float32), (128, 192), g) >= 0.5
    inter = (back & mask.astype(bool)).sum()
    assert 2 * inter / (back.sum() + mask.sum()) > 0.97


@pytest.mark.parametrize("size, fit, want", [
    ((128, 192), "stretch", 2),    # the CPU demo size from Kaggle's 1280x1918: 10x smaller
    ((320, 480), "stretch", 2),    # 4x: INTER_AREA still halves after the DCT halving
    ((640, 960), "stretch", 1),    # the Kaggle config: 2x is all DCT scaling, no resize left
    ((512, 768), "stretch", 1),    # 2.5x: too close to the DCT halving alone
    ((512, 512), "pad", 2),        # pad scales 1918 -> 512 and 1280 -> 342: 3.7x both ways
])
def test_jpeg_reduction_known_answers(size, fit, want):
    from pipeline.geometry import jpeg_reduction
    g = geometry(1280, 1918, *size, fit)
    assert jpeg_reduction(1280, 1918, g) == want


def test_prepare_and_predict_decode_a_jpeg_alike(tmp_path):
    """A JPEG 4x the model size: prepare (ingest.decode_image) and predict (data.read_image) both
    decode it at half size, and the model-input pixels they make are identical."""
    import cv2

    from pipeline.data import read_image
    from pipeline.ingest import decode_image
    from pipeline.geometry import jpeg_reduction
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.integers(0, 256, (257, 383, 3), dtype=np.uint8), (0, 0), 3)
    path = tmp_path / "car.jpg"
    cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    g = geometry(257, 383, 64, 96, "stretch")
    r = jpeg_reduction(257, 383, g)
    assert r == 2
    bgr, warnings, size = decode_image(path, lambda h, w: jpeg_reduction(h, w, g))
    assert size == (257, 383) and bgr.shape == (129, 192, 3) and warnings == []
    rgb = read_image(str(path), r)
    np.testing.assert_array_equal(rgb, bgr[..., ::-1])
    np.testing.assert_array_equal(to_model(rgb, g, 64, 96), to_model(bgr, g, 64, 96)[..., ::-1])
    # Half-size decoding is a downscale like any other: close to the full decode's INTER_AREA.
    full = to_model(read_image(str(path)), g, 64, 96).astype(int)
    assert np.abs(to_model(rgb, g, 64, 96).astype(int) - full).mean() < 1.0
    # A PNG is never reduced (cv2 would resize it after decoding; prepare does not).
    cv2.imwrite(str(tmp_path / "car.png"), img)
    assert read_image(str(tmp_path / "car.png"), 2).shape == (257, 383, 3)


def test_row_geometry_reads_the_columns_or_says_stretch():
    row = {"scaled_height": 40.0, "scaled_width": 62, "pad_top": 0, "pad_left": 1, "id": "a"}
    assert row_geometry(row) == {"scaled_height": 40, "scaled_width": 62, "pad_top": 0, "pad_left": 1}
    old = {"id": "a", "orig_height": 80}                        # an index written before fit=pad
    assert row_geometry(old) is None                            # to_original: stretch from the map's size
    assert row_geometry(old, 4, 6) == {"scaled_height": 4, "scaled_width": 6, "pad_top": 0, "pad_left": 0}
    assert row_geometry({**row, "pad_left": float("nan")}, 4, 6)["scaled_width"] == 6
    prob = np.random.default_rng(1).random((4, 6)).astype(np.float32)
    assert np.array_equal(to_original(prob, (8, 12), row_geometry(old)),
                          to_original(prob, (8, 12), row_geometry(old, 4, 6)))
