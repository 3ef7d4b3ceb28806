"""Train: one smp model per cross-validation fold, resumable, with out-of-fold predictions.

``run(cfg)`` trains ``cfg.train.fold`` (or every fold in turn when it is -1) from
the prepare artifact (``folds.csv`` + resized images, no JPEG decoding here).
Each fold writes under ``<cache>/train/<train_key>/fold<k>/`` (see docs/design.md):
``best.pt``, ``last.pt``, ``metrics.csv``, ``config.yaml``, ``curve.png``,
``oof/<id>.png``, ``oof/hist.npz``, ``oof.json`` and, last, ``manifest.json``.

- Key: the train parameters except fold/num_workers/device (they do not change
  results), the training data key (prepare.train_data_key: train-side files and
  prepare parameters, not the test set) and CODE_VERSION. A changed config trains
  anew under a new key; a fold with a manifest is not trained again.
- Resume: ``last.pt`` (written atomically after every epoch, after metrics.csv
  and curve.png) holds model, optimizer, scheduler, GradScaler, epoch, best
  score, every rank's RNG states (Python, NumPy, torch CPU and the rank's own
  GPU), the number of processes, the precision and the metrics so far. After a
  kill -9 the same command continues from the last completed epoch and ends
  with the same metrics as an uninterrupted run: shuffling comes from (seed,
  epoch) and augmentation from (seed, epoch, image), never from state lost in
  the kill. Resuming needs the same number of processes (steps per epoch and
  the schedule depend on it): another count is an error saying how to go on.
  Another device is fine (a CPU checkpoint's empty GradScaler state leaves a
  CUDA run's scaler fresh; precision=auto changing with it is logged).
- Precision: one code path. ``autocast`` is built once from (device, precision),
  ``pipeline.precision``: fp16 + GradScaler on CUDA (unscaled before clipping),
  bf16 on a CPU with native bf16, else fp32.
- Accumulation: ``need_update`` marks the last micro-batch of a group, including
  a final partial group; each loss is divided by its group's actual size.
- Non-finite values: a non-finite loss drops its group's update; without a
  GradScaler (bf16, fp32) so does a non-finite total gradient norm with a
  finite loss (optimizer.step would write NaN into the weights). Both are
  counted (``nonfinite``), and ``max_nonfinite`` of them with no update between
  stop the fold with an error. With fp16 the GradScaler skips inf/NaN
  gradients itself (routine while its scale calibrates): not counted as
  non-finite, nor as updates.
- DDP: under ``torchrun --nproc_per_node N -m pipeline train ...`` (env
  WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel (gloo on CPU,
  nccl on CUDA), a DistributedSampler shards the training set, validation and
  OOF are sharded and reduced, and only rank 0 writes checkpoints, logs and
  ``oof/hist.npz`` (the ranks' histograms are gathered to it). Every rank writes
  the OOF PNGs of its own validation shard into the fold's ``oof/`` directory and
  every rank reads the prepare artifact and ``last.pt``/``best.pt``, so DDP
  over several nodes needs ``data.cache`` (and the data) on a filesystem that
  all nodes share; on one node this holds by itself.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import io
import math
import os
import random
import signal
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import yaml
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm import tqdm

from . import cache, probmaps
from . import tboard  # issue 11: TensorBoard events
from . import precision as precision_mod
from .config import Config, ConfigError, PipelineError, stable_hash
from .data import (SegDataset, SeededSampler, build_transform, cv2_single_thread, load_index, read_image, read_mask,
                   to_device)
from .losses import BceDiceLoss, dice_per_image
from .models import IMAGENET_STATS, build_model, input_stats, model_kwargs

STAGE = "train"
CODE_VERSION = "train-3"              # bump when results change for the same config (3: OOF threshold rule)
RUN_ONLY = ("fold", "num_workers", "device")   # never change results, so not in the key
SCHEDULERS = ("cosine", "onecycle", "none")
METRIC_COLUMNS = ["epoch", "lr", "train_loss", "val_loss", "val_dice", "seconds", "images_per_s",
                  "nonfinite", "best"]
# Fault injection for the kill -9 resume test: "EPOCH:STEP" (0-based) sends SIGKILL to this process.
KILL_ENV = "PIPELINE_TRAIN_KILL_AT"


# ---------------------------------------------------------------------------- keys and paths

def train_params(cfg: Config) -> dict:
    return {k: v for k, v in asdict(cfg.train).items() if k not in RUN_ONLY}


def _prepared(cfg: Config, prepared_dir: str | Path | None) -> Path:
    if prepared_dir is not None:
        return Path(prepared_dir)
    from . import prepare
    return Path(prepare.load(cfg))


def train_key(cfg: Config, prepared_dir: str | Path | None = None) -> str:
    """Hash of the train params (minus RUN_ONLY), the training data and CODE_VERSION.

    The training data enters by ``prepare.train_data_key`` (the bytes of the artifact's
    train_index.csv and folds.csv), not by the whole prepare key, so a changed test set or
    raw path does not retrain. A local encoder-weights file enters by fingerprint (name,
    size, mtime), so replacing the file trains anew.
    """
    from . import prepare
    weights = cfg.train.encoder_weights
    inputs = {"train_data": prepare.train_data_key(_prepared(cfg, prepared_dir))}
    if Path(weights).is_file():
        inputs["encoder_weights"] = cache.file_fingerprint(weights)
    return stable_hash({"params": train_params(cfg), **inputs, "code": CODE_VERSION})


def run_dir(cfg: Config, prepared_dir: str | Path | None = None) -> Path:
    """``<cache>/train/<train_key>``: the parent of every fold's directory (no training)."""
    return cache.stage_dir(cfg.data.cache, STAGE, train_key(cfg, prepared_dir))


