"""Kaggle's own CLI for the data and for submitting (``make download``, ``make kaggle-submit``).

Download: each chosen competition archive is fetched with the official ``kaggle`` package
(``kaggle competitions download -c carvana-image-masking-challenge -f <archive> -p
<raw>/.kaggle``) and unpacked into the layout ``make prepare`` reads (:data:`ARCHIVES`):
``train.zip`` -> ``<raw>/train/*.jpg``, ``train_masks.zip`` -> ``<raw>/train_masks/*.gif``,
``train_masks.csv.zip`` -> ``<raw>/train_masks.csv``, ... Members are placed by their base
name whatever folders Kaggle nests them in (``train/``, ``__MACOSX/`` dropped), each written
to a temporary name and renamed. After an archive is complete its record
``<raw>/.kaggle/<archive>.done.json`` lists every file and size; an archive whose files
are all there at those sizes is skipped (no download), one that is not is unpacked again
from the kept zip, or downloaded when the zip is gone or unreadable. The HQ archives
(``train_hq.zip``, ``test_hq.zip``, 40 GB) only when asked (``--hq`` or ``--files``).
`make download` then runs prepare's checks on the result (``make prepare``).

Submit: the file is validated first (``pipeline.validate``: header, ids and order against
the sample, every RLE within its image); then ``kaggle competitions submit -c ... -f FILE
-m MESSAGE``. The default message carries the sidecar's config hash, OOF Dice, threshold
and folds.

The ``kaggle`` package runs as a subprocess, never imported: it authenticates (and exits)
at import. Credentials are checked first, so a missing token is one clear line, not
Kaggle's page of advice; a failed download or submit (no network, rules not accepted)
is one line with Kaggle's last message.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

from . import cache
from .errors import PipelineError

COMPETITION = "carvana-image-masking-challenge"
# archive -> ("dir", folder, member suffix) | ("file", file name)
ARCHIVES = {
    "train.zip": ("dir", "train", ".jpg"),
    "train_masks.zip": ("dir", "train_masks", ".gif"),
    "test.zip": ("dir", "test", ".jpg"),
    "train_hq.zip": ("dir", "train_hq", ".jpg"),
    "test_hq.zip": ("dir", "test_hq", ".jpg"),
    "train_masks.csv.zip": ("file", "train_masks.csv"),
    "metadata.csv.zip": ("file", "metadata.csv"),
    "sample_submission.csv.zip": ("file", "sample_submission.csv"),
}
DEFAULT_FILES = ("train.zip", "train_masks.zip", "test.zip", "train_masks.csv.zip", "metadata.csv.zip",
                 "sample_submission.csv.zip")
HQ_FILES = ("train_hq.zip", "test_hq.zip")
STATE_DIR = ".kaggle"             # under data.raw: downloaded zips and completion records
CREDENTIALS_HELP = ("no Kaggle credentials: save your API token as ~/.kaggle/kaggle.json (chmod 600) or set "
                    "KAGGLE_USERNAME and KAGGLE_KEY (kaggle >= 1.8 also takes KAGGLE_API_TOKEN or "
                    "~/.kaggle/access_token); token at https://www.kaggle.com/settings/api")

Runner = Callable[[list[str]], tuple[int, str]]


# ---------------------------------------------------------------------------- credentials, commands

def credentials(env: dict | None = None, home: Path | None = None) -> str | None:
    """Where Kaggle credentials come from (a description), or None when there are none."""
    env = os.environ if env is None else env
    if env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    if env.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    cfg_dir = Path(env["KAGGLE_CONFIG_DIR"]) if env.get("KAGGLE_CONFIG_DIR") else \
        (home or Path(env.get("HOME", str(Path.home())))) / ".kaggle"
    for name in ("kaggle.json", "access_token"):
        if (cfg_dir / name).is_file():
            return str(cfg_dir / name)
    return None


def require_credentials(env: dict | None = None, home: Path | None = None) -> str:
    found = credentials(env, home)
    if found is None:
        raise PipelineError(CREDENTIALS_HELP)
    return found


def kaggle_exe() -> str:
    """The ``kaggle`` console script of this interpreter's environment, else the one on PATH."""
    beside = Path(sys.executable).with_name("kaggle")
    if beside.is_file():
        return str(beside)
    found = shutil.which("kaggle")
    if found is None:
        raise PipelineError("the `kaggle` command is not installed: `make venv` (it is in requirements.txt) "
                            "or `pip install kaggle`")
    return found


