"""Does ``train.compile`` (torch.compile, inductor) pay within a training budget?

Times the pipeline's own training step (``pipeline.train.step.train_epoch`` on synthetic batches: the
resolved precision, channels_last, BCE + Dice, AdamW) for the fast recipe's model, eager and
compiled: the compile time (the compiled first epoch minus the eager first epoch) and the
steady step time, per precision. Writes ``benchmarks/results/compile.json`` (``compile-cuda.json``
with ``--device cuda``); ``break_even_steps`` = compile seconds / seconds saved
per step (inf when compiling is not faster).

    python benchmarks/bench_compile.py                    # Unet/Lite0 at 256, batch 8
    python benchmarks/bench_compile.py --size 512 --decoder 128,64,32,16,16
    python benchmarks/bench_compile.py --quick            # tiny model, seconds (make bench --quick)
    python benchmarks/bench_compile.py --device cuda --size 512 --precision fp32,fp16   # on a GPU
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from _common import write_result  # noqa: E402
from pipeline.distributed import Dist  # noqa: E402
from pipeline.losses import BceDiceLoss  # noqa: E402
from pipeline.train.optim import build_optimizer  # noqa: E402
from pipeline.train.plan import Inputs  # noqa: E402
from pipeline.train.step import NonFiniteGuard, Stepper, train_epoch  # noqa: E402
from pipeline.arch import model_kwargs  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.precision import autocast_factory, resolve_device, resolve_precision  # noqa: E402


def batches(n: int, bs: int, size: int) -> list:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        img = torch.randint(0, 256, (bs, size, size, 3), dtype=torch.uint8, generator=g)
        mask = (torch.rand(bs, size, size, generator=g) > 0.5).to(torch.uint8)
        out.append((img, mask, torch.arange(bs)))
    return out


def time_epochs(compiled: bool, args, data, device: torch.device, precision: str) -> list[float]:
    """Seconds per epoch of ``args.steps`` steps; the first epoch includes compiling (and CUDA warm-up)."""
    torch.manual_seed(0)
    model = build_model("Unet", args.encoder, "none", **model_kwargs(args.depth, args.decoder))
    model = model.to(device, memory_format=torch.channels_last)
    net = torch.compile(model) if compiled else model
    opt = build_optimizer(model, 1e-3, 1e-4)
    # As in train: a GradScaler only where fp16 needs one (CUDA); a disabled one is a pass-through.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step = Stepper(net, opt, None, scaler, NonFiniteGuard(10, Dist()), autocast_factory(device, precision), device)
    times = []
    for _ in range(args.epochs):
        # train_epoch drains the CUDA queue before it returns, so these are wall times of
        # finished work (and each epoch starts on an idle GPU).
        t0 = time.perf_counter()
        train_epoch(step, data, BceDiceLoss(), Inputs(device))
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="steps per timed epoch")
    ap.add_argument("--epochs", type=int, default=3, help="the first includes compiling")
    ap.add_argument("--encoder", default="tu-tf_efficientnet_lite0")
    ap.add_argument("--decoder", default="")
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (as train.device)")
    ap.add_argument("--precision", default="auto",
                    help="comma-separated train.precision values to time, e.g. fp32,fp16 (auto: bf16 on a "
                         "native-bf16 CPU, fp16 + GradScaler on CUDA)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    if args.quick:
        args.size, args.batch, args.steps, args.epochs = 64, 2, 3, 2
        args.encoder, args.depth, args.decoder = "tu-resnet18", 3, "32,16,8"
    data = batches(args.steps, args.batch, args.size)
    precisions = [resolve_precision(p.strip(), device) for p in args.precision.split(",")]
    res = {"size": args.size, "batch": args.batch, "steps": args.steps, "encoder": args.encoder,
           "decoder": args.decoder or "default", "device": _device_name(device), "threads": torch.get_num_threads()}
    for precision in precisions:
        r = res.setdefault(precision, {})
        for name, compiled in (("eager", False), ("compiled", True)):
            t = time_epochs(compiled, args, data, device, precision)
            r[name] = {"epoch_seconds": [round(v, 2) for v in t], "step_s": min(t[1:]) / args.steps}
            print(f"{precision:5s} {name:9s} epochs {[round(v, 2) for v in t]} s  -> {r[name]['step_s']:.4f} s/step",
                  flush=True)
        saved = r["eager"]["step_s"] - r["compiled"]["step_s"]
        # Both first epochs pay the warm-up (CUDA context, cuDNN autotuning); only compiling differs.
        compile_s = r["compiled"]["epoch_seconds"][0] - r["eager"]["epoch_seconds"][0]
        r["compile_seconds"] = round(compile_s, 1)
        r["speedup"] = round(r["eager"]["step_s"] / r["compiled"]["step_s"], 3)
        r["break_even_steps"] = round(compile_s / saved, 1) if saved > 0 else float("inf")
        print(f"{precision}: compile {compile_s:.0f} s, speedup x{r['speedup']}, "
              f"break-even after {r['break_even_steps']} steps", flush=True)
    write_result("compile" if device.type == "cpu" else f"compile-{device.type}", res)
    return 0


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


if __name__ == "__main__":
    sys.exit(main())
