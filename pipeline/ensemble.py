"""Multi-run ensembles for the submit stage: several trained runs (different configs), blended.

``submit.runs=a.yaml,b.yaml`` makes the submission the :func:`blend` (weighted sum) of those
runs' maps, each run's own fold mean taken back to the image's original size first
(``probmaps.fold_mean``: runs may differ in model size and geometry), then thresholded with the
same rule as a single run (``probmaps.binarize``)::

    prob255(image) = sum_m w_m * fold_mean(run m's maps of the image, geometry of run m)

Each listed file is loaded as a config of its own, with the invoking config's ``data`` section
(the same raw data, cache and submissions folder); its ``predict`` section says which folds,
TTA and precision its maps use. Weights (``submit.weights``, "" = chosen here) and the threshold
(``submit.threshold`` < 0 = chosen here) are chosen on the runs' *common* out-of-fold images: a
grid over the weight simplex (step 1/``WEIGHT_STEPS``) x ``probmaps.threshold_grid``, maximising
the mean per-image Dice at the original size, exactly as submit would threshold
(``probmaps.prob_hist`` / ``probmaps.hist_dice``). The choice is cached under
``<cache>/ensemble/<key>/choice.json`` (key: the runs' train keys and folds, the fixed
weights/threshold if any, the image cap and CODE_VERSION), so a rerun reads it back.

Torch-free: this module reads maps and masks only (the command line predicts the members' maps).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from pathlib import Path

import numpy as np
import pandas as pd

from . import cache, probmaps
from .geometry import row_geometry
from .config import Config, check_weights, load_related
from .errors import ConfigError, PipelineError
from .cache import stable_hash

CODE_VERSION = "ensemble-1"
STAGE = "ensemble"
WEIGHT_STEPS = 10                                  # weights on a 0.1 grid over the simplex


@dataclasses.dataclass
class Run:
    """One member of the ensemble: a config file and what it resolves to."""
    config_file: str
    cfg: Config
    train_dir: Path = None                          # <cache>/train/<train key>
    folds: list[int] = dataclasses.field(default_factory=list)
    prepared: Path = None                           # its prepare artifact


@functools.lru_cache(maxsize=None)
def run_files(spec: str) -> tuple[str, ...]:
    """``submit.runs`` -> the config files, each checked to exist (the typed value of the key)."""
    files = tuple(f.strip() for f in spec.split(",") if f.strip())
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise ConfigError(f"submit.runs: config file(s) not found: {', '.join(missing)}")
    if len(set(files)) != len(files):
        raise ConfigError(f"submit.runs='{spec}': a config is listed twice")
    return files


def load_runs(cfg: Config) -> list[Run]:
    """The members' configs: each file as ``config.load_related`` loads it (the invoking config's
    data section and run-only device and worker keys)."""
    return [Run(f, load_related(f, cfg)) for f in cfg.spec("submit.runs")]


@functools.lru_cache(maxsize=None)
def weight_list(spec: str) -> tuple[float, ...] | None:
    """``submit.weights`` -> its numbers (None = choose on OOF; the typed value of the key)."""
    if not spec.strip():
        return None
    try:
        return tuple(float(v) for v in spec.split(","))
    except ValueError:
        raise ConfigError(f"submit.weights='{spec}': expected a comma list of numbers") from None


def parse_weights(spec: str, n: int) -> np.ndarray | None:
    """``submit.weights``: "" -> None (choose on OOF); "0.7,0.3" -> normalised to sum 1."""
    listed = weight_list(spec)
    check_weights(spec, listed, n)
    if listed is None:
        return None
    w = np.array(listed, np.float64)
    return w / w.sum()


def weight_grid(n: int, steps: int = WEIGHT_STEPS) -> np.ndarray:
    """(G, n) every weight vector on the simplex with entries k/steps; the vertices (one run
    alone) are included, so the search can never do worse on OOF than the best single run."""
    rows = [c for c in itertools.product(range(steps + 1), repeat=n) if sum(c) == steps]
    return np.array(rows, np.float64) / steps


def blend(maps: list[np.ndarray], weights) -> np.ndarray:
    """maps: one (H, W) float32 0..255 map per run, at the original size; -> their weighted sum
    (float32). A single run with weight 1 gives its map unchanged (bit for bit)."""
    out = None
    for m, w in zip(maps, weights):
        if w == 0:
            continue
        term = m if w == 1 else m * np.float32(w)
        out = term if out is None else out + term     # a new array: the maps are never written to
    return out if out is not None else np.zeros_like(maps[0])


def oof_ids(run: Run) -> dict[str, Path]:
    """id -> the run's OOF map (``<fold dir>/oof/<id>.png``) over its folds that have finished."""
    out: dict[str, Path] = {}
    for k in run.folds:
        d = run.train_dir / f"fold{k}"
        if not cache.is_complete(d):
            raise PipelineError(f"{run.config_file}: fold {k} is not trained ({d} has no manifest; "
                                f"run `make train CONFIG={run.config_file} FOLD={k}`)")
        out.update({p.stem: p for p in sorted((d / "oof").glob("*.png"))})
    return out


