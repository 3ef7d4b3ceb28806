"""Predict: per-image cached probabilities at model size, resume after a kill, shards merge to one run."""
import json
import os
import signal
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import geometry, predict, probmaps, submit, tta
from pipeline.errors import ConfigError
from pipeline.models import build_model
from pipeline.precision import resolve_precision
from pipeline import graph

REPO = Path(__file__).resolve().parents[1]
H, W = 64, 96  # model input size (divisible by 32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny checkpoint with the keys train writes (docs/design.md)."""
    torch.manual_seed(0)
    model = build_model("Unet", "resnet18", "none", encoder_depth=3, decoder_channels=[32, 16, 8])
    p = tmp_path_factory.mktemp("ckpt") / "best.pt"
    torch.save({"model": model.state_dict(), "arch": "Unet", "encoder": "resnet18", "height": H, "width": W,
                "model_kwargs": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]},
                "config": {}, "epoch": 0, "best_score": 0.0}, p)
    return p


@pytest.fixture(scope="module")
def test_set(tmp_path_factory):
    """10 test JPEGs of two sizes (neither the model size) and a test index in 'sample' order."""
    d = tmp_path_factory.mktemp("test_imgs")
    rng = np.random.default_rng(0)
    rows = []
    for k in range(10):
        h, w = (80, 120) if k % 2 else (50, 70)
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        img[h // 4:3 * h // 4, w // 4:3 * w // 4] = (200, 30, 30)
        p = d / f"car{k:02d}_{k + 1:02d}.jpg"
        cv2.imwrite(str(p), img)
        rows.append({"img": p.name, "id": p.stem, "path": str(p), "orig_height": h, "orig_width": w})
    index = pd.DataFrame(rows)
    sample = d / "sample_submission.csv"
    sample.write_text("img,rle_mask\n" + "".join(f"{r['img']},1 1\n" for r in rows))
    return index, sample


def test_parse_shard_and_positions():
    assert predict.parse_shard("") == (0, 1)
    assert predict.parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "1", "a/b", "-1/2", "0/0"):
        with pytest.raises(ConfigError):
            predict.parse_shard(bad)
    parts = [predict.shard_positions(11, (i, 3)) for i in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(11))  # disjoint and complete
    assert parts[1].tolist() == [1, 4, 7, 10]


def test_to_original_known_answers():
    prob = np.zeros((4, 6), np.float32)
    prob[:, :3] = 1.0                                    # left half car
    out = geometry.to_original(prob, (8, 12))            # other sizes than Kaggle's work
    assert out.shape == (8, 12) and out.dtype == np.float32
    assert (out[:, :5] == 1).all() and (out[:, 7:] == 0).all()
    np.testing.assert_array_equal(geometry.to_original(prob, (4, 6)), prob)  # same size: unchanged
    # fit=pad: 2 rows of padding above and below are cropped exactly before resizing back.
    padded = np.zeros((8, 6), np.float32)
    padded[2:6] = prob
    geom = {"scaled_height": 4, "scaled_width": 6, "pad_top": 2, "pad_left": 0}
    np.testing.assert_array_equal(geometry.to_original(padded, (4, 6), geom), prob)
    big = geometry.to_original(np.full((H, W), 0.7, np.float32), (1280, 1918))
    assert big.shape == (1280, 1918) and np.allclose(big, 0.7)


def test_cache_key_depends_on_checkpoint_bytes_and_tta(ckpt, tmp_path):
    h = graph.file_sha16(ckpt)
    copy = tmp_path / "copy.pt"
    copy.write_bytes(ckpt.read_bytes())
    assert graph.file_sha16(copy) == h            # content, not path or mtime
    a = graph.predict_dir("c", h, tta.names(tta.parse("hflip")), "bf16")
    assert a != graph.predict_dir("c", h, tta.names(tta.parse("hflip,vflip")), "bf16")
    assert a == graph.predict_dir("c", h, tta.names(tta.parse("none,hflip")), "bf16")
    assert a.name.startswith(h)
    # The precision the maps were computed in is part of the key: fp32, bf16 and fp16 never mix.
    dirs = {graph.predict_dir("c", h, tta.names(tta.parse("hflip")), p) for p in ("fp32", "bf16", "fp16")}
    assert len(dirs) == 3
    with pytest.raises(ValueError, match="precision 'auto'"):  # only resolved precisions make a key
        graph.predict_dir("c", h, tta.names(tta.parse("hflip")), "auto")


