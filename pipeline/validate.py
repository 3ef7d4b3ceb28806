"""The submission check (:func:`check_submission`): header, ids, order, count and every RLE, streamed.

Checks, each reported with the file's line number (line 1 is the header):
- the header is exactly ``img,rle_mask``;
- the rows hold exactly the ids of ``sample_submission.csv``, once each, in its
  order. Each id problem is named once, checked against a sample ``id -> row``
  map: an **unknown id** (not in the sample), a **duplicate** (naming the line of
  the first occurrence), a row **out of order** (row i holds the sample's row k;
  the fewest rows that, moved, restore the order: those off the longest run of
  rows already in sample order), and **missing ids** (one problem after the last
  line: how many, and the first few with their sample rows). A missing row does
  not make the rows after it "out of order", nor does a swap look like a
  missing row;
- every ``rle_mask`` is empty (an empty mask) or an even count of positive
  integers ``start length ...`` with starts strictly increasing, runs that do
  not overlap, and the last pixel within H*W of that image.

Rows are counted from 1 without the header: row i is on line i + 1.

Both CSVs are read as UTF-8 with an optional byte-order mark (Excel writes one) and any
line ends (CRLF included); the sample's ids are its ``img`` column wherever it stands
(extra columns, in any place, are ignored).

The submission is read row by row (plain or .gz), so checking 100k rows holds
one row at a time plus the sample's ids, the ids seen and one int per row.
"""
from __future__ import annotations

import bisect
import csv
import gzip
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .errors import PipelineError

HEADER = ["img", "rle_mask"]
# A ragged 1918x1280 prediction can have tens of thousands of runs: far above csv's default
# 128 KiB field limit.
csv.field_size_limit(2**31 - 1)
_RLE_RE = re.compile(r"[0-9]+(?: [0-9]+)*")


def open_text(path: str | Path, mode: str = "rt"):
    """Open a .csv or .csv.gz as text (newline='' as the csv module wants).

    Reading uses utf-8-sig: a leading byte-order mark is dropped instead of becoming part of
    the first header name ('\\ufeffimg'); files without one read the same."""
    path = Path(path)
    enc = "utf-8-sig" if "r" in mode else "utf-8"
    if path.name.endswith(".gz"):
        return gzip.open(path, mode, newline="", encoding=enc)
    return open(path, mode, newline="", encoding=enc)


