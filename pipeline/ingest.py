"""Decoding and checking the raw Kaggle files (used by ``pipeline.prepare``; the layout by name: ``pipeline.layout``).

Everything here is pure and per-file, so prepare can run it in joblib workers.
A problem is an :class:`Issue` (file, kind, level, reason); a file that cannot
be used raises :class:`BadFile` from the readers and is left out by the caller.

Levels:
- ``error``: the file (or the image/mask pair it belongs to) is left out;
- ``warning``: the file is used after a repair (e.g. a grayscale JPEG converted
  to RGB) or a CSV disagrees with the files on disk.
Both count as problems for ``prepare.strict=true``.

Issue kinds (``prepare_report.json``):
    unreadable, corrupt, truncated    train/test image or mask file (error: left out); ``unreadable``
                                      also names entries that are not files (a directory named
                                      x.jpg, a broken symbolic link, a symbolic link loop) and a raw
                                      folder that is a symbolic link loop
    too_large                         header claims more than MAX_PIXELS pixels (a decompression
                                      bomb?), or the file is over MAX_FILE_BYTES: refused before any
                                      pixel is decoded (error: left out)
    not_jpeg, color_converted         image decoded anyway / converted to RGB (warning)
    missing_mask, missing_image       image without mask, mask without image (error)
    size_mismatch                     image and mask sizes differ (error: pair left out)
    mask_not_binary                   mask values not exactly {0,1} or {0,255} (error)
    rle_mismatch                      train_masks.csv RLE != GIF (error: pair left out)
    rle_malformed                     train_masks.csv row is not a valid RLE (warning: the GIF is used)
    rle_missing_row, rle_row_without_image   train_masks.csv vs files (warning)
    bad_id, unexpected_file           name is not <12 hex>_<NN>.jpg / _mask.gif (error)
    duplicate_id                      same id twice in a dir (error) or a CSV (warning)
    csv_unreadable, csv_columns       CSV cannot be parsed / missing (error) or extra (warning) columns
    not_in_sample, sample_without_image   test files vs sample_submission.csv rows
    no_sample_submission, no_test_images  fall-backs taken (warning)
    train_test_overlap                the same id in the train and the test folder (warning: leakage)

What is checked, and how cheaply:
- every JPEG, train and test, gets a strict decode of its whole stream (libjpeg
  warnings are errors): cv2 and PIL accept damaged entropy-coded data and paint it
  grey, libjpeg only printing a warning. Test JPEGs are checked at 1/8 scale
  (:func:`check_jpeg_data`, a tenth of a full decode);
  for RGB train JPEGs that strict decode is the full-size one prepare needs anyway
  (:func:`decode_jpeg`, one pass); other train images and the masks are decoded
  completely too: empty/unreadable files, GIFs without their trailer byte, decoder
  failures, colour modes other than RGB;
- test images get no full decode (predict does that): the header gives size and mode.
Pixels are the stored ones: EXIF orientation is ignored everywhere (Kaggle's masks
are aligned with the stored pixels, and the header sizes are the unrotated ones).

Hostile names and headers: every file is opened by its header first (:func:`read_header`),
and a size over MAX_PIXELS is refused there, so no decoder ever allocates for a forged
60000x60000 JPEG SOF or GIF screen. Names are shown through :func:`shown_name`: bytes
that are not UTF-8 and control characters appear as ``\\xNN`` escapes, so a report, the
console and the stage log can always be written.
"""
from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
from PIL import Image


# Largest image (H*W) any reader here decodes: 16x a Kaggle photo (1918x1280 = 2.5 MP) and room
# for 8K (7680x4320 = 33 MP); decoded RGB stays under 120 MB. PIL's own guard (MAX_IMAGE_PIXELS,
# 89 MP warns, 179 MP raises) is a process-wide setting other code may switch off; this one is ours.
MAX_PIXELS = 40_000_000
# Largest file read into memory (a Kaggle photo is 0.1-3 MB, an uncompressed 8K PNG ~100 MB): a
# multi-gigabyte file named .jpg is refused by its size, not read.
MAX_FILE_BYTES = 256 * 2**20


