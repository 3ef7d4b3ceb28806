"""TensorBoard overhead: the same fold trained with and without events (issue 11: must be < 2%).

A synthetic set (``pipeline.synth``) is prepared once; then fold 0 is trained ``--reps``
times with ``tensorboard.enabled=true`` and as often with false, interleaved (on, off, on,
off, ...) so that load on a shared machine hits both alike, each in a fresh cache (the events
are in no cache key, so a shared cache would find the fold trained). Reported:

- direct: the seconds spent inside ``tboard`` (writer creation, scalars, overlay forwards and
  PNG encoding, flushes; ``FoldBoard.seconds``) over the summed epoch seconds of the same run;
- wall: (median run time with events - median without) / the epochs' seconds without
  (noisier: it includes whatever else the machine did meanwhile).

Default settings are the demo's (Unet/resnet18 at 128x192, batch 8, events every epoch,
overlays of 4 images every 2 epochs): a small model where the fixed cost of logging weighs
most. Writes benchmarks/results/tboard.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from _common import write_result  # noqa: E402
from pipeline import config, prepare, synth, tboard, train  # noqa: E402
from pipeline.graph import Graph  # noqa: E402


def one_run(base: dict, prepared: Path, cache: Path, on: bool) -> dict:
    cfg = config.load(None, {**base, "data.cache": str(cache), "tensorboard.enabled": on})
    boards = []
    real_open = tboard.open_fold

    def spy(*a, **kw):
        b = real_open(*a, **kw)
        boards.append(b)
        return b

    tboard.open_fold = spy
    try:
        t0 = time.perf_counter()
        train.run(cfg, Graph(cfg, prepared=prepared))
        wall = time.perf_counter() - t0
    finally:
        tboard.open_fold = real_open
    m = pd.read_csv(Graph(cfg, prepared=prepared).fold_dir(0) / "metrics.csv")
    board_s = sum(b.seconds for b in boards)
    epochs = len(m)
    timing = {k: sum(b.timing[k] for b in boards) for k in ("open", "scalars", "overlays", "n_overlays")}
    return {"on": on, "wall_s": wall, "epoch_s": float(m["seconds"].sum()) / epochs, "board_s": board_s,
            "epochs": epochs, **{f"board_{k}": v for k, v in timing.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 reps of 2 epochs")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--cars", type=int, default=10, help="synthetic train cars (16 images each)")
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument("--set", nargs="*", default=[], help="train config overrides, e.g. train.encoder_depth=3")
    a = ap.parse_args(argv)
    reps, epochs = (2, 2) if a.quick else (a.reps, a.epochs)
    tmp = Path(tempfile.mkdtemp(prefix="bench_tboard_"))
    base = {"data.raw": str(tmp / "raw"), "prepare.height": a.height, "prepare.width": a.width,
            "prepare.n_folds": 2, "prepare.workers": 1, "train.fold": 0, "train.epochs": epochs,
            "train.arch": "Unet", "train.encoder": "resnet18", "train.encoder_weights": "none",
            "train.batch_size": 8, "train.num_workers": 0, "train.augment": "basic",
            **dict(kv.split("=", 1) for kv in a.set)}
    synth.generate(tmp / "raw", train_cars=a.cars, test_cars=1, height=2 * a.height, width=2 * a.width,
                   seed=0, workers=1)
    prepared = prepare.run(config.load(None, {**base, "data.cache": str(tmp / "prep")}))
    runs = []
    for r in range(reps):
        for on in (True, False):
            res = one_run(base, prepared, tmp / f"c{r}{int(on)}", on)
            runs.append(res)
            print(f"rep {r} events {'on ' if on else 'off'}: {res['epoch_s']:.2f} s/epoch (metrics), "
                  f"board {res['board_s']:.3f} s, run wall {res['wall_s']:.1f} s", flush=True)
    on = [r for r in runs if r["on"]]
    off = [r for r in runs if not r["on"]]
    direct = statistics.median(r["board_s"] / (r["epoch_s"] * r["epochs"]) for r in on)
    # Steady state, per epoch: scalars every epoch, an overlay strip every overlay_every epochs.
    per_epoch = statistics.median((r["board_scalars"] + r["board_overlays"]) / (r["epoch_s"] * r["epochs"])
                                  for r in on)
    overlay_cost = statistics.median(r["board_overlays"] / max(1, r["board_n_overlays"]) / r["epoch_s"] for r in on)
    open_s = statistics.median(r["board_open"] for r in on)
    # Whole runs (set-up, epochs, OOF): the same work in both arms but the events, so their
    # difference over the epochs' time is the overhead, plus the machine's noise.
    wall_on = statistics.median(r["wall_s"] for r in on)
    wall_off = statistics.median(r["wall_s"] for r in off)
    epoch_off = statistics.median(r["epoch_s"] * r["epochs"] for r in off)
    steps = len(pd.read_csv(prepared / "folds.csv").query("fold != 0")) // 8 * epochs
    out = {"settings": {**{k: v for k, v in base.items() if not k.startswith("data.")}, "reps": reps,
                        "overlay_every": config.TensorboardConfig().overlay_every,
                        "overlay_images": config.TensorboardConfig().overlay_images,
                        "optimizer_steps_per_run": steps},
           "direct_overhead_pct": round(100 * direct, 2),
           "per_epoch_overhead_pct": round(100 * per_epoch, 2),
           "one_overlay_strip_pct_of_an_epoch": round(100 * overlay_cost, 2), "writer_open_s": round(open_s, 3),
           "run_wall_on_s": round(wall_on, 2), "run_wall_off_s": round(wall_off, 2),
           "epochs_s_off": round(epoch_off, 2),
           "wall_overhead_pct": round(100 * (wall_on - wall_off) / epoch_off, 2), "runs": runs}
    print(f"\nTensorBoard overhead per epoch (scalars + overlays): {out['per_epoch_overhead_pct']:.2f}% "
          f"(one overlay strip {out['one_overlay_strip_pct_of_an_epoch']:.2f}% of an epoch; opening the writer "
          f"{open_s:.2f} s once per fold)")
    print(f"TensorBoard overhead: direct {out['direct_overhead_pct']:.2f}% of epoch time "
          f"(time inside tboard / epoch seconds, median of {reps}); whole runs {wall_on:.1f} s on vs "
          f"{wall_off:.1f} s off = {out['wall_overhead_pct']:+.1f}% of the {epoch_off:.1f} s of epochs (noisy); "
          f"{steps} optimizer steps per run")
    write_result("tboard", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