def test_resolve_precision_by_device_type(monkeypatch):
    monkeypatch.setenv("PIPELINE_CPU_BF16", "1")
    assert resolve_precision("auto", "cpu", "predict.precision") == "bf16"
    monkeypatch.setenv("PIPELINE_CPU_BF16", "0")
    assert resolve_precision("auto", "cpu", "predict.precision") == "fp32"
    assert resolve_precision("auto", "cuda", "predict.precision") == "fp16"      # resolved without needing the GPU
    assert resolve_precision("auto", "cuda:1", "predict.precision") == "fp16"
    assert resolve_precision("fp32", torch.device("cpu"), "predict.precision") == "fp32"
    assert resolve_precision("fp16", "cpu", "predict.precision") == "fp16"
    for bad in ("half", "float32", ""):
        with pytest.raises(ConfigError, match="predict.precision"):
            resolve_precision(bad, "cpu", "predict.precision")


def test_fp32_and_bf16_maps_get_their_own_dirs(ckpt, test_set, tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_CPU_BF16", "1")       # auto = bf16, as on a CPU with native bf16
    index, _ = test_set
    kw = dict(num_workers=0, device="cpu", log=lambda m: None)
    f32 = predict.predict_fold(index.iloc[:2], ckpt, tmp_path, tta.parse("hflip"), precision="fp32", **kw)
    b16 = predict.predict_fold(index.iloc[:2], ckpt, tmp_path, tta.parse("hflip"), precision="auto", **kw)
    assert f32.maps_dir != b16.maps_dir and b16.predicted == 2          # bf16 did not reuse the fp32 maps
    assert graph.predict_dir(tmp_path, graph.file_sha16(ckpt), tta.names(tta.parse("hflip")), "bf16") == b16.maps_dir
    meta = json.loads((b16.maps_dir / "meta.json").read_text())
    assert (meta["precision"], meta["autocast"], meta["device_type"]) == ("bf16", "auto", "cpu")
    assert json.loads((f32.maps_dir / "meta.json").read_text())["precision"] == "fp32"
    assert json.loads((b16.maps_dir / "manifest.json").read_text())["params"]["precision"] == "bf16"


def test_predict_fold_writes_every_image_then_caches(ckpt, test_set, tmp_path):
    index, _ = test_set
    ttas = tta.parse("hflip")
    res = predict.predict_fold(index, ckpt, tmp_path, ttas, batch_size=4, num_workers=2, log=lambda m: None)
    assert (res.predicted, res.skipped) == (10, 0)
    for i in index["id"]:
        p = probmaps.read_prob(probmaps.prob_path(res.maps_dir, i))
        assert p.shape == (H, W) and p.dtype == np.uint8
    assert (res.maps_dir / "manifest.json").is_file() and (res.maps_dir / "meta.json").is_file()
    again = predict.predict_fold(index, ckpt, tmp_path, ttas, batch_size=4, num_workers=0, log=lambda m: None)
    assert (again.predicted, again.skipped) == (0, 10)
    # A new fold or a new TTA gets its own directory; the old one is untouched.
    other = predict.predict_fold(index.iloc[:2], ckpt, tmp_path, tta.parse("none"), batch_size=4, num_workers=0,
                                 log=lambda m: None)
    assert other.maps_dir != res.maps_dir and other.predicted == 2


@pytest.mark.parametrize("stats", [None, ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))], ids=["imagenet", "recorded"])
def test_hflip_tta_is_mean_of_views(ckpt, test_set, tmp_path, stats):
    """The stored map equals the hand-made mean of the plain and the flipped-back flipped prediction,
    on inputs normalised as the checkpoint records (ImageNet when it records nothing)."""
    index, _ = test_set
    row = index.iloc[[1]]
    if stats is not None:
        state = torch.load(ckpt, weights_only=True)
        ckpt = tmp_path / "stats.pt"
        torch.save({**state, "input_stats": stats}, ckpt)
    res = predict.predict_fold(row, ckpt, tmp_path, tta.parse("hflip"), num_workers=0, precision="fp32",
                               log=lambda m: None)
    got = probmaps.read_prob(probmaps.prob_path(res.maps_dir, row["id"].iloc[0])).astype(np.float32) / 255
    from pipeline.data import read_image, to_device
    from pipeline.models import IMAGENET_STATS, load_checkpoint
    from pipeline.geometry import to_model
    model, _ = load_checkpoint(ckpt)
    img = to_model(read_image(row["path"].iloc[0]), geometry.stretch_geometry(H, W), H, W)
    x, _ = to_device(torch.from_numpy(img)[None], None, torch.device("cpu"), stats=stats or IMAGENET_STATS)
    with torch.no_grad():
        want = (torch.sigmoid(model(x)) + torch.sigmoid(model(x.flip(-1))).flip(-1))[0, 0].numpy() / 2
    assert np.abs(got - want).max() <= 0.5 / 255 + 1e-4


