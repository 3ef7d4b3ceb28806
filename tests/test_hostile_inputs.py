"""Hostile and odd inputs (issue 13): each gets one line naming the file and the problem, and
nothing good is lost.

The rule per case (docs/reliability.md, "Hostile and odd inputs"): a bad *file* is left out with an error
line and every good file is still prepared; a bad *folder or setting* that leaves nothing to
do is refused before anything is written. One test per kind of input; each fails without
the change it pins (or pins behaviour that was already right, where the docstring says so).
"""
import os
import shutil
import struct
import tracemalloc
from pathlib import Path

import pandas as pd
import pytest

from _train_helpers import RAW_H, RAW_W
from pipeline import cli, config, ingest, prepare, submit, validate
from pipeline.cache import read_json
from pipeline.config import load
from pipeline.errors import ConfigError, PipelineError
from pipeline.graph import Graph

H, W = RAW_H, RAW_W     # the shared raw set (conftest: raw_base, raw)


def _over(raw: Path) -> dict:
    return {"data.raw": str(raw), "data.cache": str(raw.parent / "cache"), "prepare.height": H,
            "prepare.width": W, "prepare.n_folds": 2, "prepare.workers": 1}


def _run(raw: Path):
    res = prepare.execute(load(None, _over(raw)))
    return res, read_json(res.dir / "prepare_report.json")


def _ids(raw: Path, sub: str) -> list[str]:
    return sorted(p.stem for p in (raw / sub).glob("*.jpg"))


def _train_ids(res) -> set[str]:
    return set(pd.read_csv(res.dir / "train_index.csv").id)


def _test_ids(res) -> list[str]:
    return list(pd.read_csv(res.dir / "test_index.csv", dtype=str).id)


def _by_file(rep: dict) -> dict[str, dict]:
    return {i["file"]: i for i in rep["issues"]}


def _forged_jpeg(data: bytes, w: int, h: int) -> bytes:
    """``data`` (a real JPEG) with the size in its frame header (SOF0..SOF2) replaced: a few KB
    that ask a decoder for an h x w x 3 buffer."""
    d = bytearray(data)
    i = next(k for k in range(2, len(d) - 9) if d[k] == 0xFF and d[k + 1] in (0xC0, 0xC1, 0xC2))
    d[i + 5:i + 9] = struct.pack(">HH", h, w)       # marker, length (2), precision (1), then H, W
    return bytes(d)


def _forged_gif(data: bytes, w: int, h: int) -> bytes:
    """``data`` (a real GIF) claiming a w x h logical screen (bytes 6..9, little-endian)."""
    return data[:6] + struct.pack("<HH", w, h) + data[10:]


# ---------------------------------------------------------------------------- 1. decompression bombs

