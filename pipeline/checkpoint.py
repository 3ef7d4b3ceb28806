"""Checkpoints: the ``last.pt`` resume protocol, ``best.pt``, RNG states, and the logs written with them.

``last.pt`` (written atomically after every epoch, after metrics.csv and curve.png)
holds model, optimizer, scheduler, GradScaler, epoch, best score, every rank's RNG
states (Python, NumPy, torch CPU and the rank's own GPU), the number of processes,
the precision and the metrics so far. After a kill -9 the same command continues
from the last completed epoch and ends with the same metrics as an uninterrupted
run: shuffling comes from (seed, epoch) and augmentation from (seed, epoch, image),
never from state lost in the kill. Resuming needs the same number of processes
(steps per epoch and the schedule depend on it): another count is an error saying
how to go on. Another device is fine (a CPU checkpoint's empty GradScaler state
leaves a CUDA run's scaler fresh; precision=auto changing with it is logged).

Both files hold tensors and plain Python values only (dict, list, tuple, str, int, float,
bool, None; the NumPy RNG state's key array as a tensor), and both are read back with
torch's weights-only unpickler (:func:`safe_load`): a checkpoint from someone else (a Kaggle
dataset) cannot run code when it is loaded, and one holding anything else is refused.

The three parts of the protocol sit side by side here: :func:`save_epoch` (best.pt,
the logs, then last.pt), :func:`load_last` (restore, or start anew), and
:func:`rewrite_logs` (a fold with no epoch left to run rewrites the logs from last.pt).
"""
from __future__ import annotations

import csv
import io
import pickle
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import cache
from .config import PipelineError

LAST, BEST = "last.pt", "best.pt"
# val_dice: the raw weights; val_dice_ema: their EMA (empty without train.ema); size: the epoch's
# training size (train.progressive).
METRIC_COLUMNS = ["epoch", "lr", "train_loss", "val_loss", "val_dice", "val_dice_ema", "size", "seconds",
                  "images_per_s", "nonfinite", "best"]


@dataclass
class Progress:
    """Where the epoch loop stands: restored from last.pt, updated every epoch."""
    start: int = 0                 # the next epoch to run (0-based)
    best: float = -1.0             # best validation Dice so far
    history: list[dict] = field(default_factory=list)   # metrics.csv rows so far
    nonfinite: int = 0             # dropped updates so far (NonFiniteGuard.total)


# ---------------------------------------------------------------------------- loading