def test_shards_merged_equal_one_run(ckpt, test_set, tmp_path):
    index, sample = test_set
    ids = list(pd.read_csv(sample)["img"])
    ttas = tta.parse("hflip")
    # Batches differ between the runs (4,4,2 vs 4 | 3 | 3): per-image results must not depend on them.
    kw = dict(batch_size=4, num_workers=0, precision="fp32", log=lambda m: None)
    one = predict.predict_fold(index, ckpt, tmp_path / "one", ttas, **kw).maps_dir
    for i in range(3):
        parts = predict.predict_fold(index, ckpt, tmp_path / "sharded", ttas, shard=(i, 3), **kw)
        if i < 2:  # before the last shard, submit refuses and names what is missing
            with pytest.raises(Exception, match=r"unfinished shards \[.*2.*\] of 3"):
                submit.write_submission(index, [parts.maps_dir], tmp_path / "x.csv", 0.5, ids, workers=1)
    sharded = parts.maps_dir
    for i in index["id"]:
        np.testing.assert_array_equal(probmaps.read_prob(probmaps.prob_path(one, i)),
                                      probmaps.read_prob(probmaps.prob_path(sharded, i)))
    a = submit.write_submission(index, [one], tmp_path / "one.csv", 0.5, ids, workers=1)
    b = submit.write_submission(index, [sharded], tmp_path / "merged.csv", 0.5, ids, workers=1, images_per_task=3)
    assert a["rows"] == b["rows"] == 10
    assert (tmp_path / "one.csv").read_bytes() == (tmp_path / "merged.csv").read_bytes()


CHILD = textwrap.dedent("""
    import sys, time
    import pandas as pd
    from pipeline import predict, tta
    real = predict.write_prob
    def slow(path, prob):  # slow writes so the parent can kill us half-way
        time.sleep(0.2)
        real(path, prob)
    predict.write_prob = slow
    index = pd.read_csv(sys.argv[1])
    predict.predict_fold(index, sys.argv[2], sys.argv[3], tta.parse("hflip"), batch_size=1, num_workers=0,
                         precision="fp32")
""")


def test_resume_after_kill(ckpt, test_set, tmp_path, zygote):
    index, _ = test_set
    index_csv = tmp_path / "test_index.csv"
    index.to_csv(index_csv, index=False)
    ttas = tta.parse("hflip")
    fold_dir = graph.predict_dir(tmp_path / "cache", graph.file_sha16(ckpt), tta.names(ttas), "fp32")
    # A process of its own (forked from the session's pre-imported zygote, tests/_stage_runner.py).
    child = zygote.spawn([str(index_csv), str(ckpt), str(tmp_path / "cache")], code=CHILD, cwd=REPO)
    deadline = time.time() + 120
    while len(probmaps.done_ids(fold_dir)) < 3 and time.time() < deadline and child.poll():
        time.sleep(0.05)
    if child.poll():
        os.kill(child.pid, signal.SIGKILL)
    child.wait()
    done = probmaps.done_ids(fold_dir)
    assert 3 <= len(done) < 10, f"child finished {len(done)} before the kill"
    for i in done:  # nothing half-written under a final name
        assert probmaps.read_prob(probmaps.prob_path(fold_dir, i)).shape == (H, W)
    res = predict.predict_fold(index, ckpt, tmp_path / "cache", ttas, batch_size=1, num_workers=0,
                               precision="fp32", log=lambda m: None)
    assert res.skipped == len(done) and res.predicted == 10 - len(done)
    assert probmaps.done_ids(fold_dir) == set(index["id"])
    ref = predict.predict_fold(index, ckpt, tmp_path / "ref", ttas, batch_size=1, num_workers=0, precision="fp32",
                               log=lambda m: None)
    for i in index["id"]:
        np.testing.assert_array_equal(probmaps.read_prob(probmaps.prob_path(fold_dir, i)),
                                      probmaps.read_prob(probmaps.prob_path(ref.maps_dir, i)))


def test_index_from_another_prepare_size_is_refused(ckpt, test_set, tmp_path):
    index, _ = test_set
    other = index.iloc[:1].assign(scaled_height=32, scaled_width=48, pad_top=0, pad_left=0)  # a 32x48 prepare
    with pytest.raises(Exception, match="prepare and train used different sizes"):
        predict.predict_fold(other, ckpt, tmp_path, tta.parse("none"), num_workers=0, log=lambda m: None)


def _spy_model_calls(monkeypatch):
    """Record the batch size of every model call inside predict_fold."""
    from pipeline import models
    real, calls = models.load_checkpoint, []

    def spy(path, device="cpu"):
        model, meta = real(path, device)
        model.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
        return model, meta
    monkeypatch.setattr(models, "load_checkpoint", spy)
    return calls