class BadFile(Exception):
    """A file that cannot be used; ``kind`` and the message become an error Issue."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


# ---------------------------------------------------------------------------- images

def read_bytes(path: Path) -> bytes:
    """The whole file (every reader here needs it), or BadFile: unreadable, empty, over MAX_FILE_BYTES."""
    try:
        size = os.stat(path).st_size
        if size > MAX_FILE_BYTES:
            raise BadFile("too_large", f"file is {size:,} bytes, over the {MAX_FILE_BYTES:,}-byte limit; not read")
        data = path.read_bytes()
    except OSError as e:
        raise BadFile("unreadable", f"cannot read file: {e.strerror or e}") from None
    if not data:
        raise BadFile("unreadable", "empty file (0 bytes)")
    return data


JPEG_TAIL = 4096    # bytes searched for the end-of-image marker: room for padding and trailers


def jpeg_complete(data: bytes) -> bool:
    """True when a JPEG's end-of-image marker FFD9 lies within its last JPEG_TAIL bytes.

    Bytes after the marker (NUL padding, a camera's or editor's trailer) are allowed.
    A file cut short (interrupted copy or download) lacks it; decoders then silently
    fill the missing rows with grey. Inside entropy-coded data FF is always followed by
    00 or a restart marker, so an FFD9 found there is the real end; one from an
    embedded EXIF thumbnail near a cut is caught by :func:`check_jpeg_data`.
    """
    return b"\xff\xd9" in data[-JPEG_TAIL:]


def check_jpeg_data(data: bytes) -> None:
    """Decode a whole JPEG stream strictly, at the smallest DCT scale; raise BadFile on any libjpeg warning.

    cv2 and PIL decode a JPEG whose entropy-coded data is damaged (zeroed, overwritten,
    cut) and fill the rest with grey; libjpeg only prints "Corrupt JPEG data: ...".
    simplejpeg's ``strict=True`` turns those warnings into ValueError. ``min_height=1,
    min_width=1`` picks libjpeg's 1/8 scale and GRAY output skips the colour conversion,
    but every scan of every component is still entropy-decoded (a tenth of a full
    decode). GRAY works for YCbCr, grayscale, CMYK and
    YCCK JPEGs alike. Trailing bytes after the end marker are accepted.
    Raises BadFile("truncated") when the data ends early, BadFile("corrupt") otherwise.
    """
    try:
        simplejpeg.decode_jpeg(data, colorspace="GRAY", strict=True, min_height=1, min_width=1)
    except Exception as e:  # ValueError with libjpeg's message; anything else is a decoder failure too
        msg = str(e).strip() or type(e).__name__
        if msg.startswith("Premature end of JPEG file") or not jpeg_complete(data):
            raise BadFile("truncated", f"truncated JPEG: data ends before its end-of-image marker "
                                       f"({len(data)} bytes; libjpeg: {msg})") from None
        raise BadFile("corrupt", f"corrupt JPEG data (libjpeg: {msg})") from None


def _unreadable(e: Exception) -> BadFile:
    """A header parse failure: files cut inside their header are 'truncated', the rest 'corrupt'."""
    kind = "truncated" if "truncated" in str(e).lower() else "corrupt"
    return BadFile(kind, f"not a readable image ({type(e).__name__}: {e})")


def _too_large(pixels: int, size: tuple[int, int] | None = None) -> BadFile:
    dims = f"{size[0]}x{size[1]} = " if size else ""
    return BadFile("too_large", f"header claims {dims}{pixels:,} pixels, over the {MAX_PIXELS:,}-pixel "
                                "limit (a decompression bomb?); not decoded")


def read_header(data: bytes) -> Image.Image:
    """PIL's lazy image for ``data`` (the header is parsed, no pixel is decoded), or BadFile.

    Raises BadFile("too_large") for more than MAX_PIXELS pixels, before any decoder (PIL,
    simplejpeg, cv2) allocates its output: a few bytes with a forged size would otherwise
    ask for gigabytes. Every reader here opens its file through this function first.
    """
    try:
        with warnings.catch_warnings():
            # Our limit is lower and checked below; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:   # over 2x PIL's limit: raised before the size is exposed
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise (_too_large(int(m.group(1))) if m else BadFile("too_large", f"{e}; not decoded")) from None
    except Exception as e:  # UnidentifiedImageError, SyntaxError from broken headers, ...
        raise _unreadable(e) from None
    w, h = im.size
    if w * h > MAX_PIXELS:
        raise _too_large(w * h, (w, h))
    return im


# decode scale -> cv2 flag (the fallback decoder, and bench_prepare's reference). IGNORE_ORIENTATION:
# the stored pixels, as the header's size and Kaggle's masks describe them (cv2 would otherwise
# apply an EXIF rotation).
JPEG_FLAGS = {1: cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION,
              2: cv2.IMREAD_REDUCED_COLOR_2 | cv2.IMREAD_IGNORE_ORIENTATION}


def decode_jpeg(data, reduction: int = 1, *, bgr: bool = False, strict: bool = False) -> np.ndarray:
    """(ceil(H/r), ceil(W/r), 3) uint8 RGB (BGR when ``bgr``) pixels of a JPEG's bytes, r = reduction.

    simplejpeg (libjpeg-turbo) gives the same pixels as ``cv2.imdecode`` with JPEG_FLAGS (checked
    on the real 1918x1280 Carvana photo, full and half size), faster (docs/accuracy.md,
    "Measurements behind the code"); r = 2 is libjpeg's DCT scaling, as IMREAD_REDUCED_COLOR_2. EXIF
    orientation is not applied (the stored pixels). ``strict=True`` raises ValueError on any
    libjpeg warning (damaged data), so a train image is checked and decoded in one pass.
    Raises ValueError for what libjpeg-turbo cannot decode (``data.read_image`` then tries cv2).
    """
    h, w = simplejpeg.decode_jpeg_header(data)[:2]
    scale = {} if reduction == 1 else {"min_height": -(-h // reduction), "min_width": -(-w // reduction)}
    return simplejpeg.decode_jpeg(data, colorspace="BGR" if bgr else "RGB", strict=strict, **scale)


def decode_image(path: Path, reduction=None) -> tuple[np.ndarray, list[tuple[str, str]], tuple[int, int]]:
    """Decode a train image. Returns ((h, w, 3) uint8 BGR, [(kind, reason) warnings], (H, W)).

    (H, W) is the image's own size (from its header). RGB JPEGs are checked and decoded in one
    strict pass by :func:`decode_jpeg` (predict decodes test JPEGs with it too), at 1/r size when
    ``reduction(H, W)`` returns r = 2 (h, w = ceil(H/r), ceil(W/r); see
    ``geometry.jpeg_reduction``); grayscale, RGBA, CMYK (and non-JPEG files named .jpg)
    go through PIL's conversion to RGB at full size, which handles Adobe CMYK.
    EXIF orientation is ignored by both (the stored pixels).
    Raises BadFile for unreadable, corrupt or truncated files.
    """
    data = read_bytes(path)
    im = read_header(data)
    fmt, mode = im.format, im.mode
    size = (im.height, im.width)
    warnings = []
    if fmt == "JPEG" and mode == "RGB":
        r = reduction(*size) if reduction is not None else 1
        try:
            arr = decode_jpeg(data, r, bgr=True, strict=True)
        except ValueError as e:
            check_jpeg_data(data)                       # names it: truncated or corrupt, libjpeg's words
            raise BadFile("corrupt", f"JPEG decoder failed ({e})") from None
        if arr.shape[:2] != (-(-size[0] // r), -(-size[1] // r)):
            raise BadFile("corrupt", f"JPEG header says {size[1]}x{size[0]}, decoded {arr.shape[1]}x{arr.shape[0]}"
                                     + (f" at 1/{r} scale" if r > 1 else ""))
        return arr, warnings, size
    if fmt == "JPEG":
        check_jpeg_data(data)
    else:
        warnings.append(("not_jpeg", f"file is {fmt}, not JPEG; decoded anyway"))
    if mode != "RGB":
        warnings.append(("color_converted", f"{mode} image converted to RGB"))
    try:
        rgb = np.asarray(im.convert("RGB"))
    except Exception as e:  # truncated non-JPEG data, decoder errors
        raise BadFile("corrupt", f"decoder failed ({type(e).__name__}: {e})") from None
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), warnings, rgb.shape[:2]


def decode_mask(path: Path) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Decode a train mask GIF. Returns ((H, W) uint8 {0, 1}, notes).

    Kaggle's GIFs are palette images whose indices are {0, 1}; a mask in {0, 255}
    is accepted and mapped to {0, 1}, with the note ("mask_0_255", reason) so that
    prepare can report how many were converted (not a problem: the labels are the same).
    Anything other than two such values (a constant mask, grey levels, other labels)
    raises BadFile("mask_not_binary").
    """
    data = read_bytes(path)
    im = read_header(data)
    if im.format == "GIF" and not data.endswith(b"\x3b"):
        raise BadFile("truncated", f"truncated GIF: no trailer byte ({len(data)} bytes)")
    try:
        # Palette ("P") masks: the indices are the labels. Other modes: their grey level.
        if im.mode not in ("P", "L"):
            im = im.convert("L")
        im.load()
        # PIL's C histogram of the indices: ~4x faster than np.bincount at 1918x1280.
        counts = im.histogram()
        arr = np.asarray(im)
    except Exception as e:
        raise BadFile("corrupt", f"decoder failed ({type(e).__name__}: {e})") from None
    values = [v for v, c in enumerate(counts) if c]
    if values == [0, 1]:
        return arr.astype(np.uint8, copy=False), []
    if values == [0, 255]:
        return (arr > 127).astype(np.uint8), [("mask_0_255", "mask stored as {0,255}; read as {0,1}")]
    shown = values if len(values) <= 8 else values[:8] + ["..."]
    raise BadFile("mask_not_binary", f"mask values {shown} are not two values {{0,1}} or {{0,255}}")


def check_test_image(path: Path) -> dict:
    """Check a test image without keeping its pixels: header, then the strict JPEG decode.

    Returns {"height", "width", "mode", "format"} (size and mode from the header, as
    stored: no EXIF rotation); raises BadFile for unreadable, truncated or corrupt files.
    A non-JPEG file named .jpg is decoded in full by PIL (rare; the caller reports it).
    """
    data = read_bytes(path)
    im = read_header(data)
    info = {"height": im.height, "width": im.width, "mode": im.mode, "format": im.format}
    if im.format == "JPEG":
        check_jpeg_data(data)
    else:
        try:
            im.load()
        except Exception as e:
            raise BadFile("corrupt", f"decoder failed ({type(e).__name__}: {e})") from None
    return info
