"""Train: one smp model per cross-validation fold, resumable, with out-of-fold predictions.

``run(cfg, graph, rt)`` trains ``cfg.train.fold`` (or every fold in turn when it is -1) from
the prepare artifact the graph resolves (``folds.csv`` + resized images, no JPEG decoding).
Each fold writes under ``<cache>/train/<train_key>/fold<k>/`` (``pipeline.graph`` names the
key and folders; docs/design.md the files): ``best.pt``, ``last.pt``, ``metrics.csv``,
``config.yaml``, ``curve.png``, ``oof/<id>.png``, ``oof/hist.npz``, ``oof.json`` and, last,
``manifest.json``. A fold with a manifest is not trained again.

The training wing, one job per module:

- ``fold``: the fold driver (lock, resume, the epochs, OOF);
- ``build``: the fold's context, loaders, model and the parts that step it;
- ``plan``: the epoch plan (input shape or crop, loss, what is scored) and batch inputs;
- ``step``: the step (forward, loss, backward, accumulation, GradScaler, non-finite guard);
- ``optim``: AdamW and the learning-rate schedule;
- ``scoring``: validation loss and Dice of the raw and EMA weights;
- ``oofmaps``: the OOF maps, histograms, ``oof.json`` and the manifest;
- ``resume``: the ``last.pt`` protocol and ``best.pt``; ``rng``: generator states;
  ``logs``: ``metrics.csv`` and ``curve.png``.

Many processes: folds train in parallel (``make train FOLD=0`` and ``FOLD=1`` at once); a
second process on the same fold waits for its lock, then reports it cached (pipeline.locks).
DDP: under ``torchrun --nproc_per_node N -m pipeline train ...`` the model is wrapped in
DistributedDataParallel (gloo on CPU, nccl on CUDA), a DistributedSampler shards the training
set, validation and OOF are sharded and reduced, and only rank 0 writes checkpoints, logs and
``oof/hist.npz``. Every rank writes the OOF maps of its own validation shard and reads the
prepare artifact and ``last.pt``/``best.pt``, so DDP over several nodes needs ``data.cache``
(and the data) on a filesystem that all nodes share.
"""
from __future__ import annotations

from .. import heap
from ..config import Config

from ..errors import ConfigError
from ..data import cv2_single_thread, load_index
from ..distributed import dist_close, dist_init
from ..graph import Graph
from ..arch import check_names
from ..runtime import Runtime, resolve
from .fold import train_fold


def check_config(cfg: Config) -> None:
    """Fail fast, before any data is read: the names only the model libraries know (config.load
    has checked the ranges and parsed every spec)."""
    check_names(cfg.train.arch, cfg.train.encoder)


def run(cfg: Config, graph: Graph | None = None, rt: Runtime | None = None) -> list[dict]:
    """Train the configured fold(s) of the prepare artifact ``graph`` resolves; ``rt``: the
    runtime context (default: resolved here from the environment and ``cfg``)."""
    check_config(cfg)
    heap.keep_pages()        # a step's buffers stay mapped: no page faults every step
    g = graph or Graph(cfg)
    prepared = g.prepared_dir
    index = load_index(prepared)
    folds = sorted(index["fold"].unique().tolist())
    if cfg.train.fold >= 0 and cfg.train.fold not in folds:
        raise ConfigError(f"train.fold={cfg.train.fold}: {prepared / 'folds.csv'} has folds {folds}")
    todo = folds if cfg.train.fold < 0 else [cfg.train.fold]
    d = dist_init(rt or resolve(cfg, "train"))
    try:
        with cv2_single_thread():
            return [train_fold(cfg, g, index, k, d) for k in todo]
    finally:
        dist_close(d)
