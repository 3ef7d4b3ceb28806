"""Cut cars out of photos with an exported run (``make cutout``): onnxruntime and image libraries only.

    python scripts/cutout.py --in DIR --out DIR [--model EXPORT_DIR] [--bg white|NAME|#rrggbb]

Every ``.jpg``/``.jpeg``/``.png`` in ``--in`` (any size, from anywhere) gives, in ``--out``:

- ``<name>.png``: the photo at its own size as RGBA, alpha = the predicted car mask (255 = car);
  with ``--bg`` a composite JPEG ``<name>.jpg`` instead (the car over that colour);
- ``<name>_mask.png``: the mask itself, 8-bit, 0 / 255.

The model is an export folder (``make export``), run by ``pipeline.onnxrun``: its ``model.json``
(the model card) names the folds' ONNX files, the input normalisation, the model size and
the geometry rule (``prepare.fit``), the TTA views and the threshold. Per photo, exactly as
predict + submit do for a test image:

1. the pixels are turned upright by their EXIF orientation (``PIL.ImageOps.exif_transpose``),
   so the cutout matches what a viewer shows;
2. the model input is ``geometry.to_model`` of the photo (stretch or pad, per the card), from a
   half-size JPEG decode when the photo is at least 3x the model size per side
   (``geometry.jpeg_reduction``, as prepare and predict decode);
3. per fold: the mean over the TTA views of sigmoid(logits), stored as round(255 p) (predict's
   maps); the fold mean of those (equal weights, submit's rule), ``geometry.to_original``
   back to the photo's size, ``> probmaps.threshold_level(threshold)`` (submit's rule).

Bad input never stops the others: a file that is not an image, a truncated or corrupt one, a
decompression-bomb header (``ingest``'s header guard: over ``ingest.MAX_PIXELS`` pixels is
refused before any pixel is decoded), an unreadable one, each gets one line on stderr; the
summary line counts done and refused. Exit status: 0 all done, 1 some photo refused, 2 the
command itself could not run (no model, a card that cannot be used, a bad ``--bg``).

Photos stream through a few threads (decode ahead, write behind: at most ``4 x workers``
photos in memory), so thousands of photos take bounded memory. No torch anywhere in this
module or what it imports (``tests/test_cutout.py`` checks it in a subprocess), so it starts
with onnxruntime's session creation rather than torch's import.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageColor, ImageOps

from . import cache, ingest, onnxrun
from .errors import ConfigError, PipelineError
from .geometry import geometry, jpeg_reduction
from .layout import shown_name

PHOTO_EXTS = (".jpg", ".jpeg", ".png")
ORIENTATION = 0x0112          # the EXIF orientation tag
JPEG_QUALITY = 95             # --bg composites


# ---------------------------------------------------------------------------- one photo

@dataclass
class Photo:
    """One decoded photo: upright pixels at its own size, and the model's input pixels."""
    name: str
    rgb: np.ndarray               # (h, w, 3) uint8 RGB, upright (EXIF orientation applied)
    small: np.ndarray             # (h', w', 3) uint8: the pixels to_model reads, rgb or its half-size decode
    geom: dict                    # where the photo sits in the model input (geometry.geometry)
    orientation: int = 1


def _orientation(im: Image.Image) -> int:
    """The EXIF (or XMP) orientation, 1..8; 1 when there is none or it cannot be parsed."""
    try:
        v = int(im.getexif().get(ORIENTATION) or 1)
    except Exception:     # a malformed EXIF block: the stored pixels, as a viewer would show them
        return 1
    return v if 1 <= v <= 8 else 1


def upright(arr: np.ndarray, orientation: int) -> np.ndarray:
    """(h, w, 3) ``arr`` turned as EXIF ``orientation`` says a viewer shows it (``ImageOps.exif_transpose``)."""
    if orientation == 1:
        return arr
    pil = Image.fromarray(arr)
    pil.getexif()[ORIENTATION] = orientation     # the image's own (empty) EXIF, with the stored tag
    return np.asarray(ImageOps.exif_transpose(pil))


def _open(data: bytes) -> Image.Image:
    """``ingest.read_header`` (the decompression-bomb guard), a file that is no image named as such."""
    try:
        return ingest.read_header(data)
    except ingest.BadFile as e:
        if "UnidentifiedImageError" in e.reason:
            raise ingest.BadFile("not_image", f"not an image: no image format recognised in its "
                                              f"{len(data):,} bytes") from None
        raise


