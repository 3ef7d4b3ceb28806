"""Inspect: where the model fails, as tables and pictures (``make inspect``).

Two sources, one output:
- a train run's out-of-fold maps (default): every finished fold's ``oof/<id>.png`` is
  brought back to the image's original size exactly as submit does it
  (``probmaps.fold_mean`` of the one map, then ``probmaps.binarize`` at t) and compared with
  prepare's full-size mask; t is the threshold submit would use (``probmaps.resolve_threshold``);
- a submission (``inspect.submission=FILE inspect.masks=DIR``): each row's RLE against the
  true mask, for the rows that have one (photos from ``data.raw/data.test_dir``).

Writes under ``graph.inspect_dir`` (``<train run>/inspect/`` or ``<submission>.inspect/``):
- ``per_image.csv``: id, car, view, fold, dice, threshold, true_area and pred_area (pixels
  at original size), wrong (= missed + extra), missed (car pixels predicted background),
  extra (background predicted car), make, model, year (``metadata.csv``); worst first;
- ``per_view.csv`` and ``per_car.csv``: the same aggregated (mean/median/min Dice, errors);
- ``worst.png``: the ``inspect.worst`` worst images (full-size photos read from data.raw),
  true outline and predicted outline in two colours, wrong pixels tinted
  (``pipeline/overlay.py``), id and Dice in each caption; ``worst_zoom.png``: the same
  images zoomed (x3) on the window with the most wrong pixels; ``per_view.png``: mean Dice per view (bar
  chart; the 16 angles fail differently).
Grid size: 4 tiles of 480x320 per row under a 40-pixel caption each, plus a 28-pixel legend.
"""
from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from tqdm import tqdm

from . import cache, overlay, rle
from .config import Config
from .errors import ConfigError, PipelineError
from .geometry import row_geometry, to_original
from .graph import Graph, inspect_dir, named_run, other_runs_text, run_folds
from .metrics import counts, dice_from_counts
from .probmaps import binarize, fold_mean, read_mask, read_prob, resolve_threshold

TILE_H, TILE_W = 320, 480          # Carvana's 1918x1280 aspect (3:2)
CAPTION_H = 40
LEGEND_H = 28
COLS = 4
CHUNK = 16                         # images per joblib task
COLUMNS = ["id", "car", "view", "fold", "dice", "threshold", "true_area", "pred_area", "wrong", "missed", "extra",
           "make", "model", "year"]
_ID = re.compile(r"^(?P<car>.+)_(?P<view>\d{2})$")


# ---------------------------------------------------------------------------- per image

def mask_stats(pred: np.ndarray, true: np.ndarray) -> dict:
    """pred, true: (H, W) bool. Dice (``pipeline.metrics``) and the error counts of per_image.csv."""
    tp, pa, ta = counts(pred, true)
    return {"dice": float(dice_from_counts(tp, pa, ta)), "true_area": ta, "pred_area": pa,
            "wrong": pa + ta - 2 * tp, "missed": ta - tp, "extra": pa - tp}


