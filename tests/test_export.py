"""make export: a trained run -> ONNX + safetensors + model card; onnxruntime reproduces torch and the
run's own submission; runs that cannot be exported are refused with one line."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pandas as pd
import pytest
import torch

from pipeline import cutout, export, graph, onnxrun, oof, predict, prepare, probmaps, rle, submit, synth, train
from pipeline.config import load
from pipeline.errors import PipelineError
from pipeline.metrics import dice
from test_safe_checkpoints import Payload      # unpickling it runs code: a hostile checkpoint

REPO = Path(__file__).resolve().parents[1]
DICE_MIN = 0.9999          # thresholded masks, ONNX vs torch: equal but where a fold mean sits at the level
PROB_TOL = 1e-4            # |p_onnx - p_torch|: fp32 on both sides differs by rounding only


def _cfg(root, **extra):
    base = {"data.raw": str(root / "raw"), "data.cache": str(root / "cache"), "data.submissions": str(root / "subs"),
            "prepare.height": 64, "prepare.width": 96, "prepare.n_folds": 2, "prepare.workers": 1,
            "train.arch": "Unet", "train.encoder": "tu-resnet18", "train.encoder_depth": 3,
            "train.decoder_channels": "32,16,8", "train.epochs": 1, "train.batch_size": 8, "train.num_workers": 0,
            "train.lr": 3e-3, "tensorboard.enabled": False, "predict.tta": "hflip", "predict.num_workers": 0,
            "predict.precision": "fp32", "predict.device": "cpu", "submit.workers": 1}
    base.update(extra)
    return load(None, base)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo set (4 train cars at 120x80, model 96x64, 2 folds, 1 epoch each, 1 test car), its OOF
    summary, predictions and submission, and the run exported."""
    root = tmp_path_factory.mktemp("export")
    cfg = _cfg(root)
    synth.generate(root / "raw", train_cars=4, test_cars=1, height=80, width=120, seed=1, workers=1)
    prepare.run(cfg)
    train.run(cfg)
    summary = oof.run(cfg)
    predict.run(cfg)
    sub = submit.run(cfg)
    out = export.run(cfg, out=str(root / "exports" / "demo"))
    return root, cfg, summary, sub, out


def parity(folder: Path, photos: list[Path]) -> dict:
    """onnxruntime through the cutout runner (``pipeline.onnxrun``) against eager torch (predict's
    ``tta.predict_proba`` on the export's safetensors weights) on the same input pixels: the largest
    per-fold probability difference at model size, and the Dice between the two thresholded masks at
    each photo's size (submit's rule: ``probmaps.fold_mean`` of the uint8 maps, binarize)."""
    from pipeline import tta
    m = onnxrun.load_model(folder)
    nets = export.torch_models(folder)
    views = tta.parse(",".join(m.views))
    diffs, dices, car = [], [], []
    for p in photos:
        photo = cutout.read_photo(p, m.height, m.width, m.fit)
        x = onnxrun.model_input(m, photo.small, photo.geom)
        got = [onnxrun.fold_probs(s, m.input_name, x, m.views) for s in m.sessions]
        with torch.no_grad():
            ref = [tta.predict_proba(net, torch.from_numpy(x)[None], views)[0, 0].numpy() for net in nets]
        diffs.append(max(float(np.abs(a - b).max()) for a, b in zip(got, ref)))
        masks = [probmaps.binarize(probmaps.fold_mean([probmaps.to_uint8(q) for q in maps], photo.rgb.shape[:2],
                                                      photo.geom), m.threshold) for maps in (got, ref)]
        dices.append(dice(masks[0], masks[1]))
        car.append(float(masks[1].mean()))
    return {"images": len(photos), "max_prob_diff": max(diffs), "min_dice": min(dices),
            "car_fraction_mean": float(np.mean(car))}


def _card(out: Path) -> dict:
    return json.loads((out / "model.json").read_text())