def fold_dir(cfg: Config, k: int, prepared_dir: str | Path | None = None) -> Path:
    return run_dir(cfg, prepared_dir) / f"fold{k}"


# ---------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False     # this run initialised the process group (and destroys it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def dist_init(device_type: str) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        owns = True
    return Dist(rank, world, local_rank, owns)


def _all_sum(values: list[float], d: Dist, device: torch.device) -> list[float]:
    """Sum floats over ranks (identity in one process)."""
    if not d.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _gather(obj, d: Dist) -> list:
    if not d.active:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def _barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


# ---------------------------------------------------------------------------- building blocks

def resolve_device(name: str, d: Dist | None = None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={name}: CUDA is not available here")
        if d is not None and d.active:
            return torch.device("cuda", d.local_rank)
    elif name != "cpu":
        raise ConfigError(f"train.device='{name}': choose auto, cpu or cuda")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """train.precision on this device -> 'fp32', 'bf16' or 'fp16' (see pipeline.precision)."""
    return precision_mod.resolve(precision, device.type)


def autocast_factory(device: torch.device, precision: str):
    """A zero-argument factory of autocast contexts (fp32: a disabled one), built once per run."""
    return functools.partial(precision_mod.autocast, device.type, precision)


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; biases and norm weights (1-d tensors) get no weight decay."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int, steps_per_epoch: int,
                    warmup_epochs: float, min_lr_ratio: float):
    """Stepped once per optimizer update. cosine: linear warmup then cosine to lr*min_lr_ratio.

    onecycle: torch's OneCycleLR peaking at lr after warmup_epochs (30% of the run when 0).
    """
    total_steps = max(1, total_steps)
    warmup = min(total_steps - 1, round(warmup_epochs * steps_per_epoch))
    if name == "none":
        return None
    if name == "cosine":
        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if name == "onecycle":
        pct = warmup / total_steps if warmup > 0 else 0.3
        max_lr = [g["lr"] for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps,
                                                   pct_start=min(max(pct, 0.01), 0.99))
    raise ConfigError(f"train.scheduler='{name}': choose one of {', '.join(SCHEDULERS)}")


class NonFiniteGuard:
    """Counts dropped updates: non-finite losses and non-finite gradients (agreed across ranks).

    ``limit`` of them with no successful update between (``updated``) stop the fold.
    """

    WHAT = {"loss": "loss was non-finite", "gradient": "gradients were non-finite (with a finite loss)"}

    def __init__(self, limit: int, d: Dist, device: torch.device):
        self.limit, self.d, self.device = max(1, limit), d, device
        self.total = 0
        self.in_a_row = 0
        self.where = ""

    def ok(self, loss: torch.Tensor) -> bool:
        """loss: a scalar tensor. False (and counted) when it is not finite on some rank."""
        return self._check(torch.isfinite(loss.detach()).all(), "loss")

    def grads_ok(self, total_norm: torch.Tensor) -> bool:
        """total_norm: the scalar gradient norm. False (and counted) when it is not finite."""
        return self._check(torch.isfinite(total_norm.detach()).all(), "gradient")

    def updated(self) -> None:
        """An optimizer step was applied: the run of dropped updates is over."""
        self.in_a_row = 0

    def _check(self, finite: torch.Tensor, what: str) -> bool:
        finite = finite.to(torch.float32).reshape(1)
        if self.d.active:     # every rank must skip together, or DDP's gradient all-reduce hangs
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if bool(finite.item()):
            return True
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise PipelineError(f"{self.where}: {self.WHAT[what]} for {self.in_a_row} batches in a row "
                                f"({self.total} in all); lower train.lr, use train.precision=fp32, "
                                f"or check the data")
        return False


