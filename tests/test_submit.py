"""Submit: fold mean -> original size -> threshold -> RLE, streamed in sample order, validated, with sidecar."""
import gzip
import json

import cv2
import numpy as np
import pandas as pd
import pytest

from pipeline import cache, config, probmaps, rle, submit, tta
from pipeline.errors import PipelineError
from pipeline.graph import Graph
from pipeline import graph

MODEL = (4, 6)  # model-size probability maps


def make_case(tmp_path, maps_by_fold, sizes):
    """Fold dirs of uint8 PNG maps, a test index (with fit=stretch geometry) and sample ids."""
    ids = [f"c{k}_{k + 1:02d}" for k in range(len(sizes))]
    dirs = []
    for f, maps in enumerate(maps_by_fold):
        d = tmp_path / f"fold{f}"
        d.mkdir()
        for i, m in zip(ids, maps):
            cv2.imwrite(str(probmaps.prob_path(d, i)), m)
        dirs.append(d)
    index = pd.DataFrame({"img": [i + ".jpg" for i in ids], "id": ids, "path": "x",
                          "orig_height": [s[0] for s in sizes], "orig_width": [s[1] for s in sizes],
                          "scaled_height": MODEL[0], "scaled_width": MODEL[1], "pad_top": 0, "pad_left": 0})
    return index, dirs, list(index["img"])


def read_sub(path):
    return pd.read_csv(path, keep_default_na=False)


def const(v):
    return np.full(MODEL, v, np.uint8)


def test_fold_mean_threshold_known_answers(tmp_path):
    half = np.zeros(MODEL, np.uint8)
    half[:, :3] = 255
    # image 0: folds 200 and 0 -> mean 100/255 = 0.39; image 1: left half car; image 2: nothing.
    index, dirs, ids = make_case(tmp_path, [[const(200), half, const(0)], [const(0), half, const(0)]],
                                 [(8, 12), (8, 12), (5, 7)])
    submit.write_submission(index, dirs, tmp_path / "s05.csv", 0.5, ids, workers=1)
    sub = read_sub(tmp_path / "s05.csv")
    assert list(sub.img) == ids
    assert sub.rle_mask[0] == ""                       # 0.39 < 0.5
    # 4 -> 8 rows, 6 -> 12 cols, bilinear: output cols 0..5 are >= 0.75, cols 6.. <= 0.25.
    assert sub.rle_mask[1] == " ".join(f"{1 + 12 * r} 6" for r in range(8))
    assert sub.rle_mask[2] == ""
    submit.write_submission(index, dirs, tmp_path / "s03.csv", 0.3, ids, workers=1)
    assert read_sub(tmp_path / "s03.csv").rle_mask[0] == "1 96"   # 0.39 > 0.3: the whole 8x12 image


def test_gzip_and_parallel_workers_match_plain(tmp_path):
    rng = np.random.default_rng(0)
    maps = [[cv2.GaussianBlur(rng.integers(0, 256, MODEL, dtype=np.uint8), (3, 3), 0) for _ in range(7)]
            for _ in range(2)]
    index, dirs, ids = make_case(tmp_path, maps, [(40, 60)] * 4 + [(33, 47)] * 3)
    submit.write_submission(index, dirs, tmp_path / "a.csv", 0.5, ids, workers=1)
    submit.write_submission(index, dirs, tmp_path / "b.csv.gz", 0.5, ids, workers=2, images_per_task=2)
    plain = (tmp_path / "a.csv").read_bytes()
    assert gzip.decompress((tmp_path / "b.csv.gz").read_bytes()) == plain
    assert plain.startswith(b"img,rle_mask\n")
    for r, (h, w) in zip(read_sub(tmp_path / "a.csv").itertuples(), zip(index.orig_height, index.orig_width)):
        assert rle.decode(r.rle_mask, (h, w)).shape == (h, w)


def test_refuses_ids_not_matching_sample(tmp_path):
    index, dirs, ids = make_case(tmp_path, [[const(255)] * 3], [(8, 12)] * 3)
    swapped = [ids[1], ids[0], ids[2]]
    with pytest.raises(PipelineError, match="do not match sample_submission.csv.*row 1"):
        submit.write_submission(index, dirs, tmp_path / "s.csv", 0.5, swapped, workers=1)
    with pytest.raises(PipelineError, match="3 vs 4 rows"):
        submit.write_submission(index, dirs, tmp_path / "s.csv", 0.5, ids + ["extra.jpg"], workers=1)
    assert [p.name for p in tmp_path.iterdir() if "s.csv" in p.name] == []


