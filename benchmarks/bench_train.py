"""Training throughput (loader overhead, precision) and a time-budgeted real-data fold.

    .venv/bin/python benchmarks/bench_train.py [--quick] [--minutes M] [--skip-real] [--size S]
                                               [--steps N] [--set key=value ...]

All on CPU, with the pipeline's own code: ``pipeline.train.step.train_epoch`` (the real
step: to_device, autocast, BCE+Dice, backward, clipping, AdamW) on the
config's model (default Unet/resnet18, batch 8) at S x S (default 256).

1. Loader overhead: steps/s with the real DataLoader (prepare's PNGs, seeded
   albumentations ``basic``, ``train.num_workers`` workers) vs with one
   preloaded batch reused every step; same model, same process, blocks
   alternated (A B A B) so that load from other processes hits both. Target:
   overhead <= 10% at 256 px.
2. Precision: s/step for fp32, fp32 + channels_last, bf16, bf16 + channels_last
   on the preloaded batch, same run, modes interleaved round-robin (median per
   mode). Expect bf16 + channels_last >= 2x fp32.
3. Real data: fold 0 of 5 of ../shared/data/carvana512 (2048 train images)
   at S x S, trained by ``train.run`` within about ``--minutes`` (default 30):
   the number of epochs (or, below one epoch, the number of steps) is planned
   from the throughput measured in part 1. Reports the OOF Dice at the
   original 512 x 512 and per-epoch validation Dice. ``--quick`` = fewer
   steps and a 1-minute smoke budget for part 3 (which then overruns the
   budget by the validation and OOF passes: they always cover the whole fold).

The prepare artifact goes to ``data.cache`` (default data/cache), so it is reused.
Writes benchmarks/results/train.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DistributedSampler  # noqa: E402

from pipeline import cache, distributed, prepare, train  # noqa: E402
from pipeline.train.optim import build_optimizer  # noqa: E402
from pipeline.train.plan import Inputs  # noqa: E402
from pipeline.train.build import make_loader  # noqa: E402
from pipeline.train.step import NonFiniteGuard, Stepper, train_epoch  # noqa: E402
from pipeline.config import load  # noqa: E402
from pipeline.configio import apply  # noqa: E402
from pipeline.augment import build_transform  # noqa: E402
from pipeline.data import SeededSampler, SegDataset, cv2_single_thread, load_index  # noqa: E402
from pipeline.losses import BceDiceLoss  # noqa: E402
from pipeline.arch import model_kwargs  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.precision import autocast_factory, resolve_precision  # noqa: E402
from pipeline.graph import Graph  # noqa: E402

REAL = ROOT.parent / "shared" / "data" / "carvana512"
CPU = torch.device("cpu")


def make_cfg(args, extra: dict | None = None):
    over = {"data.raw": str(args.raw), "data.cache": args.cache, "prepare.height": args.size,
            "prepare.width": args.size, "prepare.n_folds": 5, "train.fold": 0, "train.device": "cpu"}
    over.update(extra or {})
    cfg = load(None, over)
    for kv in args.set:
        k, v = kv.split("=", 1)
        apply(cfg, k, v)
    return cfg


class Rig:
    """One model, optimizer and loss, stepped by step.train_epoch on any batch source."""

    def __init__(self, cfg):
        t = cfg.train
        torch.manual_seed(0)
        self.t = t
        self.model = build_model(t.arch, t.encoder, t.encoder_weights, **model_kwargs(t.encoder_depth,
                                                                                      t.decoder_channels))
        self.opt = build_optimizer(self.model, t.lr, t.weight_decay)
        self.loss = BceDiceLoss(t.bce_weight, t.dice_weight)
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.guard = NonFiniteGuard(t.max_nonfinite, distributed.Dist())

    def steps(self, batches, n: int, precision: str, channels_last: bool) -> float:
        """Seconds per optimizer step over n steps of ``batches`` (a DataLoader or a list)."""
        self.model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        s = Stepper(self.model, self.opt, None, self.scaler, self.guard, autocast_factory(CPU, precision), CPU,
                    grad_clip=self.t.grad_clip)
        r = train_epoch(s, batches, self.loss, Inputs(CPU, channels_last), max_updates=n)
        return r.seconds / r.updates

    @torch.no_grad()
    def forward_only(self, batch, n: int, precision: str) -> float:
        from pipeline.data import to_device
        self.model.eval().to(memory_format=torch.channels_last)
        x, _ = to_device(batch[0], None, CPU, True)
        ac = autocast_factory(CPU, precision)
        t0 = time.perf_counter()
        for _ in range(n):
            with ac():
                self.model(x)
        return (time.perf_counter() - t0) / n


def table(rows: list[list], head: list[str]) -> str:
    cols = [head] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cols) for i in range(len(head))]
    line = lambda r: "  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([line(head), line(["-" * x for x in w])] + [line(r) for r in cols[1:]])


def throughput(args, cfg, prepared: Path) -> dict:
    t = cfg.train
    index = load_index(prepared)
    tr = index[index["fold"] != 0].reset_index(drop=True)
    ds = SegDataset(tr["image"], tr["mask"], build_transform(cfg.spec("train.augment")))
    sampler = SeededSampler(DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0), seed=0)
    dl = make_loader(ds, sampler, t.batch_size, t.num_workers, CPU, drop_last=True, seed=0)
    rig = Rig(cfg)
    batch = next(iter(dl))
    pre = [batch] * args.steps
    n, blocks = args.steps, (1 if args.quick else 2)
    prec_rounds, prec_steps = (1, 2) if args.quick else (3, max(2, n // 3))
    # The loader is measured in the precision training uses here (auto: bf16 only on CPUs with native bf16).
    auto = resolve_precision("auto", CPU)
    with cv2_single_thread():
        rig.steps(pre, 2, auto, True)                   # warm-up: kernels, allocator
        rig.steps(dl, 2, auto, True)                    # warm-up: workers started and prefetching
        loader_s, preload_s = [], []
        for b in range(blocks):
            sampler.set_epoch(b + 1)
            loader_s.append(rig.steps(dl, n, auto, True))
            preload_s.append(rig.steps(pre, n, auto, True))
        modes = {"fp32": ("fp32", False), "fp32 + channels_last": ("fp32", True),
                 "bf16": ("bf16", False), "bf16 + channels_last": ("bf16", True)}
        for precision, cl in modes.values():
            rig.steps(pre, 1, precision, cl)              # warm-up for this layout/dtype
        # Round-robin over the modes, median per mode: a burst of load from other processes
        # then hits every mode alike instead of one of them.
        times = {m: [] for m in modes}
        for _ in range(prec_rounds):
            for m, (precision, cl) in modes.items():
                times[m].append(rig.steps(pre, prec_steps, precision, cl))
        prec = {m: statistics.median(v) for m, v in times.items()}
        fwd = rig.forward_only(batch, max(2, n // 2), auto)
    lo, pr = statistics.median(loader_s), statistics.median(preload_s)
    res = {"size": args.size, "batch_size": t.batch_size, "num_workers": t.num_workers, "augment": t.augment,
           "model": f"{t.arch}/{t.encoder}", "steps_per_block": n, "blocks": blocks,
           "loader_s_per_step": loader_s, "preloaded_s_per_step": preload_s,
           "loader_precision": auto, "loader_steps_per_s": 1 / lo, "preloaded_steps_per_s": 1 / pr, "loader_overhead": lo / pr - 1,
           "precision_s_per_step": prec, "precision_rounds": times, "bf16_cl_speedup_vs_fp32": prec["fp32"] / prec["bf16 + channels_last"],
           "train_images_per_s": t.batch_size / lo, "eval_images_per_s": t.batch_size / fwd}
    print(f"\n1. Loader overhead at {args.size}x{args.size}, {t.arch}/{t.encoder}, batch {t.batch_size}, "
          f"{auto} + channels_last, {t.num_workers} workers, augment={t.augment} (median of {blocks} block(s) "
          f"of {n} steps)")
    print(table([["real DataLoader", f"{1 / lo:.3f}", f"{lo:.3f}"], ["preloaded batch", f"{1 / pr:.3f}", f"{pr:.3f}"]],
                ["source", "steps/s", "s/step"]))
    print(f"loader overhead: {100 * (lo / pr - 1):+.1f}% (target <= 10%)")
    print(f"\n2. Precision (preloaded batch; median of {prec_rounds} round-robin round(s) of {prec_steps} steps)")
    print(table([[k, f"{v:.3f}", f"{prec['fp32'] / v:.2f}x"] for k, v in prec.items()],
                ["mode", "s/step", "vs fp32"]))
    return res


def plan_budget(minutes: float, n_train: int, n_val: int, batch: int, ips: float, eval_ips: float) -> dict:
    """Epochs (and a step cap below one epoch) that fit ``minutes`` of training + validation + OOF."""
    val_s = n_val / eval_ips
    epoch_s = n_train / ips + val_s + 2.0                 # + checkpoints and curve
    avail = minutes * 60 - val_s - 15.0                   # OOF pass + start-up
    epochs = int(avail // epoch_s)
    if epochs >= 1:
        return {"epochs": epochs, "max_train_steps": 0, "planned_s": epochs * epoch_s + val_s + 15}
    steps = max(1, int((avail - val_s) * ips / batch))
    return {"epochs": 1, "max_train_steps": steps, "planned_s": steps * batch / ips + 2 * val_s + 15}


def real_fold(args, cfg, tp: dict, prepared: Path) -> dict:
    index = load_index(prepared)
    n_val = int((index["fold"] == 0).sum())
    n_train = len(index) - n_val
    budget = plan_budget(args.minutes, n_train, n_val, cfg.train.batch_size, tp["train_images_per_s"],
                         tp["eval_images_per_s"])
    cfg = make_cfg(args, {"train.epochs": budget["epochs"], "train.max_train_steps": budget["max_train_steps"],
                          "train.warmup_epochs": 0.3 if budget["epochs"] > 1 else 0.0})
    out = Graph(cfg).fold_dir(0)
    cached = cache.is_complete(out)
    print(f"\n3. Real data: fold 0 of 5 of {args.raw} ({n_train} train / {n_val} val images) at "
          f"{args.size}x{args.size}, budget {args.minutes} min -> {budget['epochs']} epoch(s)"
          + (f", {budget['max_train_steps']} steps" if budget["max_train_steps"] else "")
          + (" [cached result]" if cached else ""), flush=True)
    t0 = time.time()
    summary = train.run(cfg)[0]
    wall = time.time() - t0
    m = pd.read_csv(out / "metrics.csv")
    res = {"budget_minutes": args.minutes, "plan": budget, "wall_s": None if cached else wall, "cached": cached,
           "fold_dir": str(out), "train_images": n_train, "val_images": n_val,
           "oof_dice_original": summary["dice_original"], "oof_dice_model": summary["dice_model"],
           "original_size": "512x512", "epochs": m.to_dict("records"), "config": cfg.train.__dict__}
    print(table([[int(r.epoch), f"{r.lr:.2e}", f"{r.train_loss:.4f}", f"{r.val_loss:.4f}", f"{r.val_dice:.4f}",
                  f"{r.seconds:.0f}", f"{r.images_per_s:.1f}"] for r in m.itertuples()],
                ["epoch", "lr", "train loss", "val loss", "val Dice", "s", "img/s"]))
    print(f"OOF Dice (fold 0, {n_val} images): {summary['dice_original']:.4f} at 512x512 (original), "
          f"{summary['dice_model']:.4f} at {args.size}x{args.size}; "
          + (f"wall {wall / 60:.1f} min" if not cached else "cached"))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--minutes", type=float, default=None, help="part 3 budget (default 30; 1 with --quick)")
    ap.add_argument("--skip-real", action="store_true", help="parts 1-2 only")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=None, help="steps per timed block (default 10; 4 with --quick)")
    ap.add_argument("--raw", type=Path, default=REAL)
    ap.add_argument("--cache", default="data/cache")
    ap.add_argument("--set", nargs="*", default=[], help="train config overrides, e.g. train.encoder=resnet34")
    args = ap.parse_args(argv)
    args.minutes = args.minutes if args.minutes is not None else (1.0 if args.quick else 30.0)
    args.steps = args.steps or (4 if args.quick else 10)
    if not (args.raw / "train").is_dir():
        print(f"{args.raw}: no Kaggle-layout data; nothing to benchmark (pass --raw)")
        return 0
    cfg = make_cfg(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f} at start", flush=True)
    prepared = prepare.run(cfg)
    results = {"throughput": throughput(args, cfg, prepared)}
    if not args.skip_real:
        results["real"] = real_fold(args, cfg, results["throughput"], prepared)
    results["load_average_end"] = os.getloadavg()[0]
    out = ROOT / "benchmarks" / "results" / "train.json"
    cache.write_json(out, results)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
