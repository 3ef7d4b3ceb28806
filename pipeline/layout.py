"""The raw Kaggle layout by name and stat only: folder listings, their fingerprints, the CSVs, the scan.

Nothing here opens an image (``pipeline.ingest`` decodes and checks the files). A problem
found from names alone is an :class:`Issue` (its kinds: ``pipeline.ingest``'s docstring).
Names are shown through :func:`shown_name`: bytes that are not UTF-8 and control characters
appear as ``\\xNN`` escapes, so a report, the console and the stage log can always be written.
"""
from __future__ import annotations

import errno
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from .config import Config

from .errors import PipelineError

from .cache import stable_hash

ID_RE = re.compile(r"^[0-9a-f]{12}_\d{2}$")
IMAGE_EXTS = (".jpg", ".jpeg")          # preferred first: on duplicate ids the .jpg wins
MASK_SUFFIX = "_mask.gif"
# Columns of the Kaggle CSVs; both missing and extra columns are reported.
CSV_COLUMNS = {
    "train_masks.csv": ["img", "rle_mask"],
    "sample_submission.csv": ["img", "rle_mask"],
    "metadata.csv": ["id", "year", "make", "model", "trim1", "trim2"],
}


@dataclass(frozen=True)
class Issue:
    file: str        # path relative to the raw directory, e.g. "train/0cdf5b5d0ce1_01.jpg"
    kind: str        # stable code, e.g. "truncated", "mask_not_binary" (module docstring)
    level: str       # "error" (left out) or "warning" (used after repair / CSV disagreement)
    reason: str      # one readable sentence

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------- listing

@dataclass
class Listing:
    """One raw directory by name and stat only: the usable files by id, and the issues
    found from names alone. Plain strings, not Paths: 100,064 test files make Path
    construction cost seconds."""
    directory: str                 # absolute path of the directory
    files: dict[str, str]          # id -> file name, for names that pass the checks
    fingerprints: list[list]       # [name, size, mtime_ns] of every file, good or bad
    issues: list[Issue]

    def path(self, i: str) -> str:
        return os.path.join(self.directory, self.files[i])

    def fingerprint(self) -> str:
        """Order-independent hash of every entry's fingerprint (for regular files the same as
        cache.fingerprint_files; entries that are not files enter by their own lstat)."""
        return stable_hash(sorted(self.fingerprints), n=16)


def list_dir(directory: Path, rel: str, kind: str) -> Listing:
    """List ``directory`` (``kind`` = "image" or "mask") and check names (stat only, no read).

    Images are ``<12 hex>_<NN>.jpg``; masks are ``<12 hex>_<NN>_mask.gif``.
    Reports ids that do not match, files with other extensions, duplicate ids
    (the same id under two extensions, e.g. ``.jpg`` and ``.jpeg``: the first in
    IMAGE_EXTS order is kept), and entries that are not readable files (directories,
    broken symbolic links, fifos): ``unreadable`` for image/mask names, else
    ``unexpected_file``. Symbolic links to files are files.
    """
    issues: list[Issue] = []
    fps: list[list] = []
    if _is_link_loop(directory):
        # The folder cannot be listed at all (Path.resolve raised RuntimeError on it): say so
        # once; the caller's checks for an empty folder (no train images, no test images,
        # images without masks) then apply.
        issues.append(Issue(f"{rel}/", "unreadable", "error", "symbolic link loop; folder not read"))
        return Listing(str(Path(directory).absolute()), {}, fps, issues)
    directory = Path(directory).resolve()
    if not directory.is_dir():
        return Listing(str(directory), {}, fps, issues)
    candidates: dict[str, list[tuple[int, str]]] = {}
    with os.scandir(directory) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        name = e.name
        st, what = _entry_stat(e)
        # Non-files enter the fingerprint too: removing or fixing one must change the key.
        fps.append([name, st.st_size, st.st_mtime_ns] if st else [name, -1, -1])
        shown = shown_name(name)      # what reports print: always valid UTF-8, one line
        if what:
            claimed = name.lower().endswith(MASK_SUFFIX if kind == "mask" else IMAGE_EXTS)
            issues.append(Issue(f"{rel}/{shown}", "unreadable" if claimed else "unexpected_file", "error",
                                f"{what}, not a readable file; skipped"))
            continue
        if kind == "mask":
            ok_ext = name.lower().endswith(MASK_SUFFIX)
            stem, rank = (name[: -len(MASK_SUFFIX)], 0) if ok_ext else (name, 0)
            expected = f"<12 hex>_<NN>{MASK_SUFFIX}"
        else:
            stem, dot, ext = name.rpartition(".")   # cheaper than os.path.splitext x 100k
            stem, ext = (stem, dot + ext.lower()) if dot else (name, "")
            ok_ext = ext in IMAGE_EXTS
            rank = IMAGE_EXTS.index(ext) if ok_ext else 0
            expected = "<12 hex>_<NN>.jpg"
        if not ok_ext:
            issues.append(Issue(f"{rel}/{shown}", "unexpected_file", "error",
                                f"not a {'mask GIF' if kind == 'mask' else 'JPEG'} name (expected {expected})"))
            continue
        if not ID_RE.fullmatch(stem):   # fullmatch: '$' would let a trailing newline through
            issues.append(Issue(f"{rel}/{shown}", "bad_id", "error",
                                f"id '{shown_name(stem)}' does not match <12 hex digits>_<2 digits>"))
            continue
        candidates.setdefault(stem, []).append((rank, name))
    files = _first_of_each(candidates, rel, issues)
    return Listing(str(directory), files, fps, issues)


