"""Prepare's cache: a rerun does no work, new images are the only work, a new size is a new key,
and a run killed with SIGKILL at any point reruns to exactly the uninterrupted result."""
import os
import shutil
import signal
import time
from pathlib import Path

import cv2
import pandas as pd
import pytest

from pipeline import prepare, synth, testset
from pipeline.cache import is_complete, read_manifest
from pipeline.probmaps import read_mask
from pipeline.config import load
from pipeline.errors import PipelineError
from pipeline.graph import Graph

H, W = 64, 96


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return synth.generate(tmp_path_factory.mktemp("base") / "raw", train_cars=2, test_cars=1,
                          height=H, width=W, seed=5, workers=1)


@pytest.fixture
def raw(base, tmp_path) -> Path:
    return Path(shutil.copytree(base, tmp_path / "raw"))


def _cfg(raw: Path, cache: Path | None = None, **over):
    return load(None, {"data.raw": str(raw), "data.cache": str(cache or raw.parent / "cache"),
                       "prepare.height": H, "prepare.width": W, "prepare.n_folds": 2, "prepare.workers": 1, **over})


def test_second_run_does_no_work(raw, capsys):
    cfg = _cfg(raw)
    first = prepare.execute(cfg)
    assert first.stats["processed"] == 32 and first.stats["reused"] == 0 and not first.stats["cached"]
    manifest = read_manifest(first.dir)
    capsys.readouterr()
    second = prepare.execute(cfg)
    out = capsys.readouterr().out
    assert second.dir == first.dir and second.stats["cached"]
    assert second.stats["processed"] == 0
    assert read_manifest(second.dir) == manifest                # nothing rewritten
    assert out.count("\n") == 1 and "cached" in out and str(first.dir) in out
    assert Graph(cfg).prepare_dir == first.dir == Graph(cfg).prepared_dir


def test_load_before_prepare_says_what_to_do(raw):
    with pytest.raises(PipelineError, match="make prepare"):
        Graph(_cfg(raw)).prepared_dir


def test_run_only_knobs_do_not_change_the_key(raw):
    assert Graph(_cfg(raw)).prepare_dir == Graph(_cfg(raw, **{"prepare.workers": 2,
                                                                           "prepare.chunk_size": 3})).prepare_dir


def test_adding_ten_images_processes_only_those(raw, tmp_path):
    first = prepare.execute(_cfg(raw))
    extra = synth.generate(tmp_path / "extra", train_cars=1, test_cars=0, height=H, width=W, seed=99, workers=1)
    new = sorted(p.stem for p in (extra / "train").glob("*.jpg"))[:10]
    for i in new:
        shutil.copy(extra / "train" / f"{i}.jpg", raw / "train")
        shutil.copy(extra / "train_masks" / f"{i}_mask.gif", raw / "train_masks")
    rows = pd.read_csv(extra / "train_masks.csv")
    rows = rows[rows.img.isin([f"{i}.jpg" for i in new])]
    pd.concat([pd.read_csv(raw / "train_masks.csv"), rows]).to_csv(raw / "train_masks.csv", index=False)
    second = prepare.execute(_cfg(raw))
    assert second.dir != first.dir                              # inputs changed -> new key
    assert (second.stats["processed"], second.stats["reused"]) == (10, 32)
    assert second.stats["problems"] == 0
    idx = pd.read_csv(second.dir / "train_index.csv")
    assert set(new) <= set(idx.id) and len(idx) == 42
    assert is_complete(first.dir)                               # the old artifacts stay


def test_changed_image_is_reprocessed(raw):
    prepare.execute(_cfg(raw))
    i = sorted(p.stem for p in (raw / "train").glob("*.jpg"))[3]
    p = raw / "train" / f"{i}.jpg"
    cv2.imwrite(str(p), 255 - cv2.imread(str(p)))
    res = prepare.execute(_cfg(raw))
    assert (res.stats["processed"], res.stats["reused"]) == (1, 31)


def test_new_size_is_a_new_key_and_old_is_kept(raw):
    a = prepare.execute(_cfg(raw))
    b = prepare.execute(_cfg(raw, **{"prepare.height": 32, "prepare.width": 64}))
    assert b.dir != a.dir and b.stats["processed"] == 32
    idx = pd.read_csv(b.dir / "train_index.csv")
    assert cv2.imread(str(b.dir / idx.image[0])).shape == (32, 64, 3)
    assert read_mask(b.dir / idx["mask"][0]).shape == (32, 64)
    # Full-size masks do not depend on the size: shared by both keys.
    assert list(idx.mask_full) == list(pd.read_csv(a.dir / "train_index.csv").mask_full)
    assert is_complete(a.dir)
    again = prepare.execute(_cfg(raw))                          # back to the old size: cached
    assert again.dir == a.dir and again.stats["cached"]


def test_fold_settings_change_key_but_reuse_images(raw):
    a = prepare.execute(_cfg(raw))
    b = prepare.execute(_cfg(raw, **{"prepare.seed": 7}))
    assert b.dir != a.dir and (b.stats["processed"], b.stats["reused"]) == (0, 32)


def test_stale_temp_files_are_swept(raw):
    a = prepare.execute(_cfg(raw))
    full = a.dir.parent / "files" / "full"
    stale, fresh = full / ".x.png.tmp.old.png", full / ".y.png.tmp.new.png"
    for p in (stale, fresh):
        p.write_bytes(b"partial")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    prepare.execute(_cfg(raw, **{"prepare.seed": 9}))             # a new key: a working run
    assert not stale.exists() and fresh.exists()                  # a fresh one may be in flight


