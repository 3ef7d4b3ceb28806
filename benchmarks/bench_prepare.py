"""Prepare throughput against the raw conversion limit, and peak memory vs. dataset size.

    .venv/bin/python benchmarks/bench_prepare.py [--quick] [--images N] [--workers N] [--size HxW]

1. Throughput, on a generated set at Kaggle's full 1918x1280 (default 208 train pairs):
   - "limit": the same joblib workers and chunks doing only the unavoidable work for each
     pair: cv2 JPEG decode (at half size where ``geometry.jpeg_reduction`` has prepare do
     so, else the limit would be slower than prepare at small model sizes), INTER_AREA
     resize, PNG encode + write of the image; PIL GIF decode, full-size mask PNG, resized
     mask PNG. No validation, hashing, records or indexes.
   - "prepare": ``prepare.execute`` from an empty cache (validation, including the strict
     decode of every JPEG stream, RLE check against train_masks.csv, content-addressed
     atomic writes, records, folds, indexes, report).
   Both read the same files (page cache warm); each is timed twice in alternating order, best
   kept. Target: prepare >= 0.9x the limit in images/s. The CPU seconds of the process tree
   are reported too: on a machine shared with other jobs they compare the work done, where
   wall time mostly measures the neighbours.
2. Peak RSS of the whole process tree (parent + joblib workers) of a prepare subprocess on
   200 and on 800 images (polled every 20 ms): it should not grow with the number of images.

The set is 2 synthetic cars (32 full-size pairs) copied under new car ids up to N pairs, so
generating it takes seconds; every copy is a real file that is fully decoded.
Writes benchmarks/results/prepare.json.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
import pandas as pd
import psutil
from joblib import Parallel, delayed, effective_n_jobs
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import wait_peak_rss, write_result  # noqa: E402
from pipeline import geometry, ingest, parallel, prepare, synth  # noqa: E402
from pipeline.config import load  # noqa: E402

PNG = prepare.PNG


def make_set(base: Path, out: Path, n: int) -> Path:
    """Copy the base set's 32 train pairs under new car ids until there are ``n`` pairs."""
    pairs = sorted(p.stem for p in (base / "train").glob("*.jpg"))
    rles = pd.read_csv(base / "train_masks.csv").set_index("img").rle_mask
    (out / "train").mkdir(parents=True)
    (out / "train_masks").mkdir()
    rows = []
    for k in range(n):
        src = pairs[k % len(pairs)]
        dst = f"{k // len(pairs):04x}{src[4:]}"          # a new 12-hex car id per copy of the set
        shutil.copyfile(base / "train" / f"{src}.jpg", out / "train" / f"{dst}.jpg")
        shutil.copyfile(base / "train_masks" / f"{src}_mask.gif", out / "train_masks" / f"{dst}_mask.gif")
        rows.append((f"{dst}.jpg", rles[f"{src}.jpg"]))
    pd.DataFrame(rows, columns=["img", "rle_mask"]).to_csv(out / "train_masks.csv", index=False)
    for name in ("sample_submission.csv", "metadata.csv"):
        shutil.copyfile(base / name, out / name)
    shutil.copytree(base / "test", out / "test")
    return out


def limit_decode(path: str, h: int, w: int, fit: str = "stretch") -> np.ndarray:
    """Decode a JPEG for an h x w model input as prepare does, minus its checks: the same fast
    decoder (``ingest.decode_jpeg``), at half size when ``geometry.jpeg_reduction`` says so (the
    header read gives the size it needs), without strict mode."""
    data = np.fromfile(path, np.uint8)
    size = simplejpeg.decode_jpeg_header(data)[:2]
    r = geometry.jpeg_reduction(*size, geometry.geometry(*size, h, w, fit))
    return ingest.decode_jpeg(data, r, bgr=True)


def _limit_chunk(items: list[tuple[str, str, str]], h: int, w: int) -> int:
    cv2.setNumThreads(1)
    for img_path, mask_path, out in items:
        img = limit_decode(img_path, h, w)
        cv2.imwrite(f"{out}.png", cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA), PNG)
        m = np.asarray(Image.open(mask_path))
        cv2.imwrite(f"{out}_full.png", m, PNG)
        small = (cv2.resize(m * np.uint8(255), (w, h), interpolation=cv2.INTER_AREA) >= 128).astype(np.uint8)
        cv2.imwrite(f"{out}_mask.png", small, PNG)
    return len(items)


