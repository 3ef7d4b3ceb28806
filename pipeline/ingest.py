"""Reading and validating the raw Kaggle layout (used by ``pipeline.prepare``).

Everything here is pure and per-file, so prepare can run it in joblib workers.
A problem is an :class:`Issue` (file, kind, level, reason); a file that cannot
be used raises :class:`BadFile` from the readers and is left out by the caller.

Levels:
- ``error``: the file (or the image/mask pair it belongs to) is left out;
- ``warning``: the file is used after a repair (e.g. a grayscale JPEG converted
  to RGB) or a CSV disagrees with the files on disk.
Both count as problems for ``prepare.strict=true``.

Issue kinds (``prepare_report.json``):
    unreadable, corrupt, truncated    train/test image or mask file (error: left out)
    not_jpeg, color_converted         image decoded anyway / converted to RGB (warning)
    missing_mask, missing_image       image without mask, mask without image (error)
    size_mismatch                     image and mask sizes differ (error: pair left out)
    mask_not_binary                   mask values not exactly {0,1} or {0,255} (error)
    rle_mismatch                      train_masks.csv RLE != GIF (error: pair left out)
    rle_missing_row, rle_row_without_image   train_masks.csv vs files (warning)
    bad_id, unexpected_file           name is not <12 hex>_<NN>.jpg / _mask.gif (error)
    duplicate_id                      same id twice in a dir (error) or a CSV (warning)
    csv_unreadable, csv_columns       CSV cannot be parsed / missing (error) or extra (warning) columns
    not_in_sample, sample_without_image   test files vs sample_submission.csv rows
    no_sample_submission, no_test_images  fall-backs taken (warning)

What is checked, and how cheaply:
- train images and masks are decoded completely (prepare needs their pixels):
  empty/unreadable files, JPEGs without their end-of-image marker (truncated),
  GIFs without their trailer byte, decoder failures, colour modes other than RGB;
- test images get a header read plus the end-of-image check only (the header
  gives the size and colour mode; a truncated file lacks the final FFD9 marker).
  Decoding 100,064 full-size JPEGs would cost minutes; predict decodes them anyway.
"""
from __future__ import annotations

import io
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from .config import stable_hash

ID_RE = re.compile(r"^[0-9a-f]{12}_\d{2}$")
IMAGE_EXTS = (".jpg", ".jpeg")          # preferred first: on duplicate ids the .jpg wins
MASK_SUFFIX = "_mask.gif"
# Columns of the Kaggle CSVs; both missing and extra columns are reported.
CSV_COLUMNS = {
    "train_masks.csv": ["img", "rle_mask"],
    "sample_submission.csv": ["img", "rle_mask"],
    "metadata.csv": ["id", "year", "make", "model", "trim1", "trim2"],
}


@dataclass(frozen=True)
class Issue:
    file: str        # path relative to the raw directory, e.g. "train/0cdf5b5d0ce1_01.jpg"
    kind: str        # stable code, e.g. "truncated", "mask_not_binary" (module docstring)
    level: str       # "error" (left out) or "warning" (used after repair / CSV disagreement)
    reason: str      # one readable sentence

    def to_dict(self) -> dict:
        return asdict(self)


class BadFile(Exception):
    """A file that cannot be used; ``kind`` and the message become an error Issue."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


# ---------------------------------------------------------------------------- listing

@dataclass
class Listing:
    """One raw directory by name and stat only: the usable files by id, and the issues
    found from names alone. Plain strings, not Paths: 100,064 test files make Path
    construction cost seconds."""
    directory: str                 # absolute path of the directory
    files: dict[str, str]          # id -> file name, for names that pass the checks
    fingerprints: list[list]       # [name, size, mtime_ns] of every file, good or bad
    issues: list[Issue]

    def path(self, i: str) -> str:
        return os.path.join(self.directory, self.files[i])

    def fingerprint(self) -> str:
        """Order-independent hash of every file's fingerprint (= cache.fingerprint_files)."""
        return stable_hash(sorted(self.fingerprints), n=16)