def test_refuses_when_validation_fails(tmp_path, monkeypatch):
    index, dirs, ids = make_case(tmp_path, [[const(255)] * 3], [(8, 12)] * 3)
    monkeypatch.setattr(submit, "encode_chunk", lambda *a, **k: ["5 1000"] * len(a[1]))  # outside 8x12
    with pytest.raises(PipelineError, match=r"validation failed[\s\S]*line 2 .*beyond H\*W = 96"):
        submit.write_submission(index, dirs, tmp_path / "s.csv", 0.5, ids, workers=1)
    assert [p.name for p in tmp_path.iterdir() if "s.csv" in p.name] == []  # no final file, no temp file


def test_missing_predictions_named(tmp_path):
    index, dirs, ids = make_case(tmp_path, [[const(255)] * 3], [(8, 12)] * 3)
    probmaps.prob_path(dirs[0], index.id[1]).unlink()
    with pytest.raises(PipelineError, match=r"1 of 3 test images not predicted, e\.g\. \['c1_02'\]") as e:
        submit.write_submission(index, dirs, tmp_path / "s.csv", 0.5, ids, workers=1)
    assert "must use the same predict.precision and device type" in str(e.value)


def test_missing_maps_name_the_same_checkpoint_in_another_precision(tmp_path):
    """Predicted on a GPU (fp16), submitted where autocast resolves to bf16: the error says where the maps are."""
    index, src, ids = make_case(tmp_path, [[const(255)] * 3], [(8, 12)] * 3)
    ttas = tta.parse("hflip")
    fp16 = graph.predict_dir(tmp_path / "cache", "abcd", tta.names(ttas), "fp16")
    fp16.parent.mkdir(parents=True)
    src[0].rename(fp16)
    cache.write_json(fp16 / "meta.json", {"precision": "fp16", "tta": ["none", "hflip"]})
    bf16 = graph.predict_dir(tmp_path / "cache", "abcd", tta.names(ttas), "bf16")
    with pytest.raises(PipelineError, match=r"3 of 3 test images not predicted.*this checkpoint also has "
                                            rf"{fp16.name} \(fp16, tta none,hflip: 3 of 3 images\)"):
        submit.write_submission(index, [bf16], tmp_path / "s.csv", 0.5, ids, workers=1)


def test_threshold_sources(tmp_path):
    run = tmp_path / "run"
    assert probmaps.resolve_threshold(-1, run) == {"threshold": probmaps.DEFAULT_THRESHOLD,
                                                   "threshold_source": "default (no oof_summary.json)"}
    cache.write_json(run / "oof_summary.json", {"dice": 0.99, "best_threshold": 0.42})
    info = probmaps.resolve_threshold(-1, run)
    assert info["threshold"] == 0.42 and info["threshold_source"].endswith("oof_summary.json")
    assert info["oof_complete"] is None                                   # an older summary says nothing
    assert probmaps.resolve_threshold(0.6, run) == {"threshold": 0.6, "threshold_source": "config submit.threshold"}
    # A multi-run choice: its searched threshold, unless the config fixes one.
    choice = {"threshold": 0.44, "path": "/c/choice.json"}
    assert probmaps.resolve_threshold(-1, search=choice) == {"threshold": 0.44,
                                                             "threshold_source": "ensemble OOF search /c/choice.json"}
    assert probmaps.resolve_threshold(0.6, search=choice)["threshold_source"] == "config submit.threshold"
    np.testing.assert_array_equal(probmaps.threshold_grid(-1), probmaps.THRESHOLDS)
    assert probmaps.threshold_grid(0.6).tolist() == [0.6]


def test_one_run_of_weight_one_is_its_fold_mean(tmp_path):
    """blend_mask with one run of weight 1 is the fold mean at the original size, binarized."""
    rng = np.random.default_rng(1)
    maps = [[cv2.GaussianBlur(rng.integers(0, 256, MODEL, dtype=np.uint8), (3, 3), 0)] for _ in range(3)]
    index, dirs, _ = make_case(tmp_path, maps, [(9, 13)])
    geom = {"scaled_height": 4, "scaled_width": 5, "pad_top": 0, "pad_left": 1}
    mean = np.mean([m[0][:, 1:6].astype(np.float32) for m in maps], axis=0)
    for t in (0.3, 0.5, 0.6):
        got = submit.blend_mask([([str(d) for d in dirs], 1.0)], index.id[0], (9, 13), t, [geom])
        want = cv2.resize(mean, (13, 9), interpolation=cv2.INTER_LINEAR) > probmaps.threshold_level(t)
        assert got.dtype == bool and (got == want).mean() > 0.99


