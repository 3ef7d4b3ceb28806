"""make inspect / make runs / the self-explaining CLI on the demo data (a tiny trained run)."""
import json

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import cli, inspect as inspect_stage, metrics, oof, overlay, prepare, rle, runs, synth, train
from pipeline.config import load
from pipeline.graph import Graph
from pipeline import graph


def _cfg(root, **extra):
    base = {"data.raw": str(root / "raw"), "data.cache": str(root / "cache"), "data.submissions": str(root / "subs"),
            "prepare.height": 64, "prepare.width": 96, "prepare.n_folds": 2, "prepare.workers": 1,
            "train.arch": "Unet", "train.encoder": "tu-resnet18", "train.encoder_depth": 3,
            "train.decoder_channels": "32,16,8", "train.epochs": 1, "train.batch_size": 8, "train.num_workers": 0,
            "train.lr": 3e-3, "tensorboard.enabled": False, "inspect.worst": 6, "inspect.workers": 1}
    base.update(extra)
    return load(None, base)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """4 demo cars at 120x80 (model 96x64: the maps must go back to the original size), 2 folds, 1 epoch."""
    root = tmp_path_factory.mktemp("inspect")
    synth.generate(root / "raw", train_cars=4, test_cars=1, height=80, width=120, seed=1, workers=1)
    cfg = _cfg(root)
    prepare.run(cfg)
    train.run(cfg)
    summary = oof.run(cfg)
    assert cli.main(["inspect", f"data.raw={root / 'raw'}", f"data.cache={root / 'cache'}",
                     *[f"{k}={v}" for k, v in {"prepare.height": 64, "prepare.width": 96, "n_folds": 2,
                                                "train.encoder": "tu-resnet18", "encoder_depth": 3,
                                                "decoder_channels": "32,16,8", "epochs": 1, "train.batch_size": 8,
                                                "train.lr": 3e-3, "inspect.worst": 6,
                                                "inspect.workers": 1}.items()]]) == 0
    return root, cfg, summary, graph.inspect_dir(cfg)


def _independent_dice(root, image_id, oof_png, threshold):
    """Dice from the files alone: the OOF PNG resized bilinearly to the GIF's size, > 255 t, vs the GIF."""
    true = np.asarray(Image.open(root / "raw" / "train_masks" / f"{image_id}_mask.gif").convert("L")) > 0
    q = cv2.imread(str(oof_png), cv2.IMREAD_UNCHANGED).astype(np.float32)
    up = cv2.resize(q, (true.shape[1], true.shape[0]), interpolation=cv2.INTER_LINEAR)
    pred = up > np.float32(threshold * 255)
    return metrics.dice(pred, true), int(true.sum()), int(pred.sum())


def test_per_image_values_match_an_independent_dice(demo):
    root, cfg, summary, out = demo
    df = pd.read_csv(out / "per_image.csv", dtype={"id": str, "car": str, "year": str})
    assert list(df.columns) == inspect_stage.COLUMNS
    assert len(df) == 64 and df["id"].is_unique
    assert (df["threshold"] == summary["best_threshold"]).all()     # the threshold submit would use
    assert list(df["dice"]) == sorted(df["dice"])                    # worst first
    run_dir = Graph(cfg).train_dir
    for r in df.to_dict("records"):
        d, ta, pa = _independent_dice(root, r["id"], run_dir / f"fold{r['fold']}" / "oof" / f"{r['id']}.png",
                                      r["threshold"])
        assert r["dice"] == pytest.approx(d, abs=1e-12), r["id"]
        assert (r["true_area"], r["pred_area"]) == (ta, pa)
        assert r["wrong"] == r["missed"] + r["extra"] and r["missed"] <= ta and r["extra"] <= pa
        assert r["car"] == r["id"][:12] and r["view"] == int(r["id"][-2:])
    # and the mean is the OOF summary's Dice at the best threshold (train's histograms, same rule)
    assert df["dice"].mean() == pytest.approx(summary["dice_at_best"], abs=1e-9)
    meta = pd.read_csv(root / "raw" / "metadata.csv", dtype=str).set_index("id")
    for r in df.head(5).to_dict("records"):
        assert (r["make"], r["model"], r["year"]) == tuple(meta.loc[r["car"], ["make", "model", "year"]])


