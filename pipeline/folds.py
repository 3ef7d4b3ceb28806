"""Cross-validation folds grouped by car: sklearn's shuffled GroupKFold, or a stratified block deal.

All 16 views of a car are near-duplicates, so a car's images must share one fold:
otherwise validation Dice measures memorised cars. ``assign_folds`` gives every
car exactly one fold in ``0..n_folds-1``, deterministically for a given seed.

- ``stratify=False``: ``sklearn.model_selection.GroupKFold(n_folds, shuffle=True,
  random_state=seed)`` over the images, grouped by car. It shuffles the cars and
  cuts them into ``n_folds`` consecutive parts, so folds get the same number of
  cars to within one (not the same number of images: a car with views left out
  counts as a whole car).
- ``stratify=True`` (the default): cars sorted by mean mask area (car size in the
  frame) are cut into consecutive blocks of ``n_folds`` cars, and each block deals
  one car to every fold in a random (seeded) order. Every fold then holds one car
  from each area stratum, so small and large cars are spread evenly and the folds'
  mean areas differ by at most the spread inside one block. Folds get the same
  number of cars to within one. This path stays hand-written because it balances
  mask area per fold, which GroupKFold does not (it knows only the groups).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .errors import PipelineError


def _group_kfold(cars: dict[str, int], ids: list[str], n_folds: int, seed: int) -> dict[str, int]:
    """``stratify=False``: sklearn's shuffled GroupKFold over the images, grouped by car."""
    from sklearn.model_selection import GroupKFold     # a heavy import: only for stratify=false
    if not 0 <= seed < 2 ** 32:
        raise PipelineError(f"prepare.seed={seed}: with prepare.stratify=false the seed must be in 0..2**32-1")
    groups = np.repeat(np.array(ids, dtype=object), [cars[c] for c in ids])
    splitter = GroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold: dict[str, int] = {}
    for k, (_, test) in enumerate(splitter.split(np.zeros((len(groups), 1)), groups=groups)):
        for car in set(groups[test]):
            fold[car] = k
    return fold


def assign_folds(cars: dict[str, int], n_folds: int, seed: int,
                 areas: dict[str, float] | None = None) -> dict[str, int]:
    """cars: car_id -> number of images; areas: car_id -> mean mask area (stratify) or None.

    Returns car_id -> fold. Raises PipelineError when there are fewer cars than folds.
    """
    ids = sorted(cars)
    if len(ids) < n_folds:
        raise PipelineError(f"{len(ids)} train car(s) cannot fill {n_folds} folds: lower prepare.n_folds")
    if areas is None:
        return _group_kfold(cars, ids, n_folds, seed)
    rng = np.random.default_rng(seed)
    # A seeded random order first, so ties in area break by seed, not by name.
    order = [ids[i] for i in rng.permutation(len(ids))]
    fold: dict[str, int] = {}
    ranked = sorted(order, key=lambda c: areas[c])
    for start in range(0, len(ranked), n_folds):
        block = ranked[start:start + n_folds]
        # The last, partial block goes to the folds with the fewest cars so far (random among equals).
        counts = np.bincount(list(fold.values()), minlength=n_folds) if fold else np.zeros(n_folds, int)
        perm = rng.permutation(n_folds)
        targets = sorted(perm, key=lambda k: counts[k])[: len(block)]
        for car, k in zip(block, targets):
            fold[car] = int(k)
    return fold


def make_folds(index: pd.DataFrame, n_folds: int, seed: int, stratify: bool) -> pd.DataFrame:
    """index: one row per train image with ``id``, ``car_id`` and (if stratify) ``mask_area``.

    Returns ``folds.csv``'s frame: ``id``, ``car_id``, ``fold`` in the index's row order.
    """
    cars = index.groupby("car_id").size().to_dict()
    areas = index.groupby("car_id")["mask_area"].mean().to_dict() if stratify else None
    fold = assign_folds(cars, n_folds, seed, areas)
    return pd.DataFrame({"id": index["id"].values, "car_id": index["car_id"].values,
                         "fold": index["car_id"].map(fold).astype(int).values})