def _decode(data: bytes, im: Image.Image) -> np.ndarray:
    """(h, w, 3) uint8 RGB stored pixels: RGB JPEGs by libjpeg-turbo, strictly; others by PIL."""
    if im.format == "JPEG" and im.mode == "RGB":
        try:
            arr = ingest.decode_jpeg(data, 1, strict=True)
        except ValueError as e:
            ingest.check_jpeg_data(data)            # names it: truncated or corrupt, in libjpeg's words
            raise ingest.BadFile("corrupt", f"JPEG decoder failed ({e})") from None
        if arr.shape[:2] != (im.height, im.width):
            raise ingest.BadFile("corrupt", f"JPEG header says {im.width}x{im.height}, decoded "
                                            f"{arr.shape[1]}x{arr.shape[0]}")
        return arr
    if im.format == "JPEG":
        ingest.check_jpeg_data(data)
    try:
        return np.asarray(im.convert("RGB"))
    except Exception as e:     # truncated PNG data, decoder errors
        kind = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise ingest.BadFile(kind, f"decoder failed ({type(e).__name__}: {e})") from None


def read_photo(path: str | Path, height: int, width: int, fit: str) -> Photo:
    """Decode one photo for a height x width model with ``fit``; BadFile (kind, reason) when it cannot be used.

    The file is read once (``ingest.read_bytes``: unreadable, empty or oversized files refused),
    its header parsed by ``ingest.read_header`` before any decoder allocates, RGB JPEGs decoded
    strictly by libjpeg-turbo (``ingest.decode_jpeg``, the pixels predict and prepare decode;
    damaged or cut streams are named by ``ingest.check_jpeg_data``), other formats by PIL's
    conversion to RGB.
    """
    path = Path(path)
    data = ingest.read_bytes(path)
    im = _open(data)
    orientation = _orientation(im)
    rgb = upright(_decode(data, im), orientation)
    oh, ow = rgb.shape[:2]
    geom = geometry(oh, ow, height, width, fit)
    if min(geom["scaled_height"], geom["scaled_width"]) < 1:
        raise ingest.BadFile("too_thin", f"{ow}x{oh} is too thin to place in the {width}x{height} model input")
    small = rgb
    if im.format == "JPEG" and im.mode == "RGB" and jpeg_reduction(oh, ow, geom) == 2:
        small = upright(ingest.decode_jpeg(data, 2), orientation)   # libjpeg's DCT scaling, as predict
    return Photo(path.stem, rgb, small, geom, orientation)


def predict_mask(model: onnxrun.Model, photo: Photo) -> np.ndarray:
    """(h, w) bool at the photo's own size: submit's rule on the fold mean."""
    return onnxrun.predict_mask(model, photo.small, photo.geom, photo.rgb.shape[:2])


# ---------------------------------------------------------------------------- outputs

def parse_bg(bg: str) -> tuple[int, int, int] | None:
    """'' -> None (transparency); a colour name or #rrggbb -> (r, g, b); else PipelineError."""
    bg = (bg or "").strip()
    if not bg or bg.lower() in ("none", "transparent"):
        return None
    try:
        c = ImageColor.getrgb(bg)
    except ValueError:
        raise PipelineError(f"BG={bg}: not a colour; use a name (white, black, green, ...) or #rrggbb") from None
    return tuple(int(v) for v in c[:3])


def _encode(ext: str, arr: np.ndarray, params: list[int]) -> bytes:
    ok, buf = cv2.imencode(ext, arr, params)
    if not ok:
        raise PipelineError(f"{ext} encoding failed")
    return buf.tobytes()


def output_names(name: str, bg) -> tuple[str, str]:
    """(the cutout's file name, the mask's) for a photo named ``name`` (its stem)."""
    return (f"{name}.jpg" if bg is not None else f"{name}.png"), f"{name}_mask.png"


