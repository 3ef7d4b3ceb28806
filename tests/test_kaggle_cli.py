"""make download / make kaggle-submit without the network: real zips in Kaggle's shape, a fake runner.

What cannot run here is the kaggle CLI's own HTTP calls; everything around them does: the
command line, credentials, unpacking into the layout prepare reads, skipping, re-unpacking,
validation before submitting, the default message.
"""
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pipeline import config, kaggle_cli, prepare, synth
from pipeline.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]
CREDS = {"KAGGLE_USERNAME": "someone", "KAGGLE_KEY": "0" * 32}


@pytest.fixture(scope="module")
def kaggle_files(tmp_path_factory):
    """The synthetic set, and its competition archives as Kaggle ships them (train.zip holds train/*.jpg...)."""
    root = tmp_path_factory.mktemp("kaggle")
    src = root / "src"
    synth.generate(src, train_cars=2, test_cars=1, height=64, width=96, seed=3, workers=1)
    zips = root / "zips"
    zips.mkdir()
    for archive, kind in kaggle_cli.ARCHIVES.items():
        if archive in kaggle_cli.HQ_FILES:
            continue
        with zipfile.ZipFile(zips / archive, "w", zipfile.ZIP_DEFLATED) as zf:
            if kind[0] == "dir":
                zf.writestr(f"{kind[1]}/", b"")                      # the folder entry
                for f in sorted((src / kind[1]).iterdir()):
                    zf.write(f, f"{kind[1]}/{f.name}")
                zf.writestr(f"__MACOSX/{kind[1]}/._junk{kind[2]}", b"resource fork")
            else:
                zf.write(src / kind[1], kind[1])
    return src, zips


class FakeKaggle:
    """Stands in for the kaggle CLI: checks the command line, 'downloads' by copying a zip."""

    def __init__(self, zips: Path, rc: int = 0, output: str = "ok"):
        self.zips, self.rc, self.output, self.calls = zips, rc, output, []

    def __call__(self, cmd: list[str]) -> tuple[int, str]:
        self.calls.append(cmd)
        if cmd[:3] == ["kaggle", "competitions", "download"] and self.rc == 0:
            assert cmd[3:5] == ["-c", "carvana-image-masking-challenge"]
            name, dest = cmd[cmd.index("-f") + 1], Path(cmd[cmd.index("-p") + 1])
            shutil.copy(self.zips / name, dest / name)
        return self.rc, self.output


def _same_tree(a: Path, b: Path, rels: list[str]) -> None:
    for rel in rels:
        fa, fb = a / rel, b / rel
        if fa.is_dir():
            assert sorted(p.name for p in fa.iterdir()) == sorted(p.name for p in fb.iterdir()), rel
            for p in fa.iterdir():
                assert p.read_bytes() == (fb / p.name).read_bytes(), p
        else:
            assert fa.read_bytes() == fb.read_bytes(), rel


LAYOUT = ["train", "train_masks", "test", "train_masks.csv", "metadata.csv", "sample_submission.csv"]


def test_download_unpacks_the_kaggle_layout_then_skips(kaggle_files, tmp_path):
    src, zips = kaggle_files
    raw = tmp_path / "raw"
    fake = FakeKaggle(zips)
    files = kaggle_cli.choose_files()
    kaggle_cli.download(raw, files, runner=fake, env=CREDS)
    assert [c[c.index("-f") + 1] for c in fake.calls] == list(kaggle_cli.DEFAULT_FILES)
    assert fake.calls[0] == ["kaggle", "competitions", "download", "-c", "carvana-image-masking-challenge",
                             "-f", "train.zip", "-p", str(raw / ".kaggle")]
    _same_tree(src, raw, LAYOUT)
    assert not list(raw.glob("train/._*")) and not (raw / "__MACOSX").exists()
    # prepare reads it as it reads the original folder
    cfg = config.load(None, {"data.raw": str(raw), "data.cache": str(tmp_path / "cache"), "prepare.height": 64,
                             "prepare.width": 96, "prepare.n_folds": 2, "prepare.workers": 1})
    out = prepare.run(cfg)
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    assert stats["train_ok"] == 32 and stats["problems"] == 0

    fake.calls.clear()
    res = kaggle_cli.download(raw, files, runner=fake, env={})      # complete: no credentials needed
    assert fake.calls == [] and set(res.values()) == {"complete, skipped"}


