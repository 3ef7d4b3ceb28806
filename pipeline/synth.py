"""The embedded default dataset: synthetic studio car photos in the exact Kaggle layout.

No internet here, so a fresh checkout needs data it can make itself. Each car is
a parametric silhouette (body, cabin, four wheels) seen from 16 angles around a
turntable, the way Carvana shot them: the projected length follows the view
angle, the cabin slides towards the rear, wheels turn edge-on in front views.
The photo adds a studio backdrop with a floor, a soft shadow (background, not
car), body shading, dark windows and JPEG noise; some cars are white or silver,
close to the backdrop, so the task is learnable but not trivial.

Output (``generate(out_dir, ...)``), identical in names and formats to Kaggle's:

    train/<car>_<NN>.jpg               RGB JPEG, car = 12 hex digits, NN = 01..16
    train_masks/<car>_<NN>_mask.gif    palette GIF, values {0, 1}
    test/<car>_<NN>.jpg
    train_masks.csv                    img,rle_mask  (img = "<car>_<NN>.jpg")
    metadata.csv                       id,year,make,model,trim1,trim2 (train and test cars)
    sample_submission.csv              img,rle_mask  with "1 1" for every test image

Deterministic: the same arguments give byte-identical files.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import cv2
import numpy as np
from joblib import Parallel, delayed
from PIL import Image

from . import rle
from .cache import write_bytes, write_text

VIEWS = 16
MAKES = [("Acura", "TL"), ("Audi", "A4"), ("BMW", "3 Series"), ("Chevrolet", "Malibu"),
         ("Ford", "Fusion"), ("Honda", "Accord"), ("Hyundai", "Sonata"), ("Kia", "Optima"),
         ("Mazda", "Mazda6"), ("Nissan", "Altima"), ("Toyota", "Camry"), ("Volkswagen", "Passat")]


def paint_color(rng: np.random.Generator) -> tuple[int, int, int]:
    """A body colour in BGR. Drawn from a continuous range so that a handful of training cars
    already spans the colour space; a third are greys from black to near-white, the hard cases
    on a light backdrop (as white and silver cars are in Carvana's studio)."""
    if rng.random() < 1 / 3:
        v = int(rng.uniform(20, 240))
        return (v, v, v)
    hsv = np.uint8([[[rng.uniform(0, 180), rng.uniform(0.35, 1.0) * 255, rng.uniform(0.3, 0.95) * 255]]])
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


def car_ids(n: int, rng: np.random.Generator) -> list[str]:
    """n distinct 12-hex-digit ids, sorted (Kaggle lists files sorted)."""
    ids: set[str] = set()
    while len(ids) < n:
        ids.add("".join(rng.choice(list("0123456789abcdef"), 12)))
    return sorted(ids)


def car_params(rng: np.random.Generator) -> dict:
    """The shape and paint of one car; all lengths are fractions of the image width."""
    return {
        "length": rng.uniform(0.58, 0.72),
        "depth": rng.uniform(0.26, 0.32),        # car width seen from the front
        "body_h": rng.uniform(0.13, 0.18),       # fraction of image height
        "cabin_h": rng.uniform(0.10, 0.14),
        "cabin_len": rng.uniform(0.45, 0.6),     # fraction of the body length
        "cabin_shift": rng.uniform(0.02, 0.12),  # cabin sits towards the rear
        "wheel_r": rng.uniform(0.045, 0.06),     # fraction of image height
        "color": paint_color(rng),
        "ground": rng.uniform(0.74, 0.8),        # floor line, fraction of height
        "dx": rng.uniform(-0.02, 0.02),
    }


def _rounded_rect(x0: float, y0: float, x1: float, y1: float, r: float, n: int = 6) -> np.ndarray:
    """Polygon (K, 2) of a rectangle with rounded corners."""
    r = max(0.0, min(r, (x1 - x0) / 2, (y1 - y0) / 2))
    pts = []
    for cx, cy, a0 in ((x1 - r, y0 + r, -90), (x1 - r, y1 - r, 0), (x0 + r, y1 - r, 90), (x0 + r, y0 + r, 180)):
        for a in np.linspace(a0, a0 + 90, n):
            pts.append((cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a))))
    return np.asarray(pts)


