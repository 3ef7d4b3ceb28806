"""Prepare's validation: one test per kind of bad input. A bad file is reported by name and
reason and left out; every good file still reaches train_index.csv / test_index.csv."""
import io
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import prepare, synth
from pipeline.cache import read_json
from pipeline.config import PipelineError, load

REPO = Path(__file__).resolve().parents[1]
H, W = 64, 96


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    # 2 train cars (32 pairs) fill 2 folds; 1 test car (16 images).
    return synth.generate(tmp_path_factory.mktemp("base") / "raw", train_cars=2, test_cars=1,
                          height=H, width=W, seed=3, workers=1)


@pytest.fixture
def raw(base, tmp_path) -> Path:
    return Path(shutil.copytree(base, tmp_path / "raw"))


def _cfg(raw: Path, **over):
    return load(None, {"data.raw": str(raw), "data.cache": str(raw.parent / "cache"), "prepare.height": H,
                       "prepare.width": W, "prepare.n_folds": 2, "prepare.workers": 1, **over})


def _run(raw: Path, **over):
    res = prepare.execute(_cfg(raw, **over))
    return res, read_json(res.dir / "prepare_report.json")


def _ids(raw: Path, sub: str = "train") -> set[str]:
    return {p.stem for p in (raw / sub).glob("*.jpg")}


def _train_ids(res) -> set[str]:
    return set(pd.read_csv(res.dir / "train_index.csv").id)


def _test_ids(res) -> list[str]:
    return list(pd.read_csv(res.dir / "test_index.csv").id)


def _issue(report: dict, kind: str) -> list[dict]:
    return [i for i in report["issues"] if i["kind"] == kind]


def _one(raw: Path, sub: str = "train") -> str:
    return sorted(_ids(raw, sub))[5]


def _gif(arr: np.ndarray) -> bytes:
    im = Image.fromarray(arr.astype(np.uint8), mode="P")
    im.putpalette([v for i in range(256) for v in (i, i, i)])
    buf = io.BytesIO()
    im.save(buf, format="GIF")
    return buf.getvalue()


def test_clean_set_has_no_problems(raw):
    res, rep = _run(raw)
    assert rep["problems"] == 0 and rep["issues"] == []
    assert _train_ids(res) == _ids(raw)
    assert _test_ids(res) == [s[:-4] for s in pd.read_csv(raw / "sample_submission.csv").img]


