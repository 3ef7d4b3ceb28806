"""Prepare: validate the raw Kaggle layout, convert and resize, write indexes and folds.

``run(cfg) -> Path`` returns the artifact dir ``<cache>/prepare/<key>/`` holding
``train_index.csv``, ``folds.csv``, ``test_index.csv``, ``prepare_report.json``,
``config.yaml`` and ``manifest.json`` (written last: it marks the dir complete).

Caching (the DVC idea, in-process):
- ``key`` hashes the stage parameters (``cfg.prepare`` minus run-only knobs, plus the
  train/test directory names), ``CODE_VERSION`` and stat-only fingerprints (name,
  size, mtime) of every raw file, declared in ``pipeline.graph`` (``Graph(cfg).prepare_dir``
  resolves it without reading any pixel). A complete dir for the key means: no work, one line "cached". A second process
  on a key being built waits for the key's lock (pipeline.locks), then reports it cached.
- Per-image outputs are content-addressed under ``<cache>/prepare/files/``:
  ``full/<id>.<h>.png`` (full-size mask, keyed by the mask file and code),
  ``<H>x<W>-<fit>/<id>.<h>.png|_mask.png|.json`` (resized image, resized mask and a
  record of the validation result; keyed by image, mask, RLE row, size and code),
  ``test_checks/<code>/<h>.json`` (test image checks, one entry per file keyed by
  its directory, name, size and mtime).
  A new key (10 images added, a new size) therefore re-uses every output that
  is still valid and processes (or checks) only what is new. Old outputs stay until
  ``make clean-cache``.
- Every file is written to a temp name and renamed (``pipeline.cache``); the
  per-image record is written after its PNGs and the manifest after everything,
  so a run killed at any point (kill -9) leaves only complete files under final
  names, and the rerun finishes the same artifacts as an uninterrupted run.

Geometry (``prepare.fit``, ``pipeline.geometry``): each image's placement in the model
input is recorded in the index columns ``scaled_height, scaled_width, pad_top,
pad_left``; ``geometry.to_model`` applies it here and in predict, and
``geometry.to_original`` inverts it in train (OOF) and submit. The test-image checks
and ``test_index.csv`` rows are made by ``pipeline.testset``.

Masks: resized masks and full-size masks are 8-bit PNGs with values {0, 1}, so
``cv2.imread(p, cv2.IMREAD_GRAYSCALE)`` returns the labels directly (a bilevel
1-bit PNG would be smaller but reads back as {0, 255} in cv2). A mask GIF stored as
{0, 255} is read as {0, 1}; that is a conversion, not a problem (``strict`` ignores it),
and it is reported: one summary line, ``counts.masks_0_255`` and ``converted.masks_0_255``
(the files) in ``prepare_report.json``, and ``stats.masks_0_255`` in the manifest. The
per-image record carries the flag; records written before it (same CODE_VERSION, so an
old cache stays valid) lack it and are counted in ``counts.masks_0_255_unrecorded``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from . import cache, locks, rle
from .config import Config
from .errors import PipelineError
from .cache import stable_hash
from .graph import STAGES, Graph, params, raw_inputs, train_data_key
from .folds import make_folds
from .geometry import GEOM_COLS, geometry, jpeg_reduction, resize_mask, to_model
from .ingest import BadFile, decode_image, decode_mask
from .layout import IMAGE_EXTS, MASK_SUFFIX, Issue, Scan, read_csv
from .parallel import chunks, run_chunks
from .testset import TEST_COLS, test_checks, test_index
from .validate import rle_problem

STAGE = "prepare"
CODE_VERSION = STAGES[STAGE].code
PNG = [cv2.IMWRITE_PNG_COMPRESSION, 1]           # level 1: ~fastest, larger levels gain <5% here
TRAIN_COLS = ["id", "car_id", "view", "image", "mask", "mask_full", "orig_height", "orig_width",
              "mask_area", *GEOM_COLS, "fold"]
SUMMARY_ISSUES = 10                 # issues printed in the summary; the report has all


# ---------------------------------------------------------------------------- per-image work

def _write_png(path: Path, arr: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", arr, PNG)
    if not ok:
        raise OSError(f"PNG encoding failed for {path}")
    cache.write_bytes(path, buf.tobytes())


def _process_one(job: dict) -> dict:
    """Validate, convert and resize one train pair; write its outputs and record. Returns the record.

    job: id, img, mask (absolute raw paths), rel_img, rel_mask (names for the report),
    rle (train_masks.csv row or None), height, width, fit, root (prepare root),
    image_out, mask_out, full_out, record_out (paths relative to root).
    """
    rec = {"id": job["id"], "status": "ok", "issues": []}

    def bad(file: str, e: BadFile) -> dict:
        rec.update(status="bad", issues=rec["issues"] + [Issue(file, e.kind, "error", e.reason).to_dict()])
        return rec

    root = Path(job["root"])

    def reduction(h: int, w: int) -> int:
        return jpeg_reduction(h, w, geometry(h, w, job["height"], job["width"], job["fit"]))
    try:
        img, warnings, (h, w) = decode_image(Path(job["img"]), reduction)
        rec["issues"] += [Issue(job["rel_img"], k, "warning", r).to_dict() for k, r in warnings]
    except BadFile as e:
        return _finish(root, job, bad(job["rel_img"], e))
    try:
        mask, notes = decode_mask(Path(job["mask"]))
    except BadFile as e:
        return _finish(root, job, bad(job["rel_mask"], e))
    rec["mask_0_255"] = any(kind == "mask_0_255" for kind, _ in notes)   # reported, not a problem
    if mask.shape != (h, w):
        return _finish(root, job, bad(job["rel_img"], BadFile(
            "size_mismatch", f"image is {w}x{h} but its mask {Path(job['rel_mask']).name} is "
                             f"{mask.shape[1]}x{mask.shape[0]}")))
    if job["rle"] is not None:
        mine, theirs = rle.encode(mask), " ".join(job["rle"].split())
        why = None if mine == theirs else rle_problem(theirs, mask.size)   # only a mismatch can be malformed
        if why:
            # Not an RLE at all, so it cannot contradict the GIF: the GIF stays the truth.
            rec["issues"].append(Issue("train_masks.csv", "rle_malformed", "warning",
                                       f"row for '{job['id']}': {why}; the mask GIF is used").to_dict())
        elif mine != theirs:
            n_csv = sum(int(n) for n in theirs.split()[1::2]) if theirs else 0
            return _finish(root, job, bad(job["rel_mask"], BadFile(
                "rle_mismatch", f"train_masks.csv RLE ({n_csv} px) disagrees with the GIF "
                                f"({int(mask.sum())} px)")))
    geom = geometry(h, w, job["height"], job["width"], job["fit"])
    full = root / job["full_out"]
    if not full.is_file():   # shared by every size; written once
        _write_png(full, mask)
    _write_png(root / job["image_out"], to_model(img, geom, job["height"], job["width"]))
    _write_png(root / job["mask_out"], resize_mask(mask, geom, job["height"], job["width"]))
    rec.update(orig_height=h, orig_width=w, mask_area=float(np.count_nonzero(mask)) / mask.size, **geom,
               image=job["image_out"], mask=job["mask_out"], mask_full=job["full_out"])
    return _finish(root, job, rec)


def _finish(root: Path, job: dict, rec: dict) -> dict:
    # Written after the PNGs: a record on disk means every output of this image is complete.
    cache.write_json(root / job["record_out"], rec)
    return rec


def _process_chunk(jobs: list[dict]) -> list[dict]:
    cv2.setNumThreads(1)     # one image per worker; cv2's own threads would oversubscribe the cores
    return [_process_one(j) for j in jobs]


# ---------------------------------------------------------------------------- the stage

@dataclass
class Result:
    dir: Path
    stats: dict   # processed / reused / train_ok / left_out / test_ok / test_checked / test_reused / problems / cached


def run(cfg: Config, graph: Graph | None = None) -> Path:
    """The stage: returns the complete artifact dir (see module docstring)."""
    return execute(cfg, graph).dir


def execute(cfg: Config, graph: Graph | None = None) -> Result:
    """``run`` that also returns what it did (tests and benchmarks assert on ``stats``)."""
    graph = graph or Graph(cfg)
    scan, key, out = graph.scan, graph.prepare_key, graph.prepare_dir
    if cache.is_complete(out):
        return _cached(cfg, out)
    # One process builds a key at a time; another waits for the lock, then finds it cached.
    with locks.stage_lock(locks.lock_path(cfg.data.cache, out), f"prepare {key}"):
        if cache.is_complete(out):
            return _cached(cfg, out)
        return _build(cfg, scan, key, out)


def _build(cfg: Config, scan: Scan, key: str, out: Path) -> Result:
    """:func:`execute`'s work for a key not yet cached, under the key's lock."""
    p = cfg.prepare
    root = cache.stage_dir(cfg.data.cache, STAGE, "")
    issues = list(scan.issues)
    frames = {}
    for name, path in scan.csvs.items():
        if path is not None:
            frames[name], csv_issues = read_csv(path, name)
            issues += csv_issues

    jobs, pair_issues = _train_jobs(cfg, scan, frames.get("train_masks.csv"), root)
    issues += pair_issues
    records, processed, reused = _run_jobs(jobs, root, p)
    for rec in records.values():
        issues += [Issue(**d) for d in rec["issues"]]
    ok = [records[j["id"]] for j in jobs if records[j["id"]]["status"] == "ok"]
    if not ok:
        report = _write_report(out, key, cfg, scan, issues, {"train_ok": 0})
        raise PipelineError(f"no usable train image/mask pair in {scan.raw}; see {report}")

    train = _train_frame(ok)
    folds = make_folds(train, p.n_folds, p.seed, p.stratify)
    train["fold"] = folds["fold"].values

    checks, test_checked, test_reused = test_checks(cfg, scan, root, CODE_VERSION)
    test, test_issues = test_index(cfg, scan, frames.get("sample_submission.csv"), checks)
    issues += test_issues

    converted = _converted_masks(jobs, records)
    counts = {"train_images": len(scan.train.files), "train_masks": len(scan.masks.files),
              "train_ok": len(train), "train_left_out": _left_out(cfg, issues, train["id"]),
              "test_images": len(scan.test.files), "test_ok": len(test),
              "folds": {int(k): int(v) for k, v in train.fold.value_counts().sort_index().items()},
              "masks_0_255": len(converted["masks_0_255"]),
              "masks_0_255_unrecorded": converted["unrecorded"]}
    out.mkdir(parents=True, exist_ok=True)
    cache.write_text(out / "train_index.csv", train[TRAIN_COLS].to_csv(index=False))
    cache.write_text(out / "folds.csv", folds.to_csv(index=False))
    cache.write_text(out / "test_index.csv", test[TEST_COLS].to_csv(index=False))
    report = _write_report(out, key, cfg, scan, issues, counts, {"masks_0_255": converted["masks_0_255"]})
    stats = {"processed": processed, "reused": reused, "train_ok": len(train),
             "left_out": counts["train_left_out"], "test_ok": len(test), "test_checked": test_checked,
             "test_reused": test_reused, "problems": len(issues), "masks_0_255": counts["masks_0_255"],
             "cached": False}
    # train's key reads train_data from here (recorded, not recomputed downstream)
    cache.write_manifest(out, stage=STAGE, key=key, params=params(cfg, STAGE), inputs=raw_inputs(scan),
                         outputs={n: n for n in STAGES[STAGE].outputs}, config=cfg.to_dict(),
                         extra={"code_version": CODE_VERSION, "stats": stats, "train_data": train_data_key(out)})
    _print_summary(out, report, stats, issues)
    # Temps that killed runs left (a dead writer's, or stale); never a live writer's.
    cache.sweep_temps([root / "files" / "full", root / Path(jobs[0]["image_out"]).parent,
                       root / "files" / "test_checks" / CODE_VERSION, out])
    _strict(cfg, len(issues), out)
    return Result(out, stats)


def _cached(cfg: Config, out: Path) -> Result:
    stats = dict(cache.read_manifest(out)["stats"], processed=0, reused=0, test_checked=0, test_reused=0,
                 cached=True)
    print(f"prepare: cached, nothing to do ({stats['train_ok']} train, {stats['test_ok']} test images, "
          f"{stats['problems']} problem(s)) -> {out}")
    _strict(cfg, stats["problems"], out)
    return Result(out, stats)


def _train_frame(ok: list[dict]) -> pd.DataFrame:
    """train_index.csv rows (without folds) from the records of the usable pairs, paths relative to the artifact."""
    return pd.DataFrame([{"id": r["id"], "car_id": r["id"][:12], "view": int(r["id"][13:]),
                          "image": f"../{r['image']}", "mask": f"../{r['mask']}",
                          "mask_full": f"../{r['mask_full']}", "orig_height": r["orig_height"],
                          "orig_width": r["orig_width"], "mask_area": round(r["mask_area"], 6),
                          **{k: r[k] for k in GEOM_COLS}} for r in ok])


def _converted_masks(jobs: list[dict], records: dict[str, dict]) -> dict:
    """Usable masks stored as {0, 255} (read as {0, 1}): {"masks_0_255": [report names],
    "unrecorded": records from before the flag existed, which cannot say}."""
    ok = [(j, records[j["id"]]) for j in jobs if records[j["id"]]["status"] == "ok"]
    return {"masks_0_255": sorted(j["rel_mask"] for j, r in ok if r.get("mask_0_255")),
            "unrecorded": sum("mask_0_255" not in r for _, r in ok)}


def _pair_stem(file: str, train_dir: str) -> str | None:
    """The id part of a train image or mask name in a report ("train/<s>.jpg", "train_masks/<s>_mask.gif"),
    valid or not; None for other files (CSVs, unexpected names)."""
    folder, _, name = file.partition("/")
    if folder == train_dir and name.lower().endswith(IMAGE_EXTS):
        return name.rpartition(".")[0]
    if folder == "train_masks" and name.lower().endswith(MASK_SUFFIX):
        return name[: -len(MASK_SUFFIX)]
    return None


def _left_out(cfg: Config, issues: list[Issue], kept_ids) -> int:
    """Train pairs left out: distinct ids of train images and masks with an error that are not in
    train_index.csv.

    Every pair that is left out has an error on its image or its mask (bad file, bad pair,
    missing partner, bad name), and it counts once however many errors it has: a bad id
    on an image and on its mask is one pair. A dropped duplicate (``.jpeg`` beside a kept
    ``.jpg``) is not a pair left out; names that are neither images nor masks do not count.
    """
    stems = {_pair_stem(i.file, cfg.data.train_dir) for i in issues if i.level == "error"}
    return len(stems - {None} - set(kept_ids))


def _train_jobs(cfg: Config, scan: Scan, masks_csv: pd.DataFrame | None, root: Path) -> tuple[list[dict], list[Issue]]:
    """Pair images with masks and describe each pair's work and content-addressed outputs."""
    p, issues = cfg.prepare, []
    imgs, masks = scan.train.files, scan.masks.files
    fp_img = {f[0]: f for f in scan.train.fingerprints}
    fp_mask = {f[0]: f for f in scan.masks.fingerprints}
    for i in sorted(set(imgs) - set(masks)):
        issues.append(Issue(f"{cfg.data.train_dir}/{imgs[i]}", "missing_mask", "error",
                            f"no train_masks/{i}_mask.gif"))
    for i in sorted(set(masks) - set(imgs)):
        issues.append(Issue(f"train_masks/{masks[i]}", "missing_image", "error",
                            f"no {cfg.data.train_dir}/{i}.jpg"))
    rles: dict[str, str] | None = None
    if masks_csv is not None and p.check_rle:
        rles = dict(zip(masks_csv["img"].str.rsplit(".", n=1).str[0], masks_csv["rle_mask"]))
        for i in sorted(set(rles) - set(imgs)):
            issues.append(Issue("train_masks.csv", "rle_row_without_image", "warning",
                                f"row for '{i}' has no image in {cfg.data.train_dir}/"))
        for i in sorted((set(imgs) & set(masks)) - set(rles)):
            issues.append(Issue("train_masks.csv", "rle_missing_row", "warning", f"no row for '{i}'"))
    size_dir = f"files/{p.height}x{p.width}-{p.fit}"
    jobs = []
    for i in sorted(set(imgs) & set(masks)):
        row = rles.get(i) if rles is not None else None
        # Stat-only identity (name, size, mtime) of both inputs, as in `make`.
        h = stable_hash({"code": CODE_VERSION, "img": fp_img[imgs[i]], "mask": fp_mask[masks[i]],
                         "dir": cfg.data.train_dir,
                         "rle": None if row is None else stable_hash(" ".join(row.split())),
                         "size": [p.height, p.width, p.fit]})
        hm = stable_hash({"code": CODE_VERSION, "mask": fp_mask[masks[i]]})
        jobs.append({"id": i, "img": scan.train.path(i), "mask": scan.masks.path(i),
                     "rel_img": f"{cfg.data.train_dir}/{imgs[i]}", "rel_mask": f"train_masks/{masks[i]}",
                     "rle": row, "height": p.height, "width": p.width, "fit": p.fit, "root": str(root),
                     "image_out": f"{size_dir}/{i}.{h}.png", "mask_out": f"{size_dir}/{i}.{h}_mask.png",
                     "full_out": f"files/full/{i}.{hm}.png", "record_out": f"{size_dir}/{i}.{h}.json"})
    return jobs, issues


