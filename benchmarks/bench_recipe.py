"""Time to Dice: the recipes' training step against the machine's own limits (CPU, bf16).

    .venv/bin/python benchmarks/bench_recipe.py [--quick] [--steps N] [--only peak,recipes,candidates,levers,predict]
                                                [--epoch-steps N] [--raw DIR] [--cache DIR]

Every table and every JSON row names the CPU (lscpu's model name; the JSON's ``machine`` also
records which of avx2, avx512f, avx512_bf16, amx_bf16, amx_tile it has): a ratio to the peak
means nothing without the chip it was measured on.

1. peak: achieved TFLOP/s of a bf16 matmul (2048 and 4096 square, best call), a bf16
   channels_last conv2d (3x3, 256 -> 256 channels, 64x64, batch 8; explicit bf16 weights and
   fp32 weights under autocast, as training runs it) and the fp32 matmul and conv, under
   torch.no_grad. A child with ONEDNN_VERBOSE=1 and MKL_VERBOSE=1 runs the same ops once and
   the implementations they executed are recorded (``brg_conv_fwd:avx512_core_bf16``,
   ``brg_matmul:avx512_core_amx``, a ``ref`` fallback, MKL's SGEMM): whether matmul really
   takes a native bf16 path. The peak used for every ratio below is the best bf16 figure, and
   the op that gave it is named.
2. recipes: configs/carvana512.yaml (fast) and configs/carvana512-best.yaml (best) at each of
   their training shapes (fast: 288 crops; best: whole images at 256, then 288 crops), batch 8,
   the precision the pipeline resolves (``precision.resolve_precision``: bf16 on a CPU with
   native bf16), channels_last and the heap the pipeline keeps (``heap.keep_pages``, set for
   this whole process as train.run does). Model FLOPs per image of one forward + backward
   (``torch.utils.flop_counter``, its convolution-backward formula corrected for grouped convs:
   see :func:`conv_backward_flop`) and images/s of (i) the pipeline's step
   (``train.step.train_epoch`` with the Stepper, losses and input rule ``train.build.parts`` /
   ``plan.Inputs`` build, so boundary weight, gradient-norm check and schedule included) on one
   preloaded loader batch reused, (ii) a plain loop (same network, AdamW, BCE + soft Dice,
   autocast, zero_grad / backward / step) on the same tensors already cropped, and (iii) the
   real epoch: the pipeline's DataLoader over the prepared images (decode, augmentation,
   ``train.num_workers`` workers) for ``--epoch-steps`` steps. Achieved TFLOP/s = GFLOP/image x
   images/s, as a fraction of the peak; and the pipeline step and the real epoch as ratios of
   the plain loop (what the pipeline's extras and the loader cost).
3. candidates: the pipeline step on a preloaded batch at 288 crops, batch 8, for Unet with
   tu-tf_efficientnet_lite0/1/2, resnet18 and resnet34, each with the default and the slim
   decoder (128,64,32,16,16), plus Lite0 default / slim on whole 512 images (predict's size):
   parameters, GFLOP/image, images/s and fraction of peak. ``--quick``: two candidates.
4. levers, each a row with images/s and minor page faults per step (getrusage ru_minflt over
   the timed steps, this process only: loader workers not counted), as a ratio to a baseline:
   - env levers (the fast recipe's pipeline step, preloaded batch, one child process per
     setting so the environment applies from process start): glibc malloc tunables (a large
     trim_threshold with mmap_threshold 32 MiB, the old glibc cap, or 1 GiB; + top_pad;
     + hugetlb), torch's THP_MEM_ALLOC_ENABLE, OMP_PROC_BIND=close OMP_PLACES=cores, jemalloc /
     tcmalloc by LD_PRELOAD where installed (else "not installed"). A baseline child (default
     environment) runs before and after every row (shared by neighbours); the row's ratio is
     to the mean of its two.
     A tiny probe (ctypes malloc / free, no torch) shows per setting whether glibc hands a
     freed 24 or 48 MiB block back to the OS, so that every reuse faults its pages in again:
     by default blocks above the 32 MiB dynamic mmap threshold always are. (Older glibc also
     refused an mmap_threshold above HEAP_MAX_SIZE / 2 = 32 MiB; the probe's 48 MiB column
     under the 1 GiB setting says whether this one does.)
   - in-process levers (one child, modes round-robin): contiguous instead of channels_last
     (train.channels_last=false) and torch.set_num_threads(1), against the same child's
     baseline.
   - loader workers: the real epoch with train.num_workers 0, 1, 2 (the default, before and
     after), as a ratio to the baseline step on a preloaded batch.

5. predict: forward-only images/s at 512 through ``tta.predict_proba`` with the fast recipe's
   TTA (hflip), under inference_mode + autocast as predict runs it, batch 4, 8, 16, the two
   views batched into one forward of 2N images (predict.max_forward=0, the default) vs two
   forwards of N (max_forward=N), once with glibc's default heap and once with the pages kept
   (``heap.keep_pages``, as predict.run does); ratios to batch 8 batched (predict's defaults)
   in the same child.

Timing: this machine's speed drifts (~20% over minutes, other processes), so settings that
share a process run in alternating blocks (A B A B ..., ``--steps`` split over 2 rounds; median
per setting), after warm-up steps of their own. Random weights (encoder_weights=none) throughout:
speed does not depend on them, and no weights file is needed. The prepare artifact of
``--raw`` under ``--cache`` is built first when it is missing. ``--quick``: a step or two per
row, two candidates, fewer levers, 2048 matmuls only (a smoke test: ~3 min on an idle machine).
``--only recipes`` / ``candidates`` also runs part 1 (their ratios need its peak; it takes
seconds). The default run takes ~20 min on 2 cores.
Writes benchmarks/results/recipe.json.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

from _common import cpu_model, lscpu, write_result  # noqa: E402
from pipeline import cache, prepare  # noqa: E402
from pipeline.arch import model_kwargs  # noqa: E402
from pipeline.config import load  # noqa: E402
from pipeline.data import SegDataset, cv2_single_thread, load_index, to_device  # noqa: E402
from pipeline.distributed import Dist  # noqa: E402
from pipeline.graph import Graph  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.precision import autocast, resolve_precision  # noqa: E402
from pipeline.schedule import EpochShape  # noqa: E402
from pipeline.train import build  # noqa: E402
from pipeline.train.plan import BASE_LOSS, Inputs, plan_epochs  # noqa: E402
from pipeline.train.step import train_epoch  # noqa: E402
from pipeline.tta import predict_proba  # noqa: E402

REAL = ROOT.parent / "shared" / "data" / "carvana512"
RECIPES = {"fast": ROOT / "configs" / "carvana512.yaml", "best": ROOT / "configs" / "carvana512-best.yaml"}
FAST = RECIPES["fast"]
SLIM = "128,64,32,16,16"
ENCODERS = ("tu-tf_efficientnet_lite0", "tu-tf_efficientnet_lite1", "tu-tf_efficientnet_lite2", "resnet18",
            "resnet34")
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
PARTS = ("peak", "recipes", "candidates", "levers", "predict")
CPU = torch.device("cpu")
CROP288 = EpochShape(288, 288, True)
WHOLE512 = EpochShape(512, 512, False)

MIB, GIB = 1 << 20, 1 << 30
# glibc's defaults: a block above the mmap threshold (dynamic, at most 32 MiB on 64-bit) is
# mmapped and unmapped on free, and a free heap top above trim_threshold is given back: either
# way its pages fault in again at the next step. A fixed threshold (which turns the dynamic one
# off) needs a large trim_threshold beside it, or the heap is trimmed at every free.
HEAP32 = f"glibc.malloc.mmap_threshold={32 * MIB}:glibc.malloc.trim_threshold={4 * GIB}"
HEAP1G = f"glibc.malloc.mmap_threshold={GIB}:glibc.malloc.trim_threshold={4 * GIB}"
# (lever, setting, environment) for one child each; jemalloc / tcmalloc rows are added where found.
ENV_LEVERS = [
    ("allocator", "glibc mmap_threshold 1 GiB + trim_threshold 4 GiB", {"GLIBC_TUNABLES": HEAP1G}),
    ("allocator", "torch THP_MEM_ALLOC_ENABLE=1 (huge pages for tensors >= 2 MiB)", {"THP_MEM_ALLOC_ENABLE": "1"}),
    ("allocator", "glibc mmap_threshold 32 MiB + trim_threshold 4 GiB", {"GLIBC_TUNABLES": HEAP32}),
    ("allocator", "glibc 1 GiB + trim 4 GiB + top_pad 64 MiB",
     {"GLIBC_TUNABLES": f"{HEAP1G}:glibc.malloc.top_pad={64 * MIB}"}),
    ("allocator", "glibc 1 GiB + trim 4 GiB + hugetlb=1 (THP for malloc)",
     {"GLIBC_TUNABLES": f"{HEAP1G}:glibc.malloc.hugetlb=1"}),
    ("threads", "OMP_PROC_BIND=close OMP_PLACES=cores", {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}),
]
# What a lever child must not inherit from this shell, so that its baseline is the default environment.
LEVER_ENV = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_ARENA_MAX", "MALLOC_TOP_PAD_", "MALLOC_TRIM_THRESHOLD_",
             "MALLOC_MMAP_THRESHOLD_", "THP_MEM_ALLOC_ENABLE", "OMP_PROC_BIND", "OMP_PLACES", "OMP_NUM_THREADS")
PRELOADS = {"jemalloc": ("libjemalloc.so*",), "tcmalloc": ("libtcmalloc.so*", "libtcmalloc_minimal.so*")}
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib", "/usr/local/lib")
PREDICT_BATCHES = (4, 8, 16)
WORKER_SETTLE_S = 1.5     # after a real-epoch block: the workers' prefetch (2 batches each) runs out

# Run with ONEDNN_VERBOSE=1 / MKL_VERBOSE=1: each library prints the implementation of every call.
VERBOSE_PROBE = """
import torch
n = {n}
with torch.no_grad():
    a = torch.randn(n, n, dtype=torch.bfloat16)
    a @ a
    a.float() @ a.float()
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(8, 256, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv(x)
    conv(x)
    conv.to(torch.bfloat16)(x.to(torch.bfloat16))
"""

# Fraction of a freed block's pages that fault again when a block of the same size is reused:
# ~1 = glibc returned it to the OS (mmapped, or trimmed), ~0 = kept in the heap.
MMAP_PROBE = """
import ctypes, json, resource
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
def cycle(n):
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
out = {}
for mib in (24, 48):
    n = mib << 20
    cycle(n)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        cycle(n)
    out[f"{mib} MiB"] = round((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 4 / (n / 4096), 2)
print(json.dumps(out))
"""


# ---------------------------------------------------------------------------------------- machine
def machine() -> dict:
    """The CPU (lscpu), its relevant ISA flags, torch / oneDNN / glibc versions, threads, load."""
    out = lscpu()
    flag_line = re.search(r"^Flags:\s*(.+)$", out, re.M)
    flags = set(flag_line.group(1).split()) if flag_line else set()
    onednn = re.search(r"MKL-DNN (v[\d.]+)", torch.__config__.show())
    return {"cpu": cpu_model(out), "flags": {f: f in flags for f in FLAGS},
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "onednn": onednn.group(1) if onednn else None, "glibc": platform.libc_ver()[1],
            "load_average_start": round(os.getloadavg()[0], 2)}


def cpu_line(m: dict) -> str:
    have = [f for f in FLAGS if m["flags"][f]]
    lack = [f for f in FLAGS if not m["flags"][f]]
    return f"CPU: {m['cpu']} ({' '.join(have) or 'none of ' + '/'.join(FLAGS)}" + \
        (f"; no {' '.join(lack)})" if lack else ")") + f", {m['cpus']} CPUs, torch {m['torch']}"


def md_table(head: list[str], rows: list[list]) -> str:
    cells = [head] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(r) for r in cells[1:]])


def fmt(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


# ---------------------------------------------------------------------------------------- timing
def minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def block(run, n: int) -> tuple[float, float]:
    """(seconds per step, minor page faults per step) of ``run(n)``, which does n steps and
    returns the seconds they took."""
    f0 = minflt()
    seconds = run(n)
    return seconds / n, (minflt() - f0) / n


def interleaved(modes: dict, rounds: int, images_per_step: dict | int) -> dict:
    """``modes``: name -> (run, steps per block, warm-up steps); run(n) does n steps and returns
    their seconds. Each mode is warmed up, then ``rounds`` rounds run one block of every mode in
    turn (A B C A B C): drift and bursts of load from other processes hit every mode alike.
    ``images_per_step``: one number, or one per mode. Returns name -> median s/step, images/s,
    faults/step and the blocks' (s/step, faults/step)."""
    per = images_per_step if isinstance(images_per_step, dict) else {m: images_per_step for m in modes}
    for run, _, warm in modes.values():
        if warm:
            run(warm)
    got = {m: [] for m in modes}
    for _ in range(rounds):
        for m, (run, n, _) in modes.items():
            got[m].append(block(run, n))
    out = {}
    for m, blocks in got.items():
        s = statistics.median(b[0] for b in blocks)
        out[m] = {"s_per_step": s, "images_per_s": per[m] / s,
                  "faults_per_step": statistics.median(b[1] for b in blocks),
                  "blocks": [[round(a, 4), round(b, 1)] for a, b in blocks]}
    return out


# ---------------------------------------------------------------------------------------- 1. peak
def best_call(fn, min_s: float, min_reps: int = 3) -> float:
    """Seconds of the fastest of at least ``min_reps`` calls (and ``min_s`` in all), after one warm-up."""
    fn()
    best, t_end, reps = float("inf"), time.perf_counter() + min_s, 0
    while reps < min_reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best, reps = min(best, time.perf_counter() - t0), reps + 1
    return best


@torch.no_grad()
def peak_ops(sizes: tuple[int, ...], min_s: float) -> list[dict]:
    rows = []
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        for n in sizes:
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            s = best_call(lambda: a @ b, min_s)
            rows.append({"op": f"matmul {n}x{n}x{n}", "dtype": name, "tflops": 2 * n ** 3 / s / 1e12, "s": s})
    nb, c, hw = 8, 256, 64
    flop = 2 * nb * c * c * 9 * hw * hw
    conv = torch.nn.Conv2d(c, c, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(nb, c, hw, hw).contiguous(memory_format=torch.channels_last)
    conv16, x16 = torch.nn.Conv2d(c, c, 3, padding=1).to(torch.bfloat16, memory_format=torch.channels_last), \
        x.to(torch.bfloat16)
    what = f"conv2d 3x3 {c}->{c} {hw}x{hw} batch {nb} channels_last"

    def under_autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            conv(x)

    for name, fn in (("bf16", lambda: conv16(x16)), ("bf16 autocast (fp32 weights)", under_autocast),
                     ("fp32", lambda: conv(x))):
        s = best_call(fn, min_s)
        rows.append({"op": what, "dtype": name, "tflops": flop / s / 1e12, "s": s})
    return rows


def onednn_impls(n: int) -> dict:
    """What oneDNN and MKL executed for one bf16 / fp32 matmul and the bf16 / fp32 convs (child process)."""
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "MKL_VERBOSE": "1"}
    try:
        p = subprocess.run([sys.executable, "-c", VERBOSE_PROBE.format(n=n)], capture_output=True, text=True,
                           env=env, timeout=300)
    except subprocess.SubprocessError as e:
        return {"error": repr(e)}
    isa, seen, mkl = None, {}, []
    for line in p.stdout.splitlines():
        if line.startswith("MKL_VERBOSE") and "GEMM" in line:
            mkl.append(line.split(" ")[1])                  # e.g. SGEMM(N,N,4096,4096,4096,...)
            continue
        f = line.split(",")
        if "isa:" in line:
            isa = line.split("isa:", 1)[1]
        if "exec" not in f:
            continue
        i = f.index("exec")                                 # exec,<engine>,<kind>,<impl>,<prop>,<memory>,...
        kind, impl = f[i + 2], f[i + 3]
        src = re.search(r"src:(\w+)", f[i + 5])
        key = (kind, impl, src.group(1) if src else "?", f[-2])
        seen[key] = seen.get(key, 0) + 1
    execs = [{"primitive": k[0], "impl": k[1], "src": k[2], "problem": k[3], "calls": c} for k, c in seen.items()]

    def impl_of(kind: str, src: str) -> str | None:
        return next((e["impl"] for e in execs if e["primitive"] == kind and e["src"] == src), None)

    summary = {"matmul bf16": impl_of("matmul", "bf16"), "conv bf16": impl_of("convolution", "bf16"),
               "conv fp32": impl_of("convolution", "f32"),
               "matmul fp32": impl_of("matmul", "f32") or (f"MKL {mkl[0].split('(')[0]}" if mkl else None)}
    return {"onednn_isa": isa, "summary": summary, "fallback": any("ref" in (v or "") for v in summary.values()),
            "execs": execs, "mkl_gemm": mkl, "rc": p.returncode,
            "stderr_tail": p.stderr[-500:] if p.returncode else ""}


def part_peak(args, m: dict) -> dict:
    print(f"\n## 1. Machine peak (best call, torch.no_grad)\n{cpu_line(m)}", flush=True)
    sizes = (2048,) if args.quick else (2048, 4096)
    rows = peak_ops(sizes, 0.2 if args.quick else 1.0)
    impls = onednn_impls(sizes[-1])
    bf16 = [r for r in rows if r["dtype"].startswith("bf16")]
    top = max(bf16, key=lambda r: r["tflops"])
    for r in rows:
        r["cpu"] = m["cpu"]
    print(md_table(["op", "dtype", "TFLOP/s", "s/call", "cpu"],
                   [[r["op"], r["dtype"], fmt(r["tflops"], 3), fmt(r["s"], 4), m["cpu"]] for r in rows]))
    print(f"\noneDNN {m['onednn']} ISA: {impls.get('onednn_isa')}")
    print(md_table(["op", "implementation executed"],
                   [[k, v or "(no line)"] for k, v in impls.get("summary", {}).items()]))
    if impls.get("fallback"):
        print("WARNING: a reference (ref) implementation ran: no native kernel for that op")
    print(f"\npeak for the ratios below: {top['tflops']:.3f} TFLOP/s bf16 ({top['op']}, {top['dtype']})")
    return {"rows": rows, "implementations": impls, "peak_tflops": top["tflops"],
            "peak_op": f"{top['op']} {top['dtype']}"}


# ---------------------------------------------------------------------------------------- recipes
@dataclass
class Recipe:
    """One config's fold 0 as train builds it: context, data, model + Stepper + losses, one batch."""
    name: str
    cfg: object
    fold: build.Fold
    data: build.Data
    parts: build.Parts
    batch: list                  # one loader item (uint8 images and masks at the prepared size), reused

    def inputs(self, shape: EpochShape, channels_last: bool = True) -> Inputs:
        # A crop epoch's windows from a seeded generator, as plan.EpochPlan.crop_rng gives them.
        return Inputs(CPU, channels_last=channels_last, stats=self.parts.stats, shape=shape,
                      crop_rng=torch.Generator().manual_seed(0) if shape.crop else None)

    def shapes(self) -> list[EpochShape]:
        """The training shapes of the recipe's epochs, in order, each once."""
        plans = plan_epochs(self.cfg.train, (self.fold.height, self.fold.width))
        return list(dict.fromkeys(p.shape for p in plans))

    def step_run(self, shape: EpochShape, threads: int | None = None):
        """run(n) -> seconds of n pipeline steps on the preloaded batch at ``shape`` (``threads``:
        torch's intra-op threads for them)."""
        inputs = self.inputs(shape, self.cfg.train.channels_last)
        loss = self.parts.losses[BASE_LOSS]

        def run(n: int) -> float:
            before = torch.get_num_threads()
            torch.set_num_threads(threads or before)
            try:
                return train_epoch(self.parts.step, [self.batch] * n, loss, inputs, max_updates=n).seconds
            finally:
                torch.set_num_threads(before)
        return run

    def epoch_run(self, shape: EpochShape):
        """run(n) -> seconds of n pipeline steps over the real DataLoader (a fresh sampler epoch per call)."""
        epoch = [0]
        loss = self.parts.losses[BASE_LOSS]

        def run(n: int) -> float:
            epoch[0] += 1
            self.data.sampler.set_epoch(epoch[0])
            inputs = self.inputs(shape, self.cfg.train.channels_last)
            r = train_epoch(self.parts.step, self.data.train_dl, loss, inputs, max_updates=n)
            # The persistent workers go on prefetching the next batches after the last step; let them
            # finish (untimed) rather than compete with whatever block runs next.
            if self.cfg.train.num_workers:
                time.sleep(WORKER_SETTLE_S)
            return r.seconds
        return run


def overrides(args, extra: list[str] = ()) -> list[str]:
    return [f"data.raw={args.raw}", f"data.cache={args.cache}", "prepare.height=512", "prepare.width=512",
            "prepare.n_folds=5", "train.fold=0", "train.device=cpu", "train.encoder_weights=none", *extra]


def open_recipe(args, name: str, path: Path, extra: list[str] = ()) -> Recipe:
    cfg = load(path, overrides(args, extra))
    g = Graph(cfg)
    if not cache.is_complete(g.prepare_dir):
        t0 = time.time()
        print(f"prepare: {g.prepare_dir} missing, building it", flush=True)
        prepare.run(cfg, g)
        print(f"prepare: {time.time() - t0:.0f} s", flush=True)
    index = load_index(g.prepared_dir)
    d = Dist(device="cpu", precision=resolve_precision(cfg.train.precision, "cpu", "train.precision"))
    f = build.context(cfg, index, cfg.train.fold, d, Path(tempfile.gettempdir()) / "bench_recipe", "bench",
                      g.prepared_dir)
    data = build.data(f, index)
    parts = build.parts(f, data)
    ds = data.train_dl.dataset
    batch = default_collate([ds[(i, i)] for i in range(cfg.train.batch_size)])
    return Recipe(name, cfg, f, data, parts, batch)


class Plain:
    """The textbook step on tensors already on the device: autocast forward, BCE + soft Dice in
    fp32, zero_grad / backward / AdamW step. No crop, no edge band, no gradient-norm check, no
    schedule: what the network alone costs the optimizer loop."""

    def __init__(self, r: Recipe, shape: EpochShape):
        t = r.cfg.train
        torch.manual_seed(0)
        self.model = build_model(t.arch, t.encoder, "none", **model_kwargs(t.encoder_depth, t.decoder_channels,
                                                                            t.input_scale))
        self.model = self.model.to(memory_format=torch.channels_last).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        self.bf16 = r.fold.precision == "bf16"
        self.x, self.y = r.inputs(shape)(r.batch)

    def run(self, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            self.opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                logits = self.model(self.x)
            logits = logits.float()
            p = torch.sigmoid(logits)
            dice = 1 - (2 * (p * self.y).sum((1, 2, 3)) + 1) / (p.sum((1, 2, 3)) + self.y.sum((1, 2, 3)) + 1)
            loss = F.binary_cross_entropy_with_logits(logits, self.y) + dice.mean()
            loss.backward()
            self.opt.step()
        return time.perf_counter() - t0


def conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                       _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """FLOPs of aten.convolution_backward: the input gradient and the weight gradient each take the
    forward's multiply-adds. torch's own formula (2.14) ignores ``groups`` for the weight
    gradient, which counts a depthwise conv's as C times too many: 64 GFLOP of backward against
    7.3 of forward for Unet-Lite0 at 288."""
    from torch.utils.flop_counter import conv_flop_count
    products = bool(output_mask[0]) + bool(output_mask[1])
    return conv_flop_count(x_shape, w_shape, grad_out_shape, transposed) * products


def gflop_per_image(r: Recipe, shape: EpochShape) -> float:
    """Forward + backward FLOPs per image of the recipe's model at ``shape`` (counted on 2 images)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = r.parts.model.train()
    x, _ = r.inputs(shape)(r.batch)
    x = x[:2]
    fixed = {torch.ops.aten.convolution_backward: conv_backward_flop}
    with FlopCounterMode(display=False, custom_mapping=fixed) as fc:
        with r.fold.autocast():
            out = model(x)
        out.float().mean().backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops() / x.shape[0] / 1e9


def of_peak(gflop: float, ips: float, peak: float | None) -> tuple[float, float | None]:
    tflops = gflop * ips / 1e3
    return tflops, (tflops / peak if peak else None)


def part_recipes(args, m: dict, peak: float | None) -> list[dict]:
    rows = []
    for name, path in RECIPES.items():
        r = open_recipe(args, name, path)
        bs = r.cfg.train.batch_size
        for shape in r.shapes():
            gflop = gflop_per_image(r, shape)
            plain = Plain(r, shape)
            with cv2_single_thread():   # the loader's workers fork: cv2 without its thread pool, as train runs
                res = interleaved({"pipeline step": (r.step_run(shape), args.block, args.warmup),
                                   "plain loop": (plain.run, args.block, args.warmup),
                                   "real epoch": (r.epoch_run(shape), args.epoch_block, 2)}, args.rounds, bs)
            row = {"recipe": name, "config": str(path.relative_to(ROOT)), "shape": str(shape), "batch": bs,
                   "precision": r.fold.precision, "channels_last": r.cfg.train.channels_last,
                   "num_workers": r.cfg.train.num_workers, "encoder": r.cfg.train.encoder,
                   "decoder_channels": r.cfg.train.decoder_channels or "default",
                   "gflop_per_image": gflop, "cpu": m["cpu"]}
            for mode, v in res.items():
                v["tflops"], v["of_peak"] = of_peak(gflop, v["images_per_s"], peak)
                row[mode.replace(" ", "_")] = v
            plain_ips = res["plain loop"]["images_per_s"]
            row["pipeline_vs_plain"] = res["pipeline step"]["images_per_s"] / plain_ips
            row["real_vs_plain"] = res["real epoch"]["images_per_s"] / plain_ips
            rows.append(row)
            print(f"  {name} {shape}: pipeline {res['pipeline step']['images_per_s']:.2f}, plain {plain_ips:.2f}, "
                  f"real {res['real epoch']['images_per_s']:.2f} img/s", flush=True)
    print(f"\n## 2. Recipes: images/s, achieved TFLOP/s and fraction of the {fmt(peak, 3)} TFLOP/s bf16 peak "
          f"(batch 8, {rows[0]['precision']} autocast, channels_last; median of {args.rounds} block(s) of "
          f"{args.block} steps, real epoch {args.epoch_block})\n{cpu_line(m)}")
    head = ["recipe", "shape", "GFLOP/img"]
    for mode in ("pipeline", "plain", "real"):
        head += [f"{mode} img/s", f"{mode} TFLOP/s", f"{mode} % peak"]
    head += ["pipeline/plain", "real/plain", "faults/step pipe, plain, real", "cpu"]
    out = []
    for row in rows:
        cells = [row["recipe"], row["shape"], fmt(row["gflop_per_image"], 1)]
        for mode in ("pipeline_step", "plain_loop", "real_epoch"):
            v = row[mode]
            cells += [fmt(v["images_per_s"]), fmt(v["tflops"], 3), fmt(v["of_peak"] and 100 * v["of_peak"], 1)]
        faults = ", ".join(f"{row[k]['faults_per_step']:.0f}" for k in ("pipeline_step", "plain_loop", "real_epoch"))
        cells += [fmt(row["pipeline_vs_plain"]), fmt(row["real_vs_plain"]), faults, m["cpu"]]
        out.append(cells)
    print(md_table(head, out))
    return rows


# ---------------------------------------------------------------------------------------- candidates
def part_candidates(args, m: dict, peak: float | None) -> list[dict]:
    todo = [(e, dec, CROP288) for e in ENCODERS for dec in ("", SLIM)] + \
        [(ENCODERS[0], dec, WHOLE512) for dec in ("", SLIM)]
    if args.quick:
        todo = [(ENCODERS[0], SLIM, CROP288), ("resnet18", "", CROP288)]
    models, modes, meta, per = {}, {}, {}, {}
    for enc, dec, shape in todo:
        if (enc, dec) not in models:    # the 512 rows reuse the 288 rows' model: one network, another input
            models[enc, dec] = open_recipe(args, f"{enc}/{dec or 'default'}", FAST,
                                           [f"train.encoder={enc}", f"train.decoder_channels={dec}"])
        r = models[enc, dec]
        key = f"{enc} {dec or 'default'} {shape}"
        modes[key] = (r.step_run(shape), args.block, args.warmup)
        per[key] = r.cfg.train.batch_size
        meta[key] = {"encoder": enc, "decoder_channels": dec or "default", "shape": str(shape),
                     "batch": r.cfg.train.batch_size, "precision": r.fold.precision,
                     "params_m": sum(p.numel() for p in r.parts.model.parameters()) / 1e6,
                     "gflop_per_image": gflop_per_image(r, shape), "cpu": m["cpu"]}
    res = interleaved(modes, args.rounds, per)
    rows = []
    for key, v in res.items():
        row = {**meta[key], **v}
        row["tflops"], row["of_peak"] = of_peak(row["gflop_per_image"], row["images_per_s"], peak)
        rows.append(row)
    print(f"\n## 3. Candidates: Unet, pipeline step on a preloaded batch (batch 8, {rows[0]['precision']}, "
          f"channels_last; round-robin, median of {args.rounds} block(s) of {args.block} steps)\n{cpu_line(m)}")
    print(md_table(["encoder", "decoder", "shape", "params M", "GFLOP/img", "img/s", "TFLOP/s", "% peak",
                    "faults/step", "cpu"],
                   [[r["encoder"], r["decoder_channels"], r["shape"], fmt(r["params_m"], 1),
                     fmt(r["gflop_per_image"], 1), fmt(r["images_per_s"]), fmt(r["tflops"], 3),
                     fmt(r["of_peak"] and 100 * r["of_peak"], 1), f"{r['faults_per_step']:.0f}", m["cpu"]]
                    for r in rows]))
    return rows


# ---------------------------------------------------------------------------------------- levers
def child_main(spec: dict) -> dict:
    """One lever measurement in this (fresh) process; ``spec["task"]``: step, epoch or predict."""
    args = argparse.Namespace(raw=spec["raw"], cache=spec["cache"])
    task = spec["task"]
    if task == "step":
        base = open_recipe(args, "fast", FAST)
        modes = {"baseline": (base.step_run(CROP288), spec["block"], spec["warmup"])}
        if spec.get("in_process"):
            flat = open_recipe(args, "fast contiguous", FAST, ["train.channels_last=false"])
            modes["contiguous (channels_last off)"] = (flat.step_run(CROP288), spec["block"], spec["warmup"])
            modes["torch.set_num_threads(1)"] = (base.step_run(CROP288, threads=1), spec["block"], spec["warmup"])
        return interleaved(modes, spec["rounds"], base.cfg.train.batch_size)
    if task == "epoch":
        r = open_recipe(args, "fast", FAST, [f"train.num_workers={spec['workers']}"])
        with cv2_single_thread():
            return interleaved({"real epoch": (r.epoch_run(CROP288), spec["block"], 2)}, 1, r.cfg.train.batch_size)
    if task == "predict":
        if spec.get("heap") == "kept":
            from pipeline import heap
            heap.keep_pages()
        return predict_modes(args, spec)
    raise ValueError(f"unknown child task {task}")


def predict_modes(args, spec: dict) -> dict:
    """Forward-only images/s at 512 through tta.predict_proba, as predict runs it (eval,
    channels_last, inference_mode, autocast), per (batch, views batched or not)."""
    cfg = load(FAST, overrides(args))
    t = cfg.train
    g = Graph(cfg)
    index = load_index(g.prepared_dir)
    ds = SegDataset(index["image"], index["mask"], None)
    images = default_collate([ds[i] for i in range(max(spec["batches"]))])[0]
    x, _ = to_device(images, None, CPU, True)
    model = build_model(t.arch, t.encoder, "none", **model_kwargs(t.encoder_depth, t.decoder_channels, t.input_scale))
    model = model.eval().to(memory_format=torch.channels_last)
    ttas = cfg.spec("predict.tta")
    precision = resolve_precision(cfg.predict.precision, "cpu", "predict.precision")
    modes, per = {}, {}
    for b in spec["batches"]:
        for how, cap in (("views batched", 0), ("views separate", b)):
            def run(n: int, xb=x[:b], cap=cap) -> float:
                t0 = time.perf_counter()
                with torch.inference_mode(), autocast("cpu", precision):
                    for _ in range(n):
                        predict_proba(model, xb, ttas, cap)
                return time.perf_counter() - t0
            key = f"batch {b}, {how}"
            modes[key] = (run, max(1, spec["images"] // b), 1)
            per[key] = b
    res = interleaved(modes, spec["rounds"], per)
    for v in res.values():
        v["tta"] = [tv.name for tv in ttas]
        v["precision"] = precision
    return res


def run_child(args, spec: dict, env: dict | None = None) -> dict:
    """``spec`` in a fresh interpreter with the default environment plus ``env``; its result or an error."""
    base = {k: v for k, v in os.environ.items() if k not in LEVER_ENV}
    full = {**spec, "raw": str(args.raw), "cache": args.cache}
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(full)],
                           capture_output=True, text=True, env={**base, **(env or {})}, timeout=900, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": "timed out after 900 s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        return {"error": f"exit {p.returncode}", "stderr_tail": p.stderr[-1500:]}
    return {"result": json.loads(lines[-1][len("RESULT "):]), "wall_s": round(time.time() - t0, 1)}


def mmap_probe() -> dict:
    """Per GLIBC_TUNABLES setting, the fraction of a reused 24 / 48 MiB block's pages that fault again."""
    base = {k: v for k, v in os.environ.items() if k not in LEVER_ENV}
    out = {}
    for name, tun in (("default", None), ("mmap_threshold 32 MiB", f"glibc.malloc.mmap_threshold={32 * MIB}"),
                      ("mmap_threshold 32 MiB + trim 4 GiB", HEAP32), ("mmap_threshold 1 GiB + trim 4 GiB", HEAP1G)):
        env = {**base, **({"GLIBC_TUNABLES": tun} if tun else {})}
        p = subprocess.run([sys.executable, "-c", MMAP_PROBE], capture_output=True, text=True, env=env, timeout=60)
        out[name] = json.loads(p.stdout) if p.returncode == 0 else {"error": p.stderr[-300:]}
    return out


def find_preloads() -> dict:
    """jemalloc / tcmalloc shared objects found in the usual library folders (None: not installed)."""
    found = {}
    for name, patterns in PRELOADS.items():
        hits = [h for pat in patterns for d in LIB_DIRS for h in sorted(glob.glob(os.path.join(d, pat)))]
        found[name] = hits[0] if hits else None
    return found


def child_stats(res: dict, mode: str) -> dict | None:
    return res["result"][mode] if "result" in res else None


def part_levers(args, m: dict) -> dict:
    step = {"task": "step", "block": args.steps, "warmup": args.warmup, "rounds": 1}
    preloads = find_preloads()
    env_rows = ENV_LEVERS[:1] if args.quick else list(ENV_LEVERS)
    if not args.quick:
        env_rows += [("allocator", f"{k} (LD_PRELOAD {path})", {"LD_PRELOAD": path})
                     for k, path in preloads.items() if path]
    probe = mmap_probe()
    # Baseline, row, baseline, row, ...: every row between two baselines (each shared by neighbours).
    print("\nlevers: env children", flush=True)
    baselines = [run_child(args, step)]
    env_out = []
    for lever, setting, env in env_rows:
        res = run_child(args, step, env)
        baselines.append(run_child(args, step))
        env_out.append({"lever": lever, "setting": setting, "env": env, **res})
        v = child_stats(res, "baseline")
        print(f"  {setting}: {fmt(v and v['images_per_s'])} img/s", flush=True)
    base_ips = [b["result"]["baseline"]["images_per_s"] for b in baselines if "result" in b]
    baseline_mean = statistics.mean(base_ips) if base_ips else None
    print("levers: in-process modes, loader workers", flush=True)
    inproc = run_child(args, {**step, "block": args.block, "rounds": args.rounds, "in_process": True})
    workers = [0] if args.quick else [2, 0, 1, 2]      # the default (2) before and after
    epochs = [(w, run_child(args, {"task": "epoch", "workers": w, "block": args.epoch_steps})) for w in workers]

    rows = []

    def row(lever, setting, v, ratio, base_before=None, base_after=None, error=None):
        rows.append({"lever": lever, "setting": setting, "images_per_s": v and v["images_per_s"],
                     "faults_per_step": v and v["faults_per_step"], "ratio": ratio, "baseline_before": base_before,
                     "baseline_after": base_after, "error": error, "cpu": m["cpu"]})

    for i, r in enumerate(env_out):
        v = child_stats(r, "baseline")
        b0, b1 = child_stats(baselines[i], "baseline"), child_stats(baselines[i + 1], "baseline")
        pair = [b["images_per_s"] for b in (b0, b1) if b]
        ratio = v["images_per_s"] / statistics.mean(pair) if v and pair else None
        row(r["lever"], r["setting"], v, ratio, b0 and b0["images_per_s"], b1 and b1["images_per_s"], r.get("error"))
    for k, path in preloads.items():
        if not path:
            row("allocator", f"{k} (LD_PRELOAD)", None, None, error="not installed")
    if "result" in inproc:
        ref = inproc["result"]["baseline"]["images_per_s"]
        for mode, v in inproc["result"].items():
            row("in-process" if mode == "baseline" else ("threads" if "threads" in mode else "memory format"),
                mode, v, v["images_per_s"] / ref)
    else:
        row("in-process", "baseline / contiguous / 1 thread", None, None, error=inproc.get("error"))
    for i, (w, r) in enumerate(epochs):
        v = child_stats(r, "real epoch")
        again = " (again)" if w in [e[0] for e in epochs[:i]] else ""
        row("loader workers", f"real epoch, train.num_workers={w}{again}", v,
            v and baseline_mean and v["images_per_s"] / baseline_mean, error=r.get("error"))

    print(f"\n## 4. Levers (fast recipe, c288x288, batch 8; baseline = its pipeline step on a preloaded batch, "
          f"default environment: {fmt(baseline_mean)} img/s, mean of {len(base_ips)} baseline children)\n"
          f"{cpu_line(m)}")
    print("ratio: env rows to the mean of the baselines before and after; in-process rows to that child's "
          "baseline; loader rows to the baseline step")
    print(md_table(["lever", "setting", "img/s", "faults/step", "ratio", "baseline before", "baseline after", "cpu"],
                   [[r["lever"], r["setting"] + (f" [{r['error']}]" if r["error"] else ""), fmt(r["images_per_s"]),
                     fmt(r["faults_per_step"], 0), fmt(r["ratio"]), fmt(r["baseline_before"]),
                     fmt(r["baseline_after"]), m["cpu"]] for r in rows]))
    print("\nglibc probe: fraction of a reused block's pages faulting again (1 = handed back to the OS on free)")
    sizes = ("24 MiB", "48 MiB")
    print(md_table(["GLIBC_TUNABLES", *sizes], [[k, *(v.get(z, v.get("error")) for z in sizes)]
                                                for k, v in probe.items()]))
    return {"rows": rows, "baseline_images_per_s": baseline_mean, "baselines": baselines, "env_children": env_out,
            "in_process": inproc, "loader_workers": [{"workers": w, **r} for w, r in epochs],
            "preloads": preloads, "glibc_probe": probe}


def part_predict(args, m: dict) -> dict:
    """Predict's batch and TTA batching at 512, with glibc's default heap and with the pages kept
    (``heap.keep_pages``, what predict.run does): one child each, ratios to batch 8 views batched
    (predict's defaults) in the same child."""
    batches = PREDICT_BATCHES[:1] if args.quick else PREDICT_BATCHES
    spec = {"task": "predict", "batches": list(batches), "images": 8 if args.quick else 16, "rounds": args.rounds}
    print("\npredict: batch and TTA batching, heap default and kept", flush=True)
    children = {heap: run_child(args, {**spec, "heap": heap}) for heap in ("default", "kept")}
    rows = []
    for heap, res in children.items():
        if "result" not in res:
            rows.append({"heap": heap, "setting": "all", "images_per_s": None, "ratio": None, "error": res.get("error")})
            continue
        ref = res["result"].get("batch 8, views batched") or next(iter(res["result"].values()))
        rows += [{"heap": heap, "setting": mode, "images_per_s": v["images_per_s"], "faults_per_step": v["faults_per_step"],
                  "ratio": v["images_per_s"] / ref["images_per_s"], "error": None, "cpu": m["cpu"]}
                 for mode, v in res["result"].items()]
    print(f"\n## 5. Predict at 512, TTA hflip (forward only, fast recipe's network; ratio to batch 8 views batched, "
          f"predict's defaults, in the same child)\n{cpu_line(m)}")
    print(md_table(["heap", "setting", "img/s", "faults/batch", "ratio", "cpu"],
                   [[r["heap"], r["setting"] + (f" [{r['error']}]" if r["error"] else ""), fmt(r["images_per_s"]),
                     fmt(r.get("faults_per_step"), 0), fmt(r["ratio"]), m["cpu"]] for r in rows]))
    return {"rows": rows, "children": children}


# ---------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke test: few steps, 2 candidates, fewer levers")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (default 12; 1 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per row (default 3; 1 with --quick)")
    ap.add_argument("--epoch-steps", type=int, default=None,
                    help="timed real-epoch steps per row (default 30; 2 with --quick)")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    ap.add_argument("--raw", type=Path, default=REAL)
    ap.add_argument("--cache", default="data/cache", help="data.cache holding (or to hold) the prepare artifact")
    ap.add_argument("--child", help=argparse.SUPPRESS)       # a lever measurement: JSON spec (part 4)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child_main(json.loads(args.child))), flush=True)
        return 0
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(only) - set(PARTS))
    if unknown:
        ap.error(f"--only: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if ("recipes" in only or "candidates" in only) and "peak" not in only:
        only.insert(0, "peak")
    args.steps = args.steps or (1 if args.quick else 12)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.epoch_steps = args.epoch_steps or (2 if args.quick else 30)
    args.rounds = 1 if args.quick else 2
    args.block = max(1, args.steps // args.rounds)
    args.epoch_block = max(1, args.epoch_steps // args.rounds)
    if any(p != "peak" for p in only) and not (args.raw / "train").is_dir():
        print(f"{args.raw}: no Kaggle-layout data; nothing to benchmark (pass --raw)")
        return 0
    t0, started = time.time(), datetime.datetime.now().isoformat(timespec="seconds")
    m = machine()
    print(f"{cpu_line(m)}; {m['torch_threads']} threads; load average {m['load_average_start']} at start", flush=True)
    out = {"machine": m, "argv": sys.argv, "started": started,
           "settings": {"quick": args.quick, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
                        "epoch_steps": args.epoch_steps, "parts": only, "raw": str(args.raw), "cache": args.cache}}
    # This process runs with the heap train.run and predict.run set (pages kept), so part 2's
    # "pipeline step" is the pipeline's; parts 4 and 5 compare heaps in fresh child processes.
    from pipeline import heap
    out["settings"]["heap_kept"] = heap.keep_pages()
    peak = None
    if "peak" in only:
        out["peak"] = part_peak(args, m)
        peak = out["peak"]["peak_tflops"]
    if "recipes" in only:
        out["recipes"] = part_recipes(args, m, peak)
    if "candidates" in only:
        out["candidates"] = part_candidates(args, m, peak)
    if "levers" in only:
        out["levers"] = part_levers(args, m)
    if "predict" in only:
        out["predict"] = part_predict(args, m)
    out["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    out["elapsed_s"] = round(time.time() - t0, 1)
    out["load_average_end"] = round(os.getloadavg()[0], 2)
    write_result("recipe", out)
    print(f"elapsed {out['elapsed_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