def test_card_records_the_run(demo):
    root, cfg, summary, _, out = demo
    card, run_dir = _card(out), export.run_folder(cfg)
    assert card["format"] == onnxrun.CARD_FORMAT
    assert card["architecture"] == "Unet" and card["encoder"] == "tu-resnet18"
    assert card["model_kwargs"] == {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}
    assert card["input"]["mean"] == [0.485, 0.456, 0.406] and card["input"]["std"] == [0.229, 0.224, 0.225]
    assert (card["input"]["height"], card["input"]["width"]) == (64, 96) and card["input"]["dynamic_batch"]
    assert card["geometry"]["fit"] == "stretch" and (card["geometry"]["height"], card["geometry"]["width"]) == (64, 96)
    # submit's threshold rule: the OOF summary's best threshold, naming the file it came from
    assert card["threshold"]["value"] == summary["best_threshold"]
    assert card["threshold"]["source"] == str(run_dir / "oof_summary.json")
    assert card["tta"] == ["none", "hflip"]
    assert [f["fold"] for f in card["folds"]] == [0, 1] and [f["weight"] for f in card["folds"]] == [0.5, 0.5]
    assert card["oof"]["dice"] == summary["dice"] and set(card["oof"]["per_fold"]) == {"0", "1"}
    assert card["train_key"] == run_dir.name and card["name"] == "demo"
    assert {"torch", "onnxruntime", "onnx", "timm", "safetensors"} <= set(card["versions"])
    assert re.match(r"^\d{4}-\d\d-\d\dT", card["created"])
    for f in card["folds"]:
        model = onnx.load(str(out / f["onnx"]))
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
        dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        assert dims == ["batch", 3, "height", "width"] and f["dynamic_hw"]
        assert f["parity_max_prob_diff"] < PROB_TOL
        # the safetensors file holds best.pt's weights exactly
        from safetensors.torch import load_file
        best = torch.load(run_dir / f"fold{f['fold']}" / "best.pt", weights_only=True)["model"]
        st = load_file(str(out / f["safetensors"]))
        assert st.keys() == best.keys() and all(torch.equal(st[k], best[k]) for k in best)
        assert f["checkpoint_sha256_16"] == graph.file_sha16(run_dir / f"fold{f['fold']}" / "best.pt")
    assert export.default_out(cfg) == Path("exports") / run_dir.name == graph.Graph(cfg).export_dir


def test_onnx_matches_torch_on_the_demo_test_images(demo):
    root, _, _, _, out = demo
    rep = parity(out, sorted((root / "raw" / "test").glob("*.jpg")))
    print(f"\nparity on {rep['images']} demo test images: max |p onnx - p torch| = {rep['max_prob_diff']:.2e}, "
          f"Dice of the thresholded masks min {rep['min_dice']:.6f} (car fraction {rep['car_fraction_mean']:.2f})")
    assert rep["images"] == 16 and rep["max_prob_diff"] < PROB_TOL and rep["min_dice"] >= DICE_MIN


def test_onnx_matches_torch_on_real_photos(demo, shared_data):
    _, _, _, _, out = demo
    photos = sorted((shared_data / "carvana512" / "test").glob("*.jpg"))[:6]
    if not photos:
        pytest.skip("no ../shared/data/carvana512/test/*.jpg")
    rep = parity(out, photos)
    print(f"\nparity on {rep['images']} real 512x512 photos: max |p onnx - p torch| = {rep['max_prob_diff']:.2e}, "
          f"Dice min {rep['min_dice']:.6f} (car fraction {rep['car_fraction_mean']:.2f})")
    assert rep["max_prob_diff"] < PROB_TOL and rep["min_dice"] >= DICE_MIN


