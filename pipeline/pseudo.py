"""Pseudo-labelling: test images join training, with a finished run's predicted maps as targets.

``train.pseudo=<teacher config>`` makes every fold's training set its labelled images plus
test images whose targets are the teacher's probability maps (predict's own maps: soft targets
round(255 p), :data:`SCALE` = 1.0). The 4th-place Carvana team pretrained on the test set's
predicted masks; the Kaggle test set has 100,064 unlabelled images (``train.pseudo_images``
takes an even spread of them).

Fold-safe: fold k's student learns from the maps of the teacher's fold k only, the one teacher
model that never trained on fold k's cars, so the student's OOF Dice on fold k stays honest.
:func:`check_fold_safe` refuses a teacher whose fold k trained on a car of the student's fold k
(another ``n_folds`` or fold seed), and the command line trains and predicts exactly the
teacher folds the student needs (cached like any run).

Keys: the teacher enters the student's train key by its train key and predict key (TTA views,
precision), not by its file's path; ``pseudo_images`` and ``pseudo_confidence`` are params.

Pixels: the test image is decoded and placed as predict places it (``geometry.to_model`` with
the student's geometry and JPEG reduction); the teacher's map goes back to the image's own size
and into the student's input (:func:`target`): teacher and student may differ in size or fit.
Torch-free: the training loader (``data.PseudoImages``) and the graph import it.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .config import Config, load_related
from .errors import ConfigError, PipelineError
from .geometry import GEOM_COLS, jpeg_reduction, row_geometry, to_model, to_original

SCALE = 255          # a target of 255 is p = 1.0 (the maps' scale); labelled masks are scaled to it


@functools.lru_cache(maxsize=None)
def teacher_file(spec: str) -> str | None:
    """``train.pseudo`` -> the teacher's config file, checked to exist (None = off)."""
    spec = spec.strip()
    if not spec:
        return None
    if not Path(spec).is_file():
        raise ConfigError(f"train.pseudo={spec}: the teacher's config file is not there")
    return spec


def teacher_config(cfg: Config, chain: tuple[str, ...] = ()) -> tuple[Config, str] | None:
    """The teacher's config (``config.load_related``) set to train and predict the folds the
    student trains, and its file's real path; None without ``train.pseudo``.

    ``chain``: the real paths of the teachers already above this config (a teacher may itself
    learn from a teacher); a file met twice is a cycle."""
    path = cfg.spec("train.pseudo")
    if path is None:
        return None
    real = os.path.realpath(path)
    if real in chain:
        raise ConfigError(f"train.pseudo={path}: a cycle of teachers ({' -> '.join([*chain, real])})")
    folds = {"train.fold": cfg.train.fold, "predict.folds": "all" if cfg.train.fold < 0 else str(cfg.train.fold)}
    try:
        return load_related(path, cfg, folds), real
    except ConfigError as e:
        raise ConfigError(f"train.pseudo={path}: {e}") from None