def _tree_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of this process and its children (the joblib workers), by pid."""
    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def cpu_since(before: dict[int, float]) -> float:
    """CPU seconds the process tree spent since ``before``: robust to other load on the machine."""
    return sum(v - before.get(pid, 0.0) for pid, v in _tree_cpu().items())


def run_limit(raw: Path, out: Path, workers: int, chunk: int, h: int, w: int) -> tuple[float, float]:
    out.mkdir(parents=True, exist_ok=True)
    items = [(str(p), str(raw / "train_masks" / f"{p.stem}_mask.gif"), str(out / p.stem))
             for p in sorted((raw / "train").glob("*.jpg"))]
    # The same chunking prepare uses, so both pay the same joblib overheads.
    chunks = parallel.chunks(items, chunk, workers)
    cpu, t = _tree_cpu(), time.perf_counter()
    n_jobs = max(1, min(effective_n_jobs(workers), len(chunks)))
    done = sum(Parallel(n_jobs=n_jobs)(delayed(_limit_chunk)(c, h, w) for c in chunks))
    dt = time.perf_counter() - t
    assert done == len(items)
    return dt, cpu_since(cpu)


def run_prepare(raw: Path, cache: Path, workers: int, h: int, w: int) -> tuple[float, float, dict]:
    cfg = load(None, {"data.raw": str(raw), "data.cache": str(cache), "prepare.height": h, "prepare.width": w,
                      "prepare.workers": workers, "prepare.n_folds": 5})
    cpu, t = _tree_cpu(), time.perf_counter()
    res = prepare.execute(cfg)
    return time.perf_counter() - t, cpu_since(cpu), res.stats


def peak_rss(raw: Path, cache: Path, workers: int, h: int, w: int) -> tuple[float, float]:
    """(peak MiB of the prepare process tree, seconds) for a prepare subprocess."""
    cmd = [sys.executable, "-m", "pipeline", "prepare", f"data.raw={raw}", f"data.cache={cache}",
           f"prepare.height={h}", f"prepare.width={w}", f"prepare.workers={workers}", "prepare.n_folds=5"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = wait_peak_rss(proc)
    if proc.returncode:
        raise SystemExit(f"prepare failed: {proc.stderr.read().decode()[-2000:]}")
    return peak / 2**20, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one timing each, RSS at 200 vs 400 images")
    ap.add_argument("--images", type=int, default=208, help="train pairs for the throughput test (>= 200)")
    ap.add_argument("--workers", type=int, default=-1)
    ap.add_argument("--size", default="640x960", help="model input HxW (Kaggle config: 640x960)")
    ap.add_argument("--tmp", default=None, help="scratch dir (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    h, w = map(int, args.size.split("x"))
    workers = effective_n_jobs(args.workers)
    repeats = 1 if args.quick else 2
    rss_sizes = (200, 400) if args.quick else (200, 800)
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        t = time.perf_counter()
        base = synth.generate(tmp / "base", train_cars=2, test_cars=1, height=1280, width=1918, seed=0,
                              workers=workers)
        raw = make_set(base, tmp / f"raw{args.images}", args.images)
        print(f"generated {args.images} train pairs at 1918x1280 in {time.perf_counter() - t:.0f}s "
              f"({workers} workers, model size {h}x{w})", flush=True)

        limit, prep, limit_cpu, prep_cpu, stats = [], [], [], [], None
        load_avg = os.getloadavg()[0]
        for r in range(repeats):
            # Alternate the order so that neither side always pays the other's disk writeback.
            for what in (("limit", "prepare") if r % 2 == 0 else ("prepare", "limit")):
                if what == "limit":
                    dt, cpu = run_limit(raw, tmp / f"limit{r}", workers, 64, h, w)
                    limit.append(dt)
                    limit_cpu.append(cpu)
                    continue
                dt, cpu, stats = run_prepare(raw, tmp / f"cache{r}", workers, h, w)
                prep.append(dt)
                prep_cpu.append(cpu)
                assert stats["processed"] == args.images, stats
            t = time.perf_counter()
            _, _, again = run_prepare(raw, tmp / f"cache{r}", workers, h, w)
            cached_s = time.perf_counter() - t
            assert again["cached"]
            shutil.rmtree(tmp / f"cache{r}")
            shutil.rmtree(tmp / f"limit{r}")
        lim_ips, prep_ips = args.images / min(limit), args.images / min(prep)
        cpu_ratio = min(limit_cpu) / min(prep_cpu)

        rss = {}
        for n in rss_sizes:
            raw_n = raw if n == args.images else make_set(base, tmp / f"raw{n}", n)
            rss[n] = peak_rss(raw_n, tmp / f"rss{n}", workers, h, w)
            shutil.rmtree(tmp / f"rss{n}")
    finally:
        if not args.tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    ratio = prep_ips / lim_ips
    print(f"\n{'':28s}{'seconds':>10s}{'images/s':>10s}")
    print(f"{'raw limit (decode+resize+encode)':28s}{min(limit):10.2f}{lim_ips:10.1f}")
    print(f"{'prepare (cold cache)':28s}{min(prep):10.2f}{prep_ips:10.1f}")
    print(f"{'prepare (cached rerun)':28s}{cached_s:10.2f}{'-':>10s}")
    print(f"prepare / limit = {ratio:.2f}x by wall time (target >= 0.90x)  "
          f"[all: limit {', '.join(f'{x:.2f}' for x in limit)}; prepare {', '.join(f'{x:.2f}' for x in prep)}]")
    print(f"CPU seconds per image: limit {min(limit_cpu) / args.images * 1000:.0f} ms, prepare "
          f"{min(prep_cpu) / args.images * 1000:.0f} ms -> {cpu_ratio:.2f}x by CPU time "
          f"(robust to other load; 1-min load average at start {load_avg:.1f} on {os.cpu_count()} cores)")
    print(f"\n{'images':>8s}{'peak RSS MiB':>14s}{'seconds':>10s}   (process tree, {workers} workers)")
    for n, (mib, sec) in rss.items():
        print(f"{n:8d}{mib:14.0f}{sec:10.1f}")
    a, b = rss[rss_sizes[0]][0], rss[rss_sizes[1]][0]
    print(f"peak RSS growth {rss_sizes[0]} -> {rss_sizes[1]} images: {100 * (b - a) / a:+.1f}%")
    result = {"images": args.images, "workers": workers, "size": [h, w], "source": "synthetic 1918x1280",
              "limit_s": limit, "prepare_s": prep, "cached_rerun_s": cached_s,
              "limit_images_per_s": lim_ips, "prepare_images_per_s": prep_ips, "ratio": ratio,
              "limit_cpu_s": limit_cpu, "prepare_cpu_s": prep_cpu, "cpu_ratio": cpu_ratio,
              "load_average_at_start": load_avg,
              "peak_rss_mib": {str(n): v[0] for n, v in rss.items()}, "stats": stats}
    write_result("prepare", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
