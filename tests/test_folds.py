"""Car-grouped folds: every car in one fold, every image in exactly one fold, seeded, stratified.

stratify=False is sklearn's GroupKFold(shuffle=True, random_state=seed); stratify=True the area block deal."""
import numpy as np
import pandas as pd
import pytest

from pipeline.errors import PipelineError
from pipeline.folds import assign_folds, make_folds


def _index(n_cars: int, views: int = 16, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    cars = [f"{i:012x}" for i in range(n_cars)]
    area = {c: rng.uniform(0.1, 0.4) for c in cars}
    rows = [{"id": f"{c}_{v:02d}", "car_id": c, "mask_area": area[c] + rng.normal(0, 0.01)}
            for c in cars for v in range(1, views + 1)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("stratify", [False, True])
def test_no_car_in_two_folds_and_every_image_once(stratify):
    idx = _index(23)
    folds = make_folds(idx, n_folds=5, seed=3, stratify=stratify)
    assert list(folds.id) == list(idx.id)                     # every image, once, in order
    assert folds.id.is_unique
    assert (folds.groupby("car_id").fold.nunique() == 1).all()  # no car in two folds
    assert set(folds.fold) == set(range(5))
    cars_per_fold = folds.groupby("fold").car_id.nunique()
    assert cars_per_fold.max() - cars_per_fold.min() <= 1      # 23 cars -> 5,5,5,4,4


def test_deterministic_by_seed():
    idx = _index(20)
    a = make_folds(idx, 5, seed=1, stratify=True)
    b = make_folds(idx, 5, seed=1, stratify=True)
    c = make_folds(idx, 5, seed=2, stratify=True)
    assert a.equals(b)
    assert not a.fold.equals(c.fold)


def _cars_per_fold(fold: dict[str, int], n_folds: int) -> np.ndarray:
    return np.bincount(list(fold.values()), minlength=n_folds)


@pytest.mark.parametrize("n_cars,n_folds", [(5, 5), (6, 5), (23, 5), (128, 5), (318, 5), (17, 2), (40, 7)])
def test_group_kfold_every_car_once_and_sizes_within_one(n_cars, n_folds):
    idx = _index(n_cars)
    folds = make_folds(idx, n_folds, seed=42, stratify=False)
    assert list(folds.id) == list(idx.id) and folds.id.is_unique  # every image, once, in order
    per_car = folds.groupby("car_id").fold
    assert (per_car.nunique() == 1).all()                        # all 16 views of a car in one fold
    assert (per_car.size() == 16).all()
    assert set(folds.car_id) == set(idx.car_id)
    counts = folds.groupby("fold").car_id.nunique().reindex(range(n_folds), fill_value=0)
    assert counts.min() >= 1                                     # every fold non-empty
    assert counts.max() - counts.min() <= 1                      # within one car
    assert counts.sum() == n_cars


def test_group_kfold_is_sklearn_group_kfold():
    """The unstratified path is exactly GroupKFold(shuffle=True, random_state=seed) grouped by car."""
    from sklearn.model_selection import GroupKFold
    idx = _index(37)
    folds = make_folds(idx, 5, seed=9, stratify=False)
    split = GroupKFold(n_splits=5, shuffle=True, random_state=9).split(idx, groups=idx.car_id)
    expected = np.full(len(idx), -1)
    for k, (_, test) in enumerate(split):
        expected[test] = k
    assert (folds.fold.values == expected).all()


def test_group_kfold_uneven_views_still_groups_cars():
    # Cars with views left out (bad files): still one fold per car, folds within one car in count.
    cars = {f"{i:012x}": n for i, n in enumerate([16] * 8 + [10, 12, 14, 9])}
    for seed in range(5):
        fold = assign_folds(cars, n_folds=4, seed=seed)
        assert set(fold) == set(cars) and set(fold.values()) == set(range(4))
        assert list(_cars_per_fold(fold, 4)) == [3, 3, 3, 3]


def test_group_kfold_deterministic_by_seed():
    idx = _index(128)
    a = make_folds(idx, 5, seed=1, stratify=False)
    b = make_folds(idx, 5, seed=1, stratify=False)
    assert a.equals(b)
    assert a.to_csv(index=False) == b.to_csv(index=False)        # folds.csv bytes, for the cache key
    # Row order of the index does not matter: the assignment is per car.
    shuffled = idx.sample(frac=1.0, random_state=0)
    c = make_folds(shuffled, 5, seed=1, stratify=False)
    assert dict(zip(c.car_id, c.fold)) == dict(zip(a.car_id, a.fold))


def test_group_kfold_different_seeds_differ():
    cars = {f"{i:012x}": 16 for i in range(128)}
    assignments = [assign_folds(cars, 5, seed=s) for s in range(10)]
    for i in range(len(assignments)):
        for j in range(i + 1, len(assignments)):
            assert assignments[i] != assignments[j], (i, j)
    # Not just relabelled folds: the partitions of the cars differ too.
    parts = [frozenset(frozenset(c for c in cars if f[c] == k) for k in range(5)) for f in assignments]
    assert len(set(parts)) == len(parts)


@pytest.mark.parametrize("seed", [-1, 2 ** 32])
def test_group_kfold_seed_out_of_range_is_a_clear_error(seed):
    with pytest.raises(PipelineError, match="prepare.seed"):
        assign_folds({f"{i:012x}": 16 for i in range(10)}, 5, seed=seed)


def test_stratified_one_car_per_area_block():
    # Areas 0..19: blocks {0..4}, {5..9}, ... each deal one car to every fold, so every fold
    # holds exactly one car per block and the fold means differ by at most 4 (block width).
    cars = {f"{i:012x}": 16 for i in range(20)}
    areas = {c: float(i) for i, c in enumerate(sorted(cars))}
    fold = assign_folds(cars, 5, seed=7, areas=areas)
    for b in range(4):
        block = [c for c in cars if b * 5 <= areas[c] < b * 5 + 5]
        assert sorted(fold[c] for c in block) == [0, 1, 2, 3, 4]
    means = [np.mean([areas[c] for c in cars if fold[c] == k]) for k in range(5)]
    assert max(means) - min(means) <= 4


def test_too_few_cars_is_a_clear_error():
    with pytest.raises(PipelineError, match="cannot fill 5 folds"):
        assign_folds({"0" * 12: 16, "1" * 12: 16}, 5, seed=0)


@pytest.mark.parametrize("stratify", [False, True])
def test_too_few_cars_is_a_clear_error_both_paths(stratify):
    # A PipelineError naming the problem, not sklearn's ValueError about n_splits.
    with pytest.raises(PipelineError, match=r"^4 train car\(s\) cannot fill 5 folds: lower prepare.n_folds$"):
        make_folds(_index(4), 5, seed=0, stratify=stratify)