def download_command(archive: str, dest: Path, competition: str = COMPETITION, exe: str = "kaggle") -> list[str]:
    return [exe, "competitions", "download", "-c", competition, "-f", archive, "-p", str(dest)]


def submit_command(path: Path, message: str, competition: str = COMPETITION, exe: str = "kaggle") -> list[str]:
    return [exe, "competitions", "submit", "-c", competition, "-f", str(path), "-m", message]


def run_streaming(cmd: list[str]) -> tuple[int, str]:
    """Run ``cmd`` showing its output live; returns (exit code, the output's last 2000 characters)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail = b""
    assert proc.stdout is not None
    for chunk in iter(lambda: proc.stdout.read1(4096), b""):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        tail = (tail + chunk)[-2000:]
    return proc.wait(), tail.decode("utf-8", "replace")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", text) if ln.strip()]
    return lines[-1] if lines else "(no output)"


# ---------------------------------------------------------------------------- unpacking

def _record_path(raw: Path, archive: str) -> Path:
    return raw / STATE_DIR / f"{archive}.done.json"


def is_complete(raw: Path, archive: str) -> bool:
    """True when the archive's record exists and every file it lists is there at its size."""
    rec = _record_path(raw, archive)
    if not rec.is_file():
        return False
    try:
        files = cache.read_json(rec)["files"]
    except (ValueError, KeyError, OSError):
        return False
    for rel, size in files.items():
        try:
            if (raw / rel).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def _targets(zf: zipfile.ZipFile, archive: str) -> list[tuple[zipfile.ZipInfo, str]]:
    """(member, path relative to raw) for the members that belong in the layout."""
    kind = ARCHIVES[archive]
    out, seen = [], {}
    for info in zf.infolist():
        parts = Path(info.filename).parts
        name = parts[-1] if parts else ""
        if info.is_dir() or not name or name.startswith(".") or "__MACOSX" in parts:
            continue
        if kind[0] == "dir":
            if not name.lower().endswith(kind[2]):
                continue
            rel = f"{kind[1]}/{name}"
        else:
            if name != kind[1]:
                continue
            rel = kind[1]
        if rel in seen:
            raise PipelineError(f"{archive}: {info.filename} and {seen[rel]} both unpack to {rel}")
        seen[rel] = info.filename
        out.append((info, rel))
    if not out:
        what = f"*{kind[2]} files" if kind[0] == "dir" else kind[1]
        raise PipelineError(f"{archive}: holds no {what}; is it the Carvana archive?")
    return out


def unpack(zip_path: Path, raw: Path, archive: str) -> int:
    """Unpack ``zip_path`` into the Kaggle layout under ``raw``; write the completion record.

    Files already present at their member's size are kept (a resumed unpack); the others are
    written to a temporary name and renamed. Returns the number of files written.
    """
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise PipelineError(f"{zip_path}: not a readable zip ({e}); delete it to download again") from None
    written = 0
    with zf:
        targets = _targets(zf, archive)
        for info, rel in targets:
            dest = raw / rel
            if dest.is_file() and dest.stat().st_size == info.file_size:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                with cache.atomic_path(dest) as tmp, zf.open(info) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise PipelineError(f"{zip_path}: member {info.filename} is damaged ({e}); "
                                    "delete the zip to download it again") from None
            written += 1
        cache.write_json(_record_path(raw, archive), {"archive": archive, "zip_size": zip_path.stat().st_size,
                                                      "files": {rel: info.file_size for info, rel in targets}})
    return written