def optimizer_update(model: torch.nn.Module, optimizer, scaler, grad_clip: float, guard: NonFiniteGuard) -> bool:
    """Clip and apply the accumulated gradients. Returns True when the optimizer stepped.

    With an enabled GradScaler (fp16) the scaler finds inf/NaN gradients itself, skips the
    step and lowers its scale (routine while the scale calibrates): neither applied nor
    counted as non-finite. Without one (bf16, fp32) nothing else would catch them: a finite
    loss can still give inf/NaN gradients, clip_grad_norm_ then returns NaN and
    optimizer.step() writes NaN into every weight. So the total gradient norm (the one
    clipping uses; computed even when grad_clip is 0) is checked, and a non-finite one
    drops the step and is counted by ``guard`` like a non-finite loss. Under DDP the
    gradients, hence the norm, are the all-reduced ones, the same on every rank.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if scaler.is_enabled():
        if grad_clip > 0:
            scaler.unscale_(optimizer)     # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        return scaler.get_scale() >= scale     # a skipped step (inf/NaN found) lowers the scale
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if not guard.grads_ok(norm):
        return False
    if grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
    optimizer.step()
    return True


def _kill_point() -> tuple[int, int] | None:
    spec = os.environ.get(KILL_ENV, "")
    if not spec:
        return None
    e, s = spec.split(":")
    return int(e), int(s)


def train_one_epoch(model: torch.nn.Module, loader, loss_fn, optimizer, scheduler, scaler, *,
                    autocast, device: torch.device, accum_steps: int = 1, grad_clip: float = 0.0,
                    channels_last: bool = True, guard: NonFiniteGuard, max_steps: int = 0,
                    epoch: int = 0, progress: bool = False, desc: str = "", stats: tuple = IMAGENET_STATS) -> dict:
    """One pass over ``loader`` (batches of (images (N,H,W,3) uint8, masks (N,H,W) uint8, ...)).

    Optimizer updates every ``accum_steps`` micro-batches and after the last one;
    ``max_steps`` > 0 caps the number of updates. Returns {loss (mean over the
    images whose loss was finite), images, seconds, updates (steps applied), nonfinite
    (updates dropped for a non-finite loss or gradient), lr (of the last applied update)}.
    """
    model.train()
    n = len(loader)
    if max_steps > 0:
        n = min(n, max_steps * accum_steps)
    full = (n // accum_steps) * accum_steps   # micro-batches in complete groups
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    kill = _kill_point()
    loss_sum, images, seen, updates, nonfinite0 = 0.0, 0, 0, 0, guard.total
    lr = optimizer.param_groups[0]["lr"]
    group_bad = False
    optimizer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    bar = tqdm(total=n, desc=desc, unit="batch", leave=False, disable=not progress, mininterval=1.0)
    for i, batch in enumerate(loader):
        if i >= n:
            break
        if kill is not None and kill == (epoch, i):
            os.kill(os.getpid(), signal.SIGKILL)
        need_update = (i + 1) % accum_steps == 0 or i + 1 == n
        group = accum_steps if i < full else n - full
        images += batch[0].shape[0]
        if not group_bad:   # a group with a non-finite loss is dropped whole: no more work on it
            x, y = to_device(batch[0], batch[1], device, channels_last, stats)
            # Micro-batches before the update only accumulate locally; DDP all-reduces on the last.
            sync = model.no_sync() if ddp and not need_update else contextlib.nullcontext()
            with sync:
                with autocast():
                    logits = model(x)
                loss = loss_fn(logits, y)
                if guard.ok(loss):
                    scaler.scale(loss / group).backward()
                    loss_sum += loss.item() * x.shape[0]
                    seen += x.shape[0]
                else:
                    group_bad = True
        if need_update:
            if not group_bad and optimizer_update(model, optimizer, scaler, grad_clip, guard):
                lr = optimizer.param_groups[0]["lr"]     # the rate this update used (the scheduler steps below)
                updates += 1
                guard.updated()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:   # the schedule advances even over a skipped step
                with warnings.catch_warnings():   # ...which torch warns about; intended here
                    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
                    scheduler.step()
            group_bad = False
        bar.update(1)
        if progress and (i % 5 == 4 or i + 1 == n):
            el = time.perf_counter() - t0
            bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.4f}", img_s=f"{images / max(el, 1e-9):.1f}",
                            refresh=False)
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"loss": loss_sum / seen if seen else float("nan"), "images": images, "scored": seen, "lr": lr,
            "seconds": time.perf_counter() - t0, "updates": updates, "nonfinite": guard.total - nonfinite0}


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, loss_fn, *, autocast, device: torch.device,
             channels_last: bool = True, stats: tuple = IMAGENET_STATS) -> dict:
    """Validation sums over this rank's shard: {loss_sum, dice_sum, n} (per-image Dice at p > 0.5)."""
    model.eval()
    loss_sum, dice_sum, n = 0.0, 0.0, 0
    for images, masks, _ in loader:
        x, y = to_device(images, masks, device, channels_last, stats)
        with autocast():
            logits = model(x)
        loss_sum += loss_fn(logits, y).item() * x.shape[0]
        dice_sum += dice_per_image(logits.float(), y).sum().item()
        n += x.shape[0]
    return {"loss_sum": loss_sum, "dice_sum": dice_sum, "n": n}