def _run_jobs(jobs: list[dict], root: Path, p) -> tuple[dict[str, dict], int, int]:
    """Re-use finished records, process the rest in parallel. Returns (id -> record, processed, reused)."""
    records, todo = {}, []
    for j in jobs:
        path = root / j["record_out"]
        if path.is_file():
            records[j["id"]] = cache.read_json(path)
        else:
            todo.append(j)
    reused = len(records)
    for res in run_chunks(_process_chunk, chunks(todo, p.chunk_size, p.workers), p.workers, len(todo), "prepare"):
        records.update((r["id"], r) for r in res)
    return records, len(todo), reused


def _write_report(out: Path, key: str, cfg: Config, scan: Scan, issues: list[Issue], counts: dict,
                  converted: dict | None = None) -> Path:
    """prepare_report.json: counts, every issue, and ``converted`` (files used after a lossless
    conversion that is not a problem: masks stored as {0, 255})."""
    issues = sorted(issues, key=lambda i: (i.file, i.kind, i.reason))
    report = {"key": key, "raw": str(scan.raw.resolve()), "train_dir": cfg.data.train_dir,
              "test_dir": cfg.data.test_dir, "counts": counts, "problems": len(issues),
              "converted": converted or {},
              "by_kind": dict(sorted(Counter(i.kind for i in issues).items())),
              "by_level": dict(sorted(Counter(i.level for i in issues).items())),
              "checks": {"train": "full decode of every image and mask; strict JPEG stream decode",
                         "test": "JPEG header (size, mode) + strict decode of the whole stream at 1/8 scale",
                         "rle": bool(cfg.prepare.check_rle and scan.csvs["train_masks.csv"])},
              "resize": {"height": cfg.prepare.height, "width": cfg.prepare.width, "fit": cfg.prepare.fit,
                         "image_interpolation": "INTER_AREA",
                         "mask": "INTER_AREA on 0/255 then >= 128 (binary)"},
              "issues": [i.to_dict() for i in issues]}
    path = out / "prepare_report.json"
    cache.write_json(path, report)
    return path


