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

from _train_helpers import RAW_H, RAW_W
from pipeline import prepare
from pipeline.cache import read_json
from pipeline.probmaps import read_mask
from pipeline.config import load
from pipeline.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]
H, W = RAW_H, RAW_W     # the shared raw set (conftest: raw_base, raw)


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


def test_mask_0_255_accepted_as_0_1_and_reported(raw, capsys):
    i = _one(raw)
    p = raw / "train_masks" / f"{i}_mask.gif"
    m = np.asarray(Image.open(p)).copy()
    im = Image.fromarray((m * 255).astype(np.uint8), mode="P")
    im.putpalette([v for i in range(256) for v in (i, i, i)])
    im.save(p, format="GIF", optimize=False)       # optimize would remap the indices to {0, 1}
    assert set(np.unique(np.asarray(Image.open(p)))) == {0, 255}   # the file really holds 0/255
    res, rep = _run(raw)                           # RLE check still agrees: values mapped to {0,1}
    # A lossless conversion, not a problem (strict ignores it), but reported: as docs/reliability.md says.
    assert rep["issues"] == []
    assert rep["counts"]["masks_0_255"] == 1 and rep["converted"] == {"masks_0_255": [f"train_masks/{i}_mask.gif"]}
    assert read_json(res.dir / "manifest.json")["stats"]["masks_0_255"] == 1
    assert "note    1 mask GIF(s) stored as 0/255 were read as 0/1" in capsys.readouterr().out
    row = pd.read_csv(res.dir / "train_index.csv").set_index("id").loc[i]
    full = read_mask(res.dir / row.mask_full)
    assert np.array_equal(full, m)
    assert set(np.unique(read_mask(res.dir / row["mask"]))) <= {0, 1}


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


# ---------------------------------------------------------------------------- audit: JPEG data, names, counts

def _entropy_span(data: bytes) -> tuple[int, int]:
    """(start, end) of a baseline JPEG's entropy-coded data: after the SOS header, up to FFD9."""
    sos = data.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big"), data.rindex(b"\xff\xd9")


def _zero_middle(data: bytes, n: int = 64) -> bytes:
    a, b = _entropy_span(data)
    mid = (a + b - n) // 2
    return data[:mid] + bytes(n) + data[mid + n:]


def test_corrupt_data_mid_stream_train_jpeg_left_out(raw):
    i = _one(raw)
    p = raw / "train" / f"{i}.jpg"
    p.write_bytes(_zero_middle(p.read_bytes()))
    # What made it slip through: cv2 decodes it (and fills the damage with grey).
    assert cv2.imread(str(p)) is not None
    res, rep = _run(raw)
    [issue] = rep["issues"]
    assert (issue["file"], issue["kind"], issue["level"]) == (f"train/{i}.jpg", "corrupt", "error")
    assert "Corrupt JPEG data" in issue["reason"]              # libjpeg's own message
    assert _train_ids(res) == _ids(raw) - {i} and res.stats["left_out"] == 1


def _garbage_data(data: bytes) -> bytes:
    """The same header and end marker around random entropy-coded bytes (no markers inside)."""
    a, b = _entropy_span(data)
    junk = np.random.default_rng(0).integers(0, 255, b - a, dtype=np.uint8).tobytes().replace(b"\xff", b"\x00")
    return data[:a] + junk + data[b:]


def test_test_jpeg_with_garbage_data_left_out_and_named(raw):
    i = _one(raw, "test")
    p = raw / "test" / f"{i}.jpg"
    p.write_bytes(_garbage_data(p.read_bytes()))
    assert cv2.imread(str(p)) is not None                      # predict would not notice either
    res, rep = _run(raw)
    [issue] = rep["issues"]
    assert (issue["file"], issue["kind"], issue["level"]) == (f"test/{i}.jpg", "corrupt", "error")
    assert "libjpeg" in issue["reason"]
    assert i not in _test_ids(res) and len(_test_ids(res)) == 15
    assert res.stats["test_checked"] == 16