class ShardSampler(Sampler):
    """Indices rank, rank + world, ... of range(n): every index once across ranks, no padding."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.idx = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.idx)

    def __len__(self):
        return len(self.idx)


@torch.no_grad()
def check_output_size(model: torch.nn.Module, h: int, w: int, device: torch.device, what: str = "model") -> None:
    """One forward of a blank (1, 3, h, w) image: the logits must be (1, 1, h, w).

    Some smp architectures ignore encoder_depth in their upsampling (FPN with
    encoder_depth=3 returns 4x the input size); fail before training, not at the loss.
    """
    was = model.training
    model.eval()
    y = model(torch.zeros(1, 3, h, w, device=device))
    model.train(was)
    if tuple(y.shape) != (1, 1, h, w):
        raise ConfigError(f"{what}: output {tuple(y.shape)} for a (1, 3, {h}, {w}) input; this "
                          "architecture does not support these options (try encoder_depth=5)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict:
    """Python, NumPy and torch CPU generator states, plus the CUDA generator of ``device`` only.

    Only this process's GPU: get_rng_state_all() would create a CUDA context on every visible
    GPU from every DDP rank, and its list could not be restored where fewer GPUs are visible.
    """
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore :func:`rng_state`. Checkpoints before train-3 hold a list (every visible GPU's
    state): the entry of this process's GPU is used, and none when that GPU was not there."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):
        i = device.index if device.index is not None else torch.cuda.current_device()
        cuda = cuda[i] if i < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


# ---------------------------------------------------------------------------- out-of-fold

OOF_BINS = 200   # original-size Dice histograms resolve thresholds to 1/200


@functools.lru_cache(maxsize=4)
def _levels(bins: int) -> tuple[np.ndarray, np.ndarray]:
    """threshold_level(j / bins) for j = 0..bins, with a sentinel before (lo) and after (hi)."""
    levels = np.array([probmaps.threshold_level(j / bins) for j in range(bins + 1)], np.float32)
    inf = np.array([np.inf], np.float32)
    return np.concatenate([-inf, levels]), np.concatenate([levels, inf])


def prob_hist(prob255: np.ndarray, true: np.ndarray, bins: int = OOF_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Histograms for Dice at every threshold j/bins without keeping the maps.

    prob255: (H, W) probabilities on the uint8 scale, 0..255 (a stored map, or its
    ``probmaps.to_original`` resize: exactly what submit thresholds); true: (H, W) {0, 1}.
    Pixel value b = the number of levels ``probmaps.threshold_level(j / bins)`` below v,
    so b > j exactly when v > threshold_level(j / bins), submit's own test at t = j/bins.
    Returns (pos, all): (bins + 1,) int64 counts of b over true pixels and over all pixels.
    """
    lo, hi = _levels(bins)
    v = np.asarray(prob255, np.float32).ravel()
    # b = searchsorted(levels, v, "left") capped at bins, ~6x faster: levels are ~255 j / bins,
    # so ceil(v * bins / 255) is within one of b, and one comparison each way corrects it.
    b = np.ceil(v * np.float32(bins / 255.0))
    np.clip(b, 0, bins, out=b)
    b = b.astype(np.int32)
    b -= lo[b] >= v          # lo[b] = level b - 1: v is not above it
    b += hi[b] < v           # hi[b] = level b: v is above it
    t = np.asarray(true).ravel() > 0
    return np.bincount(b[t], minlength=bins + 1), np.bincount(b, minlength=bins + 1)