# Over 60 lines: one drawing (body, wheels, background) that reads top to bottom.
def render(p: dict, view: int, height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw view ``view`` (1..16) of car ``p``.

    Returns (image (H, W, 3) uint8 BGR, mask (H, W) uint8 in {0, 1}).
    """
    H, W = height, width
    # View 01 faces the camera (front), 05 and 13 are the sides, 09 the back, as in Carvana.
    theta = 2 * math.pi * (view - 1) / VIEWS + math.pi / 2
    c, s = math.cos(theta), math.sin(theta)
    cx = W * (0.5 + p["dx"])
    ground = H * p["ground"]
    wr = H * p["wheel_r"]
    half = 0.5 * W * (p["length"] * abs(c) + p["depth"] * abs(s))
    body_bottom = ground - 0.45 * wr
    body_top = body_bottom - H * p["body_h"]
    # The cabin moves along the car's axis: towards the rear as the car turns.
    cab_half = 0.5 * W * (p["length"] * p["cabin_len"] * abs(c) + 0.85 * p["depth"] * abs(s))
    cab_cx = cx - W * p["cabin_shift"] * p["length"] * c
    cab_top = body_top - H * p["cabin_h"]
    slant = 0.25 * cab_half * abs(c) + 0.12 * cab_half * abs(s)

    body = _rounded_rect(cx - half, body_top, cx + half, body_bottom, 0.35 * (body_bottom - body_top))
    cabin = np.asarray([(cab_cx - cab_half, body_top + 1), (cab_cx - cab_half + slant, cab_top),
                        (cab_cx + cab_half - slant, cab_top), (cab_cx + cab_half, body_top + 1)])
    # Four wheels at the car's corners, projected; front views see them edge-on.
    wheels = []
    for along in (-0.36, 0.36):
        for across in (-0.42, 0.42):
            wx = cx + W * (along * p["length"] * c + across * p["depth"] * s)
            wheels.append((wx, ground - wr, wr * max(0.35, abs(c)), wr))

    scale = 16  # cv2 fixed-point sub-pixel coordinates
    def fill(img, poly, color):
        cv2.fillPoly(img, [np.round(poly * scale).astype(np.int32)], color, lineType=cv2.LINE_AA, shift=4)

    mask = np.zeros((H, W), np.uint8)
    fill(mask, body, 1)
    fill(mask, cabin, 1)
    for wx, wy, rx, ry in wheels:
        cv2.ellipse(mask, (int(round(wx * scale)), int(round(wy * scale))),
                    (int(round(rx * scale)), int(round(ry * scale))), 0, 0, 360, 1, -1, cv2.LINE_8, 4)

    # Studio backdrop: a light vertical gradient, a slightly darker floor.
    ys = np.linspace(0, 1, H, dtype=np.float32)[:, None]
    back = 205 + 40 * (1 - ys) - 18 * (ys > p["ground"] - 0.05)
    tint = rng.uniform(-6, 6, 3).astype(np.float32)
    img = np.repeat(back[:, :, None], 3, axis=2) * np.ones((1, W, 1), np.float32) + tint
    # Soft contact shadow on the floor: dark, blurred, and not part of the mask.
    shadow = np.zeros((H, W), np.float32)
    cv2.ellipse(shadow, (int(cx), int(ground)), (int(half * 1.05), int(max(2, 0.8 * wr))), 0, 0, 360, 1.0, -1)
    k = max(3, int(0.03 * W) | 1)
    shadow = cv2.GaussianBlur(shadow, (k, k), 0)
    img *= (1 - 0.45 * shadow)[:, :, None]

    paint = np.asarray(p["color"], np.float32)
    # Body shading: brighter at the top, a highlight band, darker towards the sills.
    shade = (1.15 - 0.45 * np.clip((ys * H - cab_top) / max(1.0, body_bottom - cab_top), 0, 1))
    car_layer = np.clip(paint[None, None, :] * shade[:, :, None], 0, 255) * np.ones((1, W, 1), np.float32)
    m = mask.astype(bool)
    img[m] = car_layer[m]
    # Windows: dark glass with a sky reflection inside the cabin.
    glass = np.zeros((H, W), np.uint8)
    inset = 0.18 * (body_top - cab_top)
    win = cabin + np.asarray([[inset, -inset * 0.3], [inset, inset], [-inset, inset], [-inset, -inset * 0.3]])
    fill(glass, win, 1)
    g = glass.astype(bool) & m
    img[g] = img[g] * 0.25 + np.asarray([70, 60, 50], np.float32)
    # Tyres and rims are painted on a copy and kept only inside the mask, so paint never leaks out.
    painted = img.copy()
    for wx, wy, rx, ry in wheels:
        cv2.ellipse(painted, (int(wx), int(wy)), (int(rx), int(ry)), 0, 0, 360, (28, 28, 28), -1, cv2.LINE_AA)
        cv2.ellipse(painted, (int(wx), int(wy)), (int(rx * 0.5), int(ry * 0.5)), 0, 0, 360, (150, 150, 155), -1,
                    cv2.LINE_AA)
    img[m] = painted[m]
    img += rng.normal(0, 3.0, img.shape).astype(np.float32)
    img = cv2.GaussianBlur(np.clip(img, 0, 255).astype(np.uint8), (3, 3), 0)
    return img, mask


def _encode_gif(mask: np.ndarray) -> bytes:
    """(H, W) {0,1} -> palette GIF bytes whose pixel values read back as {0, 1}, like Kaggle's."""
    im = Image.fromarray(mask, mode="P")
    im.putpalette([0, 0, 0, 255, 255, 255] + [0, 0, 0] * 254)
    buf = io.BytesIO()
    im.save(buf, format="GIF")
    return buf.getvalue()


def _make_car(out: Path, split: str, car: str, params: dict, seed: int, height: int, width: int) -> list[tuple]:
    """Write all 16 views of one car; returns [(img name, rle)] for train_masks.csv."""
    rows = []
    for view in range(1, VIEWS + 1):
        name = f"{car}_{view:02d}"
        rng = np.random.default_rng([seed, int(car, 16) % (2**32), view])
        img, mask = render(params, view, height, width, rng)
        ok, jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 92])
        write_bytes(out / split / f"{name}.jpg", jpg.tobytes())
        if split == "train":
            write_bytes(out / "train_masks" / f"{name}_mask.gif", _encode_gif(mask))
            rows.append((f"{name}.jpg", rle.encode(mask)))
    return rows


