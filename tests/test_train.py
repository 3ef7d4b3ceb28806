"""Train stage: the fold run and its artifacts, keys, schedules, losses, OOF scoring (the step itself:
test_train_step.py)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from _train_helpers import make_prepared, tiny_cfg
from pipeline import cache, distributed, models, probmaps, train
from pipeline.train import logs, optim, scoring
from pipeline.errors import ConfigError, PipelineError
from pipeline.losses import BceDiceLoss
from pipeline.metrics import dice_batch
from pipeline.precision import autocast_factory, resolve_precision
from pipeline.graph import Graph


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("prep") / "p1")


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    """Every fold in turn (fold=-1), two epochs each: the artifacts that every fold writes."""
    cfg = tiny_cfg(tmp_path_factory.mktemp("cache"), **{"train.epochs": 2, "train.fold": -1})
    summary = train.run(cfg, Graph(cfg, prepared=prepared))
    return cfg, summary


def _run(cfg, prepared):
    return train.run(cfg, Graph(cfg, prepared=prepared))


def test_fold_writes_every_artifact(prepared, trained):
    cfg, summary = trained
    out = Graph(cfg, prepared=prepared).fold_dir(0)
    for name in ("best.pt", "last.pt", "metrics.csv", "config.yaml", "curve.png", "oof.json", "manifest.json",
                 "oof/hist.npz"):
        assert (out / name).is_file(), name
    m = pd.read_csv(out / "metrics.csv")
    assert list(m.columns) == logs.METRIC_COLUMNS
    assert m["epoch"].tolist() == [1, 2]
    assert np.isfinite(m[["lr", "train_loss", "val_loss", "val_dice", "seconds", "images_per_s"]].to_numpy()).all()
    # The cosine schedule has decayed by the last epoch.
    assert m["lr"].iloc[1] < m["lr"].iloc[0] <= cfg.train.lr
    # OOF: one map per validation image of fold 0, at model size.
    index = pd.read_csv(prepared / "folds.csv")
    val_ids = sorted(index.loc[index.fold == 0, "id"])
    assert sorted(p.stem for p in (out / "oof").glob("*.png")) == val_ids
    assert [s["fold"] for s in summary] == [0, 1]
    assert (Graph(cfg, prepared=prepared).fold_dir(1) / "manifest.json").is_file()
    s = summary[0]
    assert s["images"] == len(val_ids) and 0 <= s["dice_model"] <= 1 and 0 <= s["dice_original"] <= 1
    # The OOF Dice at model size is the best epoch's validation Dice (same model, same images).
    assert s["dice_model"] == pytest.approx(m["val_dice"].max(), abs=0.02)
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert best["epoch"] == int(m.loc[m["val_dice"].idxmax(), "epoch"])
    assert (best["height"], best["width"]) == (64, 96)
    assert best["input_stats"] == models.input_stats(cfg.train.encoder, cfg.train.encoder_weights)
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "scaler", "rng", "epoch", "best_score", "train_key"):
        assert key in last, key
    assert last["train_key"] == Graph(cfg, prepared=prepared).train_key


def test_oof_maps_match_the_checkpoint(prepared, trained):
    """oof/<id>.png is round(255 * sigmoid(best model)) on the validation image, at model size.

    Recomputed as training computed it: the checkpoint's precision, channels_last, and the same
    first validation batch (conv kernels may round differently for another batch size or
    layout), so every level must match exactly."""
    import cv2
    from pipeline.data import load_index, read_image, to_device
    from pipeline.models import load_checkpoint
    cfg, _ = trained
    out = Graph(cfg, prepared=prepared).fold_dir(0)
    model, meta = load_checkpoint(out / "best.pt")
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    val = load_index(prepared).query("fold == 0").reset_index(drop=True)
    batch = val.iloc[: cfg.train.batch_size]      # the validation loader's first batch, in its order
    images = torch.from_numpy(np.stack([read_image(p) for p in batch["image"]]))
    x, _ = to_device(images, None, torch.device("cpu"), cfg.train.channels_last, meta["input_stats"])
    with torch.no_grad(), autocast_factory(torch.device("cpu"), meta["precision"])():
        want = (torch.sigmoid(model(x).float())[:, 0] * 255).round_().to(torch.uint8).numpy()
    for image_id, w in zip(batch["id"], want):
        q = cv2.imread(str(out / "oof" / f"{image_id}.png"), cv2.IMREAD_UNCHANGED)
        assert q.shape == (meta["height"], meta["width"]) and q.dtype == np.uint8
        diff = np.abs(q.astype(int) - w.astype(int))
        assert diff.max() == 0, f"{image_id}: {int((diff > 0).sum())} pixels differ, by up to {diff.max()} levels"


def test_rerun_is_cached_and_keys(prepared, trained, capsys):
    cfg, summary = trained
    out = Graph(cfg, prepared=prepared).fold_dir(0)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    again = train.run(cfg, Graph(cfg, prepared=prepared))
    log = capsys.readouterr().out
    assert "fold 0: cached" in log and "fold 1: cached" in log
    assert again == summary
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == before
    # Run-only knobs keep the key; anything that changes results gives a new one.
    same = tiny_cfg(cfg.data.cache, **{"train.epochs": 2, "train.num_workers": 2, "train.fold": 1,
                                       "train.device": "cpu"})
    assert train.run(same, Graph(same, prepared=prepared)) == summary[1:]
    assert Graph(same, prepared=prepared).train_dir == Graph(cfg, prepared=prepared).train_dir
    for change in ({"train.lr": 1e-3}, {"train.augment": "none"}, {"train.epochs": 3}):
        other = tiny_cfg(cfg.data.cache, **{"train.epochs": 2, **change})
        assert Graph(other, prepared=prepared).train_dir != Graph(cfg, prepared=prepared).train_dir, change
    # Other training data (another size, other images or folds) is another key.
    other_data = make_prepared(prepared.parent / "other", height=32, width=64)
    assert Graph(cfg, prepared=other_data).train_key != Graph(cfg, prepared=prepared).train_key


def test_unknown_names_are_errors_listing_valid_ones(prepared, tmp_path):
    with pytest.raises(ConfigError, match="unknown encoder 'resnet1800'.*resnet18"):
        _run(tiny_cfg(tmp_path, **{"train.encoder": "resnet1800"}), prepared)
    with pytest.raises(ConfigError, match="unknown architecture 'UNet'.*Unet"):
        _run(tiny_cfg(tmp_path, **{"train.arch": "UNet"}), prepared)
    with pytest.raises(ConfigError, match="train.scheduler"):
        _run(tiny_cfg(tmp_path, **{"train.scheduler": "step"}), prepared)
    with pytest.raises(ConfigError, match="train.augment"):
        _run(tiny_cfg(tmp_path, **{"train.augment": "hflip,mixup"}), prepared)
    # smp's FPN ignores encoder_depth when upsampling: caught before any training step.
    with pytest.raises(ConfigError, match=r"FPN/tu-resnet18 .*output \(1, 1, 256, 384\) for a \(1, 3, 64, 96\)"):
        _run(tiny_cfg(tmp_path, **{"train.arch": "FPN", "train.decoder_channels": ""}), prepared)
    assert not (tmp_path / "train").exists()


def test_cli_unknown_encoder_exits_2(capsys):
    from pipeline.cli import main
    assert main(["train", "encoder=tu-not_a_timm_model"]) == 2
    err = capsys.readouterr().err
    assert "unknown timm encoder 'tu-not_a_timm_model'" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------- small pieces

def _lrs(name, total=20, per_epoch=5, warmup=1.0, lr=1.0):
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=lr)
    s = optim.build_scheduler(opt, name, total, per_epoch, warmup, 0.01)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    return out


def test_cosine_warmup_then_decay():
    lrs = _lrs("cosine", warmup=1.0)       # 5 warmup steps
    assert lrs[:5] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6])
    assert lrs[5] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:])) and 0.01 <= lrs[-1] < 0.05


def test_onecycle_peaks_at_lr_after_warmup():
    lrs = _lrs("onecycle", warmup=1.0)
    assert int(np.argmax(lrs)) in (4, 5) and max(lrs) == pytest.approx(1.0, rel=1e-3)
    assert lrs[0] < 0.1 and lrs[-1] < 1e-3


def test_hist_dice_matches_thresholded_dice():
    """prob_hist takes uint8-scale maps; hist_dice at t is Dice of v > threshold_level(t) (submit's rule)."""
    from pipeline.probmaps import threshold_level
    rng = np.random.default_rng(0)
    prob = (rng.random((3, 20, 30)) * 255).astype(np.float32)
    prob[1] = np.round(prob[1])                       # uint8-quantised maps, as stored
    prob[1, :5] = 153                                 # exactly at the 0.6 level: not positive at 0.6
    true = (rng.random((3, 20, 30)) > 0.5).astype(np.uint8)
    true[2] = 0
    prob[2] = 25.5                                    # both empty above 0.1 -> Dice 1
    thresholds = [0.1, 0.3, 0.45, 0.5, 0.6, 0.65]
    hists = [probmaps.prob_hist(p, t) for p, t in zip(prob, true)]
    got = probmaps.hist_dice(np.stack([h[0] for h in hists]), np.stack([h[1] for h in hists]), thresholds)
    want = np.stack([dice_batch(prob > threshold_level(t), true) for t in thresholds], 1)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert (got[2] == 1).all()
    # The fast binning equals searchsorted over the levels, also just around every level.
    levels = np.array([threshold_level(j / probmaps.OOF_BINS) for j in range(probmaps.OOF_BINS + 1)], np.float32)
    v = np.concatenate([levels, np.nextafter(levels, np.float32(-1)), np.nextafter(levels, np.float32(300)),
                        np.linspace(0, 255, 100_001, dtype=np.float32)])
    v = np.clip(v, 0, 255)
    want_b = np.bincount(np.searchsorted(levels, v, side="left"), minlength=probmaps.OOF_BINS + 1)
    np.testing.assert_array_equal(probmaps.prob_hist(v, np.zeros_like(v))[1], want_b)


def test_hard_dice_matches_metrics():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 1, 8, 8, generator=g)
    target = (torch.rand(4, 1, 8, 8, generator=g) > 0.5).float()
    target[3] = 0
    logits[3] = -1
    got = scoring.hard_dice(logits, target).numpy()
    np.testing.assert_allclose(got, dice_batch(torch.sigmoid(logits).numpy() > 0.5, target.numpy()))
    assert got[3] == 1.0