@pytest.mark.parametrize("kind,damage", [
    ("truncated", lambda b: b[: len(b) // 2]),
    ("corrupt", lambda b: b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4 + b"\xff\xd9"),
    ("unreadable", lambda b: b""),
])
def test_bad_train_jpeg_left_out(raw, kind, damage):
    i = _one(raw)
    p = raw / "train" / f"{i}.jpg"
    p.write_bytes(damage(p.read_bytes()))
    res, rep = _run(raw)
    [issue] = rep["issues"]
    assert (issue["file"], issue["kind"], issue["level"]) == (f"train/{i}.jpg", kind, "error")
    assert _train_ids(res) == _ids(raw) - {i}
    assert res.stats["left_out"] == 1


@pytest.mark.parametrize("kind,damage", [
    ("truncated", lambda b: b[: len(b) - 40]),
    ("corrupt", lambda b: b"GIF89a" + b"\x00\x07" * 50 + b";"),
])
def test_bad_gif_left_out(raw, kind, damage):
    i = _one(raw)
    p = raw / "train_masks" / f"{i}_mask.gif"
    p.write_bytes(damage(p.read_bytes()))
    res, rep = _run(raw)
    [issue] = rep["issues"]
    assert (issue["file"], issue["kind"]) == (f"train_masks/{i}_mask.gif", kind)
    assert _train_ids(res) == _ids(raw) - {i}


def test_bad_test_jpeg_left_out(raw):
    i = _one(raw, "test")
    p = raw / "test" / f"{i}.jpg"
    p.write_bytes(p.read_bytes()[:300])
    res, rep = _run(raw)
    [issue] = rep["issues"]
    assert (issue["file"], issue["kind"]) == (f"test/{i}.jpg", "truncated")
    assert i not in _test_ids(res) and len(_test_ids(res)) == 15


def test_image_without_mask(raw):
    i = _one(raw)
    (raw / "train_masks" / f"{i}_mask.gif").unlink()
    res, rep = _run(raw)
    [issue] = rep["issues"]
    assert (issue["file"], issue["kind"]) == (f"train/{i}.jpg", "missing_mask")
    assert _train_ids(res) == _ids(raw) - {i}


def test_mask_without_image(raw):
    i = _one(raw)
    (raw / "train" / f"{i}.jpg").unlink()
    res, rep = _run(raw)
    kinds = {(x["file"], x["kind"]) for x in rep["issues"]}
    assert (f"train_masks/{i}_mask.gif", "missing_image") in kinds
    assert _train_ids(res) == _ids(raw)           # every image that exists is kept


def test_size_mismatch(raw):
    i = _one(raw)
    p = raw / "train" / f"{i}.jpg"
    small = cv2.resize(cv2.imread(str(p)), (W // 2, H // 2))
    cv2.imwrite(str(p), small)
    res, rep = _run(raw)
    [issue] = rep["issues"]
    assert issue["kind"] == "size_mismatch" and issue["file"] == f"train/{i}.jpg"
    assert "48x32" in issue["reason"] and "96x64" in issue["reason"]
    assert _train_ids(res) == _ids(raw) - {i}


def test_non_binary_mask_left_out(raw):
    i = _one(raw)
    p = raw / "train_masks" / f"{i}_mask.gif"
    m = np.asarray(Image.open(p)).copy()
    m[:5, :5] = 2
    p.write_bytes(_gif(m))
    res, rep = _run(raw, check_rle=False)
    [issue] = rep["issues"]
    assert (issue["file"], issue["kind"]) == (f"train_masks/{i}_mask.gif", "mask_not_binary")
    assert "[0, 1, 2]" in issue["reason"]
    assert _train_ids(res) == _ids(raw) - {i}


def test_constant_mask_is_not_binary(raw):
    i = _one(raw)
    (raw / "train_masks" / f"{i}_mask.gif").write_bytes(_gif(np.zeros((H, W))))
    res, rep = _run(raw, check_rle=False)
    assert [x["kind"] for x in rep["issues"]] == ["mask_not_binary"]


def test_mask_0_255_accepted_as_0_1(raw):
    i = _one(raw)
    p = raw / "train_masks" / f"{i}_mask.gif"
    m = np.asarray(Image.open(p)).copy()
    p.write_bytes(_gif(m * 255))
    res, rep = _run(raw)                           # RLE check still agrees: values mapped to {0,1}
    assert rep["issues"] == []
    row = pd.read_csv(res.dir / "train_index.csv").set_index("id").loc[i]
    full = prepare.read_mask(res.dir / row.mask_full)
    assert np.array_equal(full, m)
    assert set(np.unique(prepare.read_mask(res.dir / row["mask"]))) <= {0, 1}


@pytest.mark.parametrize("mode,fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG")])
def test_non_rgb_image_converted_and_reported(raw, mode, fmt):
    i = _one(raw)
    p = raw / "train" / f"{i}.jpg"
    rgb = Image.open(p).convert("RGB")
    buf = io.BytesIO()
    rgb.convert(mode).save(buf, format=fmt)
    p.write_bytes(buf.getvalue())
    res, rep = _run(raw)
    conv = _issue(rep, "color_converted")
    assert len(conv) == 1 and conv[0]["file"] == f"train/{i}.jpg" and mode in conv[0]["reason"]
    assert conv[0]["level"] == "warning"
    assert _train_ids(res) == _ids(raw)            # converted, not lost
    row = pd.read_csv(res.dir / "train_index.csv").set_index("id").loc[i]
    out = cv2.imread(str(res.dir / row.image), cv2.IMREAD_UNCHANGED)
    assert out.shape == (H, W, 3)
    # The conversion preserves the picture: close to the original RGB (up to JPEG loss).
    ref = cv2.cvtColor(np.asarray(rgb), cv2.COLOR_RGB2BGR).astype(int)
    assert np.abs(out.astype(int) - ref).mean() < 12


def test_duplicate_id(raw):
    i = _one(raw)
    shutil.copy(raw / "train" / f"{i}.jpg", raw / "train" / f"{i}.jpeg")
    res, rep = _run(raw)
    [issue] = rep["issues"]
    assert (issue["file"], issue["kind"]) == (f"train/{i}.jpeg", "duplicate_id")
    assert _train_ids(res) == _ids(raw)


def test_duplicate_row_in_sample_submission(raw):
    s = (raw / "sample_submission.csv").read_text().splitlines()
    (raw / "sample_submission.csv").write_text("\n".join(s + [s[3]]) + "\n")
    res, rep = _run(raw)
    assert [x["kind"] for x in rep["issues"]] == ["duplicate_id"]
    assert len(_test_ids(res)) == 16


def test_bad_id_names(raw):
    i = _one(raw)
    for a, b in [(f"train/{i}.jpg", "train/NOTHEX000000_01.jpg"),
                 (f"train_masks/{i}_mask.gif", "train_masks/NOTHEX000000_01_mask.gif")]:
        (raw / a).rename(raw / b)
    (raw / "train" / "notes.txt").write_text("x")
    res, rep = _run(raw, check_rle=False)
    got = {(x["file"], x["kind"]) for x in rep["issues"]}
    assert got == {("train/NOTHEX000000_01.jpg", "bad_id"), ("train_masks/NOTHEX000000_01_mask.gif", "bad_id"),
                   ("train/notes.txt", "unexpected_file")}
    assert _train_ids(res) == _ids(raw) - {"NOTHEX000000_01"}


def test_csv_missing_and_extra_columns(raw):
    meta = pd.read_csv(raw / "metadata.csv").drop(columns=["trim2"])
    meta.to_csv(raw / "metadata.csv", index=False)
    sample = pd.read_csv(raw / "sample_submission.csv").assign(extra=1)
    sample.to_csv(raw / "sample_submission.csv", index=False)
    res, rep = _run(raw)
    got = {(x["file"], x["kind"], x["level"]) for x in rep["issues"]}
    assert got == {("metadata.csv", "csv_columns", "error"), ("sample_submission.csv", "csv_columns", "warning")}
    assert "trim2" in _issue(rep, "csv_columns")[0]["reason"] + _issue(rep, "csv_columns")[1]["reason"]
    assert len(_test_ids(res)) == 16


def test_sample_without_img_column_falls_back_to_sorted_files(raw):
    pd.read_csv(raw / "sample_submission.csv").rename(columns={"img": "image"}).to_csv(
        raw / "sample_submission.csv", index=False)
    res, rep = _run(raw)
    assert {x["kind"] for x in rep["issues"]} == {"csv_columns", "no_sample_submission"}
    assert _test_ids(res) == sorted(_ids(raw, "test"))


def test_test_images_vs_sample_submission(raw):
    sample = pd.read_csv(raw / "sample_submission.csv")
    dropped = sample.img[4][:-4]
    sample = sample.drop(index=4)
    ghost = "abcdefabcdef_01.jpg"
    sample = pd.concat([sample, pd.DataFrame({"img": [ghost], "rle_mask": ["1 1"]})])
    sample.to_csv(raw / "sample_submission.csv", index=False)
    res, rep = _run(raw)
    got = {(x["file"], x["kind"]) for x in rep["issues"]}
    assert got == {(f"test/{dropped}.jpg", "not_in_sample"), ("sample_submission.csv", "sample_without_image")}
    assert ghost in _issue(rep, "sample_without_image")[0]["reason"]
    assert _test_ids(res) == [s[:-4] for s in sample.img if s != ghost]   # sample order kept


def test_rle_disagrees_with_gif(raw):
    csv = pd.read_csv(raw / "train_masks.csv")
    i = _one(raw)
    row = csv.img == f"{i}.jpg"
    nums = csv.loc[row, "rle_mask"].iloc[0].split()
    nums[1] = str(int(nums[1]) + 3)
    csv.loc[row, "rle_mask"] = " ".join(nums)
    csv.to_csv(raw / "train_masks.csv", index=False)
    res, rep = _run(raw)
    [issue] = rep["issues"]
    assert (issue["file"], issue["kind"]) == (f"train_masks/{i}_mask.gif", "rle_mismatch")
    assert _train_ids(res) == _ids(raw) - {i}
    res2, rep2 = _run(raw, check_rle=False)           # the check can be switched off
    assert rep2["issues"] == [] and _train_ids(res2) == _ids(raw)


def test_hq_directories(raw):
    (raw / "train").rename(raw / "train_hq")
    (raw / "test").rename(raw / "test_hq")
    res, rep = _run(raw, **{"data.train_dir": "train_hq", "data.test_dir": "test_hq"})
    assert rep["issues"] == [] and len(_train_ids(res)) == 32 and len(_test_ids(res)) == 16
    assert all("/test_hq/" in p for p in pd.read_csv(res.dir / "test_index.csv").path)


def test_missing_raw_dir_is_one_line_error(tmp_path):
    with pytest.raises(PipelineError, match="no such directory"):
        prepare.execute(_cfg(tmp_path / "nowhere"))


def _cli(raw: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline", "prepare", f"data.raw={raw}", f"data.cache={raw.parent / 'cache'}",
           f"prepare.height={H}", f"prepare.width={W}", "n_folds=2", "prepare.workers=1", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_garbage_everywhere_no_traceback_and_strict_exits_nonzero(raw):
    ids = sorted(_ids(raw))
    (raw / "train" / f"{ids[0]}.jpg").write_bytes(b"")
    (raw / "train_masks" / f"{ids[1]}_mask.gif").write_bytes(b"\x00" * 100)
    (raw / "train_masks.csv").write_bytes(b"\x89\xff\x00garbage\n\x00,,,\"\n")
    (raw / "metadata.csv").write_bytes(b"")
    loose = _cli(raw)
    assert loose.returncode == 0, loose.stderr
    assert "Traceback" not in loose.stdout + loose.stderr
    assert "problem(s)" in loose.stdout and f"train/{ids[0]}.jpg" in loose.stdout
    strict = _cli(raw, "strict=true")
    assert strict.returncode == 2
    assert "Traceback" not in strict.stderr
    assert strict.stderr.strip().startswith("error: prepare.strict") and len(strict.stderr.strip().splitlines()) == 1


def test_no_usable_pair_is_one_error_with_a_report(raw):
    shutil.rmtree(raw / "train_masks")
    with pytest.raises(PipelineError, match="no usable train image/mask pair") as e:
        prepare.execute(_cfg(raw))
    report = read_json(Path(str(e.value).rsplit("see ", 1)[1]))
    assert len(_issue(report, "missing_mask")) == 32