def _csv_text(header: list[str], rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def generate(out_dir: str | Path, train_cars: int = 8, test_cars: int = 4, height: int = 320, width: int = 480,
             seed: int = 0, workers: int = -1) -> Path:
    """Write a synthetic Carvana dataset to ``out_dir``; returns it. See the module docstring."""
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    ids = car_ids(train_cars + test_cars, rng)
    order = rng.permutation(len(ids))
    train = sorted(ids[i] for i in order[:train_cars])
    test = sorted(ids[i] for i in order[train_cars:])
    params = {car: car_params(np.random.default_rng([seed, int(car, 16) % (2**32)])) for car in ids}
    jobs = [("train", car) for car in train] + [("test", car) for car in test]
    results = Parallel(n_jobs=workers)(
        delayed(_make_car)(out, split, car, params[car], seed, height, width) for split, car in jobs)
    mask_rows = [row for rows in results for row in rows]
    write_text(out / "train_masks.csv", _csv_text(["img", "rle_mask"], mask_rows))
    meta = []
    for car in sorted(ids):
        make, model = MAKES[int(car[:4], 16) % len(MAKES)]
        meta.append((car, 2010 + int(car[4:6], 16) % 8, make, model, model, ""))
    write_text(out / "metadata.csv", _csv_text(["id", "year", "make", "model", "trim1", "trim2"], meta))
    sample = [(f"{car}_{v:02d}.jpg", "1 1") for car in test for v in range(1, VIEWS + 1)]
    write_text(out / "sample_submission.csv", _csv_text(["img", "rle_mask"], sample))
    return out


def run(cfg, graph=None) -> Path:
    """``make demo-data``: write the synthetic set to ``cfg.data.raw``, unless a dataset is there
    (``graph`` is unused: the demo data has no upstream).

    A folder that already holds a complete Kaggle layout (``sample_submission.csv`` and
    train images) is left alone, so ``make all`` may call this on real data too. A folder
    with some files but no complete dataset (an interrupted copy, say) is an error: nothing
    is ever written over a user's files. The set is generated in a temporary sibling folder
    and renamed into place, so an interrupted run leaves no half-written dataset behind.
    """
    import shutil
    from .errors import PipelineError
    out = Path(cfg.data.raw)
    has_train = (out / "train").is_dir() and any((out / "train").iterdir())
    if has_train and (out / "sample_submission.csv").is_file():
        print(f"synth: {out} already holds a dataset; nothing generated (remove it to regenerate the demo set)")
        return out
    if out.exists() and any(out.iterdir()):
        raise PipelineError(f"{out}: holds files but no complete dataset (train/*.jpg + sample_submission.csv); "
                            f"remove it or point data.raw elsewhere")
    s = cfg.synth
    tmp = out.with_name(f".{out.name}.synth-tmp")
    shutil.rmtree(tmp, ignore_errors=True)           # a previous interrupted run
    generate(tmp, s.train_cars, s.test_cars, s.image_height, s.image_width, s.seed, s.workers)
    if out.exists():
        out.rmdir()                                  # empty, checked above
    tmp.rename(out)
    n_train, n_test = s.train_cars * VIEWS, s.test_cars * VIEWS
    print(f"synth: wrote {n_train} train and {n_test} test images ({s.image_width}x{s.image_height}) to {out}")
    return out