def list_dir(directory: Path, rel: str, kind: str) -> Listing:
    """List ``directory`` (``kind`` = "image" or "mask") and check names (stat only, no read).

    Images are ``<12 hex>_<NN>.jpg``; masks are ``<12 hex>_<NN>_mask.gif``.
    Reports ids that do not match, files with other extensions, and duplicate ids
    (the same id under two extensions, e.g. ``.jpg`` and ``.jpeg``: the first in
    IMAGE_EXTS order is kept).
    """
    directory = Path(directory).resolve()
    files: dict[str, str] = {}
    issues: list[Issue] = []
    fps: list[list] = []
    if not directory.is_dir():
        return Listing(str(directory), files, fps, issues)
    candidates: dict[str, list[tuple[int, str]]] = {}
    with os.scandir(directory) as it:
        entries = sorted((e for e in it if e.is_file()), key=lambda e: e.name)
    for e in entries:
        name = e.name
        st = e.stat()
        fps.append([name, st.st_size, st.st_mtime_ns])
        if kind == "mask":
            ok_ext = name.lower().endswith(MASK_SUFFIX)
            stem, rank = (name[: -len(MASK_SUFFIX)], 0) if ok_ext else (name, 0)
            expected = f"<12 hex>_<NN>{MASK_SUFFIX}"
        else:
            stem, dot, ext = name.rpartition(".")   # cheaper than os.path.splitext x 100k
            stem, ext = (stem, dot + ext.lower()) if dot else (name, "")
            ok_ext = ext in IMAGE_EXTS
            rank = IMAGE_EXTS.index(ext) if ok_ext else 0
            expected = "<12 hex>_<NN>.jpg"
        if not ok_ext:
            issues.append(Issue(f"{rel}/{name}", "unexpected_file", "error",
                                f"not a {'mask GIF' if kind == 'mask' else 'JPEG'} name (expected {expected})"))
            continue
        if not ID_RE.match(stem):
            issues.append(Issue(f"{rel}/{name}", "bad_id", "error",
                                f"id '{stem}' does not match <12 hex digits>_<2 digits>"))
            continue
        candidates.setdefault(stem, []).append((rank, name))
    for stem, cands in candidates.items():
        cands.sort()
        files[stem] = cands[0][1]
        for _, name in cands[1:]:
            issues.append(Issue(f"{rel}/{name}", "duplicate_id", "error",
                                f"duplicate id '{stem}' (kept {cands[0][1]})"))
    return Listing(str(directory), files, fps, issues)


# ---------------------------------------------------------------------------- CSVs

def read_csv(path: Path, name: str) -> tuple[pd.DataFrame | None, list[Issue]]:
    """Read a Kaggle CSV as strings; report unreadable files and missing/extra columns.

    Returns (None, issues) when unreadable or when a required column is missing.
    """
    expected = CSV_COLUMNS[name]
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # pandas raises many types (ParserError, UnicodeDecodeError, EmptyDataError)
        return None, [Issue(name, "csv_unreadable", "error", f"cannot parse CSV: {type(e).__name__}: {e}")]
    issues = []
    cols = [str(c) for c in df.columns]
    missing = [c for c in expected if c not in cols]
    extra = [c for c in cols if c not in expected]
    if missing:
        issues.append(Issue(name, "csv_columns", "error",
                            f"missing column(s) {missing}; expected {expected}, found {cols}"))
    if extra:
        issues.append(Issue(name, "csv_columns", "warning", f"extra column(s) {extra} ignored"))
    key = expected[0]
    if not missing:
        dup = df[key][df[key].duplicated()].unique().tolist()
        if dup:
            issues.append(Issue(name, "duplicate_id", "warning",
                                f"{len(dup)} duplicate '{key}' value(s), first kept: {dup[:5]}"))
            df = df.drop_duplicates(subset=key, keep="first")
    return (None if missing else df.reset_index(drop=True)), issues


# ---------------------------------------------------------------------------- images

def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadFile("unreadable", f"cannot read file: {e.strerror or e}") from None
    if not data:
        raise BadFile("unreadable", "empty file (0 bytes)")
    return data


def jpeg_complete(tail: bytes) -> bool:
    """True when a JPEG ends with its end-of-image marker FFD9 (trailing NUL padding allowed).

    A file cut short (interrupted copy or download) lacks it; decoders then
    silently fill the missing rows with grey, so a decode alone does not notice.
    """
    return tail.rstrip(b"\x00").endswith(b"\xff\xd9")