def test_decompression_bomb_headers_are_refused_before_decoding(raw, tmp_path, capsys):
    """60000x60000 headers in train/, test/ and train_masks/ are left out as ``too_large`` with
    one line each (PIL used to name them 'corrupt'), the other 61 files are prepared; an
    8000x8000 header, under PIL's own limit, is refused before simplejpeg allocates its 192 MB;
    the submission validator reading sizes from a bomb's header fails with one line, no traceback."""
    tr, te = _ids(raw, "train"), _ids(raw, "test")
    bomb_img, bomb_mask, bomb_test = tr[3], tr[7], te[2]
    p = raw / "train" / f"{bomb_img}.jpg"
    p.write_bytes(_forged_jpeg(p.read_bytes(), 60000, 60000))
    p = raw / "test" / f"{bomb_test}.jpg"
    p.write_bytes(_forged_jpeg(p.read_bytes(), 60000, 60000))
    p = raw / "train_masks" / f"{bomb_mask}_mask.gif"
    p.write_bytes(_forged_gif(p.read_bytes(), 60000, 60000))

    res, rep = _run(raw)
    issues = _by_file(rep)
    files = {f"train/{bomb_img}.jpg", f"test/{bomb_test}.jpg", f"train_masks/{bomb_mask}_mask.gif"}
    assert set(issues) == files
    for f in files:
        i = issues[f]
        assert (i["kind"], i["level"]) == ("too_large", "error"), i
        assert "decompression bomb" in i["reason"] and "\n" not in i["reason"]
    assert all("3,600,000,000 pixels, over the 40,000,000-pixel limit" in issues[f]["reason"] for f in files)
    assert _train_ids(res) == set(tr) - {bomb_img, bomb_mask}
    assert _test_ids(res) == [i for i in te if i != bomb_test]
    assert f"error   train/{bomb_img}.jpg: header claims" in capsys.readouterr().out

    # Under PIL's limit (89 MP warns, 179 MP raises) but over ours: refused at the header.
    small = tmp_path / "8k.jpg"
    small.write_bytes(_forged_jpeg((raw / "train" / f"{tr[0]}.jpg").read_bytes(), 8000, 8000))
    tracemalloc.start()
    try:
        with pytest.raises(ingest.BadFile, match="8000x8000 = 64,000,000 pixels") as e:
            ingest.decode_image(small)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.kind == "too_large"
    assert peak < 20e6, f"{peak / 1e6:.0f} MB allocated for a refused header"
    # A file far too big to be a photo is refused by its size, never read (sparse: no disk used).
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as f:
        f.truncate(ingest.MAX_FILE_BYTES + 1)
    with pytest.raises(ingest.BadFile, match=r"file is 268,435,457 bytes, over the 268,435,456-byte limit"):
        ingest.check_test_image(huge)

    # The validator's --images mode reads each test image's header for its size.
    sample = tmp_path / "sample_submission.csv"
    sample.write_text(f"img,rle_mask\n{bomb_test}.jpg,\n")
    sub = tmp_path / "sub.csv"
    sub.write_text(f"img,rle_mask\n{bomb_test}.jpg,1 1\n")
    assert validate.main([str(sub), "--sample", str(sample), "--images", str(raw / "test")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {raw / 'test' / bomb_test}.jpg: cannot read image size") and "\n" not in err


# ---------------------------------------------------------------------------- 2. symbolic link loops

def test_symlink_loops_are_named_and_good_files_kept(raw):
    """A file link loop in train/ (two links naming each other) and a folder link into its own
    folder (train_masks/loop -> .) are skipped with one line each: the file loop already was
    (now named 'symbolic link loop'), the listing never recurses. A test/ folder that is a link
    loop used to crash prepare with RuntimeError; now it is one error line, the train side is
    prepared and test_index.csv is empty (submit then refuses). A loop where train/ or data.raw
    should be is refused before anything is written."""
    good = set(_ids(raw, "train"))
    a, b = raw / "train" / "0123456789ab_01.jpg", raw / "train" / "0123456789ab_02.jpg"
    os.symlink(b, a)
    os.symlink(a, b)
    os.symlink(raw / "train_masks", raw / "train_masks" / "loop")
    shutil.rmtree(raw / "test")
    os.symlink(raw / "test", raw / "test")

    res, rep = _run(raw)
    issues = _by_file(rep)
    for f in ("train/0123456789ab_01.jpg", "train/0123456789ab_02.jpg"):
        assert issues[f]["kind"] == "unreadable" and issues[f]["reason"].startswith("symbolic link loop")
    assert issues["train_masks/loop"]["reason"].startswith("symbolic link to a directory")
    assert (issues["test/"]["kind"], issues["test/"]["reason"]) == ("unreadable", "symbolic link loop; folder not read")
    assert sum(i["kind"] == "no_test_images" for i in rep["issues"]) == 1
    assert _train_ids(res) == good and len(good) == 32
    assert _test_ids(res) == []

    cache = raw.parent / "cache"
    shutil.rmtree(cache)
    train = raw.parent / "train_moved"
    (raw / "train").rename(train)
    os.symlink(raw / "train", raw / "train")
    with pytest.raises(PipelineError, match=r"train: no train images \(symbolic link loop; folder not read\)"):
        prepare.execute(load(None, _over(raw)))
    loop = raw.parent / "rawloop"
    os.symlink(loop, loop)
    with pytest.raises(PipelineError, match=r"data.raw=.*rawloop: a symbolic link loop"):
        prepare.execute(load(None, _over(loop)))
    assert not (cache / "prepare").exists() or not any((cache / "prepare").glob("*/manifest.json"))


# ---------------------------------------------------------------------------- 3. odd file names

def test_non_utf8_space_and_newline_names_are_shown_escaped(raw_base, tmp_path, capsys):
    """Through the command line (console and stage log): a name with bytes that are not UTF-8
    used to crash after the work was done (a strict console or the UTF-8 stage log cannot
    write lone surrogates); a name ending in a newline used to pass the id check ('$' matches
    before it) and print as two lines. Now both are bad_id lines with \\x escapes; a name with
    a space is a plain bad_id; a raw folder whose path has a space works; every good pair is kept."""
    raw = Path(shutil.copytree(raw_base, tmp_path / "my data" / "raw"))
    good = (raw / "train" / f"{_ids(raw, 'train')[0]}.jpg").read_bytes()
    with open(os.fsencode(raw / "train") + b"/\xff\xfe_01.jpg", "wb") as f:
        f.write(good)
    (raw / "train" / "with space_01.jpg").write_bytes(good)
    (raw / "train" / "0123456789ab_01\n.jpg").write_bytes(good)

    args = [f"{k}={v}" for k, v in _over(raw).items()]
    assert cli.main(["prepare", *args]) == 0
    out = capsys.readouterr().out
    out_dir = Graph(load(None, _over(raw))).prepare_dir
    rep = read_json(out_dir / "prepare_report.json")
    issues = _by_file(rep)
    assert set(issues) == {"train/\\xff\\xfe_01.jpg", "train/with space_01.jpg", "train/0123456789ab_01\\n.jpg"}
    assert all(i["kind"] == "bad_id" for i in issues.values())
    assert "error   train/\\xff\\xfe_01.jpg: id '\\xff\\xfe_01' does not match" in out
    assert "error   train/0123456789ab_01\\n.jpg: id '0123456789ab_01\\n' does not match" in out
    log = (out_dir / "prepare.log").read_bytes().decode("utf-8")        # strict: valid UTF-8
    assert "train/\\xff\\xfe_01.jpg" in log
    assert len(pd.read_csv(out_dir / "train_index.csv")) == 32


# ---------------------------------------------------------------------------- 4. BOM and CRLF

def test_csvs_with_bom_and_crlf_just_work(raw, tmp_path):
    """train_masks.csv, metadata.csv and sample_submission.csv as Excel saves them (UTF-8 BOM,
    CRLF): prepare already read them (pandas), RLE check included; the submission validator's
    sample reader took '\\ufeffimg' for the header and refused ('first column must be img')."""
    for name in ("train_masks.csv", "metadata.csv", "sample_submission.csv"):
        p = raw / name
        p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    res, rep = _run(raw)
    assert rep["problems"] == 0 and rep["checks"]["rle"] is True
    assert len(_train_ids(res)) == 32
    sample_ids = [s[:-4] for s in pd.read_csv(raw / "sample_submission.csv").img]
    assert _test_ids(res) == sample_ids

    ids = validate.read_ids(raw / "sample_submission.csv")
    assert ids == [f"{i}.jpg" for i in sample_ids]
    sub = tmp_path / "sub.csv"
    sub.write_bytes(b"\xef\xbb\xbfimg,rle_mask\r\n" + b"".join(f"{i},1 5 9 2\r\n".encode() for i in ids))
    rep = validate.check_submission(sub, ids, validate.sizes_from((H, W)))
    assert rep.ok, rep.summary()


# ---------------------------------------------------------------------------- 5. empty test/

def test_empty_test_folder_prepares_train_and_submit_refuses(raw, tmp_path):
    """Pinned (already so): an empty test/ is one warning naming the folder; the train side is
    prepared in full (training needs no test set) and test_index.csv is empty. Submit, which
    needs a row per sample_submission.csv image, refuses before writing any file."""
    for p in (raw / "test").iterdir():
        p.unlink()
    res, rep = _run(raw)
    assert [(i["file"], i["kind"], i["level"]) for i in rep["issues"]] == [("test/", "no_test_images", "warning")]
    assert len(_train_ids(res)) == 32 and _test_ids(res) == []
    index = pd.read_csv(res.dir / "test_index.csv")
    sample_ids = validate.read_ids(raw / "sample_submission.csv")
    out = tmp_path / "subs" / "s.csv"
    with pytest.raises(PipelineError, match=r"test index ids do not match sample_submission.csv \(0 vs 16 rows"):
        submit.write_submission(index, [], out, 0.5, sample_ids, workers=1)
    assert not out.parent.exists() or not any(out.parent.iterdir())


# ---------------------------------------------------------------------------- 6. extra columns

def test_sample_submission_with_extra_columns(raw):
    """Extra columns before and after img/rle_mask: prepare warns once naming them and keeps the
    sample's order (already so); the validator's sample reader finds 'img' by name (it used to
    require it first and refused)."""
    p = raw / "sample_submission.csv"
    df = pd.read_csv(p, dtype=str, keep_default_na=False)
    df.insert(0, "Id", range(len(df)))
    df["Usage"] = "Public"
    df.to_csv(p, index=False)
    res, rep = _run(raw)
    assert [(i["file"], i["kind"], i["level"], i["reason"]) for i in rep["issues"]] == [
        ("sample_submission.csv", "csv_columns", "warning", "extra column(s) ['Id', 'Usage'] ignored")]
    assert _test_ids(res) == [s[:-4] for s in df.img]
    assert validate.read_ids(p) == list(df.img)


# ---------------------------------------------------------------------------- 7. config YAML

def test_config_yaml_list_tab_and_bytes_are_one_line_errors(tmp_path):
    """A YAML whose top level is a list, one indented with a tab and one that is not UTF-8: a
    ConfigError on one line naming the file and line (PyYAML's tab message spanned four lines;
    non-UTF-8 bytes raised UnicodeDecodeError, a traceback)."""
    cases = {"list.yaml": (b"- train\n- epochs: 3\n", r"list\.yaml:1: the top level must be a mapping.*got a list"),
             "tab.yaml": (b"train:\n\tepochs: 3\n", r"tab\.yaml:2:1: not valid YAML: a tab character; YAML indents "
                                                    r"with spaces only"),
             "bytes.yaml": (b"train:\n  arch: Unet\xff\n", r"bytes\.yaml:2: not UTF-8 text \(byte 0xff\)")}
    for name, (body, pattern) in cases.items():
        f = tmp_path / name
        f.write_bytes(body)
        with pytest.raises(ConfigError, match=pattern) as e:
            config.load(f)
        assert "\n" not in str(e.value), str(e.value)
    f = tmp_path / "ok.yaml"
    f.write_text("train:\n  epochs: 3\n")               # the same file with spaces loads
    assert config.load(f).train.epochs == 3


# ---------------------------------------------------------------------------- 8. data.cache elsewhere

def test_data_cache_outside_the_project_is_allowed_with_a_note(tmp_path, capsys):
    """The rule: data.cache may be anywhere (another disk is a good reason); a new one outside the
    project gets one stderr line, since `make clean-cache` removes it only given the same settings (once: when it
    exists, the commands after stay quiet). A cache inside data.raw (or equal to it) is refused:
    stage outputs would be written into the input data."""
    elsewhere = tmp_path / "other disk" / "cache"
    cfg = config.load(None, [f"data.cache={elsewhere}", f"data.raw={tmp_path / 'raw'}"])
    assert cfg.data.cache == str(elsewhere)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"data.cache={elsewhere} is outside the project" in err[0] and "clean-cache" in err[0]
    elsewhere.mkdir(parents=True)                      # what the first stage does
    config.load(None, [f"data.cache={elsewhere}", f"data.raw={tmp_path / 'raw'}"])
    assert capsys.readouterr().err == ""

    config.load(None, [f"data.cache={config.PROJECT / 'data' / 'new-cache'}"])      # inside: quiet
    assert capsys.readouterr().err == ""

    for cache in (tmp_path / "raw", tmp_path / "raw" / "cache"):
        with pytest.raises(ConfigError, match=r"data.cache=.* is inside data.raw=.*: stage outputs would be "
                                              r"written into the input data"):
            config.load(None, [f"data.cache={cache}", f"data.raw={tmp_path / 'raw'}"])