def hist_dice(pos: np.ndarray, all_: np.ndarray, thresholds) -> np.ndarray:
    """Per-image Dice at each threshold from :func:`prob_hist` counts.

    pos, all_: (N, bins + 1); thresholds: (T,) in [0, 1). Returns (N, T); both-empty -> 1.
    """
    pos, all_ = np.atleast_2d(pos).astype(np.int64), np.atleast_2d(all_).astype(np.int64)
    bins = pos.shape[1] - 1
    j = np.floor(np.asarray(thresholds, dtype=np.float64) * bins + 1e-9).astype(np.int64)
    # Suffix sums: count of b > j is the sum over bins j+1..bins.
    pos_gt = np.concatenate([np.cumsum(pos[:, ::-1], 1)[:, ::-1], np.zeros((len(pos), 1), np.int64)], 1)
    all_gt = np.concatenate([np.cumsum(all_[:, ::-1], 1)[:, ::-1], np.zeros((len(all_), 1), np.int64)], 1)
    tp, pred, true = pos_gt[:, j + 1], all_gt[:, j + 1], pos.sum(1, keepdims=True)
    denom = pred + true
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom == 0, 1.0, 2.0 * tp / np.maximum(denom, 1))


def _geometry(row) -> dict:
    """prepare's placement of the image in the model input (stretch when the index has none)."""
    from .prepare import GEOM_COLS
    if all(c in row and not pd.isna(row[c]) for c in GEOM_COLS):
        return {c: int(row[c]) for c in GEOM_COLS}
    h, w = row["_model_hw"]
    return {"scaled_height": h, "scaled_width": w, "pad_top": 0, "pad_left": 0}


def _oof_one(q: np.ndarray, mask_small: np.ndarray, row: dict, out_png: Path) -> tuple:
    """Write one OOF map and score it. q: (h, w) uint8 = round(255 p) at model size.

    The original-size map is made exactly as submit makes it from one fold's map (uint8
    scale float32, ``probmaps.to_original``), so the histograms give submit's Dice.
    """
    ok, buf = cv2.imencode(".png", q)
    if not ok:
        raise PipelineError(f"PNG encoding failed for {out_png}")
    cache.write_bytes(out_png, buf.tobytes())
    qf = q.astype(np.float32)
    dice_model = float(hist_dice(*prob_hist(qf, mask_small), [0.5])[0, 0])
    full = read_mask(row["mask_full"])
    oh, ow = int(row["orig_height"]), int(row["orig_width"])
    if full.shape != (oh, ow):
        raise PipelineError(f"{row['mask_full']}: mask is {full.shape[1]}x{full.shape[0]} but the index says "
                            f"{ow}x{oh}")
    pos, all_ = prob_hist(probmaps.to_original(qf, (oh, ow), _geometry(row)), full)
    return row["id"], dice_model, pos, all_


@torch.no_grad()
def predict_oof(model: torch.nn.Module, val: pd.DataFrame, loader, out_dir: Path, *, autocast,
                device: torch.device, channels_last: bool = True, stats: tuple = IMAGENET_STATS) -> list[tuple]:
    """Predict this rank's validation shard; write ``out_dir/<id>.png``; score at both sizes.

    Returns [(id, dice at model size, pos hist, all hist at original size)] (see prob_hist).
    """
    model.eval()
    rows = val.to_dict("records")
    out, pending = [], []
    with ThreadPoolExecutor(max_workers=2) as pool:   # PNG I/O and full-size resizes overlap the model
        for images, masks, idx in loader:
            x, _ = to_device(images, None, device, channels_last, stats)
            with autocast():
                logits = model(x)
            q = (torch.sigmoid(logits.float())[:, 0] * 255).round_().to(torch.uint8).cpu().numpy()
            for j, i in enumerate(idx.tolist()):
                r = rows[i]
                pending.append(pool.submit(_oof_one, q[j], masks[j].numpy(), r, out_dir / f"{r['id']}.png"))
            while len(pending) > 64:
                out.append(pending.pop(0).result())
        out += [f.result() for f in pending]
    return out


# ---------------------------------------------------------------------------- one fold

def _loader(ds, sampler, batch_size: int, num_workers: int, device: torch.device, drop_last: bool, seed: int):
    # Its own generator: the loader's base-seed draw must not consume the global torch RNG
    # (dropout/drop-path use it), or a resumed run would diverge from an uninterrupted one.
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=device.type == "cuda", drop_last=drop_last,
                      persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))


def _sync_buffers(model: torch.nn.Module, d: Dist) -> None:
    """Give every rank rank 0's BatchNorm statistics (the ones the checkpoint holds)."""
    if d.active:
        for b in model.buffers():
            dist.broadcast(b, 0)


def _write_metrics(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: row[k] for k in METRIC_COLUMNS})
    cache.write_text(path, buf.getvalue())