def test_exif_orientation_is_ignored_stored_pixels_kept(raw):
    i = _one(raw)
    p = raw / "train" / f"{i}.jpg"
    stored = Image.open(p).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6                                           # Orientation: rotate 90 CW to display
    stored.save(p, format="JPEG", quality=95, exif=exif.tobytes())
    assert cv2.imread(str(p)).shape == (W, H, 3)               # cv2's default applies the rotation
    res, rep = _run(raw)
    assert rep["issues"] == []
    assert _train_ids(res) == _ids(raw)
    row = pd.read_csv(res.dir / "train_index.csv").set_index("id").loc[i]
    assert (row.orig_height, row.orig_width) == (H, W)
    out = cv2.imread(str(res.dir / row.image))[..., ::-1].astype(int)
    assert np.abs(out - np.asarray(Image.open(p).convert("RGB")).astype(int)).mean() < 1   # unrotated pixels
    from pipeline.data import read_image                      # predict reads the same pixels
    assert read_image(str(p)).shape == (H, W, 3)


@pytest.mark.parametrize("sub", ["train", "test"])
def test_bytes_after_the_end_marker_are_accepted(raw, sub):
    i = _one(raw, sub)
    p = raw / sub / f"{i}.jpg"
    p.write_bytes(p.read_bytes() + b"TRAILER " * 250)         # 2 KB after FFD9
    res, rep = _run(raw)
    assert rep["issues"] == []
    assert i in (_train_ids(res) if sub == "train" else set(_test_ids(res)))


@pytest.mark.parametrize("sub", ["train", "test"])
def test_truncated_jpeg_still_caught(raw, sub):
    i = _one(raw, sub)
    p = raw / sub / f"{i}.jpg"
    p.write_bytes(p.read_bytes()[:-2])                          # every data byte, only FFD9 missing
    res, rep = _run(raw)
    [issue] = rep["issues"]
    assert (issue["file"], issue["kind"]) == (f"{sub}/{i}.jpg", "truncated")
    assert i not in (_train_ids(res) if sub == "train" else set(_test_ids(res)))


@pytest.mark.parametrize("bad_rle,why", [("abc def", "non-negative integers"), ("1 2 3", "odd count")])
def test_malformed_rle_row_is_reported_and_the_gif_used(raw, bad_rle, why):
    csv = pd.read_csv(raw / "train_masks.csv")
    i = _one(raw)
    csv.loc[csv.img == f"{i}.jpg", "rle_mask"] = bad_rle
    csv.to_csv(raw / "train_masks.csv", index=False)
    res, rep = _run(raw)
    [issue] = rep["issues"]
    assert (issue["file"], issue["kind"], issue["level"]) == ("train_masks.csv", "rle_malformed", "warning")
    assert i in issue["reason"] and why in issue["reason"]
    assert _train_ids(res) == _ids(raw)                         # the pair is kept, with its GIF
    row = pd.read_csv(res.dir / "train_index.csv").set_index("id").loc[i]
    gif = np.asarray(Image.open(raw / "train_masks" / f"{i}_mask.gif"))
    assert np.array_equal(read_mask(res.dir / row.mask_full), gif)


def test_malformed_rle_no_traceback_from_the_cli(raw):
    csv = pd.read_csv(raw / "train_masks.csv")
    csv.loc[0, "rle_mask"] = "abc def"
    csv.to_csv(raw / "train_masks.csv", index=False)
    out = _cli(raw)
    assert out.returncode == 0 and "Traceback" not in out.stdout + out.stderr
    assert "rle_malformed 1" in out.stdout


def test_workers_zero_is_a_config_error(raw):
    from pipeline.errors import ConfigError
    with pytest.raises(ConfigError, match=r"prepare.workers=0: use -1 for all cores or a positive count"):
        prepare.execute(_cfg(raw, **{"prepare.workers": 0}))
    out = _cli(raw, "prepare.workers=0")
    assert out.returncode == 2 and "Traceback" not in out.stderr and "prepare.workers=0" in out.stderr