def test_tables_per_view_and_per_car(demo):
    _, _, _, out = demo
    df = pd.read_csv(out / "per_image.csv", dtype={"car": str})
    views = pd.read_csv(out / "per_view.csv")
    assert list(views["view"]) == list(range(1, 17)) and views["images"].sum() == 64
    np.testing.assert_allclose(views["dice_mean"], df.groupby("view")["dice"].mean().to_numpy())
    cars = pd.read_csv(out / "per_car.csv", dtype={"car": str})
    assert sorted(cars["car"]) == sorted(df["car"].unique()) and (cars["images"] == 16).all()
    worst = df.loc[df.groupby("car")["dice"].idxmin()].set_index("car")["view"]
    assert all(worst[c] == v for c, v in zip(cars["car"], cars["worst_view"]))


def _colour_fraction(img_rgb, rgb, tol=40):
    return float((np.abs(img_rgb.astype(int) - np.array(rgb)).max(-1) < tol).mean())


def test_pictures_exist_with_the_expected_size_and_colours(demo):
    _, _, _, out = demo
    for name in ("worst.png", "worst_zoom.png"):
        img = cv2.cvtColor(cv2.imread(str(out / name)), cv2.COLOR_BGR2RGB)
        # 6 images: 2 rows of 4 tiles of 480x320 under 40-pixel captions, a 28-pixel legend on top
        assert img.shape == (28 + 2 * (40 + 320), 4 * 480, 3)
        first = img[28 + 40:28 + 40 + 320, :480]
        assert _colour_fraction(first, overlay.TRUE_RGB) > 0.001, name       # the true outline is drawn
        # 6 images in 8 places: the last two of the second row are blank
        assert _colour_fraction(img[28 + 360:, 2 * 480:], (255, 255, 255), 1) == 1.0
    chart = cv2.imread(str(out / "per_view.png"))
    assert chart.shape == (400, 1000, 3)
    assert (out / "inspect.log").read_text().count("inspect: mean Dice") == 1     # the stage's log beside it


def test_error_box_frames_the_largest_error():
    true = np.zeros((400, 600), bool)
    true[100:300, 100:500] = True
    pred = true.copy()
    pred[280:300, 400:480] = False          # the big miss (1600 px)
    pred[100:104, 120:140] = False          # a small one elsewhere (80 px)
    x0, y0, x1, y1 = overlay.error_box(true, pred, aspect=1.5)
    assert x0 <= 400 and x1 >= 480 and y0 <= 280 and y1 >= 300          # holds the big miss
    assert not (x0 <= 120 and y0 <= 100)                                  # not stretched to the small one
    assert abs((x1 - x0) / (y1 - y0) - 1.5) < 0.05 and 0 <= x0 < x1 <= 600 and 0 <= y0 < y1 <= 400
    assert y1 - y0 == round(400 / 3)                                      # a x3 zoom
    assert overlay.error_box(true, true, 1.5) is None