def pred_true(row: dict, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(pred, true) (H, W) bool masks of one row, either source: an OOF map thresholded exactly as
    submit thresholds, or a submission row's RLE."""
    if "oof" in row:
        true = read_mask(row["mask_full"]) > 0
        return binarize(fold_mean([read_prob(row["oof"])], true.shape, row["geom"]), threshold), true
    true = read_mask(row["mask"]) > 0
    try:
        return rle.decode(row["rle"], true.shape).astype(bool), true
    except ValueError as e:
        raise PipelineError(f"{row['sub']} line {row['line']} ({row['img']}): invalid rle_mask: {e}") from None


def _stats_chunk(rows: list[dict], threshold: float) -> list[dict]:
    return [{"id": r["id"], **mask_stats(*pred_true(r, threshold))} for r in rows]


def _parallel(fn, rows: list[dict], workers: int, desc: str, *args) -> list[dict]:
    chunks = [rows[i:i + CHUNK] for i in range(0, len(rows), CHUNK)]
    out = []
    with tqdm(total=len(rows), desc=desc, unit="img", mininterval=1.0) as bar:
        for part in Parallel(n_jobs=workers, return_as="generator")(delayed(fn)(c, *args) for c in chunks):
            out += part
            bar.update(len(part))
    return out


def read_photo(path: str | Path) -> np.ndarray | None:
    """(H, W, 3) uint8 RGB of a raw JPEG as stored (EXIF orientation ignored, as prepare); None if absent."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    return None if img is None else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_metadata(raw: str | Path) -> pd.DataFrame:
    """metadata.csv as car, make, model, year (empty when the file is absent)."""
    p = Path(raw) / "metadata.csv"
    if not p.is_file():
        return pd.DataFrame(columns=["car", "make", "model", "year"])
    m = pd.read_csv(p, dtype=str, keep_default_na=False)
    if "id" not in m.columns:
        raise PipelineError(f"{p}: no 'id' column")
    m = m.rename(columns={"id": "car"})
    for c in ("make", "model", "year"):
        if c not in m.columns:
            m[c] = ""
    return m[["car", "make", "model", "year"]].drop_duplicates("car")


# ---------------------------------------------------------------------------- sources

def _named_run(cfg: Config) -> tuple[Path, Path, list[int], dict]:
    """(run dir, prepare artifact, finished folds, threshold info) of ``inspect.run``, from its manifests.

    Any run in the cache, whatever config (or code version) trained it: the fold manifests name
    the prepare artifact; the threshold follows submit's rule on this run's own oof_summary.json."""
    root = named_run(cfg, cfg.inspect.run)
    done = {k: cache.read_manifest(d) for k, d in run_folds(root).items() if cache.is_complete(d)}
    if not done:
        raise PipelineError(f"no finished fold under {root}" + other_runs_text(cfg, root))
    prepared = Path(next(iter(done.values()))["inputs"]["prepare"])
    if not (prepared / "train_index.csv").is_file():
        raise PipelineError(f"{root}: its prepare artifact {prepared} is gone (run `make prepare` with its config)")
    return root, prepared, sorted(done), resolve_threshold(cfg.submit.threshold, root)


def oof_rows(cfg: Config, g: Graph) -> tuple[list[dict], float, str]:
    """Jobs for every image of every finished fold: (rows, threshold, what)."""
    from .data import load_index
    if cfg.inspect.run:
        root, prepared, done, thr = _named_run(cfg)
    else:
        root, prepared, done = g.train_dir, g.prepared_dir, g.require_finished()
        thr = resolve_threshold(cfg.submit.threshold, root)
    index = load_index(prepared)
    folds = sorted(index["fold"].unique().tolist())
    if len(done) < len(folds):
        print(f"inspect: folds {sorted(set(folds) - set(done))} not finished, left out")
    raw_dir = Path(cfg.data.raw) / cfg.data.train_dir
    rows = []
    for r in index[index["fold"].isin(done)].to_dict("records"):
        rows.append({"id": r["id"], "car": r["car_id"], "view": int(r["view"]), "fold": int(r["fold"]),
                     "oof": str(root / f"fold{r['fold']}" / "oof" / f"{r['id']}.png"), "mask_full": r["mask_full"],
                     "orig_hw": (int(r["orig_height"]), int(r["orig_width"])), "geom": row_geometry(r),
                     "photo": str(raw_dir / f"{r['id']}.jpg"), "image": r["image"]})
    what = f"{len(rows)} OOF images of {root} (folds {done}), threshold {thr['threshold']:.2f} " \
           f"({thr['threshold_source']})"
    return rows, float(thr["threshold"]), what


def submission_rows(cfg: Config) -> tuple[list[dict], float, str]:
    """Jobs for every submission row that has a true mask in ``inspect.masks``."""
    from .score import find_mask
    from .validate import iter_rows
    sub, masks = Path(cfg.inspect.submission), Path(cfg.inspect.masks)
    if not cfg.inspect.masks:
        raise ConfigError("inspect.submission needs inspect.masks=<folder of true masks> (MASKS=...)")
    if not sub.is_file():
        raise PipelineError(f"inspect.submission={sub}: no such file")
    if not masks.is_dir():
        raise PipelineError(f"inspect.masks={masks}: no such folder")
    rows_iter = iter_rows(sub)
    _, header = next(rows_iter, (1, []))
    if header != ["img", "rle_mask"]:
        raise PipelineError(f"{sub}: header must be 'img,rle_mask'")
    test_dir = Path(cfg.data.raw) / cfg.data.test_dir
    rows, seen = [], set()
    for line, fields in rows_iter:
        if len(fields) != 2 or fields[0] in seen:
            continue
        img, code = fields
        m = find_mask(masks, img)
        if m is None:
            continue
        seen.add(img)
        stem = Path(img).stem
        car, view = (_ID.match(stem).group("car"), int(_ID.match(stem).group("view"))) if _ID.match(stem) \
            else (stem, 0)
        rows.append({"id": stem, "car": car, "view": view, "fold": -1, "img": img, "rle": code, "mask": str(m),
                     "line": line, "sub": str(sub), "photo": str(test_dir / img)})
    if not rows:
        raise PipelineError(f"{sub}: no row has a true mask in {masks}")
    side = sub.with_name(re.sub(r"\.csv(\.gz)?$", "", sub.name) + ".json")
    thr = float(cache.read_json(side).get("threshold", np.nan)) if side.is_file() else float("nan")
    return rows, thr, f"{len(rows)} rows of {sub} with a mask in {masks}"


# ---------------------------------------------------------------------------- tables

def tables(per_image: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per_view, per_car) aggregates of ``per_image``."""
    g = per_image.groupby("view")
    per_view = pd.DataFrame({"images": g.size(), "dice_mean": g["dice"].mean(), "dice_median": g["dice"].median(),
                             "dice_min": g["dice"].min(), "missed_mean": g["missed"].mean(),
                             "extra_mean": g["extra"].mean()}).reset_index()
    g = per_image.groupby("car")
    worst = per_image.loc[g["dice"].idxmin(), ["car", "view"]].set_index("car")["view"]
    per_car = pd.DataFrame({"make": g["make"].first(), "model": g["model"].first(), "year": g["year"].first(),
                            "fold": g["fold"].first(), "images": g.size(), "dice_mean": g["dice"].mean(),
                            "dice_min": g["dice"].min(), "worst_view": worst, "wrong_sum": g["wrong"].sum()})
    per_car = per_car.reset_index().sort_values(["dice_mean", "car"]).reset_index(drop=True)
    return per_view, per_car


def view_chart(per_view: pd.DataFrame, path: Path, title: str) -> None:
    """Bar chart of mean Dice per view (1000x400 PNG), the worst image's Dice as a dot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4), dpi=100)
    x = per_view["view"].astype(int).to_numpy()
    ax.bar(x, per_view["dice_mean"], color="C0", label="mean Dice")
    ax.plot(x, per_view["dice_min"], "o", color="C3", ms=4, label="worst image")
    lo = float(min(per_view["dice_min"].min(), per_view["dice_mean"].min()))
    ax.set_ylim(max(0.0, lo - 0.15 * (1 - lo) - 1e-3), 1.0)
    for xi, m in zip(x, per_view["dice_mean"]):
        ax.text(xi, m, f"{m:.4f}", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(x, [f"{v:02d}\n{(v - 1) * 22.5:g}°" for v in x], fontsize=7)
    ax.set_xlabel("view (angle around the car: 01 front, 05 side, 09 back, 13 other side)")
    ax.set_ylabel("Dice")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with cache.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def grid_size(n: int) -> tuple[int, int]:
    """(height, width) of a worst-N grid PNG."""
    cols = min(COLS, n)
    return LEGEND_H + -(-n // cols) * (CAPTION_H + TILE_H), cols * TILE_W


def worst_grids(per_image: pd.DataFrame, rows: dict[str, dict], threshold: float, n: int, out: Path,
                note: str) -> tuple[Path, Path]:
    """worst.png (whole images) and worst_zoom.png (largest error region) of the n worst images."""
    full_tiles, zoom_tiles, fallback = [], [], []
    for r in per_image.head(n).to_dict("records"):
        row = rows[r["id"]]
        pred, true = pred_true(row, threshold)
        photo = read_photo(row["photo"])
        if photo is None or photo.shape[:2] != true.shape:
            fallback.append(row["photo"])
            photo = _model_photo(row, true.shape)
        tc, pc = overlay.contours(true), overlay.contours(pred)
        meta = " ".join(str(r[c]) for c in ("make", "model", "year") if str(r[c]) not in ("", "nan"))
        head = f"{r['id']}  Dice {r['dice']:.4f}"
        full = overlay.render(photo, true, pred, (TILE_H, TILE_W), true_contours=tc, pred_contours=pc)
        full_tiles.append(overlay.put_text(full, [head, f"view {int(r['view']):02d}  {meta}"[:60]], CAPTION_H))
        box = overlay.error_box(true, pred, TILE_W / TILE_H)
        if box is None:
            zoom, where = full, "no wrong pixels"
        else:
            x0, y0, x1, y1 = box
            zoom = overlay.render(photo, true, pred, (TILE_H, TILE_W), box=box, true_contours=tc, pred_contours=pc)
            n_in = int(np.count_nonzero(true[y0:y1, x0:x1] != pred[y0:y1, x0:x1]))
            where = f"x {x0}-{x1}, y {y0}-{y1}: {n_in} of {int(r['wrong'])} wrong px"
        zoom_tiles.append(overlay.put_text(zoom, [head, where], CAPTION_H))
    if fallback:
        print(f"inspect: {len(fallback)} original photo(s) not found or of another size (e.g. {fallback[0]}): "
              "showing the model-size image resized instead (pass data.raw=<the raw data>)")
    cols = min(COLS, len(full_tiles))
    paths = out / "worst.png", out / "worst_zoom.png"
    for path, tiles, what in ((paths[0], full_tiles, ""), (paths[1], zoom_tiles, "zoomed: ")):
        g = overlay.grid(tiles, cols)
        rgb = np.concatenate([overlay.legend_strip(g.shape[1], LEGEND_H, what + note), g], 0)
        cache.write_png(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return paths


def _model_photo(row: dict, shape: tuple[int, int]) -> np.ndarray:
    """The prepare artifact's model-size image back at ``shape`` (when the raw photo is gone)."""
    from .data import read_image
    if "image" not in row:
        return np.zeros((*shape, 3), np.uint8)
    img = read_image(row["image"]).astype(np.float32)
    return np.clip(to_original(img, shape, row["geom"]), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------- the tool

def run(cfg: Config, graph: Graph | None = None) -> Path:
    """Write the tables and pictures; returns the output folder."""
    if cfg.inspect.worst < 1:
        raise ConfigError(f"inspect.worst={cfg.inspect.worst}: must be >= 1")
    g = graph or Graph(cfg)
    rows, threshold, what = submission_rows(cfg) if cfg.inspect.submission else oof_rows(cfg, g)
    out = inspect_dir(cfg, g)
    print(f"inspect: {what}")
    stats = _parallel(_stats_chunk, rows, cfg.inspect.workers, "inspect", threshold)
    info = pd.DataFrame([{k: r[k] for k in ("id", "car", "view", "fold")} for r in rows])
    per_image = info.merge(pd.DataFrame(stats), on="id", validate="one_to_one")
    per_image["threshold"] = threshold
    per_image = per_image.merge(read_metadata(cfg.data.raw), on="car", how="left")
    per_image = per_image[COLUMNS].sort_values(["dice", "id"]).reset_index(drop=True)
    per_view, per_car = tables(per_image)
    cache.write_text(out / "per_image.csv", per_image.to_csv(index=False))
    cache.write_text(out / "per_view.csv", per_view.to_csv(index=False))
    cache.write_text(out / "per_car.csv", per_car.to_csv(index=False))
    n = min(cfg.inspect.worst, len(per_image))
    mean = per_image["dice"].mean()
    thr_txt = f"threshold {threshold:.2f}" if threshold == threshold else "threshold from the submission"
    view_chart(per_view, out / "per_view.png", f"Dice per view: {len(per_image)} images, mean {mean:.4f}, {thr_txt}")
    note = f"worst {n} of {len(per_image)}, {thr_txt}"
    worst_grids(per_image, {r["id"]: r for r in rows}, threshold, n, out, note)
    with pd.option_context("display.width", 120, "display.max_columns", 20):
        print(per_view.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print("worst: " + ", ".join(f"{i} {d:.4f}" for i, d in zip(per_image["id"][:5], per_image["dice"][:5])))
    print(f"inspect: mean Dice {mean:.4f} over {len(per_image)} images ({thr_txt}) -> {out}: per_image.csv "
          f"per_view.csv per_car.csv worst.png worst_zoom.png per_view.png")
    return out