def _first_of_each(candidates: dict[str, list[tuple[int, str]]], rel: str, issues: list[Issue]) -> dict[str, str]:
    """id -> the file kept for it (the first extension in IMAGE_EXTS order); the others are issues."""
    files = {}
    for stem, cands in candidates.items():
        cands.sort()
        files[stem] = cands[0][1]
        for _, name in cands[1:]:
            issues.append(Issue(f"{rel}/{name}", "duplicate_id", "error",
                                f"duplicate id '{stem}' (kept {cands[0][1]})"))
    return files


def shown_name(name: str) -> str:
    """A file name as reports, the console and logs show it: valid UTF-8 on one line.

    ``os.scandir`` hands bytes that are not UTF-8 back as lone surrogates, which no UTF-8
    writer accepts (the report, a strict console, the stage log would fail after the work
    was done): they become ``\\xNN``. Control characters (a newline in a name) are escaped
    too, so one issue stays one line. Other names, spaces and accents included, are unchanged.
    """
    s = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in s)


def _is_link_loop(path: str | Path) -> bool:
    """True when following ``path`` never ends (a link to itself, or links naming each other)."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


def _loop_or(err: OSError) -> str:
    """A stat failure in words: symbolic link loops by name, others by the OS's reason."""
    if err.errno == errno.ELOOP:
        return "symbolic link loop"
    return f"cannot stat ({err.strerror or err})"


def _entry_stat(e: os.DirEntry) -> tuple[os.stat_result | None, str | None]:
    """(stat, None) for a regular file (a symlink to one included), else (lstat or None, what it is)."""
    try:
        if e.is_file():
            return e.stat(), None
        st = e.stat(follow_symlinks=False)
    except OSError as err:   # a link loop (ELOOP), or vanished or unreadable between listing and stat
        return None, _loop_or(err)
    if e.is_symlink():
        return st, "broken symbolic link" if not os.path.exists(e.path) else "symbolic link to a directory"
    return st, "a directory" if e.is_dir() else "not a regular file"


def overlap_issues(train: Listing, test: Listing, train_rel: str, test_rel: str) -> list[Issue]:
    """Warnings for ids present in both the train and the test folder (the same car in both leaks)."""
    return [Issue(f"{test_rel}/{test.files[i]}", "train_test_overlap", "warning",
                  f"id '{i}' is also a train image ({train_rel}/{train.files[i]}): the same car in train "
                  "and test leaks into the test score")
            for i in sorted(set(train.files) & set(test.files))]


# ---------------------------------------------------------------------------- CSVs

def read_csv(path: Path, name: str) -> tuple[pd.DataFrame | None, list[Issue]]:
    """Read a Kaggle CSV as strings; report unreadable files and missing/extra columns.

    Returns (None, issues) when unreadable or when a required column is missing.
    """
    expected = CSV_COLUMNS[name]
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # pandas raises many types (ParserError, UnicodeDecodeError, EmptyDataError)
        return None, [Issue(name, "csv_unreadable", "error", f"cannot parse CSV: {type(e).__name__}: {e}")]
    issues = []
    cols = [str(c) for c in df.columns]
    missing = [c for c in expected if c not in cols]
    extra = [c for c in cols if c not in expected]
    if missing:
        issues.append(Issue(name, "csv_columns", "error",
                            f"missing column(s) {missing}; expected {expected}, found {cols}"))
    if extra:
        issues.append(Issue(name, "csv_columns", "warning", f"extra column(s) {extra} ignored"))
    key = expected[0]
    if not missing:
        dup = df[key][df[key].duplicated()].unique().tolist()
        if dup:
            issues.append(Issue(name, "duplicate_id", "warning",
                                f"{len(dup)} duplicate '{key}' value(s), first kept: {dup[:5]}"))
            df = df.drop_duplicates(subset=key, keep="first")
    return (None if missing else df.reset_index(drop=True)), issues


# ---------------------------------------------------------------------------- the raw layout

@dataclass
class Scan:
    """The raw layout by name only (no file is opened)."""
    raw: Path
    train: Listing
    masks: Listing
    test: Listing
    csvs: dict[str, Path | None]
    issues: list[Issue] = field(default_factory=list)


def scan(cfg: Config) -> Scan:
    """The raw layout under ``data.raw`` by name and stat only; PipelineError when there is none."""
    raw = Path(cfg.data.raw)
    if not raw.is_dir():
        why = "a symbolic link loop" if _is_link_loop(raw) else "no such directory"
        raise PipelineError(f"data.raw={raw}: {why} (run `make demo-data` or pass RAW=<kaggle dir>)")
    train = list_dir(raw / cfg.data.train_dir, cfg.data.train_dir, "image")
    if not train.fingerprints:
        why = f" ({train.issues[0].reason})" if train.issues else ""
        raise PipelineError(f"{raw / cfg.data.train_dir}: no train images{why} (data.raw / data.train_dir)")
    masks = list_dir(raw / "train_masks", "train_masks", "mask")
    test = list_dir(raw / cfg.data.test_dir, cfg.data.test_dir, "image")
    csvs = {name: (raw / name if (raw / name).is_file() else None)
            for name in ("train_masks.csv", "sample_submission.csv", "metadata.csv")}
    overlap = overlap_issues(train, test, cfg.data.train_dir, cfg.data.test_dir)
    return Scan(raw, train, masks, test, csvs, train.issues + masks.issues + test.issues + overlap)