def _index(run: Run) -> pd.DataFrame:
    df = pd.read_csv(run.prepared / "train_index.csv", dtype={"id": str})
    return df.set_index("id")


def _original_map(path: Path, row) -> np.ndarray:
    size = (int(row["orig_height"]), int(row["orig_width"]))
    return probmaps.fold_mean([probmaps.read_prob(path)], size, row_geometry(row))


def search(runs: list[Run], weights: np.ndarray | None, threshold: float, max_images: int, seed: int = 0) -> dict:
    """Choose weights and/or threshold on the runs' common OOF images (see the module docstring).

    Returns {weights, threshold, oof_dice (at the choice), images, solo (each run alone at its
    own best threshold), grid_size}.
    """
    maps = [oof_ids(r) for r in runs]
    common = sorted(set.intersection(*(set(m) for m in maps)))
    if not common:
        raise PipelineError("submit.runs: the runs share no out-of-fold image (train the same folds, e.g. "
                            "fold 0, for every run)")
    if max_images and len(common) > max_images:
        common = sorted(np.random.default_rng(seed).choice(common, max_images, replace=False).tolist())
    grid = weight_grid(len(runs)) if weights is None else weights[None, :]
    thresholds = probmaps.threshold_grid(threshold)
    rows = [_index(r) for r in runs]
    dice_sum = np.zeros((len(grid), len(thresholds)))
    for image_id in common:
        per_run = [_original_map(m[image_id], g.loc[image_id]) for m, g in zip(maps, rows)]
        true = probmaps.read_mask(runs[0].prepared / rows[0].loc[image_id, "mask_full"])
        for gi, w in enumerate(grid):
            pos, all_ = probmaps.prob_hist(blend(per_run, w), true)
            dice_sum[gi] += probmaps.hist_dice(pos, all_, thresholds)[0]
    mean = dice_sum / len(common)
    gi, ti = np.unravel_index(int(np.argmax(mean)), mean.shape)
    solo = {}
    for j, r in enumerate(runs):
        hit = [i for i, w in enumerate(grid) if w[j] == 1]
        if hit:
            solo[r.config_file] = {"oof_dice": float(mean[hit[0]].max()),
                                   "threshold": float(thresholds[int(np.argmax(mean[hit[0]]))])}
    return {"weights": [float(v) for v in grid[gi]], "threshold": float(thresholds[ti]),
            "oof_dice": float(mean[gi, ti]), "images": len(common), "solo": solo, "grid_size": int(len(grid))}


def choose(cfg: Config, runs: list[Run], max_images: int) -> dict:
    """:func:`search`, cached by the runs' train keys and folds (and the fixed parts of the choice)."""
    fixed_w = parse_weights(cfg.submit.weights, len(runs))
    key = stable_hash({"runs": [(r.train_dir.name, r.folds) for r in runs],
                       "weights": None if fixed_w is None else fixed_w.tolist(),
                       "threshold": cfg.submit.threshold if cfg.submit.threshold >= 0 else None,
                       "max_images": max_images, "code": CODE_VERSION})
    out = cache.stage_dir(cfg.data.cache, STAGE, key) / "choice.json"
    if out.is_file():
        return {**cache.read_json(out), "path": str(out), "cached": True}
    if fixed_w is not None and cfg.submit.threshold >= 0:
        choice = {"weights": fixed_w.tolist(), "threshold": float(cfg.submit.threshold), "oof_dice": None,
                  "images": 0, "solo": {}, "grid_size": 0}
    else:
        choice = search(runs, fixed_w, cfg.submit.threshold, max_images)
    choice["runs"] = [r.config_file for r in runs]
    cache.write_json(out, choice)
    return {**choice, "path": str(out), "cached": False}
