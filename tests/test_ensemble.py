"""Multi-run ensembles (submit.runs): known answers for the pure pieces, and two tiny runs of
different configs (different model sizes) ensembled end to end through the CLI (each command a
process forked from the session's pre-imported zygote, tests/_stage_runner.py; the exit-code
test runs ``python -m pipeline`` itself)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from _stage_runner import run_ok

from pipeline import ensemble, geometry, probmaps, rle, synth
from pipeline.errors import ConfigError
from pipeline.validate import check_submission, read_ids, sizes_from

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ pure pieces

def test_weight_grid_covers_the_simplex_with_its_vertices():
    g = ensemble.weight_grid(2, steps=10)
    assert g.shape == (11, 2) and np.allclose(g.sum(1), 1)
    assert [1.0, 0.0] in g.tolist() and [0.0, 1.0] in g.tolist() and [0.5, 0.5] in g.tolist()
    assert ensemble.weight_grid(3, steps=10).shape == (66, 3)      # C(12, 2)
    assert ensemble.weight_grid(1).tolist() == [[1.0]]


def test_blend_known_answers():
    a = np.array([[0, 100], [255, 51]], np.float32)
    b = np.array([[255, 0], [255, 153]], np.float32)
    assert ensemble.blend([a], [1.0]) is a
    np.testing.assert_allclose(ensemble.blend([a, b], [0.25, 0.75]), [[191.25, 25], [255, 127.5]])
    assert np.array_equal(ensemble.blend([a, b], [1.0, 0.0]), a)


def test_weights_are_checked_by_name():
    assert ensemble.parse_weights("", 2) is None
    np.testing.assert_allclose(ensemble.parse_weights("3,1", 2), [0.75, 0.25])
    for bad in ("1", "1,x", "-1,2", "0,0"):
        with pytest.raises(ConfigError, match="submit.weights"):
            ensemble.parse_weights(bad, 2)
    with pytest.raises(ConfigError, match="submit.runs"):
        ensemble.run_files("no/such.yaml")


# ------------------------------------------------------------------ two tiny runs, end to end

RUN = {"train": {"arch": "Unet", "encoder": "resnet18", "encoder_weights": "none", "encoder_depth": 3,
                 "decoder_channels": "32,16,8", "epochs": 1, "batch_size": 8, "num_workers": 0, "fold": 0},
       "predict": {"folds": "0", "tta": "hflip", "num_workers": 0},
       "prepare": {"n_folds": 2, "workers": 1}}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, zygote):
    tmp = tmp_path_factory.mktemp("ens")
    synth.generate(tmp / "raw", train_cars=4, test_cars=1, height=80, width=120, seed=3, workers=1)
    configs = []
    # Two configs that differ in model size (so in geometry) and seed: a real multi-run ensemble.
    for name, (h, w, seed) in {"a": (64, 96, 1), "b": (96, 128, 2)}.items():
        doc = {**RUN, "prepare": {**RUN["prepare"], "height": h, "width": w},
               "train": {**RUN["train"], "seed": seed}, "submit": {"name": f"solo-{name}"}}
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        for stage in ("prepare", "train"):
            run_ok(zygote, stage, path, tmp)
        configs.append(path)
    runs = ",".join(str(c) for c in configs)
    out = run_ok(zygote, "submit", configs[0], tmp, f"submit.runs={runs}", "submit.name=ens")
    return tmp, configs, runs, out


def _rows(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False)


def test_ensemble_submission_is_the_weighted_mean_of_the_runs(two_runs):
    tmp, configs, _, _ = two_runs
    sub = tmp / "subs" / "ens.csv"
    side = json.loads((tmp / "subs" / "ens.json").read_text())
    rep = check_submission(sub, read_ids(tmp / "raw" / "sample_submission.csv"),
                              sizes_from(images_dir=tmp / "raw" / "test"))
    assert rep.ok, rep.summary()
    weights = [r["weight"] for r in side["runs"]]
    assert len(weights) == 2 and sum(weights) == pytest.approx(1.0)
    assert [r["config"] for r in side["runs"]] == [str(c) for c in configs]
    assert side["threshold_source"].startswith("ensemble OOF search")
    # The search saw both runs alone (grid vertices) and kept the best of everything it tried.
    assert set(side["ensemble"]["solo"]) == {str(c) for c in configs}
    assert side["ensemble"]["oof_dice"] >= max(s["oof_dice"] for s in side["ensemble"]["solo"].values()) - 1e-12
    # Independently: each run's map (its one fold) back to the JPEG's size, weighted, thresholded.
    dirs = [r["models"][0]["predictions"] for r in side["runs"]]
    for img, code in zip(*_rows(sub)[["img", "rle_mask"]].T.values):
        stem = Path(img).stem
        maps = [geometry.to_original(probmaps.read_prob(probmaps.prob_path(d, stem)).astype(np.float32), (80, 120))
                for d in dirs]
        want = weights[0] * maps[0] + weights[1] * maps[1] > side["threshold"] * 255
        got = rle.decode(code, (80, 120))
        assert (got == want).mean() > 0.999, img


def test_weights_one_zero_reproduce_the_first_run_alone(two_runs, zygote):
    tmp, configs, runs, _ = two_runs
    run_ok(zygote, "submit", configs[0], tmp, "submit.threshold=0.5")              # run a alone: solo-a.csv
    run_ok(zygote, "submit", configs[0], tmp, f"submit.runs={runs}", "submit.weights=1,0", "submit.threshold=0.5",
         "submit.name=ens10")
    assert (tmp / "subs" / "ens10.csv").read_bytes() == (tmp / "subs" / "solo-a.csv").read_bytes()


def test_ensemble_submit_is_cached_and_predicts_nothing_again(two_runs, zygote):
    tmp, configs, runs, first = two_runs
    sub = tmp / "subs" / "ens.csv"
    before = sub.stat().st_mtime_ns
    again = run_ok(zygote, "submit", configs[0], tmp, f"submit.runs={runs}", "submit.name=ens")
    assert "cached, nothing to do" in again.out
    assert sub.stat().st_mtime_ns == before
    import re
    # predict ran for each run (first time: every test image), then found everything cached.
    assert [int(n) for n in re.findall(r"(\d+) predicted", first.out)] == [16, 16]
    assert [int(n) for n in re.findall(r"(\d+) predicted", again.out)] == [0, 0]
    choices = list((tmp / "cache" / "ensemble").glob("*/choice.json"))
    assert len(choices) >= 1


def test_a_run_without_its_fold_is_named(two_runs, tmp_path):
    tmp, configs, _, _ = two_runs
    other = tmp_path / "c.yaml"
    other.write_text(yaml.safe_dump({**RUN, "prepare": {**RUN["prepare"], "height": 64, "width": 96},
                                     "train": {**RUN["train"], "seed": 9}}))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "submit", "--config", str(configs[0]),
                           f"data.raw={tmp / 'raw'}", f"data.cache={tmp / 'cache'}", f"data.submissions={tmp_path}",
                           f"submit.runs={configs[0]},{other}"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2 and f"submit.runs: {other}:" in proc.stderr and "no trained checkpoint" in proc.stderr