def test_export_reproduces_the_submission(demo, tmp_path):
    """The exported folder, run by the torch-free cutout runner on the demo test JPEGs, gives the
    masks of the run's own predict + submit (decoded from the CSV)."""
    root, _, _, sub, out = demo
    s = cutout.run(root / "raw" / "test", tmp_path / "cut", out, progress=False)
    assert (s.done, s.refused) == (16, 0)
    rows = pd.read_csv(sub, keep_default_na=False)
    cars = 0
    for r in rows.itertuples():
        name = Path(r.img).stem
        got = cv2.imread(str(tmp_path / "cut" / f"{name}_mask.png"), cv2.IMREAD_UNCHANGED) > 127
        want = rle.decode(r.rle_mask, got.shape).astype(bool)
        rgba = cv2.imread(str(tmp_path / "cut" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert rgba.shape == (80, 120, 4) and np.array_equal(rgba[..., 3] > 0, got)
        assert dice(got, want) >= DICE_MIN, name
        cars += int(want.sum())
    assert 0.05 < cars / (16 * 80 * 120) < 0.95       # the masks are neither empty nor full


def test_cutout_finds_the_configs_export_without_torch(demo, tmp_path, monkeypatch):
    """`make export` then `make cutout` without MODEL=: the export of the config's run, found from the
    config alone in a fresh interpreter that never imports torch."""
    root, cfg, _, _, _ = demo
    overrides = [f"{k}={v}" for k, v in {
        "data.raw": root / "raw", "data.cache": root / "cache", "prepare.height": 64, "prepare.width": 96,
        "prepare.n_folds": 2, "train.encoder": "tu-resnet18", "train.encoder_depth": 3,
        "train.decoder_channels": "32,16,8", "train.epochs": 1, "train.batch_size": 8, "train.lr": 3e-3}.items()]
    monkeypatch.chdir(tmp_path)           # exports/ is relative to the working directory, as under make
    assert export.main(overrides) == 0
    assert (tmp_path / "exports" / export.run_folder(cfg).name / "model.json").is_file()
    args = ["--in", str(root / "raw" / "test"), "--out", "cut", "--no-progress", *overrides]
    code = ("import sys; from pipeline import cutout; "
            f"rc = cutout.main({args!r}); "
            "print('RESULT', rc, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "RESULT 0 False" in proc.stdout, proc.stderr[-2000:]
    assert len(list((tmp_path / "cut").glob("*_mask.png"))) == 16


def test_second_export_is_up_to_date(demo):
    _, cfg, _, _, out = demo
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    lines = []
    root = export.run_folder(cfg)
    assert export.export(root, out, tta=cfg.predict.tta,
                         threshold=probmaps.resolve_threshold(cfg.submit.threshold, root), log=lines.append) == out
    assert lines and "up to date" in lines[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_refuses_a_run_with_no_finished_fold(demo, tmp_path, capsys):
    _, cfg, _, _, _ = demo
    run = tmp_path / "cache" / "train" / "unfinished"
    (run / "fold0").mkdir(parents=True)
    shutil.copy(export.run_folder(cfg) / "fold0" / "best.pt", run / "fold0" / "best.pt")   # no manifest.json
    with pytest.raises(PipelineError, match=r"^no finished fold under .*unfinished"):
        export.export(run, tmp_path / "out")
    rc = export.main([f"data.cache={tmp_path / 'cache'}", "--run", "unfinished", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: no finished fold under")
    assert not (tmp_path / "out").exists()


def test_refuses_a_checkpoint_carrying_code(demo, tmp_path, capsys):
    """A finished fold whose best.pt carries a pickled callable: refused on one line naming the file,
    the callable never runs, nothing is written."""
    _, cfg, _, _, _ = demo
    src = export.run_folder(cfg) / "fold0"
    fold = tmp_path / "run" / "fold0"
    shutil.copytree(src, fold)
    marker = tmp_path / "ran.txt"
    ckpt = torch.load(fold / "best.pt", weights_only=True)
    torch.save({**ckpt, "note": Payload(marker)}, fold / "best.pt")
    (tmp_path / "cache").mkdir()          # (a new cache outside the project gets a note line)
    pattern = rf"^{re.escape(str(fold / 'best.pt'))}: refused to load, it holds non-tensor objects[^\n]*$"
    with pytest.raises(PipelineError, match=pattern):
        export.export(tmp_path / "run", tmp_path / "out")
    rc = export.main([f"data.cache={tmp_path / 'cache'}", "--run", str(tmp_path / "run"),
                      "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "refused to load" in err[0]
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))          # no temp folder left behind


def test_refuses_an_out_folder_that_is_not_an_export(demo, tmp_path):
    _, cfg, _, _, _ = demo
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "photo.jpg").write_bytes(b"precious")
    with pytest.raises(PipelineError, match="exists and is not an export folder"):
        export.export(export.run_folder(cfg), tmp_path / "mine")
    assert (tmp_path / "mine" / "photo.jpg").read_bytes() == b"precious"