def test_bce_dice_is_a_mean_over_images():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 1, 8, 8, generator=g)
    target = (torch.rand(4, 1, 8, 8, generator=g) > 0.5).float()
    loss = BceDiceLoss(0.5, 2.0)
    whole = loss(logits, target)
    parts = torch.stack([loss(logits[i:i + 1], target[i:i + 1]) for i in range(4)]).mean()
    torch.testing.assert_close(whole, parts)
    # A confident, correct prediction has ~0 loss.
    perfect = loss((target * 2 - 1) * 50, target)
    assert perfect.item() < 1e-6
    # The Dice term alone equals 1 - soft Dice of one image.
    dice_only = BceDiceLoss(0.0, 1.0)(logits[:1], target[:1])
    p = torch.sigmoid(logits[:1])
    soft = 2 * (p * target[:1]).sum() / (p.sum() + target[:1].sum())
    torch.testing.assert_close(dice_only, 1 - soft)


def test_precision_resolution(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setenv("PIPELINE_CPU_BF16", "1")         # a CPU with native bf16
    assert resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setenv("PIPELINE_CPU_BF16", "0")         # an AVX2-only CPU: bf16 would be emulated
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"   # an explicit choice is taken as given
    assert resolve_precision("auto", cuda) == "fp16"
    assert resolve_precision("fp32", cpu) == "fp32"
    with autocast_factory(cpu, "bf16")():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast_factory(cpu, "fp32")():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_shard_sampler_covers_each_index_once():
    parts = [list(distributed.ShardSampler(10, r, 3)) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(10))


# ---------------------------------------------------------------------------- make oof

def test_oof_summary_equals_direct_scoring(prepared, trained):
    """oof.run pools both folds; its Dice equals scoring the saved maps against the full masks."""
    import cv2
    from pipeline import oof
    from pipeline.metrics import dice
    cfg, _ = trained
    s = oof.run(cfg, Graph(cfg, prepared=prepared))
    assert cache.read_json(Graph(cfg, prepared=prepared).train_dir / "oof_summary.json") == s
    index = pd.read_csv(prepared / "train_index.csv")
    assert s["images"] == len(index) and s["complete"] and s["folds_missing"] == []
    from pipeline.probmaps import threshold_level
    scores = {t: [] for t in (0.5, s["best_threshold"])}
    for r in index.itertuples():
        q = cv2.imread(str(Graph(cfg, prepared=prepared).fold_dir(r.fold) / "oof" / f"{r.id}.png"), cv2.IMREAD_UNCHANGED)
        # As submit thresholds one fold's map: uint8 scale, bilinear to the original size.
        up = cv2.resize(q.astype(np.float32), (r.orig_width, r.orig_height), interpolation=cv2.INTER_LINEAR)
        full = cv2.imread(str(prepared / r.mask_full), cv2.IMREAD_GRAYSCALE)
        for t in scores:
            scores[t].append(dice(up > threshold_level(t), full))
    assert s["dice"] == pytest.approx(np.mean(scores[0.5]), abs=1e-9)
    assert s["dice_at_best"] == pytest.approx(np.mean(scores[s["best_threshold"]]), abs=1e-9)
    assert s["dice_at_best"] >= s["dice"] and 0.3 <= s["best_threshold"] <= 0.7
    assert s["folds"]["0"]["images"] + s["folds"]["1"]["images"] == len(index)


def test_oof_summary_known_answer(tmp_path):
    """Two folds of hand-made histograms; fold 1 unfinished is reported missing."""
    bins = probmaps.OOF_BINS
    f0 = tmp_path / "fold0"
    (f0 / "oof").mkdir(parents=True)
    # Image a: 10 true pixels at p=0.9, 10 false pixels at p=0.4 -> Dice 1 for t >= 0.4, 2*10/30 below.
    # Image b: 4 true pixels at p=0.35 -> Dice 1 for t < 0.35, 0 at and above.
    pos = np.zeros((2, bins + 1), np.int64)
    all_ = np.zeros((2, bins + 1), np.int64)
    for i, (p, n_true, n_false) in enumerate([(0.9, 10, 0), (0.4, 0, 10)]):
        b = int(np.ceil(p * bins))
        pos[0, b] += n_true
        all_[0, b] += n_true + n_false
    b = int(np.ceil(0.35 * bins))
    pos[1, b] = all_[1, b] = 4
    np.savez(f0 / "oof" / "hist.npz", ids=np.array(["a", "b"]), pos=pos, all=all_)
    cache.write_json(f0 / "oof.json", {"dice_model": 0.5})
    cache.write_manifest(f0, stage="train", key="k", params={}, inputs={}, outputs={})
    s = probmaps.pool_oof({0: f0, 1: tmp_path / "fold1"}, thresholds=np.array([0.3, 0.34, 0.35, 0.4, 0.5]))
    # t=0.3: a 20/30, b 1 -> 0.8333; t=0.34: same; t=0.35: a 20/30, b 0; t=0.4: a 1, b 0; t=0.5: a 1, b 0.
    assert s["curve"] == pytest.approx({"0.30": 5 / 6, "0.34": 5 / 6, "0.35": 1 / 3, "0.40": 0.5, "0.50": 0.5})
    assert s["best_threshold"] == 0.3 and s["dice_at_best"] == pytest.approx(5 / 6)
    assert s["dice"] == pytest.approx(0.5) and s["folds_missing"] == [1] and not s["complete"]
    with pytest.raises(PipelineError, match="no finished fold"):
        probmaps.pool_oof({1: tmp_path / "fold1"})
