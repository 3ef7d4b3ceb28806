"""Local scoring: Kaggle's Carvana metric against a folder of true masks.

Score = mean over the submission's images of Dice = 2|P∩T| / (|P|+|T|), each
image decoded from its RLE at the size of its true mask. Convention (as in
``pipeline.metrics.dice``): an image whose predicted and true masks are both
empty scores 1; one empty and the other not scores 0.

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

from . import rle
from .config import PipelineError
from .metrics import dice
from .validate import HEADER, iter_rows

MASK_PATTERNS = ("{stem}_mask.gif", "{stem}_mask.png", "{stem}.png", "{stem}.gif")


def find_mask(masks_dir: Path, img: str) -> Path | None:
    stem = Path(img).stem
    for pat in MASK_PATTERNS:
        p = masks_dir / pat.format(stem=stem)
        if p.is_file():
            return p
    return None


def read_true_mask(path: Path) -> np.ndarray:
    """(H, W) bool, True = car.

    Carvana's GIFs are palette images (index 1 = white); a GIF writer may reorder
    the palette (a mask that is all car can come back as index 0), so palette
    images are read through their colours, not their indices. PNGs may hold
    {0, 1} or {0, 255}.
    """
    from PIL import Image
    with Image.open(path) as im:
        if im.mode == "P":
            im = im.convert("L")
        return np.asarray(im) > 0


def _score_chunk(masks_dir: str, rows: list[tuple[int, str, str]]) -> list[tuple[str, float]]:
    root = Path(masks_dir)
    out = []
    for line, img, code in rows:
        p = find_mask(root, img)
        if p is None:
            raise PipelineError(f"line {line} ({img}): no true mask in {root} "
                                f"(looked for {', '.join(pat.format(stem=Path(img).stem) for pat in MASK_PATTERNS)})")
        true = read_true_mask(p)
        try:
            pred = rle.decode(code, true.shape)
        except ValueError as e:
            raise PipelineError(f"line {line} ({img}): invalid rle_mask for a {true.shape[1]}x{true.shape[0]} "
                                f"mask: {e}") from None
        out.append((img, dice(pred, true)))
    return out


def _chunks(path: Path, size: int):
    rows = iter_rows(path)
    _, header = next(rows, (1, []))
    if header != HEADER:
        raise PipelineError(f"{path}: header must be 'img,rle_mask', got {','.join(header)!r}")
    chunk = []
    for line, fields in rows:
        if len(fields) != 2:
            raise PipelineError(f"{path}: line {line}: expected 2 fields, got {len(fields)}")
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

    def worst(self, k: int = 5) -> list[tuple[str, float]]:
        return sorted(self.per_image, key=lambda t: t[1])[:k]

    def to_dict(self) -> dict:
        return {"mean_dice": self.mean_dice, "n_images": self.n_images, "worst": self.worst(),
                "seconds": round(self.seconds, 2)}


def score_submission(sub_path: str | Path, masks_dir: str | Path, workers: int = -1,
                     images_per_task: int = 32) -> ScoreResult:
    """Mean Dice of a submission (.csv/.csv.gz) against ``masks_dir``; errors name the line."""
    t0 = time.time()
    sub_path, masks_dir = Path(sub_path), Path(masks_dir)
    if not sub_path.is_file():
        raise PipelineError(f"{sub_path}: submission not found")
    if not masks_dir.is_dir():
        raise PipelineError(f"{masks_dir}: mask folder not found")
    jobs = (delayed(_score_chunk)(str(masks_dir), c) for c in _chunks(sub_path, images_per_task))
    per_image = []
    for part in Parallel(n_jobs=workers, return_as="generator")(jobs):
        per_image.extend(part)
    if not per_image:
        raise PipelineError(f"{sub_path}: no rows to score")
    mean = float(np.mean([d for _, d in per_image]))
    return ScoreResult(mean, len(per_image), per_image, time.time() - t0)


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
    a = ap.parse_args(argv)
    try:
        res = score_submission(a.submission, a.masks, a.workers)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"mean Dice {res.mean_dice:.6f} over {res.n_images} images ({res.seconds:.1f}s)")
    print("worst: " + ", ".join(f"{i} {d:.4f}" for i, d in res.worst()))
    if a.json:
        Path(a.json).write_text(json.dumps(res.to_dict(), indent=2))
    if a.per_image:
        Path(a.per_image).write_text("img,dice\n" + "".join(f"{i},{d:.6f}\n" for i, d in res.per_image))
    return 0
