"""Pseudo-labelling (train.pseudo): known answers for the pure pieces (selection, fold safety,
target placement, the confidence mask), and a tiny teacher and student trained end to end
through the CLI (forked from the session's zygote, tests/_stage_runner.py)."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from _stage_runner import run_ok

from pipeline import cache, config, data, geometry, probmaps, pseudo, synth
from pipeline.errors import ConfigError, PipelineError
from pipeline.graph import Graph
from pipeline.losses import BceDiceLoss


# ------------------------------------------------------------------ pure pieces

def test_select_spreads_evenly_and_all_means_all():
    ids = [f"i{n}" for n in range(10)]
    assert pseudo.select(ids[::-1], 3) == ["i1", "i5", "i8"]
    assert pseudo.select(ids, 0) == ids and pseudo.select(ids, 10) == ids and pseudo.select(ids, 99) == ids
    assert len(set(pseudo.select(ids, 7))) == 7


def _folds(pairs):
    return pd.DataFrame([{"car_id": c, "fold": f} for c, f in pairs])


def test_fold_safety_refuses_a_teacher_that_trained_on_the_students_fold():
    student = _folds([("a", 0), ("b", 0), ("c", 1), ("d", 1)])
    pseudo.check_fold_safe(student, _folds([("a", 0), ("b", 0), ("c", 1), ("d", 2)]), 0)   # fold 0 held out alike
    pseudo.check_fold_safe(student, _folds([("a", 0), ("c", 1), ("d", 1)]), 0)     # b: never in the teacher's data
    with pytest.raises(PipelineError, match=r"fold 0 trained on 1 car\(s\).*b \(teacher fold 1\)"):
        pseudo.check_fold_safe(student, _folds([("a", 0), ("b", 1), ("c", 0), ("d", 1)]), 0)
    with pytest.raises(PipelineError, match="fold 1 trained on 2 car"):
        pseudo.check_fold_safe(student, _folds([("a", 1), ("b", 1), ("c", 0), ("d", 0)]), 1)


def test_target_is_the_map_when_placed_alike_else_taken_through_the_original_size():
    prob = np.zeros((4, 6), np.uint8)
    prob[:, :3] = 255                                            # left half is the car
    g = geometry.stretch_geometry(4, 6)
    assert pseudo.target(prob, (8, 12), g, g, 4, 6) is prob
    big = pseudo.target(prob, (8, 12), g, geometry.stretch_geometry(8, 12), 8, 12)
    assert big.shape == (8, 12) and big.dtype == np.uint8
    assert (big[:, :5] == 255).all() and (big[:, 7:] == 0).all()     # the edge stays in the middle
    # The student pads (fit=pad) where the teacher stretched: padding is background.
    pad = geometry.geometry(8, 12, 12, 12, "pad")
    placed = pseudo.target(prob, (8, 12), g, pad, 12, 12)
    assert placed.shape == (12, 12) and (placed[:pad["pad_top"]] == 0).all()
    np.testing.assert_array_equal(placed[pad["pad_top"]:pad["pad_top"] + 8], big)


def test_confidence_leaves_unsure_pixels_out_of_both_terms():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 8, 8, requires_grad=True)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    target[:, :, 2:4, :] = 0.5                                      # the teacher is unsure here
    loss = BceDiceLoss(1.0, 1.0, 0.0, confidence=0.9)(logits, target)
    loss.backward()
    assert logits.grad[:, :, 2:4].abs().max() == 0 and logits.grad.abs().sum() > 0
    # Known answer: BCE over the sure pixels only, Dice of the maps with the unsure pixels at 0.
    keep = torch.ones_like(target)
    keep[:, :, 2:4] = 0
    lg = logits.detach()
    bce = (torch.nn.functional.binary_cross_entropy_with_logits(lg, target, reduction="none") * keep).sum() / keep.sum()
    p, t = torch.sigmoid(lg) * keep, target * keep
    dice = 1 - (2 * (p * t).sum((1, 2, 3)) / (p.sum((1, 2, 3)) + t.sum((1, 2, 3))).clamp_min(1e-7))
    assert loss.item() == pytest.approx((bce + dice.mean()).item(), rel=1e-4)
    # Off (0): the loss of the labelled path, unchanged.
    hard = (target > 0.5).float()
    assert BceDiceLoss(1, 1, 2.0, 0.0)(lg, hard).item() == BceDiceLoss(1, 1, 2.0)(lg, hard).item()


def test_joined_passes_seeds_and_numbers_rows_through(tmp_path):
    a = np.zeros((4, 4, 3), np.uint8)
    for n in range(3):
        np.save(tmp_path / f"img{n}.npy", a + n)
        np.save(tmp_path / f"m{n}.npy", np.ones((4, 4), np.uint8))
    ds = [data.SegDataset([str(tmp_path / f"img{n}.npy") for n in r], [str(tmp_path / f"m{n}.npy") for n in r],
                          mask_scale=255) for r in ([0, 1], [2])]
    j = data.Joined(*ds)
    assert len(j) == 3
    img, mask, i = j[(2, 123)]
    assert i == 2 and int(img[0, 0, 0]) == 2 and int(mask.max()) == 255


def test_the_teacher_file_is_checked_by_name(tmp_path):
    with pytest.raises(ConfigError, match="train.pseudo=no/such.yaml"):
        config.load(None, ["train.pseudo=no/such.yaml"])
    with pytest.raises(ConfigError, match="pseudo_confidence"):
        config.load(None, ["train.pseudo_confidence=0.3"])
    loop = tmp_path / "loop.yaml"
    loop.write_text(yaml.safe_dump({"train": {"pseudo": str(loop)}}))
    with pytest.raises(ConfigError, match="cycle of teachers"):
        _ = Graph(config.load(loop, [f"data.cache={tmp_path / 'c'}"])).teacher.teacher


# ------------------------------------------------------------------ a teacher and a student, end to end

RUN = {"train": {"arch": "Unet", "encoder": "resnet18", "encoder_weights": "none", "encoder_depth": 3,
                 "decoder_channels": "32,16,8", "epochs": 1, "batch_size": 8, "num_workers": 0, "fold": 0},
       "predict": {"folds": "0", "tta": "hflip", "num_workers": 0},
       "prepare": {"n_folds": 2, "workers": 1, "height": 64, "width": 96}}


def _graph(path: Path, tmp: Path, *extra: str) -> Graph:
    return Graph(config.load(path, [f"data.raw={tmp / 'raw'}", f"data.cache={tmp / 'cache'}", *extra]))


@pytest.fixture(scope="module")
def taught(tmp_path_factory, zygote):
    tmp = tmp_path_factory.mktemp("pseudo")
    synth.generate(tmp / "raw", train_cars=4, test_cars=1, height=80, width=120, seed=3, workers=1)
    teacher, student = tmp / "teacher.yaml", tmp / "student.yaml"
    teacher.write_text(yaml.safe_dump({**RUN, "train": {**RUN["train"], "seed": 1}}))
    # The student is larger than the teacher: its targets are the teacher's maps re-placed.
    student.write_text(yaml.safe_dump({**RUN, "prepare": {**RUN["prepare"], "height": 96, "width": 128},
                                       "train": {**RUN["train"], "seed": 2, "pseudo": str(teacher),
                                                 "pseudo_confidence": 0.8}}))
    run_ok(zygote, "prepare", student, tmp)
    out = run_ok(zygote, "train", student, tmp)          # trains and predicts the teacher's fold 0 first
    return tmp, teacher, student, out


def test_the_student_learns_from_the_teachers_own_fold(taught):
    tmp, teacher, student, out = taught
    t, s = _graph(teacher, tmp), _graph(student, tmp)
    assert cache.is_complete(t.fold_dir(0)) and not t.fold_dir(1).exists()     # only the fold the student needs
    maps = t.fold_predict_dir(0)
    assert len(list(maps.glob("*.png"))) == 16
    manifest = cache.read_manifest(s.fold_dir(0))
    assert manifest["inputs"]["pseudo"] == {"maps": str(maps), "images": 16}
    assert "+ 16 pseudo-labelled test images" in out.out and "train.pseudo" not in out.err
    assert cache.is_complete(s.fold_dir(0))


def test_pseudo_targets_are_the_teachers_maps_at_the_students_size(taught):
    tmp, teacher, student, _ = taught
    s = _graph(student, tmp)
    ps = pseudo.pseudo_set(s, 0)
    ds = data.PseudoImages(ps.frame, 96, 128)
    img, tgt, _ = ds[0]
    row = ps.frame.iloc[0]
    prob = geometry.to_original(probmaps.read_prob(row["map"]), (80, 120))
    want = np.clip(np.rint(geometry.to_model(prob, row["geom"], 96, 128)), 0, 255)
    assert tuple(img.shape) == (96, 128, 3) and tuple(tgt.shape) == (96, 128)
    np.testing.assert_array_equal(tgt.numpy(), want)
    assert tgt.numpy().std() > 0                   # a map, not a blank (the one-epoch teacher is unsure)


def test_the_student_is_cached_and_keyed_by_its_teacher(taught, zygote):
    tmp, teacher, student, _ = taught
    again = run_ok(zygote, "train", student, tmp)
    assert "fold 0: cached" in again.out and "epoch 1/1" not in again.out
    plain = _graph(student, tmp, "train.pseudo=")
    s = _graph(student, tmp)
    assert s.train_key != plain.train_key
    assert _graph(student, tmp, "train.pseudo_images=4").train_key != s.train_key
    # Another teacher (a changed seed: another run) is another student; the file's path is not in the key.
    other = tmp / "elsewhere.yaml"
    other.write_text(teacher.read_text())
    assert _graph(student, tmp, f"train.pseudo={other}").train_key == s.train_key
    other.write_text(yaml.safe_dump({**RUN, "train": {**RUN["train"], "seed": 5}}))
    assert _graph(student, tmp, f"train.pseudo={other}").train_key != s.train_key
    assert json.loads((s.fold_dir(0) / "oof.json").read_text())["images"] > 0
