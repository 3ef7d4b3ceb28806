"""The ``last.pt`` resume protocol, and ``best.pt``.

``last.pt`` (written atomically after every epoch, after metrics.csv and curve.png)
holds model, optimizer, scheduler, GradScaler, EMA weights, epoch, best score, every rank's
RNG states (:mod:`pipeline.train.rng`), the number of processes, the precision and the
metrics so far. After a kill -9 the same command continues from the last completed epoch
and ends with the same metrics as an uninterrupted run: shuffling comes from (seed, epoch)
and augmentation from (seed, epoch, image), never from state lost in the kill. Resuming
needs the same number of processes (steps per epoch and the schedule depend on it): another
count is an error saying how to go on. Another device is fine (a CPU checkpoint's empty
GradScaler state leaves a CUDA run's scaler fresh; precision=auto changing with it is logged).

Both files hold tensors and plain Python values only (dict, list, tuple, str, int, float,
bool, None; the NumPy RNG state's key array as a tensor) and are read back weights-only
(:mod:`pipeline.safeload`).

The three parts of the protocol sit side by side: :func:`save_epoch` (best.pt, the logs,
then last.pt), :func:`load_last` (restore, or start anew), and :func:`rewrite_logs` (a fold
with no epoch left to run rewrites the logs from last.pt).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import cache
from ..errors import PipelineError
from ..safeload import load_dict
from .logs import write_logs
from .rng import set_rng_state

LAST, BEST = "last.pt", "best.pt"


@dataclass
class Progress:
    """Where the epoch loop stands: restored from last.pt, updated every epoch."""
    start: int = 0                 # the next epoch to run (0-based)
    best: float = -1.0             # best validation Dice so far
    history: list[dict] = field(default_factory=list)   # metrics.csv rows so far
    nonfinite: int = 0             # dropped updates so far (NonFiniteGuard.total)


def load_last(out: Path, key: str, model, step, *, device: torch.device, precision: str, rank: int, world: int,
              epochs: int, log, what: str) -> Progress:
    """Restore ``out/last.pt`` into ``model`` and ``step`` (a :class:`pipeline.train.step.Stepper`:
    optimizer, scheduler, scaler, EMA) when it belongs to ``key``; returns the progress.

    No last.pt, or one of another config (logged): a fresh :class:`Progress`, nothing restored.
    ``what`` prefixes the log lines ("fold 0"). train.ema is in the key, so a matching last.pt
    holds EMA weights (``ema``) exactly when ``step.ema`` is set.
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
    step.optimizer.load_state_dict(ckpt["optimizer"])
    if step.scheduler is not None:
        step.scheduler.load_state_dict(ckpt["scheduler"])
    load_scaler_state(step.scaler, ckpt["scaler"])
    if step.ema is not None:
        step.ema.module.load_state_dict(ckpt["ema"])
    set_rng_state(ckpt["rng"][rank], device)
    p = Progress(ckpt["epoch"] + 1, ckpt["best_score"], ckpt["history"], ckpt.get("nonfinite_total", 0))
    log(f"{what}: resuming after epoch {p.start} of {epochs} (best val Dice {p.best:.4f})")
    return p


def save_epoch(out: Path, meta: dict, state: dict, step, rngs: list[dict], epoch: int, progress: Progress,
               title: str, best_is_ema: bool = False) -> None:
    """After epoch ``epoch`` (0-based; rank 0 only): best.pt when this epoch is the best, then
    metrics.csv and curve.png, then last.pt. ``state``: the bare model's state_dict; ``step``:
    the :class:`pipeline.train.step.Stepper` whose optimizer, scheduler, scaler and EMA weights
    last.pt keeps; ``rngs``: every rank's RNG state. best.pt holds the EMA weights
    (``weights: ema``) when ``best_is_ema`` (they scored higher), else the raw ones.

    last.pt goes last: a kill before it repeats this epoch, identically, and rewrites the
    files before it, so metrics.csv and curve.png are never a row short of last.pt.
    """
    ema_state = step.ema.module.state_dict() if step.ema is not None else None
    if progress.history[-1]["best"]:
        # Into a file object, not the temp's path: torch.save names the zip's root folder after a
        # path's file name (the random temp name), so the same weights would never give the same bytes.
        with cache.atomic_path(out / BEST) as tmp, open(tmp, "wb") as fh:
            torch.save({**meta, "model": ema_state if best_is_ema else state,
                        "weights": "ema" if best_is_ema else "raw", "epoch": epoch + 1, "best_score": progress.best},
                       fh)
    write_logs(out, progress.history, title)
    with cache.atomic_path(out / LAST) as tmp, open(tmp, "wb") as fh:
        torch.save({**meta, "model": state, "optimizer": step.optimizer.state_dict(),
                    "scheduler": step.scheduler.state_dict() if step.scheduler is not None else None,
                    "scaler": step.scaler.state_dict(), "rng": rngs, "epoch": epoch, "best_score": progress.best,
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
    so a resume under another count would not continue the same run.
    """
    # Checkpoints before train-3 have no world_size; their RNG list holds one state per rank.
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
