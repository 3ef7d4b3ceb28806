"""The strict JPEG check (``ingest.check_jpeg_data``) and the decode flags, file by file: damaged
entropy-coded data is caught where cv2 and PIL paint it grey, every colour model Carvana-like
data can hold still passes, trailers are fine and truncation is still caught; EXIF rotation is
never applied (prepare and predict read the stored pixels)."""
import io

import cv2
import numpy as np
import pytest
import simplejpeg
from PIL import Image

from pipeline.data import read_image
from pipeline.ingest import BadFile, check_jpeg_data, check_test_image, decode_image, jpeg_complete

H, W = 240, 360


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A smooth, car-sized-detail RGB picture (JPEG compresses it like a photo)."""
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), (0, 0), 2)
    cv2.rectangle(img, (60, 80), (300, 190), (40, 40, 200), -1)
    return img


def _jpeg(rgb: np.ndarray, mode: str = "RGB", **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


def _zero_middle(data: bytes, n: int = 256) -> bytes:
    sos = data.index(b"\xff\xda")
    a, b = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big"), data.rindex(b"\xff\xd9")
    mid = (a + b - n) // 2
    return data[:mid] + bytes(n) + data[mid + n:]


def test_zeroed_block_mid_stream_is_corrupt(photo, tmp_path):
    bad = _zero_middle(_jpeg(photo))
    assert cv2.imdecode(np.frombuffer(bad, np.uint8), cv2.IMREAD_COLOR) is not None   # cv2 accepts it
    with pytest.raises(BadFile, match="Corrupt JPEG data") as e:
        check_jpeg_data(bad)
    assert e.value.kind == "corrupt"
    (tmp_path / "x.jpg").write_bytes(bad)
    for check in (decode_image, check_test_image):               # train and test paths alike
        with pytest.raises(BadFile) as e:
            check(tmp_path / "x.jpg")
        assert e.value.kind == "corrupt" and "libjpeg" in e.value.reason


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
@pytest.mark.parametrize("progressive", [False, True])
def test_every_colour_model_passes(photo, tmp_path, mode, progressive):
    data = _jpeg(photo, mode, progressive=progressive)
    check_jpeg_data(data)
    (tmp_path / "x.jpg").write_bytes(data)
    img, warnings, size = decode_image(tmp_path / "x.jpg")
    assert img.shape == (H, W, 3) and size == (H, W)
    assert [k for k, _ in warnings] == ([] if mode == "RGB" else ["color_converted"])
    assert check_test_image(tmp_path / "x.jpg")["mode"] == mode


def test_ycck_jpeg_passes(photo, tmp_path):
    cmyk = np.asarray(Image.fromarray(photo).convert("CMYK"))
    data = simplejpeg.encode_jpeg(np.ascontiguousarray(cmyk), colorspace="CMYK")
    assert simplejpeg.decode_jpeg_header(data)[2] == "YCCK"
    check_jpeg_data(data)
    (tmp_path / "x.jpg").write_bytes(data)
    assert decode_image(tmp_path / "x.jpg")[0].shape == (H, W, 3)


@pytest.mark.parametrize("trailer", [b"\0" * 100, b"TRAILER " * 250, b"x" * 20000])
def test_bytes_after_the_end_marker_pass(photo, tmp_path, trailer):
    data = _jpeg(photo) + trailer
    check_jpeg_data(data)                      # even past JPEG_TAIL: the strict decode is the judge
    (tmp_path / "x.jpg").write_bytes(data)
    assert decode_image(tmp_path / "x.jpg")[0].shape == (H, W, 3)
    assert jpeg_complete(data) == (len(trailer) < 4096)


@pytest.mark.parametrize("cut", [2, 0.5, 0.9])
def test_truncated_is_caught(photo, cut):
    data = _jpeg(photo)
    short = data[:-cut] if isinstance(cut, int) else data[:int(len(data) * cut)]
    with pytest.raises(BadFile) as e:
        check_jpeg_data(short)
    assert e.value.kind == "truncated" and f"({len(short)} bytes" in e.value.reason


def test_cut_then_end_marker_appended_is_corrupt(photo):
    data = _jpeg(photo)
    with pytest.raises(BadFile) as e:
        check_jpeg_data(data[: len(data) // 2] + b"\xff\xd9")
    assert e.value.kind == "corrupt"


@pytest.mark.parametrize("reduction", [1, 2])
def test_exif_orientation_is_not_applied(photo, tmp_path, reduction):
    exif = Image.Exif()
    exif[0x0112] = 6                           # "rotate 90 CW to display": cv2's default obeys it
    p = tmp_path / "x.jpg"
    p.write_bytes(_jpeg(photo, exif=exif.tobytes()))
    stored = np.asarray(Image.open(p).convert("RGB"))                 # PIL: the stored pixels
    img, warnings, size = decode_image(p, lambda h, w: reduction)
    h, w = -(-H // reduction), -(-W // reduction)
    assert size == (H, W) and img.shape == (h, w, 3) and warnings == []
    pred = read_image(str(p), reduction)
    np.testing.assert_array_equal(pred, img[..., ::-1])               # predict = prepare
    if reduction == 1:
        assert np.abs(pred.astype(int) - stored.astype(int)).mean() < 1



FULLRES = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared/data/carvana_fullres/train/00087a6bd4dc_04.jpg"


@pytest.mark.parametrize("reduction", [1, 2])
@pytest.mark.parametrize("mode, progressive", [("RGB", False), ("RGB", True), ("L", False)])
def test_decode_jpeg_gives_cv2s_pixels(photo, tmp_path, reduction, mode, progressive):
    """The fast decoder (simplejpeg) is a drop-in for cv2.imdecode: same pixels, same DCT scaling."""
    from pipeline.ingest import JPEG_FLAGS, decode_jpeg
    data = _jpeg(photo, mode, progressive=progressive, subsampling=2)
    ref = cv2.imdecode(np.frombuffer(data, np.uint8), JPEG_FLAGS[reduction])
    assert np.array_equal(decode_jpeg(data, reduction, bgr=True), ref)
    path = tmp_path / "x.jpg"
    path.write_bytes(data)
    assert np.array_equal(read_image(str(path), reduction), cv2.cvtColor(ref, cv2.COLOR_BGR2RGB))


@pytest.mark.skipif(not FULLRES.is_file(), reason="needs ../shared/data/carvana_fullres")
@pytest.mark.parametrize("reduction", [1, 2])
def test_decode_jpeg_on_the_real_photo(reduction):
    from pipeline.ingest import JPEG_FLAGS, decode_jpeg
    data = FULLRES.read_bytes()
    ref = cv2.imdecode(np.frombuffer(data, np.uint8), JPEG_FLAGS[reduction])
    assert ref.shape[:2] == (-(-1280 // reduction), -(-1918 // reduction))
    assert np.array_equal(decode_jpeg(data, reduction, bgr=True), ref)


def test_cmyk_test_image_decodes_as_cv2_does(photo, tmp_path):
    """Predict's read_image on a CMYK JPEG: the same pixels cv2 gives (libjpeg-turbo converts CMYK)."""
    data = _jpeg(photo, "CMYK")
    path = tmp_path / "cmyk.jpg"
    path.write_bytes(data)
    ref = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    assert np.array_equal(read_image(str(path)), cv2.cvtColor(ref, cv2.COLOR_BGR2RGB))