def test_max_forward_bounds_images_per_call_same_maps(ckpt, test_set, tmp_path, monkeypatch):
    index, _ = test_set
    calls = _spy_model_calls(monkeypatch)
    kw = dict(batch_size=4, num_workers=0, precision="fp32", log=lambda m: None)
    ttas = tta.parse("hflip,vflip")                                  # 3 views: 12 images per batch of 4
    whole = predict.predict_fold(index, ckpt, tmp_path / "a", ttas, **kw)
    assert max(calls) == 12
    calls.clear()
    capped = predict.predict_fold(index, ckpt, tmp_path / "b", ttas, max_forward=3, **kw)
    assert max(calls) <= 3 and sum(calls) == 30                      # 10 images x 3 views, none twice
    assert capped.maps_dir.name == whole.maps_dir.name               # same maps, so the same cache key
    for i in index["id"]:
        a = probmaps.read_prob(probmaps.prob_path(whole.maps_dir, i)).astype(int)
        b = probmaps.read_prob(probmaps.prob_path(capped.maps_dir, i)).astype(int)
        assert np.abs(a - b).max() <= 1                              # fp32 sums in another order
    with pytest.raises(ConfigError, match="max_forward=-2"):
        predict.predict_fold(index, ckpt, tmp_path / "c", ttas, max_forward=-2, **kw)


def test_manifest_writes_config_beside_the_maps(ckpt, test_set, tmp_path):
    import yaml
    index, _ = test_set
    cfg = {"predict": {"tta": "hflip", "batch_size": 5, "max_forward": 0}, "data": {"cache": str(tmp_path)}}
    kw = dict(num_workers=0, precision="fp32", log=lambda m: None)
    part = predict.predict_fold(index, ckpt, tmp_path, tta.parse("hflip"), shard=(0, 2), config=cfg, **kw)
    assert not (part.maps_dir / "config.yaml").exists()              # half the images: unfinished
    done = predict.predict_fold(index, ckpt, tmp_path, tta.parse("hflip"), shard=(1, 2), config=cfg, **kw)
    assert yaml.safe_load((done.maps_dir / "config.yaml").read_text()) == cfg
    assert (done.maps_dir / "manifest.json").is_file()
    # Called without a config (tests, benchmarks): the call's own predict settings are recorded.
    alone = predict.predict_fold(index.iloc[:1], ckpt, tmp_path / "x", tta.parse("hflip"), batch_size=3, **kw)
    got = yaml.safe_load((alone.maps_dir / "config.yaml").read_text())["predict"]
    assert (got["tta"], got["batch_size"], got["precision"], got["max_forward"]) == ("none,hflip", 3, "fp32", 0)


def test_scale_tta_through_predict_fold(ckpt, test_set, tmp_path, monkeypatch):
    """tta=hflip,scale0.75 on the tiny model: the scaled view (64x96 -> 64x64, a separate forward)
    comes back at model size, the map is the mean of the three views, and it is cached."""
    index, _ = test_set
    calls = _spy_model_calls(monkeypatch)
    ttas = tta.parse("hflip,scale0.75")
    kw = dict(batch_size=5, num_workers=0, precision="fp32", log=lambda m: None)
    res = predict.predict_fold(index, ckpt, tmp_path, ttas, **kw)
    assert res.predicted == 10 and sorted(calls) == [5, 5, 10, 10]  # per batch: 2 flips together, 1 scaled
    plain = predict.predict_fold(index, ckpt, tmp_path, tta.parse("hflip"), **kw)
    assert plain.maps_dir != res.maps_dir
    from pipeline.data import read_image, to_device
    from pipeline.models import IMAGENET_STATS, load_checkpoint
    from pipeline.geometry import to_model
    model, _ = load_checkpoint(ckpt)
    for k, i in enumerate(index["id"]):
        got = probmaps.read_prob(probmaps.prob_path(res.maps_dir, i))
        assert got.shape == (H, W) and got.dtype == np.uint8 and 0 < got.mean() < 255
        if k < 2:  # the stored map is the 3-view mean, against the model called by hand
            img = to_model(read_image(index["path"].iloc[k]), geometry.stretch_geometry(H, W), H, W)
            x, _ = to_device(torch.from_numpy(img)[None], None, torch.device("cpu"), stats=IMAGENET_STATS)
            with torch.no_grad():
                small = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", antialias=True)
                views = [torch.sigmoid(model(x)), torch.sigmoid(model(x.flip(-1))).flip(-1),
                         torch.nn.functional.interpolate(torch.sigmoid(model(small)), size=(H, W), mode="bilinear")]
            want = (sum(views) / 3)[0, 0].numpy() * 255
            assert np.abs(got - want).max() <= 0.5 + 1e-3
    again = predict.predict_fold(index, ckpt, tmp_path, ttas, **kw)
    assert (again.predicted, again.skipped) == (0, 10)