def _readable_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path):
            return True
    except (zipfile.BadZipFile, OSError):
        return False


def choose_files(files: str = "", hq: bool = False) -> list[str]:
    """The archives to fetch: a comma list of names, else the default set (+ HQ when asked)."""
    if files.strip():
        names = [f.strip() for f in files.split(",") if f.strip()]
        bad = [n for n in names if n not in ARCHIVES]
        if bad:
            raise PipelineError(f"unknown Kaggle file(s) {', '.join(bad)}: choose from {', '.join(ARCHIVES)}")
        return names
    return [*DEFAULT_FILES, *(HQ_FILES if hq else ())]


def download(raw: str | Path, files: list[str], *, runner: Runner | None = None, keep_zips: bool = True,
             competition: str = COMPETITION, env: dict | None = None) -> dict:
    """Fetch and unpack ``files`` into ``raw``; skip complete ones. Returns {archive: what happened}."""
    raw = Path(raw)
    state = raw / STATE_DIR
    todo = [a for a in files if not is_complete(raw, a)]
    result = {a: "complete, skipped" for a in files if a not in todo}
    for a, what in result.items():
        print(f"download: {a}: {what}")
    if not todo:
        return result
    need_fetch = [a for a in todo if not _readable_zip(state / a)]
    if need_fetch:
        require_credentials(env)
        runner = runner or run_streaming
        exe = kaggle_exe() if runner is run_streaming else "kaggle"
    state.mkdir(parents=True, exist_ok=True)
    for a in todo:
        z = state / a
        if a in need_fetch:
            print(f"download: {a} from Kaggle ({competition}) ...", flush=True)
            rc, out = runner(download_command(a, state, competition, exe))
            if rc != 0:
                raise PipelineError(f"kaggle download of {a} failed: {_last_line(out)} (check the network, the "
                                    f"credentials and that you accepted the rules at "
                                    f"https://www.kaggle.com/c/{competition}/rules)")
            if not _readable_zip(z):
                raise PipelineError(f"kaggle reported success but {z} is missing or not a zip")
        n = unpack(z, raw, a)
        result[a] = ("downloaded" if a in need_fetch else "unpacked from the kept zip") + f", {n} files written"
        print(f"download: {a}: {result[a]}", flush=True)
        if not keep_zips:
            z.unlink()
    return result


# ---------------------------------------------------------------------------- submit

def sidecar_for(sub: Path) -> Path:
    return sub.with_name(re.sub(r"\.csv(\.gz)?$", "", sub.name) + ".json")


def default_message(sub: Path) -> str:
    """'<name>: config <hash>, OOF Dice d (best-threshold d*), threshold t, folds [..]' from the sidecar."""
    side = sidecar_for(sub)
    if not side.is_file():
        return f"{sub.name} (no sidecar {side.name})"
    s = cache.read_json(side)
    oof = None
    src = Path(str(s.get("threshold_source", "")))
    models = s.get("models") or []
    candidates = [src] if src.name == "oof_summary.json" else []
    candidates += [Path(m["checkpoint"]).parent.parent / "oof_summary.json" for m in models if m.get("checkpoint")]
    for c in candidates:
        if c.is_file():
            oof = cache.read_json(c)
            break
    parts = [f"config {s.get('config_hash', '?')}"]
    if oof is not None:
        parts.append(f"OOF Dice {oof['dice']:.4f} (at best threshold {oof['dice_at_best']:.4f}, "
                     f"{oof.get('images', '?')} images{'' if oof.get('complete', True) else ', folds missing'})")
    else:
        parts.append("OOF Dice unknown")
    parts.append(f"threshold {s.get('threshold', '?')}")
    parts.append(f"folds {','.join(str(f) for f in s.get('folds', []))}")
    parts.append(f"TTA {','.join(s.get('tta', []))}")
    return f"{sub.name}: " + ", ".join(parts)


