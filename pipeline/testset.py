"""Prepare's test side: every test image checked (results cached per file), and ``test_index.csv``.

A part of the prepare stage (``prepare.execute`` calls :func:`test_checks` and
:func:`test_index`), kept apart so that prepare.py holds the train side and the stage.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import cache
from .config import Config
from .errors import PipelineError
from .cache import stable_hash
from .geometry import GEOM_COLS, geometry
from .ingest import BadFile, check_test_image
from .layout import Issue, Scan
from .parallel import chunks, run_chunks

TEST_COLS = ["img", "id", "path", "orig_height", "orig_width", *GEOM_COLS]
TEST_CHUNK = 1024                   # test images per worker task and per check-cache file
TEST_CACHE_FILES = 16               # more check-cache files than this are merged into one


def _check_test_chunk(items: list[tuple[str, str]]) -> list[tuple[str, dict]]:
    """[(id, path)] -> [(id, header dict or {"error": kind, "reason"})]; never raises for a bad file."""
    out = []
    for i, path in items:
        try:
            out.append((i, check_test_image(Path(path))))
        except BadFile as e:
            out.append((i, {"error": e.kind, "reason": e.reason}))
    return out


def _test_check_key(test_dir: str, fp: list) -> str:
    """A test file's identity for the check cache: directory name, file name, size, mtime_ns."""
    name, size, mtime_ns = fp
    return f"{test_dir}/{name}:{size}:{mtime_ns}"


def _read_test_checks(d: Path) -> tuple[dict[str, dict], list[Path]]:
    """All cached test checks under ``d`` (key -> result), and the files they came from.

    A file that vanished (a concurrent run merged it) or cannot be parsed is skipped:
    it is only a cache, so its images are checked again.
    """
    known: dict[str, dict] = {}
    files = []
    for p in sorted(p for p in d.glob("*.json") if not p.name.startswith(".")):   # not temp files
        try:
            known.update(cache.read_json(p))
            files.append(p)
        except (OSError, ValueError):
            continue
    return known, files


def _write_test_checks(d: Path, entries: dict[str, dict]) -> Path:
    """One cache file for ``entries``, named by the hash of its keys (same entries, same file)."""
    path = d / f"{stable_hash(sorted(entries), n=16)}.json"
    cache.write_json(path, entries)
    return path


def test_checks(cfg: Config, scan: Scan, root: Path, code: str) -> tuple[dict[str, dict], int, int]:
    """id -> check result (``ingest.check_test_image`` dict or {"error", "reason"}) for every test image.

    Returns (results, checked, reused). Each file's result is cached under its own
    fingerprint in ``files/test_checks/<code>/`` (``code``: prepare's CODE_VERSION), so adding
    10 images to 100,064 checks those 10. New results are written one file per finished chunk (a killed run
    resumes where it stopped); past TEST_CACHE_FILES files they are merged into one.
    """
    d = root / "files" / "test_checks" / code
    known, files = _read_test_checks(d)
    fps = {f[0]: f for f in scan.test.fingerprints}
    keys = {i: _test_check_key(cfg.data.test_dir, fps[name]) for i, name in scan.test.files.items()}
    results = {i: known[k] for i, k in keys.items() if k in known}
    todo = [(i, scan.test.path(i)) for i in sorted(keys) if keys[i] not in known]
    p = cfg.prepare
    for res in run_chunks(_check_test_chunk, chunks(todo, TEST_CHUNK, p.workers), p.workers, len(todo),
                         "test checks"):
        entries = {keys[i]: r for i, r in res}
        files.append(_write_test_checks(d, entries))
        known.update(entries)
        results.update(res)
    if len(files) > TEST_CACHE_FILES:
        merged = _write_test_checks(d, known)   # written before the parts go: nothing is ever missing
        for f in files:
            if f != merged:
                f.unlink(missing_ok=True)
    return results, len(todo), len(keys) - len(todo)


def test_index(cfg: Config, scan: Scan, sample: pd.DataFrame | None,
                checks: dict[str, dict]) -> tuple[pd.DataFrame, list[Issue]]:
    """test_index.csv rows in sample_submission.csv order (or sorted file order without it).

    ``checks``: id -> :func:`test_checks` result. A test image that fails its check
    (unreadable, truncated, corrupt data) is reported as an error with its name and
    libjpeg's reason and gets no row here, as the header check always did. Predict
    never sees it, and submit, which needs one row per sample_submission.csv image,
    refuses to write the CSV and points at prepare_report.json: no submission ever
    silently holds a made-up mask. Replace the file (or remove it from the sample,
    for a local set) and rerun prepare: only that file is checked again.
    """
    p, issues, rel = cfg.prepare, [], cfg.data.test_dir
    files = scan.test.files
    if not files:
        issues.append(Issue(f"{rel}/", "no_test_images", "warning",
                            f"{scan.raw / rel} is missing or holds no test images; test_index.csv is empty"))
        return pd.DataFrame(columns=TEST_COLS), issues
    if sample is None:
        why = "missing" if scan.csvs["sample_submission.csv"] is None else "unusable"
        issues.append(Issue("sample_submission.csv", "no_sample_submission", "warning",
                            f"sample_submission.csv {why}: test images listed in sorted file order"))
        order = sorted(files)
    else:
        sample_ids = sample["img"].str.rsplit(".", n=1).str[0].tolist()
        listed = set(sample_ids)
        for img, i in zip(sample["img"], sample_ids):
            if i not in files:
                issues.append(Issue("sample_submission.csv", "sample_without_image", "error",
                                    f"row '{img}' has no image in {rel}/"))
        for i in sorted(set(files) - listed):
            issues.append(Issue(f"{rel}/{files[i]}", "not_in_sample", "warning",
                                "test image not listed in sample_submission.csv; left out"))
        order = [i for i in sample_ids if i in files]
    rows = []
    for i in order:
        hd = checks[i]
        if "error" in hd:
            issues.append(Issue(f"{rel}/{files[i]}", hd["error"], "error", hd["reason"]))
            continue
        if hd["mode"] != "RGB" or hd["format"] != "JPEG":
            issues.append(Issue(f"{rel}/{files[i]}", "color_converted", "warning",
                                f"{hd['format']} {hd['mode']} test image: predict must convert it to RGB"))
        rows.append({"img": files[i], "id": i, "path": scan.test.path(i),
                     "orig_height": hd["height"], "orig_width": hd["width"],
                     **geometry(hd["height"], hd["width"], p.height, p.width, p.fit)})
    return pd.DataFrame(rows, columns=TEST_COLS), issues


TEST_INDEX_COLUMNS = ("img", "id", "path", "orig_height", "orig_width")   # what predict and submit read


def read_test_index(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: test index missing (run `make prepare` first)")
    df = pd.read_csv(path, dtype={"img": str, "id": str, "path": str}, keep_default_na=False)
    missing = [c for c in TEST_INDEX_COLUMNS if c not in df.columns]
    if missing:
        raise PipelineError(f"{path}: missing columns {missing}")
    if df["id"].duplicated().any():
        raise PipelineError(f"{path}: duplicate ids, e.g. {df.loc[df['id'].duplicated(), 'id'].iloc[0]}")
    return df