def iter_rows(path: str | Path) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, fields) for every line, header included (line 1)."""
    with open_text(path) as f:
        for k, fields in enumerate(csv.reader(f), start=1):
            yield k, fields


def read_ids(sample_path: str | Path) -> list[str]:
    """The ``img`` column of a sample_submission.csv, in order (other columns are ignored)."""
    p = Path(sample_path)
    if not p.is_file():
        raise PipelineError(f"{p}: sample submission not found")
    rows = iter_rows(p)
    try:
        _, header = next(rows, (1, []))
        if "img" not in header:
            raise PipelineError(f"{p}: line 1: no 'img' column in the header {header[:5]}")
        col = header.index("img")
        ids = []
        for line, fields in rows:
            if not fields:
                continue
            if len(fields) <= col:
                raise PipelineError(f"{p}: line {line}: {len(fields)} field(s), no 'img' value (column {col + 1})")
            ids.append(fields[col])
    except (UnicodeDecodeError, csv.Error) as e:
        raise PipelineError(f"{p}: unreadable CSV ({type(e).__name__}: {e})") from None
    return ids


def rle_problem(rle: str, n_pixels: int) -> str | None:
    """None when ``rle`` is a valid Carvana RLE for an image of n_pixels = H*W, else what is wrong."""
    if rle == "":
        return None
    if not _RLE_RE.fullmatch(rle):
        bad = next((t for t in rle.split(" ") if not (t.isascii() and t.isdigit())), "")
        return f"not space-separated non-negative integers (token {bad[:20]!r})"
    tokens = rle.split(" ")
    if len(tokens) % 2:
        return f"odd count of numbers ({len(tokens)}): pairs 'start length' expected"
    if max(len(t) for t in tokens) > 18:
        return "a number is too large"
    nums = np.array(tokens, dtype=np.int64)
    starts, lengths = nums[0::2], nums[1::2]
    k = np.flatnonzero(starts < 1)
    if k.size:
        return f"pair {k[0] + 1}: start {starts[k[0]]} is not positive (starts are 1-indexed)"
    k = np.flatnonzero(lengths < 1)
    if k.size:
        return f"pair {k[0] + 1}: length {lengths[k[0]]} is not positive"
    k = np.flatnonzero(starts[1:] <= starts[:-1])
    if k.size:
        return f"pair {k[0] + 2}: start {starts[k[0] + 1]} not after previous start {starts[k[0]]}"
    ends = starts + lengths - 1  # last pixel of each run, 1-indexed
    k = np.flatnonzero(ends[:-1] >= starts[1:])
    if k.size:
        return (f"pair {k[0] + 1}: run {starts[k[0]]}+{lengths[k[0]]} overlaps the next run "
                f"starting at {starts[k[0] + 1]}")
    if ends[-1] > n_pixels:
        return f"last run ends at pixel {ends[-1]}, beyond H*W = {n_pixels}"
    return None


@dataclass
class Problem:
    line: int
    img: str
    message: str

    def __str__(self):
        return f"line {self.line}" + (f" ({self.img})" if self.img else "") + f": {self.message}"


@dataclass
class Report:
    path: str
    rows: int = 0
    expected_rows: int = 0
    problems: list[Problem] = field(default_factory=list)
    n_problems: int = 0

    @property
    def ok(self) -> bool:
        return self.n_problems == 0

    def add(self, line: int, img: str, message: str, limit: int) -> None:
        self.n_problems += 1
        if len(self.problems) < limit:
            self.problems.append(Problem(line, img, message))

    def merge(self, found: list[Problem], limit: int) -> None:
        """Add problems found after the pass (out of order rows), keeping the listed ones the
        first ``limit`` by line: any problem beyond the first ``limit`` of either list cannot be."""
        self.n_problems += len(found)
        self.problems = sorted(self.problems + found[:limit], key=lambda q: q.line)[:limit]

    def summary(self) -> str:
        if self.ok:
            return f"{self.path}: OK ({self.rows} rows)"
        head = f"{self.path}: {self.n_problems} problem(s) in {self.rows} rows (expected {self.expected_rows})"
        more = self.n_problems - len(self.problems)
        return "\n".join([head, *(f"  {p}" for p in self.problems)] + ([f"  ... and {more} more"] if more else []))


SizeOf = Callable[[str], tuple[int, int]]


def sizes_from(size: tuple[int, int] | dict | None = None, images_dir: str | Path | None = None) -> SizeOf:
    """img name -> (H, W): one size for all, a {img: (H, W)} mapping, or each test JPEG's header."""
    if isinstance(size, tuple):
        return lambda img: size
    if isinstance(size, dict):
        def lookup(img: str) -> tuple[int, int]:
            if img not in size:
                raise PipelineError(f"no size known for {img} (not in the test index)")
            return size[img]
        return lookup
    if images_dir is not None:
        from PIL import Image
        root = Path(images_dir)

        def header(img: str) -> tuple[int, int]:
            p = root / img
            try:
                with Image.open(p) as im:  # reads the header only
                    w, h = im.size
            except (OSError, Image.DecompressionBombError, ValueError) as e:
                # DecompressionBombError (a forged 60000x60000 header) is no OSError: say so in one line.
                raise PipelineError(f"{p}: cannot read image size ({type(e).__name__}: {e}); "
                                    "pass --size HxW") from None
            return h, w
        return header
    raise PipelineError("need image sizes: --size HxW, --index test_index.csv or a test image folder")


def out_of_order(positions: list[int]) -> list[int]:
    """Indices of the fewest entries to move to put ``positions`` (distinct) in increasing order:
    those off one longest increasing subsequence, found in O(n log n).
    [0, 2, 1, 3] -> [1] (an adjacent swap is one row out of order); [3, 0, 1, 2] -> [0]."""
    tails, tail_at, prev = [], [], [-1] * len(positions)   # patience sorting with back-links
    for j, v in enumerate(positions):
        k = bisect.bisect_left(tails, v)
        if k == len(tails):
            tails.append(v)
            tail_at.append(j)
        else:
            tails[k], tail_at[k] = v, j
        prev[j] = tail_at[k - 1] if k else -1
    keep = set()
    j = tail_at[-1] if tail_at else -1
    while j >= 0:
        keep.add(j)
        j = prev[j]
    return [j for j in range(len(positions)) if j not in keep]


def order_problems(lines: list[int], positions: list[int], sample_ids: list[str]) -> list[Problem]:
    """The rows out of order (:func:`out_of_order`), each saying where it belongs, by line.

    lines, positions: the file line and sample row (0-based) of each first occurrence of a sample id."""
    moved = out_of_order(positions)
    kept = sorted(set(range(len(positions))) - set(moved))
    kept_pos = [positions[j] for j in kept]
    found = []
    for j in moved:
        line, k = lines[j], positions[j]
        # Where it belongs among the rows that are in order: after the last of them that the
        # sample puts before it, before the first that the sample puts after it.
        b = bisect.bisect_right(kept_pos, k)
        after = f"line {lines[kept[b - 1]]} ({sample_ids[kept_pos[b - 1]]})" if b > 0 else ""
        before = f"line {lines[kept[b]]} ({sample_ids[kept_pos[b]]})" if b < len(kept) else ""
        where = (f", which belongs between {after} and {before}" if after and before
                 else f", which belongs after {after}" if after else f", which belongs before {before}" if before
                 else "")
        found.append(Problem(line, sample_ids[k],
                             f"out of order: row {line - 1} holds the sample's row {k + 1}{where}"))
    return sorted(found, key=lambda q: q.line)


