"""Accuracy levers of the train stage: EMA, progressive resizing and crops, boundary-weighted BCE, a final
Lovasz phase, torch.compile — and that none of them moves the key of a run trained without them."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from _train_helpers import make_prepared, tiny_cfg
from pipeline import faults, graph, train
from pipeline.train import logs, plan
from pipeline.schedule import parse_progressive
from pipeline.errors import ConfigError
from pipeline.losses import BceDiceLoss, LovaszLoss, dilate, edge_band
from pipeline.graph import Graph


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("prep") / "p1", height=64, width=96)


# ------------------------------------------------------------------ pure pieces, known answers

def test_parse_progressive_known_answers():
    assert parse_progressive("", 3, (64, 96)) == [(64, 96, False)] * 3
    assert parse_progressive("32:1,32x64:1", 3, (64, 96)) == [(32, 32, False), (32, 64, False), (64, 96, False)]
    # crops keep the prepared scale, so they may cover every epoch
    assert parse_progressive("32:1,c32x64:2", 3, (64, 96)) == [(32, 32, False), (32, 64, True), (32, 64, True)]
    assert parse_progressive("C64:1", 2, (64, 96)) == [(64, 64, True), (64, 96, False)]
    assert [str(s) for s in parse_progressive("c32:1,32:1", 3, (64, 96))] == ["c32x32", "32x32", "64x96"]
    for bad, what in [("31:1", "multiples of 32"), ("32:0", "at least 1"), ("32", "SIZE:EPOCHS"),
                      ("32:3", "leave at least the last epoch"), ("ax32:1", "SIZE:EPOCHS"),
                      ("c32:2,32:1", "leave at least the last epoch"), ("c32:4", "covers 4 epochs"),
                      ("c96:1", "larger than the prepared 64x96"), ("cc32:1", "SIZE:EPOCHS")]:
        with pytest.raises(ConfigError, match=what):
            parse_progressive(bad, 3, (64, 96))


def test_resize_batch_moves_image_and_mask_together():
    # A square "car" in the top-left quarter: after halving, both image and mask have it in the
    # same top-left quarter (a misaligned resize would move one of them).
    x = torch.zeros(1, 3, 64, 96)
    y = torch.zeros(1, 1, 64, 96)
    x[..., :32, :48] = 1.0
    y[..., :32, :48] = 1.0
    xs, ys = plan.resize_batch(x, y, (32, 48))
    assert xs.shape == (1, 3, 32, 48) and ys.shape == (1, 1, 32, 48)
    assert set(ys.unique().tolist()) <= {0.0, 1.0}
    assert ys[0, 0, :16, :24].min() == 1 and ys[0, 0, 16:, :].max() == 0 and ys[0, 0, :, 24:].max() == 0
    assert torch.equal(xs[0, 0] > 0.5, ys[0, 0] > 0.5)


def test_crop_batch_takes_the_same_window_from_image_and_mask():
    # Each pixel's value encodes its position, so a crop's top-left value names its offset: every
    # image gets its own window, the mask the same one, and the seed fixes the windows.
    pos = torch.arange(64 * 96, dtype=torch.float32).reshape(1, 1, 64, 96)
    x = pos.expand(6, 3, 64, 96).clone()
    y = pos.expand(6, 1, 64, 96).clone()
    xs, ys = plan.crop_batch(x, y, (32, 64), torch.Generator().manual_seed(3))
    assert xs.shape == (6, 3, 32, 64) and ys.shape == (6, 1, 32, 64)
    assert xs.is_contiguous(memory_format=torch.channels_last)
    for i in range(6):
        top, left = divmod(int(xs[i, 0, 0, 0]), 96)
        assert 0 <= top <= 32 and 0 <= left <= 32
        assert torch.equal(xs[i, 1], pos[0, 0, top:top + 32, left:left + 64])
        assert torch.equal(ys[i, 0], xs[i, 0])
    assert len({int(v) for v in xs[:, 0, 0, 0]}) > 1          # not one window for the whole batch
    again, _ = plan.crop_batch(x, y, (32, 64), torch.Generator().manual_seed(3))
    assert torch.equal(again, xs)


def test_crop_offsets_reach_the_borders():
    # 288 windows in 512: the centre is uniform, so a start of 0 (the top border in view) has
    # probability 144/512 = 0.28, the same for the last start, the rest spread between.
    starts = torch.tensor(plan.crop_offsets(20000, 512, 288, torch.Generator().manual_seed(0)))
    assert starts.min() == 0 and starts.max() == 512 - 288
    for edge in (0, 512 - 288):
        assert abs((starts == edge).float().mean().item() - 144 / 512) < 0.02
    inner = starts[(starts > 0) & (starts < 224)]
    assert abs(len(inner) / len(starts) - 223 / 512) < 0.02
    assert plan.crop_offsets(3, 64, 64, torch.Generator()) == [0, 0, 0]     # a crop of the whole side


def test_edge_band_is_the_ring_around_the_mask_edge():
    y = torch.zeros(1, 1, 20, 20)
    y[..., 5:15, 5:15] = 1
    band = edge_band(y, px=1)
    # Pixels within 1 px of the edge, on both sides: rows/cols 4..5 and 14..15 of the square's border.
    expected = torch.zeros(20, 20)
    expected[4:16, 4:16] = 1
    expected[6:14, 6:14] = 0
    assert torch.equal(band[0, 0], expected)


def test_dilate_equals_max_pool_at_every_pixel_and_border():
    torch.manual_seed(0)
    for shape, px in [((2, 1, 37, 29), 3), ((1, 1, 5, 9), 1), ((1, 1, 4, 4), 3)]:
        x = (torch.rand(shape) > 0.7).float()
        assert torch.equal(dilate(x, px), F.max_pool2d(x, 2 * px + 1, stride=1, padding=px))
        assert torch.equal(-dilate(-x, px), -F.max_pool2d(-x, 2 * px + 1, stride=1, padding=px))
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 0, 8] = 1                                   # a corner pixel grows into a 2x2 square at px=1
    expected = torch.zeros(9, 9)
    expected[0:2, 7:9] = 1
    assert torch.equal(dilate(x, 1)[0, 0], expected)


def test_boundary_weight_puts_the_loss_where_the_edges_are():
    torch.manual_seed(0)
    y = torch.zeros(2, 1, 32, 32)
    y[:, :, 8:24, 8:24] = 1
    band = edge_band(y) > 0
    wrong_edge = torch.where(band, -4 * (2 * y - 1), 4 * (2 * y - 1))    # wrong only on the band
    wrong_inside = torch.where(band, 4 * (2 * y - 1), -4 * (2 * y - 1))  # wrong only off the band
    plain, weighted = BceDiceLoss(1, 0), BceDiceLoss(1, 0, boundary_weight=4)
    # Same pixels right and wrong as plain BCE sees them; the weighted one ranks edge errors higher.
    assert weighted(wrong_edge, y) / plain(wrong_edge, y) > 1.5
    assert weighted(wrong_inside, y) / plain(wrong_inside, y) < 1.0
    assert torch.equal(BceDiceLoss(1, 1, 0)(wrong_edge, y), BceDiceLoss(1, 1)(wrong_edge, y))


def test_lovasz_is_zero_for_a_confident_right_answer_and_positive_otherwise():
    y = torch.zeros(2, 1, 16, 16)
    y[:, :, 4:12, 4:12] = 1
    right = 10 * (2 * y - 1)
    assert LovaszLoss()(right, y).item() == pytest.approx(0.0, abs=1e-6)
    assert LovaszLoss()(-right, y).item() > 1.0


# ------------------------------------------------------------------ keys

def test_new_levers_at_their_defaults_keep_the_train_key(prepared, tmp_path):
    base = tiny_cfg(tmp_path)
    params = graph.params(base, "train")
    added = [p.key.split(".", 1)[1] for p in graph.STAGES["train"].params if p.added]
    assert added and not set(added) & set(params)   # a run trained before these keys existed keeps its key
    key = Graph(base, prepared=prepared).train_key
    assert Graph(tiny_cfg(tmp_path, **{"train.ema_decay": 0.99}), prepared=prepared).train_key == key   # EMA off
    assert Graph(tiny_cfg(tmp_path, **{"train.compile": True}), prepared=prepared).train_key == key     # speed only
    for change in ({"train.ema": True}, {"train.progressive": "32:1", "train.epochs": 2},
                   {"train.boundary_weight": 2.0}, {"train.loss_final": "lovasz", "train.epochs": 2},
                   {"train.val_every": 2, "train.epochs": 3}):
        assert Graph(tiny_cfg(tmp_path, **change), prepared=prepared).train_key != key, change
    square = {"prepare.height": 64, "prepare.width": 64}   # 0.5 of 64x96 is not a multiple of 32
    assert (Graph(tiny_cfg(tmp_path, **square, **{"train.input_scale": 0.5}), prepared=prepared).train_key
            != Graph(tiny_cfg(tmp_path, **square), prepared=prepared).train_key)


def test_lever_options_are_checked_by_name(tmp_path):
    for bad, what in [({"train.loss_final": "focal"}, "train.loss_final"),
                      ({"train.loss_final": "lovasz", "train.epochs": 1}, "train.loss_final_epochs"),
                      ({"train.ema_decay": 1.5}, "train.ema_decay"),
                      ({"train.boundary_weight": -1.0}, "train.boundary_weight"),
                      ({"train.val_every": 0}, "train.val_every"),
                      ({"train.progressive": "33:1", "train.epochs": 2}, "train.progressive"),
                      ({"train.input_scale": 0.0}, "train.input_scale"),
                      ({"train.input_scale": 1.5}, "train.input_scale"),
                      # 64x96 at 0.5 is 32x48: 48 is not a multiple of 32
                      ({"train.input_scale": 0.5}, "input_scale=0.5: 64x96 inputs would run at 32x48")]:
        with pytest.raises(ConfigError, match=what):
            train.check_config(tiny_cfg(tmp_path, **bad))


# ------------------------------------------------------------------ a fold with every lever on

@pytest.fixture(scope="module")
def levers_run(prepared, tmp_path_factory):
    cfg = tiny_cfg(tmp_path_factory.mktemp("cache"), **{
        "train.epochs": 3, "train.ema": True, "train.ema_decay": 0.9,
        "train.progressive": "32x64:1,c32x64:2", "train.boundary_weight": 2.0, "train.loss_final": "lovasz",
        "train.loss_final_epochs": 1})
    summary = train.run(cfg, Graph(cfg, prepared=prepared))[0]
    return cfg, summary, Graph(cfg, prepared=prepared).fold_dir(0)


def test_ema_is_scored_and_checkpointed_beside_the_raw_weights(levers_run):
    cfg, summary, out = levers_run
    m = pd.read_csv(out / "metrics.csv")
    assert list(m.columns) == logs.METRIC_COLUMNS
    assert m["size"].tolist() == ["32x64", "c32x64", "c32x64"]   # resized, then crops
    assert m["val_dice_ema"].notna().all() and ((m["val_dice_ema"] >= 0) & (m["val_dice_ema"] <= 1)).all()
    # EMA weights are not the raw ones (else scoring both would be pointless).
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert set(last["ema"]) == set(last["model"])
    assert any(not torch.equal(last["ema"][k], last["model"][k]) for k in last["model"]
               if last["model"][k].is_floating_point())
    # best.pt holds whichever scored higher, and says which.
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    row = m.loc[m["epoch"] == best["epoch"]].iloc[0]
    assert best["best_score"] == pytest.approx(max(row["val_dice"], row["val_dice_ema"]))
    assert best["weights"] == ("ema" if row["val_dice_ema"] > row["val_dice"] else "raw")
    assert best["best_score"] == pytest.approx(max(m["val_dice"].max(), m["val_dice_ema"].max()))
    assert summary["dice_model"] == pytest.approx(best["best_score"], abs=0.02)


def test_ema_run_resumes_to_the_same_metrics(prepared, levers_run, tmp_path, zygote):
    """kill -9 at the start of epoch 3, then the same command continues from last.pt: EMA state
    and progressive sizes must carry over, and the rerun crop epoch must draw the same windows:
    the metrics equal the uninterrupted run's. (Both runs: processes forked from the session's
    pre-imported zygote, tests/_stage_runner.py, as ``python -c`` would run the script.)"""
    cfg, _, out = levers_run
    ref = pd.read_csv(out / "metrics.csv")
    import shutil
    work = tmp_path / "resume"
    # Run the same config into a fresh cache, killed at the start of epoch 3: 2 micro-batches per
    # epoch, so the 5th micro-batch's kill point.
    import os
    code = (
        "import sys; sys.path.insert(0, 'tests');"
        "from _train_helpers import tiny_cfg; from pipeline import train; from pipeline.graph import Graph;"
        f"cfg = tiny_cfg({str(work)!r}, **{{'train.epochs': 3, 'train.ema': True, 'train.ema_decay': 0.9,"
        "'train.progressive': '32x64:1,c32x64:2', 'train.boundary_weight': 2.0, 'train.loss_final': 'lovasz',"
        "'train.loss_final_epochs': 1});"
        f"train.run(cfg, Graph(cfg, prepared={str(prepared)!r}))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = zygote.run([], code=code, cwd=root, env={faults.KILL_ENV: "train.batch:5"})
    assert r.rc == -9, r.err[-2000:]   # killed at the start of epoch 3
    assert len(pd.read_csv(next(work.glob("train/*/fold0")) / "metrics.csv")) == 2
    r = zygote.run([], code=code, cwd=root, unset=(faults.KILL_ENV,))
    assert r.rc == 0, r.err[-2000:]
    resumed = pd.read_csv(next(work.glob("train/*/fold0")) / "metrics.csv")
    cols = ["epoch", "lr", "train_loss", "val_loss", "val_dice", "val_dice_ema", "size", "best"]
    pd.testing.assert_frame_equal(resumed[cols], ref[cols], check_exact=False, rtol=1e-5)
    shutil.rmtree(work)


def test_val_every_validates_every_nth_and_the_last_epoch(prepared, tmp_path):
    """val_every=2 over 3 epochs: epoch 1 is not scored (NaN, never best), 2 and 3 are, and the
    validated epochs' scores equal those of a run that validates every epoch (validation does not
    touch the training trajectory)."""
    every = tiny_cfg(tmp_path / "a", **{"train.epochs": 3, "train.ema": True})
    sparse = tiny_cfg(tmp_path / "b", **{"train.epochs": 3, "train.ema": True, "train.val_every": 2})
    train.run(every, Graph(every, prepared=prepared)), train.run(sparse, Graph(sparse, prepared=prepared))
    ref = pd.read_csv(Graph(every, prepared=prepared).fold_dir(0) / "metrics.csv")
    m = pd.read_csv(Graph(sparse, prepared=prepared).fold_dir(0) / "metrics.csv")
    assert m[["val_loss", "val_dice", "val_dice_ema"]].isna().values.tolist() == [[True] * 3, [False] * 3, [False] * 3]
    assert not m.loc[0, "best"]
    cols = ["train_loss", "val_loss", "val_dice", "val_dice_ema"]
    pd.testing.assert_frame_equal(m.loc[1:, cols], ref.loc[1:, cols], check_exact=False, rtol=1e-5)
    best = torch.load(Graph(sparse, prepared=prepared).fold_dir(0) / "best.pt", map_location="cpu", weights_only=True)
    assert best["epoch"] in (2, 3)


def test_compile_trains_the_same_model(prepared, tmp_path):
    """torch.compile is a speed option: one epoch compiled ends within float noise of eager."""
    pytest.importorskip("torch._inductor")
    eager = train.run(tiny_cfg(tmp_path / "a"), Graph(tiny_cfg(tmp_path / "a"), prepared=prepared))[0]
    try:
        compiled = train.run(tiny_cfg(tmp_path / "b", **{"train.compile": True}), Graph(tiny_cfg(tmp_path / "b", **{"train.compile": True}), prepared=prepared))[0]
    except Exception as e:   # no C++ compiler for inductor on this machine
        pytest.skip(f"torch.compile unavailable here: {type(e).__name__}: {e}")
    assert compiled["dice_model"] == pytest.approx(eager["dice_model"], abs=0.02)
    assert math.isfinite(compiled["dice_original"])


def test_ema_never_changes_the_raw_trajectory(prepared, levers_run, tmp_path):
    """The EMA is a bystander: with it off, the raw weights train bit for bit the same (so a
    recipe can drop EMA when the raw weights win, and keep the run's measured score)."""
    cfg, _, out = levers_run
    off = tiny_cfg(tmp_path, **{"train.epochs": 3, "train.progressive": "32x64:1,c32x64:2",
                                "train.boundary_weight": 2.0,
                                "train.loss_final": "lovasz", "train.loss_final_epochs": 1})
    train.run(off, Graph(off, prepared=prepared))
    with_ema = pd.read_csv(out / "metrics.csv")
    without = pd.read_csv(Graph(off, prepared=prepared).fold_dir(0) / "metrics.csv")
    cols = ["train_loss", "val_loss", "val_dice"]
    pd.testing.assert_frame_equal(with_ema[cols], without[cols], check_exact=True)
    assert without["val_dice_ema"].isna().all()


def test_input_scale_trains_small_and_scores_at_full_size(tmp_path):
    """A fold with input_scale=0.5 on 64x64 images: the network runs at 32x32, but the epochs
    train and validate on 64x64 batches, the checkpoint answers at 64x64 and the run learns."""
    prep = make_prepared(tmp_path / "p64", height=64, width=64)
    cfg = tiny_cfg(tmp_path / "cache", **{"prepare.height": 64, "prepare.width": 64, "train.input_scale": 0.5,
                                          "train.epochs": 3})
    summary = train.run(cfg, Graph(cfg, prepared=prep))[0]
    out = Graph(cfg, prepared=prep).fold_dir(0)
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert best["model_kwargs"]["input_scale"] == 0.5 and (best["height"], best["width"]) == (64, 64)
    from pipeline.models import load_checkpoint
    model, _ = load_checkpoint(out / "best.pt")
    seen = []
    model.encoder.register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape[-2:])))
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)
    assert seen == [(32, 32)]
    assert pd.read_csv(out / "metrics.csv")["size"].tolist() == ["64x64"] * 3
    assert summary["dice_model"] > 0.6      # the demo shapes are learnt through the half-size network