def select(ids: list[str], n: int) -> list[str]:
    """``n`` of the sorted ``ids``, evenly spread (every car's views alike); 0 or more = all."""
    ids = sorted(ids)
    if n <= 0 or n >= len(ids):
        return ids
    return [ids[(2 * i + 1) * len(ids) // (2 * n)] for i in range(n)]


def check_fold_safe(student: pd.DataFrame, teacher: pd.DataFrame, k: int, where: str = "") -> None:
    """student, teacher: folds.csv frames (car_id, fold). PipelineError unless every car of the
    student's fold ``k`` is held out by the teacher's fold ``k`` (or not in its data at all)."""
    theirs = teacher.drop_duplicates("car_id").set_index("car_id")["fold"]
    cars = sorted(set(student.loc[student["fold"] == k, "car_id"]))
    seen = [c for c in cars if c in theirs.index and int(theirs[c]) != k]
    if seen:
        eg = ", ".join(f"{c} (teacher fold {int(theirs[c])})" for c in seen[:3])
        raise PipelineError(f"train.pseudo: the teacher's fold {k} trained on {len(seen)} car(s) of the student's "
                            f"fold {k}, e.g. {eg}: its maps would leak those cars' labels into the student's OOF "
                            f"Dice. Give the teacher the student's prepare.n_folds and prepare.seed{where}")


def target(prob: np.ndarray, orig_hw: tuple[int, int], teacher_geom: dict | None, geom: dict,
           height: int, width: int) -> np.ndarray:
    """A teacher map (its model size, uint8 0..255) -> (height, width) uint8 in the student's input:
    unchanged where both place the image alike, else back to the image's size (``to_original``)
    and into the student's placement (``to_model``)."""
    same = teacher_geom is not None and prob.shape == (height, width) and \
        all(int(teacher_geom[c]) == int(geom[c]) for c in GEOM_COLS)
    if same:
        return prob
    orig = to_original(prob, orig_hw, teacher_geom)
    return np.clip(np.rint(to_model(orig, geom, height, width)), 0, 255).astype(np.uint8)


@dataclass
class PseudoSet:
    """The test images fold ``k``'s student trains on: one row per image (``frame``: id, path,
    reduction, orig_height, orig_width, geom, teacher_geom, map), from ``maps_dir``."""
    frame: pd.DataFrame
    maps_dir: Path


def pseudo_set(graph, k: int) -> PseudoSet | None:
    """Fold ``k``'s pseudo-labelled images: the teacher's fold ``k`` maps of the selected test
    images, placed for the student (``graph``: the student's ``pipeline.graph.Graph``)."""
    teacher = graph.teacher
    if teacher is None:
        return None
    from .testset import read_test_index
    t = graph.cfg.train
    what = f" (teacher {t.pseudo}: {teacher.prepared_dir / 'folds.csv'}; student: {graph.prepared_dir / 'folds.csv'})"
    check_fold_safe(pd.read_csv(graph.prepared_dir / "folds.csv", dtype={"car_id": str}),
                    pd.read_csv(teacher.prepared_dir / "folds.csv", dtype={"car_id": str}), k, what)
    ckpt = teacher.fold_dir(k) / "best.pt"
    if not ckpt.is_file():
        raise PipelineError(f"train.pseudo: the teacher's fold {k} is not trained ({ckpt} missing; "
                            f"`make train CONFIG={t.pseudo} FOLD={k}`)")
    maps_dir = teacher.fold_predict_dir(k)
    mine = read_test_index(graph.prepared_dir / "test_index.csv").set_index("id")
    theirs = read_test_index(teacher.prepared_dir / "test_index.csv").set_index("id")
    h, w = graph.cfg.prepare.height, graph.cfg.prepare.width
    th, tw = teacher.cfg.prepare.height, teacher.cfg.prepare.width
    rows = []
    for i in select([i for i in mine.index if i in theirs.index], t.pseudo_images):
        r = mine.loc[i]
        geom = row_geometry(r, h, w)
        rows.append({"id": i, "path": r["path"], "orig_height": int(r["orig_height"]),
                     "orig_width": int(r["orig_width"]), "geom": geom, "teacher_geom": row_geometry(theirs.loc[i], th, tw),
                     "reduction": jpeg_reduction(int(r["orig_height"]), int(r["orig_width"]), geom),
                     "map": str(maps_dir / f"{i}.png")})
    if not rows:
        raise PipelineError(f"train.pseudo: the teacher's test_index.csv ({teacher.prepared_dir}) has no image of "
                            f"the student's ({graph.prepared_dir})")
    missing = [r["map"] for r in rows if not os.path.isfile(r["map"])]
    if missing:
        raise PipelineError(f"train.pseudo: {maps_dir} has no map of {len(missing)} of {len(rows)} test images, e.g. "
                            f"{missing[0]} (`make predict CONFIG={t.pseudo} ARGS=predict.folds={k}`)")
    return PseudoSet(pd.DataFrame(rows), maps_dir)