def check_submission(path: str | Path, sample_ids: list[str], size_of: SizeOf,
                        max_problems: int = 20) -> Report:
    """Check a submission file against the sample's ids (in order) and each image's (H, W).

    Returns a Report: every problem counted, the first ``max_problems`` by line listed (the
    missing-ids summary, when there is one, always among them).
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: submission not found")
    rep = Report(str(path), expected_rows=len(sample_ids))
    position = {}                       # sample id -> its 0-based row in the sample
    for k, i in enumerate(sample_ids):
        position.setdefault(i, k)
    seen: dict[str, int] = {}           # id -> line of its first occurrence
    order_lines: list[int] = []         # first occurrences of sample ids: line, sample row
    order_pos: list[int] = []
    rows = iter_rows(path)
    try:
        _, header = next(rows, (1, []))
        if header != HEADER:
            rep.add(1, "", f"header must be 'img,rle_mask', got {','.join(header)!r}", max_problems)
        for line, fields in rows:
            rep.rows += 1
            img = fields[0] if fields else ""
            known = img in position
            if known and img in seen:
                rep.add(line, img, f"duplicate of line {seen[img]} (row {seen[img] - 1})", max_problems)
            elif known:
                seen[img] = line
                order_lines.append(line)
                order_pos.append(position[img])
            elif img:
                rep.add(line, img, "unknown id: not in the sample submission", max_problems)
            if len(fields) != 2:
                rep.add(line, img, f"expected 2 fields, got {len(fields)}", max_problems)
                continue
            if not known:
                continue
            h, w = size_of(img)
            msg = rle_problem(fields[1], h * w)
            if msg:
                rep.add(line, img, f"rle_mask: {msg} (image {w}x{h})", max_problems)
    except (UnicodeDecodeError, csv.Error, OSError, EOFError) as e:
        rep.add(rep.rows + 2, "", f"unreadable: {e}", max_problems)
        return rep
    found = order_problems(order_lines, order_pos, sample_ids)
    if found:
        rep.merge(found, max_problems)
    if len(seen) < len(position):
        missing = [k for i, k in position.items() if i not in seen]
        missing.sort()
        first = ", ".join(f"{sample_ids[k]} (row {k + 1})" for k in missing[:3])
        if len(rep.problems) >= max_problems > 0:
            rep.problems.pop()          # the summary matters more than the last row listed
        rep.add(rep.rows + 2, "", f"{len(missing)} id(s) of the sample missing: {first}"
                + (", ..." if len(missing) > 3 else ""), max_problems)
    return rep


def parse_size(spec: str) -> tuple[int, int]:
    """'1918x1280' (W x H, as Kaggle writes it) -> (H, W) = (1280, 1918)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", spec or "")
    if not m:
        raise PipelineError(f"--size '{spec}': expected WxH, e.g. 1918x1280")
    return int(m.group(2)), int(m.group(1))


def sizes_from_index(index_path: str | Path) -> dict:
    """{img: (H, W)} from prepare's test_index.csv."""
    import pandas as pd
    df = pd.read_csv(index_path, usecols=["img", "orig_height", "orig_width"], dtype={"img": str})
    return dict(zip(df["img"], zip(df["orig_height"].astype(int), df["orig_width"].astype(int))))


def main(argv: list[str] | None = None) -> int:
    """scripts/validate.py: exit 0 when valid, 1 with the first problems listed, 2 on bad input."""
    import argparse
    import sys
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("submission", help="submission .csv or .csv.gz")
    ap.add_argument("--sample", default="data/raw/sample_submission.csv",
                    help="sample_submission.csv giving ids and order (default: %(default)s)")
    ap.add_argument("--size", help="one WxH for every image, e.g. 1918x1280 (Kaggle)")
    ap.add_argument("--index", help="prepare's test_index.csv (orig_height, orig_width per img)")
    ap.add_argument("--images", help="test image folder, sizes from JPEG headers "
                                     "(default: the --test-dir folder beside the sample)")
    ap.add_argument("--test-dir", default="test",
                    help="test image folder name beside the sample, as data.test_dir (e.g. test_hq; "
                         "default: %(default)s)")
    ap.add_argument("--max-problems", type=int, default=20)
    a = ap.parse_args(argv)
    try:
        ids = read_ids(a.sample)
        if a.size:
            size_of = sizes_from(parse_size(a.size))
        elif a.index:
            size_of = sizes_from(sizes_from_index(a.index))
        else:
            images = Path(a.images) if a.images else Path(a.sample).parent / a.test_dir
            if not images.is_dir():
                raise PipelineError(f"{images}: no test image folder to read sizes from "
                                    "(--test-dir NAME beside the sample, --images DIR, --index or --size)")
            size_of = sizes_from(images_dir=images)
        rep = check_submission(a.submission, ids, size_of, a.max_problems)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(rep.summary())
    return 0 if rep.ok else 1