def validate_for_submit(sub: Path, raw: Path, test_dir: str = "test") -> str:
    """Validate like `make validate`; sizes from the sidecar's test index, else the test JPEGs."""
    from .validate import read_ids, sizes_from, sizes_from_index, check_submission
    if not sub.is_file():
        raise PipelineError(f"{sub}: submission not found")
    sample = raw / "sample_submission.csv"
    if not sample.is_file():
        raise PipelineError(f"{sample}: missing (RAW=<the Kaggle data folder>, or `make download`)")
    side = sidecar_for(sub)
    index = Path(cache.read_json(side).get("test_index", "")) if side.is_file() else None
    if index is not None and index.is_file():
        size_of = sizes_from(sizes_from_index(index))
    elif (raw / test_dir).is_dir():
        size_of = sizes_from(images_dir=raw / test_dir)
    else:
        raise PipelineError(f"no image sizes to check {sub} against: neither the sidecar's test index nor "
                            f"{raw / test_dir} exists")
    rep = check_submission(sub, read_ids(sample), size_of)
    if not rep.ok:
        raise PipelineError(f"{sub} is not a valid submission, not submitted:\n{rep.summary()}")
    return rep.summary()


def submit(sub: str | Path, raw: str | Path, message: str = "", *, test_dir: str = "test",
           runner: Runner | None = None, competition: str = COMPETITION, env: dict | None = None) -> list[str]:
    """Validate ``sub``, then submit it with Kaggle's CLI. Returns the command that ran."""
    sub, raw = Path(sub), Path(raw)
    print(validate_for_submit(sub, raw, test_dir))
    msg = message or default_message(sub)
    require_credentials(env)
    runner = runner or run_streaming
    cmd = submit_command(sub, msg, competition, kaggle_exe() if runner is run_streaming else "kaggle")
    print(f"kaggle-submit: {sub} with message {msg!r}", flush=True)
    rc, out = runner(cmd)
    if rc != 0:
        raise PipelineError(f"kaggle submit failed: {_last_line(out)}")
    return cmd


# ---------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    """scripts/kaggle_cli.py download|submit ... (see --help)."""
    import argparse
    from .config import load
    from .errors import ConfigError
    argv = list(sys.argv[1:] if argv is None else argv)
    parsers = {}
    d = parsers["download"] = argparse.ArgumentParser(
        prog="scripts/kaggle_cli.py download", description="fetch and unpack the competition data into data.raw "
        "(`make download` runs prepare's checks after it)\n\n" + __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--files", default="", help=f"comma list of archives (default: {','.join(DEFAULT_FILES)})")
    d.add_argument("--hq", action="store_true", help="also the HQ archives (train_hq.zip, test_hq.zip)")
    d.add_argument("--delete-zips", action="store_true", help="delete each zip once unpacked")
    s = parsers["submit"] = argparse.ArgumentParser(
        prog="scripts/kaggle_cli.py submit", description="validate a submission, then submit it\n\n" + __doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("submission")
    s.add_argument("--message", "-m", default="", help="default: config hash, OOF Dice, threshold, folds")
    for p in (d, s):
        p.add_argument("--config", "-c", default=None, help="YAML experiment file (data.raw, data.test_dir)")
        p.add_argument("overrides", nargs="*", help="key=value, e.g. data.raw=/path/to/kaggle")
    if not argv or argv[0] not in parsers:
        print("usage: scripts/kaggle_cli.py {download,submit} [--help] ...", file=sys.stderr)
        return 2
    a = parsers[argv[0]].parse_intermixed_args(argv[1:])
    a.cmd = argv[0]
    try:
        cfg = load(a.config, a.overrides)
        if a.cmd == "download":
            download(cfg.data.raw, choose_files(a.files, a.hq), keep_zips=not a.delete_zips)
        else:
            submit(a.submission, cfg.data.raw, a.message, test_dir=cfg.data.test_dir)
    except (ConfigError, PipelineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"kaggle": a.cmd, "ok": True}))
    return 0