def _print_summary(out: Path, report: Path, stats: dict, issues: list[Issue]) -> None:
    kinds = Counter(i.kind for i in issues)
    print(f"prepare: {stats['train_ok']} train pairs ({stats['processed']} processed, {stats['reused']} reused), "
          f"{stats['left_out']} left out; {stats['test_ok']} test images ({stats['test_checked']} checked, "
          f"{stats['test_reused']} reused); {len(issues)} problem(s)"
          + (": " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) if kinds else ""))
    for i in sorted(issues, key=lambda i: (i.level != "error", i.file))[:SUMMARY_ISSUES]:
        print(f"  {i.level:7s} {i.file}: {i.reason}")
    if len(issues) > SUMMARY_ISSUES:
        print(f"  ... {len(issues) - SUMMARY_ISSUES} more in the report")
    if stats.get("masks_0_255"):
        print(f"  note    {stats['masks_0_255']} mask GIF(s) stored as 0/255 were read as 0/1 "
              "(converted.masks_0_255 in the report lists them)")
    print(f"  report:    {report}\n  artifacts: {out}")


def _strict(cfg: Config, problems: int, out: Path) -> None:
    if cfg.prepare.strict and problems:
        raise PipelineError(f"prepare.strict: {problems} validation problem(s); see {out / 'prepare_report.json'}")