def test_submission_mode(demo, tmp_path):
    """A submission over the train images (data.test_dir=train): exact, empty and eroded rows."""
    root, _, _, _ = demo
    masks = root / "raw" / "train_masks"
    ids = sorted(p.name[:-9] for p in masks.glob("*_mask.gif"))[:4]
    codes, expect = [], {}
    for k, i in enumerate(ids):
        true = np.asarray(Image.open(masks / f"{i}_mask.gif").convert("L")) > 0
        pred = [true, np.zeros_like(true), cv2.erode(true.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0,
                true][k]
        codes.append(f"{i}.jpg,{rle.encode(pred.astype(np.uint8))}")
        expect[i] = metrics.dice(pred, true)
    sub = tmp_path / "mine.csv"
    sub.write_text("img,rle_mask\n" + "\n".join(codes) + "\n")
    cfg = _cfg(root, **{"inspect.submission": str(sub), "inspect.masks": str(masks), "data.test_dir": "train",
                        "inspect.worst": 3})
    out = inspect_stage.run(cfg)
    assert out == tmp_path / "mine.inspect"
    df = pd.read_csv(out / "per_image.csv", dtype={"id": str})
    assert dict(zip(df["id"], df["dice"])) == pytest.approx(expect)
    img = cv2.cvtColor(cv2.imread(str(out / "worst.png")), cv2.COLOR_BGR2RGB)
    assert img.shape == (28 + 40 + 320, 3 * 480, 3)
    tiles = [img[28 + 40:, k * 480:(k + 1) * 480] for k in range(3)]      # worst first: empty, eroded, exact
    assert list(df["dice"][:3]) == sorted(expect.values())[:3]
    assert _colour_fraction(tiles[0], overlay.PRED_RGB) == 0              # nothing predicted: no outline
    assert _colour_fraction(tiles[1], overlay.PRED_RGB) > 0.001           # the eroded prediction's outline
    assert _colour_fraction(tiles[0], overlay.TRUE_RGB) > 0.001
    with pytest.raises(Exception, match="inspect.masks"):
        inspect_stage.run(_cfg(root, **{"inspect.submission": str(sub)}))


def test_runs_leaderboard(demo, tmp_path, capsys):
    root, cfg, summary, _ = demo
    df = runs.leaderboard(cfg.data.cache)
    row = df[df["key"] == Graph(cfg).train_dir.name].iloc[0]
    assert row["folds"] == "2/2" and row["arch"] == "Unet" and row["encoder"] == "tu-resnet18"
    assert row["size"] == "64x96 stretch" and row["epochs"] == 1
    assert row["oof_dice"] == pytest.approx(summary["dice"]) and row["threshold"] == summary["best_threshold"]
    # an unfinished run (a second config, fold 0 only, no manifest) shows as such, after the finished one
    other = Graph(cfg).train_dir.parent / "unfinished0000"
    (other / "fold0").mkdir(parents=True)
    (other / "fold0" / "config.yaml").write_text((Graph(cfg).train_dir / "fold0" / "config.yaml").read_text())
    (other / "fold0" / "metrics.csv").write_text("epoch,seconds\n1,30.0\n")
    try:
        df = runs.leaderboard(cfg.data.cache)
        assert list(df["key"]).index(row["key"]) < list(df["key"]).index("unfinished0000")
        assert df.set_index("key").loc["unfinished0000", "folds"] == "0/2; fold 0: epoch 1/1" or \
            df.set_index("key").loc["unfinished0000", "folds"] == "0/2; fold 0: OOF"
        assert runs.main([f"data.cache={cfg.data.cache}", "--csv", str(tmp_path / "runs.csv")]) == 0
        assert len(pd.read_csv(tmp_path / "runs.csv")) == len(df)
        assert "unfinished0000" in capsys.readouterr().out
    finally:
        import shutil
        shutil.rmtree(other)


def test_stage_logs_beside_artifacts(demo):
    _, cfg, _, _ = demo
    # the fixture ran prepare/train/oof in-process (no CLI, so no log) and inspect through the CLI
    assert (graph.inspect_dir(cfg) / "inspect.log").is_file()
    assert cli.main(["oof", f"data.raw={cfg.data.raw}", f"data.cache={cfg.data.cache}",
                     "prepare.height=64", "prepare.width=96", "n_folds=2", "train.encoder=tu-resnet18",
                     "encoder_depth=3", "decoder_channels=32,16,8", "epochs=1", "train.batch_size=8",
                     "train.lr=3e-3"]) == 0
    log = (Graph(cfg).train_dir / "oof.log").read_text()
    assert "OOF Dice" in log and log.rstrip().splitlines()[-1].startswith("=== ok")
    json.loads((Graph(cfg).train_dir / "oof_summary.json").read_text())
