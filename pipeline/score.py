"""Local scoring: Kaggle's Carvana metric against a folder of true masks.

Score = mean over the images of ``pipeline.metrics.dice`` (2|P∩T| / (|P|+|T|); both
empty scores 1, one empty and the other not 0), each image decoded from its RLE at the size
of its true mask (read by ``probmaps.read_mask``: Kaggle's palette GIFs through their
colours, PNGs in {0, 1} or {0, 255}).

The masks folder defines the set scored: every true mask's image must appear
exactly once in the submission, and every row must have a true mask. Otherwise
the mean over the rows present is not the set's score (leaving out hard images,
or repeating easy ones, raises it), so scoring fails and names the missing
images, the duplicated ones and the rows without a mask. ``--partial``
(``partial=True``) scores the intersection instead (rows with a true mask, first
occurrence only) and says so in the result and on the console.

True masks are looked up as ``<masks>/<stem>_mask.gif`` (Kaggle's naming),
then ``<stem>_mask.png``, ``<stem>.png``, ``<stem>.gif``. Rows are streamed
and scored in parallel chunks, so 100k images need no more memory than 10.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from tqdm import tqdm

from . import rle
from .errors import PipelineError
from .metrics import dice
from .probmaps import read_mask
from .validate import HEADER, iter_rows

MASK_PATTERNS = ("{stem}_mask.gif", "{stem}_mask.png", "{stem}.png", "{stem}.gif")


def find_mask(masks_dir: Path, img: str) -> Path | None:
    stem = Path(img).stem
    for pat in MASK_PATTERNS:
        p = masks_dir / pat.format(stem=stem)
        if p.is_file():
            return p
    return None


def mask_stems(masks_dir: Path) -> set[str]:
    """Image stems of every true mask in the folder, by the names find_mask accepts
    (``a_01_mask.gif`` -> ``a_01``); temp files (leading '.') are not masks."""
    stems = set()
    for p in masks_dir.iterdir():
        name = p.name
        if name.startswith(".") or not p.is_file():
            continue
        for pat in MASK_PATTERNS:                       # "_mask.gif" before ".gif"
            suffix = pat.format(stem="")
            if name.endswith(suffix) and len(name) > len(suffix):
                stems.add(name[: -len(suffix)])
                break
    return stems


def _examples(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


@dataclass
class Coverage:
    """How a submission's rows cover the masks folder's images."""
    n_masks: int
    missing: list[str]                      # mask stems with no row
    duplicates: dict[str, list[int]]        # stem -> lines of all its rows, when more than one
    without_mask: list[tuple[int, str]]     # (line, img) of rows with no true mask
    score_lines: set[int]                   # lines to score: first row of each image with a mask

    @property
    def complete(self) -> bool:
        return not (self.missing or self.duplicates or self.without_mask)

    def describe(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} of {self.n_masks} true masks' images have no row, e.g. "
                         + _examples(sorted(self.missing)))
        if self.duplicates:
            dup = [f"{s} (lines {', '.join(map(str, lines))})" for s, lines in self.duplicates.items()]
            parts.append(f"{len(self.duplicates)} image(s) have more than one row, e.g. " + _examples(dup))
        if self.without_mask:
            parts.append(f"{len(self.without_mask)} row(s) have no true mask, e.g. "
                         + _examples([f"line {ln} ({img})" for ln, img in self.without_mask]))
        return "; ".join(parts)


def coverage(sub_path: Path, masks_dir: Path) -> Coverage:
    """One pass over the submission's ids (RLEs are not decoded) against the masks folder."""
    stems = mask_stems(masks_dir)
    first: dict[str, int] = {}
    dups: dict[str, list[int]] = {}
    without = []
    for chunk in _chunks(sub_path, 1024):
        for line, img, _ in chunk:
            stem = Path(img).stem
            if stem not in stems:
                without.append((line, img))
            elif stem in first:
                dups.setdefault(stem, [first[stem]]).append(line)
            else:
                first[stem] = line
    return Coverage(len(stems), sorted(stems - first.keys()), dups, without, set(first.values()))


def _score_chunk(masks_dir: str, rows: list[tuple[int, str, str]]) -> list[tuple[str, float]]:
    root = Path(masks_dir)
    out = []
    for line, img, code in rows:
        p = find_mask(root, img)
        if p is None:
            raise PipelineError(f"line {line} ({img}): no true mask in {root} "
                                f"(looked for {', '.join(pat.format(stem=Path(img).stem) for pat in MASK_PATTERNS)})")
        true = read_mask(p) > 0
        try:
            pred = rle.decode(code, true.shape)
        except ValueError as e:
            raise PipelineError(f"line {line} ({img}): invalid rle_mask for a {true.shape[1]}x{true.shape[0]} "
                                f"mask: {e}") from None
        out.append((img, dice(pred, true)))
    return out