def write_outputs(out_dir: Path, photo: Photo, mask: np.ndarray, bg) -> None:
    """``<name>.png`` (RGBA, alpha = the (h, w) bool mask) or ``<name>.jpg`` (composite over ``bg``),
    and ``<name>_mask.png``."""
    alpha = mask.astype(np.uint8) * np.uint8(255)
    main, mask_name = output_names(photo.name, bg)
    bgr = cv2.cvtColor(photo.rgb, cv2.COLOR_RGB2BGR)
    if bg is None:
        data = _encode(".png", np.dstack([bgr, alpha]), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    else:
        colour = np.array(bg[::-1], np.uint8)                       # BGR
        data = _encode(".jpg", np.where(mask[..., None], bgr, colour), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    cache.write_bytes(out_dir / main, data)
    cache.write_bytes(out_dir / mask_name, _encode(".png", alpha, [cv2.IMWRITE_PNG_COMPRESSION, 3]))


# ---------------------------------------------------------------------------- the folder

@dataclass
class Summary:
    done: int = 0
    refused: int = 0
    ignored: int = 0               # files in IN that are not .jpg/.jpeg/.png (not counted as photos)
    seconds: float = 0.0
    refusals: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


def list_photos(in_dir: Path) -> tuple[list[Path], int]:
    """(the .jpg/.jpeg/.png entries of ``in_dir``, sorted by name; how many other files were left aside)."""
    if not in_dir.is_dir():
        raise PipelineError(f"IN={in_dir}: not a folder")
    photos, other = [], 0
    with os.scandir(in_dir) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            if e.name.lower().endswith(PHOTO_EXTS):
                photos.append(Path(e.path))
            elif not e.is_dir():
                other += 1
    return sorted(photos, key=lambda p: p.name), other


def _unclashed(photos: list[Path], colour, refuse) -> list[Path]:
    """The photos whose outputs no earlier photo writes (``a.jpg`` and ``a.png``: the second is refused)."""
    claimed: dict[str, str] = {}        # output file name -> the photo that writes it
    todo = []
    for p in photos:
        outs = output_names(p.stem, colour)
        clash = next((claimed[o] for o in outs if o in claimed), None)
        if clash is not None:
            refuse(p, ("name_clash", f"its output {outs[0]} would overwrite the cutout of {clash}; rename one"))
            continue
        claimed.update({o: p.name for o in outs})
        todo.append(p)
    return todo


def _read(p: Path, model: onnxrun.Model):
    """(Photo, None) or (None, (kind, reason)): one photo's failure never stops the others."""
    try:
        return read_photo(p, model.height, model.width, model.fit), None
    except ingest.BadFile as e:
        return None, (e.kind, e.reason)
    except Exception as e:      # noqa: BLE001 - whatever else a decoder raises
        return None, ("unreadable", f"{type(e).__name__}: {e}")


def _mask(model: onnxrun.Model, photo: Photo):
    """(mask, None) or (None, (kind, reason)), e.g. for a photo whose shape the model cannot take."""
    try:
        return predict_mask(model, photo), None
    except Exception as e:      # noqa: BLE001 - the next photo may well work
        return None, ("failed", f"{type(e).__name__}: {e}")


def _write(out_dir: Path, photo: Photo, mask: np.ndarray, colour):
    """None, or (kind, reason) when the outputs cannot be written (a full disk names every photo)."""
    try:
        write_outputs(out_dir, photo, mask, colour)
        return None
    except Exception as e:      # noqa: BLE001 - one photo's failure never stops the others
        return ("write_failed", f"{type(e).__name__}: {e}")


def _stream(todo: list[Path], model: onnxrun.Model, out_dir: Path, colour, workers: int, finish) -> None:
    """Decode ahead and write behind on ``workers`` threads while the model runs here; ``finish(path,
    error or None)`` once per photo. At most ``2 * workers`` photos wait on each side."""
    ahead = max(1, 2 * workers)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        reads: deque = deque()
        writes: deque = deque()
        it = iter(todo)

        def fill():
            while len(reads) < ahead:
                p = next(it, None)
                if p is None:
                    return
                reads.append((p, pool.submit(_read, p, model)))

        def drain(limit: int):
            while len(writes) > limit:
                p, fut = writes.popleft()
                finish(p, fut.result())

        fill()
        while reads:
            p, fut = reads.popleft()
            fill()
            photo, err = fut.result()
            mask, err = _mask(model, photo) if err is None else (None, err)
            if err:
                finish(p, err)
                continue
            writes.append((p, pool.submit(_write, out_dir, photo, mask, colour)))
            del photo, mask
            drain(ahead)
        drain(0)


def run(in_dir: str | Path, out_dir: str | Path, model: onnxrun.Model | str | Path, bg: str = "", *,
        workers: int = 2, threads: int = 0, progress: bool = True, log=None) -> Summary:
    """Cut out every photo of ``in_dir`` into ``out_dir`` (see the module docstring); returns the counts.

    Each bad photo gets one line through ``log`` (default: stderr) and is counted as refused;
    nothing about one photo stops the others. ``workers`` threads decode and write while the
    model runs (at most ``4 * workers`` photos in memory)."""
    from tqdm import tqdm
    log = log or (lambda m: tqdm.write(m, file=sys.stderr))
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    colour = parse_bg(bg)
    if not isinstance(model, onnxrun.Model):
        model = onnxrun.load_model(model, threads)
    photos, other = list_photos(in_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if out_dir.resolve() == in_dir.resolve():
        raise PipelineError(f"OUT={out_dir} is the input folder: the cutouts would overwrite the photos; "
                            f"choose another OUT")
    s = Summary(ignored=other)

    def refuse(path: Path, err: tuple[str, str]) -> None:
        s.refused += 1
        s.refusals.append(f"cutout: refused {shown_name(path.name)}: {err[0]}: {err[1]}")
        log(s.refusals[-1])

    todo = _unclashed(photos, colour, refuse)
    t0 = time.time()
    bar = tqdm(total=len(photos), desc="cutout", unit="img", disable=not progress, file=sys.stderr,
               initial=len(photos) - len(todo))

    def finish(path: Path, err) -> None:
        if err:
            refuse(path, err)
        else:
            s.done += 1
        bar.update(1)

    _stream(todo, model, out_dir, colour, workers, finish)
    bar.close()
    s.seconds = time.time() - t0
    return s


def summary_line(s: Summary, in_dir, out_dir) -> str:
    extra = f", {s.ignored} other file(s) left aside (not .jpg/.jpeg/.png)" if s.ignored else ""
    return (f"cutout: {s.done} done, {s.refused} refused ({in_dir} -> {out_dir}) in {s.seconds:.1f} s, "
            f"{s.images_per_s:.2f} images/s{extra}")


# ---------------------------------------------------------------------------- command line

def default_model_dir(config: str | None, overrides: list[str]) -> Path:
    """``make export``'s default folder for the config's run (``Graph.export_dir``, resolved by the
    torch-free stage graph). ``--model`` skips it."""
    from .config import load
    from .graph import Graph
    return Graph(load(config, overrides)).export_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="make cutout", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--in", dest="in_dir", required=True, help="folder of photos (.jpg, .jpeg, .png)")
    ap.add_argument("--out", dest="out_dir", required=True, help="folder for the cutouts")
    ap.add_argument("--model", default="", help="export folder (default: the export of --config's run)")
    ap.add_argument("--bg", default="", help="composite JPEG over this colour (white, a name, #rrggbb) "
                                             "instead of a transparent PNG")
    ap.add_argument("--workers", type=int, default=2, help="decode/write threads (default 2)")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0 = every core)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--config", "-c", default=None, help="YAML experiment file (only to find the default --model)")
    ap.add_argument("overrides", nargs="*", help="key=value (only to find the default --model)")
    a = ap.parse_intermixed_args(argv)
    try:
        parse_bg(a.bg)                          # a bad colour is said before any model is opened
        folder = Path(a.model) if a.model else default_model_dir(a.config, a.overrides)
        model = onnxrun.load_model(folder, a.threads)
        print(f"cutout: model {folder} ({len(model.sessions)} fold(s), {model.height}x{model.width} "
              f"{model.fit}, TTA {','.join(model.views)}, threshold {model.threshold:g}; "
              f"loaded in {model.seconds_to_load:.2f} s)", file=sys.stderr)
        s = run(a.in_dir, a.out_dir, model, a.bg, workers=a.workers, progress=not a.no_progress)
    except (ConfigError, PipelineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary_line(s, a.in_dir, a.out_dir))
    return 1 if s.refused else 0


if __name__ == "__main__":
    sys.exit(main())
