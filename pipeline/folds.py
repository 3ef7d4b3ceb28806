"""Cross-validation folds grouped by car (a seeded, optionally stratified GroupKFold).

All 16 views of a car are near-duplicates, so a car's images must share one fold:
otherwise validation Dice measures memorised cars. ``assign_folds`` gives every
car exactly one fold in ``0..n_folds-1``, deterministically for a given seed.

- ``stratify=False``: GroupKFold's greedy balance: cars in random (seeded) order,
  largest first, each to the fold that has the fewest images so far. Folds get
  the same number of images to within one car.
- ``stratify=True``: cars sorted by mean mask area (car size in the frame) are cut
  into consecutive blocks of ``n_folds`` cars, and each block deals one car to
  every fold in a random (seeded) order. Every fold then holds one car from each
  area stratum, so small and large cars are spread evenly and the folds'
  mean areas differ by at most the spread inside one block. Folds get the same
  number of cars to within one.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .config import PipelineError


def assign_folds(cars: dict[str, int], n_folds: int, seed: int,
                 areas: dict[str, float] | None = None) -> dict[str, int]:
    """cars: car_id -> number of images; areas: car_id -> mean mask area (stratify) or None.

    Returns car_id -> fold. Raises PipelineError when there are fewer cars than folds.
    """
    ids = sorted(cars)
    if len(ids) < n_folds:
        raise PipelineError(f"{len(ids)} train car(s) cannot fill {n_folds} folds: lower prepare.n_folds")
    rng = np.random.default_rng(seed)
    # A seeded random order first, so ties (equal area or size) break by seed, not by name.
    order = [ids[i] for i in rng.permutation(len(ids))]
    fold: dict[str, int] = {}
    if areas is None:
        load = np.zeros(n_folds, dtype=np.int64)
        cars_in = np.zeros(n_folds, dtype=np.int64)
        # Stable sort keeps the seeded order among cars with equal image counts.
        for car in sorted(order, key=lambda c: -cars[c]):
            k = int(np.lexsort((np.arange(n_folds), cars_in, load))[0])
            fold[car] = k
            load[k] += cars[car]
            cars_in[k] += 1
        return fold
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