def safe_load(path: str | Path):
    """``path`` read on the CPU with ``torch.load(weights_only=True)``: tensors and plain values.

    A file that needs anything else (a pickled object or function, whose unpickling can run
    arbitrary code) is refused before any of it is built: a one-line PipelineError naming the file.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is many lines of advice to load it unsafely; keep what it found.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"e.g. {found.group(1)}" if found else str(e).strip().splitlines()[-1][:120]
        raise PipelineError(f"{path}: refused to load, it holds non-tensor objects ({what}) and unpickling those "
                            f"can run code; only tensors and plain values are loaded (torch weights_only): delete "
                            f"it and retrain, or re-save it as tensors if you trust its source") from None


def load_dict(path: str | Path) -> dict:
    """:func:`safe_load` of a train checkpoint (best.pt / last.pt), which must be a dict."""
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict):
        raise PipelineError(f"{path}: not a train checkpoint (holds a {type(ckpt).__name__}, not a dict)")
    return ckpt


# ---------------------------------------------------------------------------- last.pt

def load_last(out: Path, key: str, model, optimizer, scheduler, scaler, *, device: torch.device,
              precision: str, rank: int, world: int, epochs: int, log, what: str, ema=None) -> Progress:
    """Restore ``out/last.pt`` into the given objects when it belongs to ``key``; returns the progress.

    No last.pt, or one of another config (logged): a fresh :class:`Progress`, nothing restored.
    ``what`` prefixes the log lines ("fold 0"). ``ema``: a timm ModelEmaV3 whose weights last.pt
    holds under ``ema`` (train.ema is in the key, so a matching last.pt has them).
    """
    last_path = out / LAST
    if not last_path.is_file():
        return Progress()
    ckpt = load_dict(last_path)
    if ckpt.get("train_key") != key:
        log(f"{what}: {last_path} belongs to another config ({ckpt.get('train_key')}); starting anew")
        return Progress()
    check_resume_world(ckpt, world, last_path, out)
    if ckpt.get("precision", precision) != precision:   # precision=auto on another device type
        log(f"{what}: {last_path} was trained in {ckpt['precision']} on {ckpt.get('device_type')}, "
            f"this run uses {precision} on {device.type}; resuming (the metrics will differ slightly "
            f"from an uninterrupted run)")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    load_scaler_state(scaler, ckpt["scaler"])
    if ema is not None:
        ema.module.load_state_dict(ckpt["ema"])
    set_rng_state(ckpt["rng"][rank], device)
    p = Progress(ckpt["epoch"] + 1, ckpt["best_score"], ckpt["history"], ckpt.get("nonfinite_total", 0))
    log(f"{what}: resuming after epoch {p.start} of {epochs} "
        f"(best val Dice {p.best:.4f})")
    return p


def save_epoch(out: Path, meta: dict, state: dict, optimizer, scheduler, scaler, rngs: list[dict],
               epoch: int, progress: Progress, title: str, ema_state: dict | None = None,
               best_is_ema: bool = False) -> None:
    """After epoch ``epoch`` (0-based; rank 0 only): best.pt when this epoch is the best, then
    metrics.csv and curve.png, then last.pt. ``state``: the bare model's state_dict;
    ``rngs``: every rank's :func:`rng_state`; ``ema_state``: the EMA weights (train.ema), kept
    in last.pt, and in best.pt (``weights: ema``) when ``best_is_ema`` (they scored higher).

    last.pt goes last: a kill before it repeats this epoch, identically, and rewrites the
    files before it, so metrics.csv and curve.png are never a row short of last.pt.
    """
    if progress.history[-1]["best"]:
        # Into a file object, not the temp's path: torch.save names the zip's root folder after a
        # path's file name (the random temp name), so the same weights would never give the same bytes.
        with cache.atomic_path(out / BEST) as tmp, open(tmp, "wb") as fh:
            torch.save({**meta, "model": ema_state if best_is_ema else state,
                        "weights": "ema" if best_is_ema else "raw", "epoch": epoch + 1, "best_score": progress.best},
                       fh)
    write_logs(out, progress.history, title)
    with cache.atomic_path(out / LAST) as tmp, open(tmp, "wb") as fh:
        torch.save({**meta, "model": state, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "scaler": scaler.state_dict(), "rng": rngs, "epoch": epoch, "best_score": progress.best,
                    "history": progress.history, "nonfinite_total": progress.nonfinite, "ema": ema_state}, fh)


def rewrite_logs(out: Path, progress: Progress, epochs: int, title: str) -> None:
    """Nothing left to train (killed during OOF): the logs again from last.pt's history, in case
    an older run was killed between last.pt and them (rank 0 only)."""
    if progress.start >= epochs and progress.history:
        write_logs(out, progress.history, title)


def load_best(model: torch.nn.Module, out: Path, what: str) -> None:
    """The best epoch's weights into ``model`` (for the OOF predictions)."""
    best_path = out / BEST
    if not best_path.is_file():
        raise PipelineError(f"{what}: {best_path} missing after training (no epoch was scored)")
    model.load_state_dict(load_dict(best_path)["model"])


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


# ---------------------------------------------------------------------------- RNG states

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict:
    """Python, NumPy and torch CPU generator states, plus the CUDA generator of ``device`` only.

    Only this process's GPU: get_rng_state_all() would create a CUDA context on every visible
    GPU from every DDP rank, and its list could not be restored where fewer GPUs are visible.

    python: random.getstate(), (3, 625 ints, None); numpy: ("MT19937", int64 tensor (624,) of the
    uint32 keys, pos, has_gauss, cached_gaussian) - a tensor, not NumPy's ndarray, which the
    weights-only loader refuses; torch, cuda: uint8 tensors.
    """
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore :func:`rng_state`. Checkpoints before train-3 hold a list (every visible GPU's
    state): the entry of this process's GPU is used, and none when that GPU was not there."""
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]     # keys: a tensor (an ndarray in checkpoints before safe loading)
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):
        i = device.index if device.index is not None else torch.cuda.current_device()
        cuda = cuda[i] if i < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


# ---------------------------------------------------------------------------- logs

def write_logs(out: Path, history: list[dict], title: str) -> None:
    write_metrics(out / "metrics.csv", history)
    write_curve(out / "curve.png", history, title)


def write_metrics(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: row.get(k, "") for k in METRIC_COLUMNS})   # older runs' rows lack the newer columns
    cache.write_text(path, buf.getvalue())


def write_curve(path: Path, history: list[dict], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    a.plot(ep, [h["val_loss"] for h in history], "o-", label="val")
    a.set_xlabel("epoch"), a.set_ylabel("BCE + Dice loss"), a.legend()
    b.plot(ep, [h["val_dice"] for h in history], "o-", color="C2", label="raw")
    ema = [h.get("val_dice_ema", float("nan")) for h in history]
    if not all(v != v for v in ema):    # any EMA score (NaN != NaN)
        b.plot(ep, ema, "s--", color="C3", label="EMA")
        b.legend()
    b.set_xlabel("epoch"), b.set_ylabel("val Dice (p > 0.5)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with cache.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