def test_incomplete_archive_is_unpacked_again_from_the_kept_zip(kaggle_files, tmp_path):
    src, zips = kaggle_files
    raw = tmp_path / "raw"
    fake = FakeKaggle(zips)
    kaggle_cli.download(raw, ["train.zip", "metadata.csv.zip"], runner=fake, env=CREDS)
    victims = sorted((raw / "train").iterdir())[:2]
    victims[0].unlink()
    victims[1].write_bytes(victims[1].read_bytes()[:100])     # a truncated file
    fake.calls.clear()
    res = kaggle_cli.download(raw, ["train.zip", "metadata.csv.zip"], runner=fake, env=CREDS)
    assert fake.calls == []
    assert res["train.zip"] == "unpacked from the kept zip, 2 files written"
    assert res["metadata.csv.zip"] == "complete, skipped"
    _same_tree(src, raw, ["train", "metadata.csv"])
    # without the zip (deleted after unpacking) an incomplete archive is downloaded again
    (raw / ".kaggle" / "train.zip").unlink()
    victims[0].unlink()
    kaggle_cli.download(raw, ["train.zip"], runner=fake, env=CREDS)
    assert [c[c.index("-f") + 1] for c in fake.calls] == ["train.zip"]
    _same_tree(src, raw, ["train"])


def test_no_credentials_one_clear_line(tmp_path, monkeypatch):
    for k in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(PipelineError) as e:
        kaggle_cli.download(tmp_path / "raw", ["train.zip"], runner=FakeKaggle(tmp_path))
    assert "kaggle.json" in str(e.value) and "KAGGLE_USERNAME" in str(e.value) and "\n" not in str(e.value)
    proc = subprocess.run([sys.executable, "scripts/kaggle_cli.py", "download", f"data.raw={tmp_path / 'raw'}"],
                          cwd=REPO, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin",
                                                                         "HOME": str(tmp_path / "home")})
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "~/.kaggle/kaggle.json" in proc.stderr, proc.stderr
    # a kaggle.json (or the variables) is enough to go on
    (tmp_path / "home" / ".kaggle").mkdir(parents=True)
    (tmp_path / "home" / ".kaggle" / "kaggle.json").write_text('{"username": "u", "key": "k"}')
    assert kaggle_cli.credentials() == str(tmp_path / "home" / ".kaggle" / "kaggle.json")


def test_failed_download_names_kaggles_message(kaggle_files, tmp_path):
    fake = FakeKaggle(kaggle_files[1], rc=1, output="Downloading...\nHTTPSConnectionPool(host='api.kaggle.com'): "
                                                    "Failed to resolve 'api.kaggle.com'\n")
    with pytest.raises(PipelineError, match="kaggle download of test.zip failed: HTTPSConnectionPool.*resolve"):
        kaggle_cli.download(tmp_path / "raw", ["test.zip"], runner=fake, env=CREDS)
    with pytest.raises(PipelineError, match="unknown Kaggle file.*train.tar"):
        kaggle_cli.choose_files("train.zip,train.tar")
    assert kaggle_cli.choose_files(hq=True)[-2:] == ["train_hq.zip", "test_hq.zip"]


def _submission(src: Path, subs: Path, order=None) -> Path:
    ids = [ln.split(",")[0] for ln in (src / "sample_submission.csv").read_text().splitlines()[1:]]
    if order:
        ids = order(ids)
    sub = subs / "demo.csv"
    subs.mkdir(exist_ok=True)
    sub.write_text("img,rle_mask\n" + "".join(f"{i},1 10\n" for i in ids))
    return sub


def test_submit_validates_then_submits_with_the_sidecar_message(kaggle_files, tmp_path):
    src, _ = kaggle_files
    sub = _submission(src, tmp_path / "subs")
    run = tmp_path / "cache" / "train" / "abc"
    (run / "fold0").mkdir(parents=True)
    (run / "oof_summary.json").write_text(json.dumps({"dice": 0.98765, "dice_at_best": 0.99012, "images": 400,
                                                      "best_threshold": 0.57, "complete": True}))
    (tmp_path / "subs" / "demo.json").write_text(json.dumps({
        "config_hash": "c0ffee123456", "threshold": 0.57, "threshold_source": str(run / "oof_summary.json"),
        "folds": [0, 1], "tta": ["none", "hflip"], "models": [{"fold": 0, "checkpoint": str(run / "fold0/best.pt")}]}))
    fake = FakeKaggle(tmp_path)
    cmd = kaggle_cli.submit(sub, src, runner=fake, env=CREDS)
    assert fake.calls == [cmd]
    msg = cmd[cmd.index("-m") + 1]
    assert cmd[:7] == ["kaggle", "competitions", "submit", "-c", "carvana-image-masking-challenge", "-f", str(sub)]
    for part in ("config c0ffee123456", "OOF Dice 0.9877", "0.9901", "threshold 0.57", "folds 0,1"):
        assert part in msg, (part, msg)
    cmd = kaggle_cli.submit(sub, src, "my own words", runner=fake, env=CREDS)
    assert cmd[-1] == "my own words"


def test_invalid_submission_is_not_submitted(kaggle_files, tmp_path):
    src, _ = kaggle_files
    sub = _submission(src, tmp_path / "subs", order=lambda ids: ids[::-1])
    fake = FakeKaggle(tmp_path)
    with pytest.raises(PipelineError, match="not a valid submission"):
        kaggle_cli.submit(sub, src, runner=fake, env=CREDS)
    assert fake.calls == []