def _snapshot(d: Path) -> dict:
    """Everything other stages read from an artifact dir: the indexes and the bytes of each file."""
    out = {}
    for name in ("train_index.csv", "folds.csv", "test_index.csv", "prepare_report.json"):
        out[name] = (d / name).read_text().replace(str(d.parent.parent.parent), "<root>")
    idx = pd.read_csv(d / "train_index.csv")
    for col in ("image", "mask", "mask_full"):
        for rel in idx[col]:
            out[rel] = (d / rel).read_bytes()
    return out


def test_kill_9_mid_run_then_rerun_is_identical(tmp_path, zygote):
    # Large enough (48 images at 480x720) that one worker needs ~1 s: the kill lands mid-run.
    raw = synth.generate(tmp_path / "raw", train_cars=3, test_cars=1, height=480, width=720, seed=2, workers=1)
    cache = tmp_path / "cache"
    argv = ["prepare", f"data.raw={raw}", f"data.cache={cache}", "prepare.height=224", "prepare.width=320",
            "n_folds=2", "prepare.workers=1"]
    # `python -m pipeline prepare` in a process (and process group) of its own, forked from the
    # session's pre-imported zygote (tests/_stage_runner.py).
    proc = zygote.spawn(argv, session=True)
    files = cache / "prepare" / "files" / "224x320-stretch"

    def final(pattern: str) -> list[Path]:
        # pathlib's glob also matches dot files: leave out temp files (".<name>.tmp.*").
        return [p for p in files.glob(pattern) if not p.name.startswith(".")]

    deadline = time.time() + 60
    while time.time() < deadline and len(final("*.json")) < 3:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(final("*.json"))
    key_dir = Graph(_cfg(raw, cache, **{"prepare.height": 224, "prepare.width": 320})).prepare_dir
    assert 3 <= done < 48 and not is_complete(key_dir), "the kill did not land mid-run"
    # No file under a final name is half-written: every PNG decodes.
    for p in final("*.png") + [p for p in (cache / "prepare" / "files" / "full").glob("*.png")
                               if not p.name.startswith(".")]:
        assert cv2.imread(str(p), cv2.IMREAD_UNCHANGED) is not None, p
    cfg = _cfg(raw, cache, **{"prepare.height": 224, "prepare.width": 320})
    resumed = prepare.execute(cfg)
    assert resumed.stats["reused"] >= done and resumed.stats["processed"] + resumed.stats["reused"] == 48
    clean = prepare.execute(_cfg(raw, tmp_path / "clean", **{"prepare.height": 224, "prepare.width": 320}))
    assert clean.stats["processed"] == 48
    assert _snapshot(resumed.dir) == _snapshot(clean.dir)


def _add_test_images(raw: Path, tmp_path: Path, n: int) -> list[str]:
    """Copy n test images of a new car into raw/test and append them to the sample submission."""
    extra = synth.generate(tmp_path / "extra_test", train_cars=1, test_cars=1, height=H, width=W, seed=77, workers=1)
    new = sorted(p.name for p in (extra / "test").glob("*.jpg"))[:n]
    for name in new:
        shutil.copy(extra / "test" / name, raw / "test")
    sample = pd.read_csv(raw / "sample_submission.csv")
    pd.concat([sample, pd.DataFrame({"img": new, "rle_mask": "1 1"})]).to_csv(raw / "sample_submission.csv",
                                                                             index=False)
    return new


def test_adding_ten_test_images_checks_only_those(raw, tmp_path):
    first = prepare.execute(_cfg(raw))
    assert (first.stats["test_checked"], first.stats["test_reused"]) == (16, 0)
    new = _add_test_images(raw, tmp_path, 10)
    second = prepare.execute(_cfg(raw))
    assert second.dir != first.dir
    assert (second.stats["test_checked"], second.stats["test_reused"]) == (10, 16)
    assert second.stats["test_ok"] == 26 and second.stats["problems"] == 0
    assert set(s[:-4] for s in new) <= set(pd.read_csv(second.dir / "test_index.csv").id)
    # A new size is a new key, but no test file changed: nothing to check.
    third = prepare.execute(_cfg(raw, **{"prepare.height": 32, "prepare.width": 64}))
    assert (third.stats["test_checked"], third.stats["test_reused"]) == (0, 26)
    # A rewritten file has a new fingerprint: only it is checked again.
    p = raw / "test" / new[0]
    p.write_bytes(p.read_bytes() + b"\0")
    fourth = prepare.execute(_cfg(raw))
    assert (fourth.stats["test_checked"], fourth.stats["test_reused"]) == (1, 25)
    assert read_manifest(fourth.dir)["stats"]["test_checked"] == 1


def test_test_check_cache_files_are_merged(raw, tmp_path, monkeypatch):
    monkeypatch.setattr(testset, "TEST_CACHE_FILES", 2)
    prepare.execute(_cfg(raw))                      # 4 chunks of 4 -> 4 files -> merged into one
    d = Path(raw.parent / "cache" / "prepare" / "files" / "test_checks" / prepare.CODE_VERSION)
    assert len([p for p in d.glob("*.json")]) == 1
    again = prepare.execute(_cfg(raw, **{"prepare.seed": 3}))
    assert (again.stats["test_checked"], again.stats["test_reused"]) == (0, 16)