def _unreadable(e: Exception) -> BadFile:
    """A header parse failure: files cut inside their header are 'truncated', the rest 'corrupt'."""
    kind = "truncated" if "truncated" in str(e).lower() else "corrupt"
    return BadFile(kind, f"not a readable image ({type(e).__name__}: {e})")


def _header(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except Exception as e:  # UnidentifiedImageError, SyntaxError from broken headers, ...
        raise _unreadable(e) from None


JPEG_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2}   # decode scale -> cv2 flag


def decode_image(path: Path, reduction=None) -> tuple[np.ndarray, list[tuple[str, str]], tuple[int, int]]:
    """Decode a train image. Returns ((h, w, 3) uint8 BGR, [(kind, reason) warnings], (H, W)).

    (H, W) is the image's own size (from its header). RGB JPEGs take the fast cv2 path,
    decoded at 1/r size when ``reduction(H, W)`` returns r = 2 (h, w = ceil(H/r), ceil(W/r);
    see ``prepare.jpeg_reduction``); grayscale, RGBA, CMYK (and non-JPEG files named .jpg)
    go through PIL's conversion to RGB at full size, which handles Adobe CMYK.
    Raises BadFile for unreadable, corrupt or truncated files.
    """
    data = _read_bytes(path)
    im = _header(data)
    fmt, mode = im.format, im.mode
    size = (im.height, im.width)
    warnings = []
    if fmt == "JPEG" and not jpeg_complete(data[-64:]):
        raise BadFile("truncated", f"truncated JPEG: no end-of-image marker ({len(data)} bytes)")
    if fmt == "JPEG" and mode == "RGB":
        r = reduction(*size) if reduction is not None else 1
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), JPEG_FLAGS[r])
        if arr is None:
            raise BadFile("corrupt", "JPEG decoder failed")
        if arr.shape[:2] != (-(-size[0] // r), -(-size[1] // r)):
            raise BadFile("corrupt", f"JPEG header says {size[1]}x{size[0]}, decoded {arr.shape[1]}x{arr.shape[0]}"
                                     + (f" at 1/{r} scale" if r > 1 else ""))
        return arr, warnings, size
    if fmt != "JPEG":
        warnings.append(("not_jpeg", f"file is {fmt}, not JPEG; decoded anyway"))
    if mode != "RGB":
        warnings.append(("color_converted", f"{mode} image converted to RGB"))
    try:
        rgb = np.asarray(im.convert("RGB"))
    except Exception as e:  # truncated non-JPEG data, decoder errors
        raise BadFile("corrupt", f"decoder failed ({type(e).__name__}: {e})") from None
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), warnings, rgb.shape[:2]


def decode_mask(path: Path) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Decode a train mask GIF. Returns ((H, W) uint8 {0, 1}, warnings).

    Kaggle's GIFs are palette images whose indices are {0, 1}; a mask in {0, 255}
    is accepted and mapped to {0, 1}. Anything other than two such values
    (a constant mask, grey levels, other labels) raises BadFile("mask_not_binary").
    """
    data = _read_bytes(path)
    im = _header(data)
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
        return (arr > 127).astype(np.uint8), []
    shown = values if len(values) <= 8 else values[:8] + ["..."]
    raise BadFile("mask_not_binary", f"mask values {shown} are not two values {{0,1}} or {{0,255}}")


def jpeg_header(path: Path) -> dict:
    """Cheap check of a test image: size and mode from the header, plus the end marker.

    Returns {"height", "width", "mode"}; raises BadFile. Reads only the first
    bytes PIL needs and the last 64 bytes.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise BadFile("unreadable", "empty file (0 bytes)")
            try:
                im = Image.open(f)
                w, h, mode, fmt = im.width, im.height, im.mode, im.format
            except BadFile:
                raise
            except Exception as e:
                raise _unreadable(e) from None
            f.seek(max(0, size - 64))
            tail = f.read()
    except OSError as e:
        raise BadFile("unreadable", f"cannot read file: {e.strerror or e}") from None
    if fmt == "JPEG" and not jpeg_complete(tail):
        raise BadFile("truncated", f"truncated JPEG: no end-of-image marker ({size} bytes)")
    return {"height": h, "width": w, "mode": mode, "format": fmt}