def test_entries_that_are_not_files_are_reported(raw):
    ids = _ids(raw)
    (raw / "train" / "abcdefabcdef_01.jpg").mkdir()
    (raw / "train" / "abcdefabcdef_02.jpg").symlink_to(raw / "nowhere.jpg")
    (raw / "train_masks" / "abcdefabcdef_03_mask.gif").symlink_to(raw / "nowhere.gif")
    (raw / "test" / "abcdefabcdef_04.jpg").symlink_to(raw / "nowhere.jpg")
    res, rep = _run(raw)
    got = {(x["file"], x["kind"], x["level"]) for x in rep["issues"]}
    assert got == {("train/abcdefabcdef_01.jpg", "unreadable", "error"),
                   ("train/abcdefabcdef_02.jpg", "unreadable", "error"),
                   ("train_masks/abcdefabcdef_03_mask.gif", "unreadable", "error"),
                   ("test/abcdefabcdef_04.jpg", "unreadable", "error")}
    reasons = {x["file"]: x["reason"] for x in rep["issues"]}
    assert "directory" in reasons["train/abcdefabcdef_01.jpg"]
    assert "broken symbolic link" in reasons["train/abcdefabcdef_02.jpg"]
    assert _train_ids(res) == ids and len(_test_ids(res)) == 16
    assert res.stats["left_out"] == 3                            # three unusable train-side entries
    # The entries are inputs: removing them is a new key whose report is clean again.
    (raw / "train" / "abcdefabcdef_02.jpg").unlink()
    (raw / "train_masks" / "abcdefabcdef_03_mask.gif").unlink()
    (raw / "test" / "abcdefabcdef_04.jpg").unlink()
    (raw / "train" / "abcdefabcdef_01.jpg").rmdir()
    res2, rep2 = _run(raw)
    assert res2.dir != res.dir and rep2["issues"] == []


def test_id_in_train_and_test_is_a_leakage_warning(raw):
    i = _one(raw)
    shutil.copy(raw / "train" / f"{i}.jpg", raw / "test" / f"{i}.jpg")
    sample = pd.read_csv(raw / "sample_submission.csv")
    pd.concat([sample, pd.DataFrame({"img": [f"{i}.jpg"], "rle_mask": ["1 1"]})]).to_csv(
        raw / "sample_submission.csv", index=False)
    res, rep = _run(raw)
    [issue] = rep["issues"]
    assert (issue["file"], issue["kind"], issue["level"]) == (f"test/{i}.jpg", "train_test_overlap", "warning")
    assert f"train/{i}.jpg" in issue["reason"]
    assert i in _train_ids(res) and i in _test_ids(res)         # a warning: nothing is left out


def test_left_out_counts_pairs_not_errors(raw):
    ids = sorted(_ids(raw))
    # Pair 1: a bad id on both the image and its mask (two errors, one pair).
    (raw / "train" / f"{ids[0]}.jpg").rename(raw / "train" / "NOTHEX000000_01.jpg")
    (raw / "train_masks" / f"{ids[0]}_mask.gif").rename(raw / "train_masks" / "NOTHEX000000_01_mask.gif")
    # Pair 2: an empty image. Pair 3: a mask without its image.
    (raw / "train" / f"{ids[1]}.jpg").write_bytes(b"")
    (raw / "train" / f"{ids[2]}.jpg").unlink()
    # Not a pair left out: a duplicate .jpeg next to a kept .jpg.
    shutil.copy(raw / "train" / f"{ids[3]}.jpg", raw / "train" / f"{ids[3]}.jpeg")
    res, rep = _run(raw, check_rle=False)
    assert rep["by_level"]["error"] == 5
    assert res.stats["left_out"] == 3 == rep["counts"]["train_left_out"]
    assert len(_train_ids(res)) == 32 - 3