def run_case(tmp_path, **overrides):
    """run(cfg, graph)'s inputs: a prepare artifact, 2 folds' best.pt and their fp32 maps of 2 images
    where the graph puts them. Returns (cfg, graph, ckpts)."""
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "train_index.csv").write_text("id,fold\nx_01,0\nx_02,1\n")
    (prepared / "folds.csv").write_text("id,car_id,fold\nx_01,x,0\nx_02,x,1\n")
    index, tmp_dirs, ids = make_case(tmp_path, [[const(255), const(0)], [const(255), const(0)]], [(8, 12), (8, 12)])
    index.to_csv(prepared / "test_index.csv", index=False)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "sample_submission.csv").write_text("img,rle_mask\n" + "".join(f"{i},1 1\n" for i in ids))
    cfg = config.load(None, {"data.cache": str(tmp_path / "cache"), "data.raw": str(raw),
                             "data.submissions": str(tmp_path / "subs"), "submit.gzip": "true",
                             "submit.threshold": "0.5", "submit.workers": "1", "submit.name": "mine",
                             "prepare.n_folds": "2", "predict.tta": "hflip", "predict.precision": "fp32",
                             **overrides})
    g = Graph(cfg, prepared=prepared, precision="fp32")
    ckpts = []
    for k in range(2):
        c = g.fold_dir(k) / "best.pt"
        c.parent.mkdir(parents=True)
        c.write_bytes(f"weights {k}".encode())
        ckpts.append(c)
    for src, dst in zip(tmp_dirs, g.predict_dirs()):
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.rename(dst)
    return cfg, g, ckpts


def test_run_writes_csv_and_sidecar(tmp_path, monkeypatch):
    """run(cfg) with the other stages replaced by a fixed plan: CSV, gzip, sidecar contents."""
    cfg, g, ckpts = run_case(tmp_path)
    out = submit.run(cfg, g)
    assert out == tmp_path / "subs" / "mine.csv.gz"
    sub = pd.read_csv(out, keep_default_na=False)
    assert list(sub.rle_mask) == ["1 96", ""]
    side = json.loads((tmp_path / "subs" / "mine.json").read_text())
    assert side["threshold"] == 0.5 and side["threshold_source"] == "config submit.threshold"
    assert side["folds"] == [0, 1] and side["tta"] == ["none", "hflip"] and side["rows"] == 2
    assert [m["checkpoint_sha256_16"] for m in side["models"]] == [graph.file_sha16(c) for c in ckpts]
    assert side["config_hash"] == cache.stable_hash(cfg.to_dict())
    assert side["precision"] == "fp32" and not any(k.startswith("oof_") for k in side)

    # Same inputs: nothing is written. A new threshold, or an edited CSV, writes it again.
    writes = []
    real_write = submit.write_submission
    monkeypatch.setattr(submit, "write_submission", lambda *a, **kw: writes.append(1) or real_write(*a, **kw))
    assert submit.run(cfg, g) == out and writes == []
    cfg.submit.threshold = 0.99
    submit.run(cfg, g)
    assert len(writes) == 1 and json.loads((tmp_path / "subs" / "mine.json").read_text())["threshold"] == 0.99
    submit.run(cfg, g)
    assert len(writes) == 1
    out.write_bytes(b"edited")
    submit.run(cfg, g)
    assert len(writes) == 2 and list(pd.read_csv(out, keep_default_na=False).rle_mask) == ["1 96", ""]


def test_sidecar_records_whether_the_oof_summary_was_complete(tmp_path, capsys):
    cfg, g, _ = run_case(tmp_path, **{"submit.threshold": "-1"})
    summary = g.train_dir / "oof_summary.json"
    cache.write_json(summary, {"best_threshold": 0.5, "complete": False, "folds_missing": [1]})
    out = submit.run(cfg, g)
    side_path = tmp_path / "subs" / "mine.json"
    side = json.loads(side_path.read_text())
    assert side["threshold_source"] == str(summary) and side["threshold"] == 0.5
    assert (side["oof_complete"], side["oof_folds_missing"]) == (False, [1])
    assert "incomplete OOF summary (folds missing [1])" in capsys.readouterr().out
    # The other folds finish, same best threshold: the CSV is cached, the sidecar follows the summary.
    cache.write_json(summary, {"best_threshold": 0.5, "complete": True, "folds_missing": []})
    before = out.read_bytes()
    submit.run(cfg, g)
    side = json.loads(side_path.read_text())
    assert (side["oof_complete"], side["oof_folds_missing"]) == (True, [])
    assert out.read_bytes() == before and side["submission_fingerprint"] == cache.file_fingerprint(out)
    # A threshold from the config: no OOF fields at all.
    cfg.submit.threshold = 0.5
    submit.run(cfg, g)
    side = json.loads(side_path.read_text())
    assert side["threshold_source"] == "config submit.threshold" and not any(k.startswith("oof_") for k in side)