def _write_curve(path: Path, history: list[dict], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    a.plot(ep, [h["val_loss"] for h in history], "o-", label="val")
    a.set_xlabel("epoch"), a.set_ylabel("BCE + Dice loss"), a.legend()
    b.plot(ep, [h["val_dice"] for h in history], "o-", color="C2")
    b.set_xlabel("epoch"), b.set_ylabel("val Dice (p > 0.5)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with cache.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


def _log(d: Dist, msg: str) -> None:
    if d.main:
        print(msg, flush=True)


def _unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def check_resume_world(ckpt: dict, world: int, last_path: Path, out: Path) -> None:
    """PipelineError unless ``ckpt`` (last.pt) was written by ``world`` processes.

    Steps per epoch, the LR schedule and the sampler's shards depend on the process count,
    so a resume under another count would not continue the same run. Checkpoints before
    train-3 have no ``world_size``; their RNG list holds one state per rank.
    """
    saved = int(ckpt.get("world_size", len(ckpt.get("rng") or [None])))
    if saved != world:
        how = "`make train` (no DDP)" if saved == 1 else f"NPROC={saved} (`make train-ddp NPROC={saved}`)"
        raise PipelineError(f"{last_path} was trained with {saved} process(es) but this run has {world}; "
                            f"steps per epoch and the LR schedule depend on it: resume with {how}, "
                            f"or remove {out} to train this fold anew")


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict | None) -> None:
    """Load a saved GradScaler state unless it is empty.

    A disabled scaler (bf16/fp32, e.g. a CPU run) saves {}, which an enabled one refuses
    ("The source state dict is empty"): a fp16 run resumed from it keeps its fresh scale.
    (A disabled scaler ignores whatever it is given.)
    """
    if state:
        scaler.load_state_dict(state)


def train_fold(cfg: Config, prepared: Path, index: pd.DataFrame, k: int, d: Dist) -> dict:
    """Train fold ``k`` (or resume it, or report it cached). Returns the fold summary (oof.json)."""
    t = cfg.train
    key = train_key(cfg, prepared)
    out = fold_dir(cfg, k, prepared)
    if cache.is_complete(out):
        summary = cache.read_json(out / "oof.json")
        n = summary.get("world_size", d.world)
        note = f"; trained with {n} process(es), this run has {d.world}" if n != d.world else ""
        _log(d, f"fold {k}: cached ({out}){note}")
        return summary
    device = resolve_device(t.device, d)
    precision = resolve_precision(t.precision, device)
    autocast = autocast_factory(device, precision)
    fold_cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, fold=k)).to_dict()

    train_df = index[index["fold"] != k].reset_index(drop=True)
    val_df = index[index["fold"] == k].reset_index(drop=True)
    if train_df.empty or val_df.empty:
        raise PipelineError(f"{prepared / 'folds.csv'}: fold {k} leaves no training or no validation images")
    h, w = read_image(train_df["image"].iloc[0]).shape[:2]
    val_df["_model_hw"] = [(h, w)] * len(val_df)

    train_ds = SegDataset(train_df["image"], train_df["mask"], build_transform(t.augment))
    val_ds = SegDataset(val_df["image"], val_df["mask"], None)
    base = DistributedSampler(train_ds, num_replicas=d.world, rank=d.rank, shuffle=True, seed=t.seed + k)
    sampler = SeededSampler(base, seed=t.seed + k)
    # Full batches only (BatchNorm dislikes a tiny last batch), unless the set is smaller than one batch.
    train_dl = _loader(train_ds, sampler, t.batch_size, t.num_workers, device,
                       drop_last=len(sampler) >= t.batch_size, seed=t.seed + k)
    val_dl = _loader(val_ds, ShardSampler(len(val_ds), d.rank, d.world), t.batch_size, t.num_workers, device,
                     drop_last=False, seed=t.seed + k)
    steps_per_epoch = math.ceil(len(train_dl) / t.accum_steps)
    if t.max_train_steps > 0:
        steps_per_epoch = min(steps_per_epoch, t.max_train_steps)

    seed_everything(t.seed + 1000 * k + d.rank)
    kwargs = model_kwargs(t.encoder_depth, t.decoder_channels)
    model = build_model(t.arch, t.encoder, t.encoder_weights, **kwargs).to(device)
    check_output_size(model, h, w, device, f"{t.arch}/{t.encoder} with {kwargs}")
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, t.lr, t.weight_decay)
    scheduler = build_scheduler(optimizer, t.scheduler, steps_per_epoch * t.epochs, steps_per_epoch,
                                t.warmup_epochs, t.min_lr_ratio)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loss_fn = BceDiceLoss(t.bce_weight, t.dice_weight)
    guard = NonFiniteGuard(t.max_nonfinite, d, device)

    stats = input_stats(t.encoder, t.encoder_weights)   # predict normalises as training did
    meta = {"arch": t.arch, "encoder": t.encoder, "model_kwargs": kwargs, "height": h, "width": w,
            "input_stats": stats, "config": fold_cfg, "train_key": key, "fold": k, "code_version": CODE_VERSION,
            "world_size": d.world, "precision": precision, "device_type": device.type}
    start, best, history = 0, -1.0, []
    last_path, best_path = out / "last.pt", out / "best.pt"
    if last_path.is_file():
        ckpt = torch.load(last_path, map_location="cpu", weights_only=False)
        if ckpt.get("train_key") != key:
            _log(d, f"fold {k}: {last_path} belongs to another config ({ckpt.get('train_key')}); starting anew")
        else:
            check_resume_world(ckpt, d.world, last_path, out)
            if ckpt.get("precision", precision) != precision:   # precision=auto on another device type
                _log(d, f"fold {k}: {last_path} was trained in {ckpt['precision']} on {ckpt.get('device_type')}, "
                        f"this run uses {precision} on {device.type}; resuming (the metrics will differ slightly "
                        f"from an uninterrupted run)")
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(ckpt["scheduler"])
            load_scaler_state(scaler, ckpt["scaler"])
            set_rng_state(ckpt["rng"][d.rank], device)
            start, best, history = ckpt["epoch"] + 1, ckpt["best_score"], ckpt["history"]
            guard.total = ckpt.get("nonfinite_total", 0)
            _log(d, f"fold {k}: resuming after epoch {start} of {t.epochs} (best val Dice {best:.4f})")
    if d.main:
        cache.write_text(out / "config.yaml", yaml.safe_dump(fold_cfg, sort_keys=False))
    net = model
    if d.active:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if start == 0:
        n_img = min(len(train_dl), steps_per_epoch * t.accum_steps) * t.batch_size * d.world
        _log(d, f"fold {k}: {len(train_df)} train / {len(val_df)} val images at {h}x{w}, {t.arch}/{t.encoder}, "
                f"{precision}{' channels_last' if t.channels_last else ''}, {d.world} process(es), "
                f"{steps_per_epoch} updates/epoch of {t.batch_size}x{t.accum_steps}x{d.world} "
                f"({n_img} images/epoch) -> {out}")

    curve_title = f"fold {k} {t.arch}/{t.encoder} [{key}]"
    board = tboard.open_fold(cfg, out, d.main, start)  # issue 11: TensorBoard events (rank 0)
    if start >= t.epochs and d.main and history:
        # Nothing left to train (killed during OOF): the logs again from last.pt's history, in case
        # an older run was killed between last.pt and them.
        _write_metrics(out / "metrics.csv", history)
        _write_curve(out / "curve.png", history, curve_title)
    for epoch in range(start, t.epochs):
        t0 = time.perf_counter()
        guard.where = f"fold {k} epoch {epoch + 1}"
        sampler.set_epoch(epoch)
        tr = train_one_epoch(net, train_dl, loss_fn, optimizer, scheduler, scaler, autocast=autocast,
                             device=device, accum_steps=t.accum_steps, grad_clip=t.grad_clip,
                             channels_last=t.channels_last, guard=guard, max_steps=t.max_train_steps,
                             epoch=epoch, progress=d.main, desc=f"fold {k} epoch {epoch + 1}/{t.epochs}",
                             stats=stats)
        loss_sum, scored, seen_img, seconds = _all_sum(
            [tr["loss"] * tr["scored"] if tr["scored"] else 0.0, tr["scored"], tr["images"], tr["seconds"]],
            d, device)
        # The bare model: ranks hold different numbers of validation batches, and DDP's forward
        # would expect matching collectives.
        _sync_buffers(model, d)
        ev = evaluate(model, val_dl, loss_fn, autocast=autocast, device=device, channels_last=t.channels_last,
                      stats=stats)
        v_loss, v_dice, v_n = _all_sum([ev["loss_sum"], ev["dice_sum"], ev["n"]], d, device)
        row = {"epoch": epoch + 1, "lr": tr["lr"], "train_loss": loss_sum / scored if scored else float("nan"),
               "val_loss": v_loss / v_n, "val_dice": v_dice / v_n, "seconds": time.perf_counter() - t0,
               "images_per_s": seen_img / max(seconds / d.world, 1e-9), "nonfinite": tr["nonfinite"],
               "best": False}
        if row["val_dice"] > best:
            best, row["best"] = row["val_dice"], True
        history.append(row)
        rngs = _gather(rng_state(device), d)
        if d.main:
            state = _unwrap(net).state_dict()
            if row["best"]:
                with cache.atomic_path(best_path) as tmp:
                    torch.save({**meta, "model": state, "epoch": epoch + 1, "best_score": best}, tmp)
            # last.pt goes last: a kill before it repeats this epoch, identically, and rewrites the
            # files before it, so metrics.csv and curve.png are never a row short of last.pt.
            _write_metrics(out / "metrics.csv", history)
            _write_curve(out / "curve.png", history, curve_title)
            with cache.atomic_path(last_path) as tmp:
                torch.save({**meta, "model": state, "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict() if scheduler is not None else None,
                            "scaler": scaler.state_dict(), "rng": rngs, "epoch": epoch, "best_score": best,
                            "history": history, "nonfinite_total": guard.total}, tmp)
        board.epoch(row, model, val_ds, autocast=autocast, device=device, channels_last=t.channels_last,
                    stats=stats)  # issue 11: scalars every epoch, overlays every few
        _barrier(d)
        _log(d, f"fold {k} epoch {epoch + 1}/{t.epochs}: lr {row['lr']:.2e}  train loss {row['train_loss']:.4f}  "
                f"val loss {row['val_loss']:.4f}  val Dice {row['val_dice']:.4f}{' *' if row['best'] else ''}  "
                f"{row['seconds']:.1f}s  {row['images_per_s']:.1f} img/s"
                + (f"  non-finite {row['nonfinite']}" if row["nonfinite"] else ""))

    board.close()  # issue 11
    # Out-of-fold: the best checkpoint on this fold's validation images.
    if not best_path.is_file():
        raise PipelineError(f"fold {k}: {best_path} missing after training (no epoch was scored)")
    model.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=False)["model"])
    results = predict_oof(model, val_df, val_dl, out / "oof", autocast=autocast, device=device,
                          channels_last=t.channels_last, stats=stats)
    results = [r for part in _gather(results, d) for r in part]
    summary = {}
    if d.main:
        results.sort(key=lambda r: r[0])
        ids = [r[0] for r in results]
        pos, all_ = np.stack([r[2] for r in results]), np.stack([r[3] for r in results])
        with cache.atomic_path(out / "oof" / "hist.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, ids=np.array(ids), pos=pos.astype(np.int64), all=all_.astype(np.int64))
        dice_orig = hist_dice(pos, all_, [0.5])[:, 0]
        summary = {"fold": k, "images": len(ids), "dice_model": float(np.mean([r[1] for r in results])),
                   "dice_original": float(dice_orig.mean()), "threshold": 0.5, "best_epoch_val_dice": best,
                   "epochs": t.epochs, "nonfinite": guard.total, "height": h, "width": w,
                   "world_size": d.world, "precision": precision}
        cache.write_json(out / "oof.json", summary)
        cache.write_manifest(out, stage=STAGE, key=key, params=train_params(cfg),
                             inputs={"prepare": str(prepared), "fold": k},
                             outputs={"best": "best.pt", "last": "last.pt", "metrics": "metrics.csv",
                                      "curve": "curve.png", "oof": "oof/", "oof_summary": "oof.json"},
                             config=fold_cfg, extra={"fold": k, "oof": summary})
        _log(d, f"fold {k}: OOF Dice {summary['dice_model']:.4f} at {h}x{w}, {summary['dice_original']:.4f} "
                f"at original size ({len(ids)} images) -> {out}")
    _barrier(d)
    return summary


# ---------------------------------------------------------------------------- the stage

def check_config(cfg: Config) -> None:
    """Fail fast, before any data is read, on names and values train cannot use."""
    from .data import parse_augment
    from .models import check_names
    t = cfg.train
    check_names(t.arch, t.encoder)
    parse_augment(t.augment)
    model_kwargs(t.encoder_depth, t.decoder_channels)
    if t.scheduler not in SCHEDULERS:
        raise ConfigError(f"train.scheduler='{t.scheduler}': choose one of {', '.join(SCHEDULERS)}")
    for name in ("epochs", "batch_size", "max_nonfinite"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name}={getattr(t, name)}: must be >= 1")


def run(cfg: Config, prepared_dir: str | Path | None = None) -> list[dict]:
    """Train the configured fold(s). ``prepared_dir`` overrides the prepare artifact (tests)."""
    check_config(cfg)
    if prepared_dir is None:
        from . import prepare
        prepared = Path(prepare.load(cfg))
    else:
        prepared = Path(prepared_dir)
    index = load_index(prepared)
    folds = sorted(index["fold"].unique().tolist())
    if cfg.train.fold >= 0 and cfg.train.fold not in folds:
        raise ConfigError(f"train.fold={cfg.train.fold}: {prepared / 'folds.csv'} has folds {folds}")
    todo = folds if cfg.train.fold < 0 else [cfg.train.fold]
    d = dist_init(resolve_device(cfg.train.device).type)
    try:
        with cv2_single_thread():
            return [train_fold(cfg, prepared, index, k, d) for k in todo]
    finally:
        if d.owns_group:
            dist.destroy_process_group()