def _chunks(path: Path, size: int, lines: set[int] | None = None):
    """Lists of (line, img, rle) of at most ``size`` rows; only the given lines when ``lines``."""
    rows = iter_rows(path)
    _, header = next(rows, (1, []))
    if header != HEADER:
        raise PipelineError(f"{path}: header must be 'img,rle_mask', got {','.join(header)!r}")
    chunk = []
    for line, fields in rows:
        if len(fields) != 2:
            raise PipelineError(f"{path}: line {line}: expected 2 fields, got {len(fields)}")
        if lines is not None and line not in lines:
            continue
        chunk.append((line, fields[0], fields[1]))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class ScoreResult:
    mean_dice: float
    n_images: int
    per_image: list[tuple[str, float]]
    seconds: float
    partial: bool = False                   # True: only the images with a row and a mask were scored
    n_masks: int = 0                        # true masks in the folder
    coverage_problems: str = ""             # what a partial score left out (Coverage.describe)

    def worst(self, k: int = 5) -> list[tuple[str, float]]:
        return sorted(self.per_image, key=lambda t: t[1])[:k]

    def to_dict(self) -> dict:
        return {"mean_dice": self.mean_dice, "n_images": self.n_images, "n_masks": self.n_masks,
                "partial": self.partial, "left_out": self.coverage_problems, "worst": self.worst(),
                "seconds": round(self.seconds, 2)}


def score_submission(sub_path: str | Path, masks_dir: str | Path, workers: int = -1,
                     images_per_task: int = 32, partial: bool = False) -> ScoreResult:
    """Mean Dice of a submission (.csv/.csv.gz) against ``masks_dir``; errors name the line.

    The submission must cover the masks folder exactly (each mask's image once, no row without
    a mask), else PipelineError naming what is missing, duplicated or unknown; ``partial=True``
    scores the rows with a mask (first occurrence of each image) and marks the result partial.
    """
    t0 = time.time()
    sub_path, masks_dir = Path(sub_path), Path(masks_dir)
    if not sub_path.is_file():
        raise PipelineError(f"{sub_path}: submission not found")
    if not masks_dir.is_dir():
        raise PipelineError(f"{masks_dir}: mask folder not found")
    cov = coverage(sub_path, masks_dir)
    if not cov.complete and not partial:
        raise PipelineError(f"{sub_path} does not cover {masks_dir} ({cov.n_masks} true masks) exactly once: "
                            f"{cov.describe()}. A mean over these rows is not the set's score; fix the "
                            "submission, or pass --partial to score the images with a row and a mask")
    lines = None if cov.complete else cov.score_lines
    jobs = (delayed(_score_chunk)(str(masks_dir), c) for c in _chunks(sub_path, images_per_task, lines))
    per_image = []
    total = cov.n_masks if cov.complete else len(lines)
    with tqdm(total=total, desc="score", unit="img", mininterval=1.0) as bar:
        for part in Parallel(n_jobs=workers, return_as="generator")(jobs):
            per_image.extend(part)
            bar.update(len(part))
    if not per_image:
        raise PipelineError(f"{sub_path}: no rows to score")
    mean = float(np.mean([d for _, d in per_image]))
    return ScoreResult(mean, len(per_image), per_image, time.time() - t0, partial=not cov.complete,
                       n_masks=cov.n_masks, coverage_problems=cov.describe())


def main(argv: list[str] | None = None) -> int:
    """scripts/score.py SUB MASKS: prints the mean Dice (and the worst images)."""
    import argparse
    import sys
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("submission", help="submission .csv or .csv.gz")
    ap.add_argument("masks", help="folder of true masks (<id>_mask.gif as in Kaggle's train_masks)")
    ap.add_argument("--workers", type=int, default=-1)
    ap.add_argument("--json", help="also write the result (mean, n, worst) to this JSON file")
    ap.add_argument("--per-image", help="write img,dice for every image to this CSV")
    ap.add_argument("--partial", action="store_true",
                    help="score only the images that have both a row and a true mask (first row of each), "
                         "instead of failing when the submission does not cover the masks folder exactly")
    a = ap.parse_args(argv)
    try:
        res = score_submission(a.submission, a.masks, a.workers, partial=a.partial)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if res.partial:
        warning = (f"PARTIAL SCORE: {res.n_images} of {res.n_masks} true masks' images scored, not comparable "
                   f"with a complete score. Left out: {res.coverage_problems}")
        print(warning)
        print(f"warning: {warning}", file=sys.stderr)
    print(f"mean Dice {res.mean_dice:.6f} over {res.n_images} images{' (PARTIAL)' if res.partial else ''} "
          f"({res.seconds:.1f}s)")
    print("worst: " + ", ".join(f"{i} {d:.4f}" for i, d in res.worst()))
    if a.json:
        Path(a.json).write_text(json.dumps(res.to_dict(), indent=2))
    if a.per_image:
        Path(a.per_image).write_text("img,dice\n" + "".join(f"{i},{d:.6f}\n" for i, d in res.per_image))
    return 0
