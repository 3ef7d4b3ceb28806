"""Predict stage: per-fold, per-image test probabilities at model size, with TTA.

Layout (one directory per checkpoint x TTA, so adding a fold or changing the
threshold reruns only what changed)::

    <cache>/predict/<ckpt sha256[:16]>-<hash of TTA + precision>/
        meta.json            checkpoint path/hash, arch, encoder, model size, TTA names, precision
        <id>.png             uint8 = round(255 * mean over TTA views of sigmoid), model size
        shards/<i>of<N>.json a shard finished (submit names the missing ones)
        config.yaml, manifest.json   written once every test image is present

The precision the forward ran in (fp32, or bf16/fp16 autocast: ``predict.precision``
resolved for the device type by ``pipeline.precision``: 'auto' = fp16 on CUDA, bf16 on
a CPU with native bf16, else fp32) is part of the
key: bf16 and fp16 maps differ by a few levels of 255, so they never share a
directory, and shards must run with the same precision (a CPU and a GPU machine
with precision=auto do not) to fill the same one.

Every ``<id>.png`` is written atomically, and images whose file exists are
skipped, so an interrupted run resumes where it stopped and shards running on
different machines (``predict.shard=i/N``) fill the same directory without
coordination. Nothing holds more than a few batches in memory.

The fold ensemble (mean over folds) and the way back to each image's original
size (``geometry.to_original``) are applied by the submit stage; the maps' file layout
is ``pipeline.probmaps``.
"""
from __future__ import annotations

import datetime
import json
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import cache, heap, locks, runtime, tta as tta_mod
from .config import Config
from .errors import ConfigError, PipelineError
from .graph import STAGES, Graph, file_sha16, predict_dir
from .data import cv2_single_thread, read_image, to_device
from .geometry import jpeg_reduction, row_geometry, to_model
from .precision import autocast, resolve_device, resolve_precision
from .probmaps import done_ids, prob_path, write_prob
from .testset import read_test_index
from .runtime import Runtime, parse_shard

CODE_VERSION = STAGES["predict"].code


# ----------------------------------------------------------------------------- small pure helpers

def shard_positions(n_rows: int, shard: tuple[int, int]) -> np.ndarray:
    """Row positions of shard (i, N): every N-th row from i. Disjoint, and together they cover all rows."""
    i, n = shard
    return np.arange(i, n_rows, n)


# ----------------------------------------------------------------------------- prediction

class TestImages(Dataset):
    """Test JPEGs decoded and placed in the model input in DataLoader workers.

    Uses ``geometry.to_model`` with each image's geometry (resize, and padding for
    fit=pad), so the model sees test pixels made exactly as its training pixels.
    Returns ((h, w, 3) uint8 RGB tensor, row position).
    """

    def __init__(self, paths: list[str], geoms: list[dict], size: tuple[int, int], reductions: list[int]):
        self.paths, self.geoms, self.size, self.reductions = list(paths), list(geoms), size, list(reductions)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img = read_image(self.paths[i], self.reductions[i])   # JPEG decode scale, as prepare decodes
        out = to_model(img, self.geoms[i], *self.size)
        return torch.from_numpy(np.ascontiguousarray(out)), i


def _worker_init(_):
    # Each loader worker decodes one image at a time: extra threads would only fight the model's.
    # No cv2.setNumThreads here: in a forked worker it can deadlock (see cv2_single_thread).
    torch.set_num_threads(1)


def write_meta(maps_dir: Path, info: dict) -> None:
    p = maps_dir / "meta.json"
    if not p.is_file():
        cache.write_json(p, info)


@dataclass
class PredictResult:
    maps_dir: Path
    predicted: int
    skipped: int
    seconds: float


def predict_fold(index: pd.DataFrame, ckpt_path: str | Path, cache_root: str | Path, ttas: list[tta_mod.TTA], *,
                 shard: tuple[int, int] = (0, 1), device: str = "auto", precision: str = "auto",
                 ckpt_hash: str | None = None, log=print, **kwargs) -> PredictResult:
    """:func:`_predict_fold` (its docstring has the arguments) under the shard's lock: a second
    process on the same shard of the same directory waits (pipeline.locks), then finds its
    images cached; other shards run in parallel."""
    ckpt_hash = ckpt_hash or file_sha16(ckpt_path)
    dev = resolve_device(device, "predict.device")
    maps_dir = predict_dir(cache_root, ckpt_hash, tta_mod.names(ttas), resolve_precision(precision, dev,
                                                                                          "predict.precision"))
    with locks.stage_lock(locks.lock_path(cache_root, maps_dir, f".shard{shard[0]}of{shard[1]}"),
                          f"predict shard {shard[0]}/{shard[1]}", log=log):
        return _predict_fold(index, ckpt_path, cache_root, ttas, shard=shard, device=device, precision=precision,
                             ckpt_hash=ckpt_hash, log=log, **kwargs)


@cv2_single_thread()
def _predict_fold(index: pd.DataFrame, ckpt_path: str | Path, cache_root: str | Path, ttas: list[tta_mod.TTA], *,
                  shard: tuple[int, int] = (0, 1), batch_size: int = 8, num_workers: int = 2,
                 device: str = "auto", precision: str = "auto", max_forward: int = 0, ckpt_hash: str | None = None,
                 config: dict | None = None, log=print, progress: bool = True) -> PredictResult:
    """Predict this shard's test images with one checkpoint; skip those already on disk.

    index: test index rows (columns id, path). Writes ``<maps_dir>/<id>.png`` (uint8, model size).
    precision: the predict.precision setting (auto, fp32, bf16, fp16), resolved for ``device``.
    max_forward: at most this many images (TTA views included) per model call; 0 = a batch's
    views of one scale at once (batch_size * views). Peak memory follows it; the maps do not.
    config: the resolved config, written as ``config.yaml`` beside the maps with the manifest
    (default: this call's own arguments).
    """
    t0 = time.time()
    tta_mod.check_max_forward(max_forward)      # before any model is loaded
    ckpt_path = Path(ckpt_path)
    ckpt_hash = ckpt_hash or file_sha16(ckpt_path)
    dev = resolve_device(device, "predict.device")
    resolved = resolve_precision(precision, dev, "predict.precision")
    maps_dir = predict_dir(cache_root, ckpt_hash, tta_mod.names(ttas), resolved)
    maps_dir.mkdir(parents=True, exist_ok=True)
    cache.sweep_temps([maps_dir, maps_dir / "shards"])   # killed runs' temps; a live shard's stay
    rows = index.iloc[shard_positions(len(index), shard)]
    todo = rows[~rows["id"].isin(done_ids(maps_dir))]
    if len(todo) or not (maps_dir / "meta.json").is_file():  # a finished shard needs no model
        model, size, stats = _open_checkpoint(ckpt_path, ckpt_hash, dev, maps_dir, ttas, resolved, precision)
    if len(todo):
        geoms = _placements(todo, size)
        _predict_images(model, todo, geoms, size, stats, maps_dir, ttas, dev, resolved,
                        batch_size=batch_size, num_workers=num_workers, max_forward=max_forward, progress=progress,
                        log=log)
    cache.write_json(maps_dir / "shards" / f"{shard[0]}of{shard[1]}.json",
                     {"shard": f"{shard[0]}/{shard[1]}", "images": len(rows), "finished_at": time.time()})
    if done_ids(maps_dir).issuperset(index["id"]):
        if config is None:  # called directly (tests, benchmarks): record what this call was given
            config = {"predict": {"tta": ",".join(tta_mod.names(ttas)), "batch_size": batch_size,
                                  "shard": f"{shard[0]}/{shard[1]}", "num_workers": num_workers, "device": device,
                                  "precision": precision, "max_forward": max_forward}}
        _write_manifest(maps_dir, index, ckpt_path, ckpt_hash, ttas, resolved, config)
    res = PredictResult(maps_dir, len(todo), len(rows) - len(todo), time.time() - t0)
    log(f"predict: {ckpt_path} -> {maps_dir}: {res.predicted} predicted, {res.skipped} cached "
        f"(shard {shard[0]}/{shard[1]}), {res.seconds:.1f}s")
    return res


def _open_checkpoint(ckpt_path: Path, ckpt_hash: str, dev: torch.device, maps_dir: Path, ttas: list[tta_mod.TTA],
                     resolved: str, setting: str) -> tuple[torch.nn.Module, tuple[int, int], tuple]:
    """The model (eval mode, on ``dev``), its input size and input statistics; writes meta.json
    once per directory. ``setting``: the precision as configured, recorded beside the resolved one."""
    from .models import IMAGENET_STATS, load_checkpoint
    model, meta = load_checkpoint(ckpt_path, dev)
    size = (int(meta["height"]), int(meta["width"]))
    # Checkpoints written before input_stats was recorded were all trained on ImageNet statistics.
    stats = meta.get("input_stats", IMAGENET_STATS)
    # "autocast" is the setting's name in meta.json since predict-1 (the config key is now predict.precision).
    write_meta(maps_dir, {"checkpoint": str(ckpt_path.resolve()), "checkpoint_sha256_16": ckpt_hash,
                          "arch": meta.get("arch"), "encoder": meta.get("encoder"), "height": size[0],
                          "width": size[1], "tta": tta_mod.names(ttas), "precision": resolved,
                          "autocast": setting, "device_type": dev.type, "code": CODE_VERSION})
    return model, size, stats


def _placements(todo: pd.DataFrame, size: tuple[int, int]) -> list[dict]:
    """Each row's geometry, checked against the checkpoint's input size.

    The placement must fit the checkpoint's input and fill it along one axis at least
    (prepare's stretch and pad both do): anything else means another prepare size.
    """
    geoms = [row_geometry(r, *size) for r in todo.to_dict("records")]
    bad = [(i, g) for i, g in zip(todo["id"], geoms)
           if g["pad_top"] + g["scaled_height"] > size[0] or g["pad_left"] + g["scaled_width"] > size[1]
           or (g["scaled_height"] != size[0] and g["scaled_width"] != size[1])]
    if bad:
        raise PipelineError(f"test index geometry {bad[0][1]} of {bad[0][0]} does not fit the checkpoint's "
                            f"{size[0]}x{size[1]} input: prepare and train used different sizes")
    return geoms


def _predict_images(model, todo: pd.DataFrame, geoms: list[dict], size: tuple[int, int], stats: tuple,
                    maps_dir: Path, ttas: list[tta_mod.TTA], dev: torch.device, resolved: str, *,
                    batch_size: int, num_workers: int, max_forward: int, progress: bool, log=print) -> None:
    """Decode, predict (TTA mean of sigmoids) and write ``<id>.png`` for every row of ``todo``.

    Out of GPU memory, the images per model call are halved and the batch retried (see
    :class:`_Fitting`), for the rest of the run."""
    model = model.to(memory_format=torch.channels_last)
    reductions = [jpeg_reduction(int(r["orig_height"]), int(r["orig_width"]), g)
                  for r, g in zip(todo.to_dict("records"), geoms)]
    loader = DataLoader(TestImages(todo["path"].tolist(), geoms, size, reductions), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers, pin_memory=dev.type == "cuda",
                        worker_init_fn=_worker_init, prefetch_factor=4 if num_workers else None)
    ids = todo["id"].tolist()
    # PNG encoding + atomic writes run in threads (cv2 releases the GIL) while the model computes;
    # at most `max_pending` images wait, so memory does not grow with the number of images.
    pending: deque = deque()
    max_pending = 4 * batch_size
    fitting = _Fitting(max_forward, log)
    with ThreadPoolExecutor(max_workers=2) as pool, torch.inference_mode(), autocast(dev.type, resolved):
        for images, pos in tqdm(loader, desc=f"predict {maps_dir.name}", unit="batch", disable=not progress,
                                mininterval=5.0):
            x, _ = to_device(images, None, dev, stats=stats)
            prob = fitting.proba(model, x, ttas)[:, 0]
            prob_u8 = (prob * 255.0).round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()
            for k, p in zip(pos.tolist(), prob_u8):
                pending.append(pool.submit(write_prob, prob_path(maps_dir, ids[k]), p))
            while len(pending) > max_pending:
                pending.popleft().result()
        while pending:
            pending.popleft().result()


class _Fitting:
    """``tta.predict_proba`` that halves the images per model call on CUDA out-of-memory.

    ``cap``: images (TTA views included) per model call, 0 = a batch's views of one scale at
    once (``predict.max_forward``). An OutOfMemoryError halves it (from the size of the call
    that failed), logs one line and retries the same batch; the smaller cap stays for the rest
    of the run (what failed once would fail again). The cap changes no map beyond fp32 sums run
    in another order (at most one level of 255, as ``predict.max_forward``), so the cache key
    stays. At one image per call the error is a PipelineError saying what to change.
    """

    def __init__(self, max_forward: int, log=print):
        self.cap, self.log = max_forward, log

    def proba(self, model, x: torch.Tensor, ttas: list[tta_mod.TTA]) -> torch.Tensor:
        while True:
            try:
                return tta_mod.predict_proba(model, x, ttas, self.cap)
            except torch.cuda.OutOfMemoryError:
                pass    # handled out here: the exception's frames hold the failed call's tensors
            widest = x.shape[0] * max(sum(t.scale == s for t in ttas) for s in {t.scale for t in ttas})
            tried = min(self.cap, widest) if self.cap > 0 else widest
            if tried <= 1:
                raise PipelineError(f"predict: out of GPU memory with one {tuple(x.shape[-2:])} image per "
                                    "model call; free the GPU, or use predict.precision=fp16 or predict.device=cpu")
            if x.is_cuda:
                torch.cuda.empty_cache()     # the failed call's blocks, before the smaller retry
            self.cap = tried // 2
            self.log(f"predict: out of GPU memory at {tried} images per model call; halved to {self.cap} "
                     f"(as predict.max_forward={self.cap}), retrying the batch")


def _write_manifest(maps_dir: Path, index: pd.DataFrame, ckpt_path: Path, ckpt_hash: str,
                    ttas: list[tta_mod.TTA], resolved: str, config: dict) -> None:
    # Rewritten by every run that finds this index complete (the directory outlives one test set):
    # the config is that run's; shards may differ in settings outside the key (batch size,
    # workers, max_forward), which leave the maps unchanged.
    cache.write_manifest(maps_dir, stage="predict", key=maps_dir.name,
                         params={"tta": tta_mod.names(ttas), "checkpoint_sha256_16": ckpt_hash,
                                 "precision": resolved},
                         inputs={"checkpoint": str(ckpt_path.resolve())},
                         outputs={"images": int(len(index))}, config=config)


# ----------------------------------------------------------------------------- one shard per torchrun rank
# `make predict-ddp NPROC=N` (torchrun, one or several nodes) runs this stage once per rank. Each
# rank predicts shard RANK/WORLD_SIZE (the same rule as predict.shard=i/N, so the maps are those of
# a one-process run), and no rank returns before every shard is written: then the torchrun that
# holds rank 0 ends only when the cache is complete, and `make submit` after it can merge.

# How long a finished rank waits for the slowest: shards differ by at most one image, so this only
# bounds a hung or lost rank (one that fails makes torchrun stop the other ranks on its node at once).
SHARD_WAIT = datetime.timedelta(hours=2)


def rank_shard(spec: str, rt: Runtime) -> tuple[int, int]:
    """The shard this process predicts: (rank, world) under torchrun, else ``parse_shard(spec)``.

    predict.shard together with torchrun is refused: the two would split the same rows twice."""
    if not rt.active:
        return parse_shard(spec)
    if spec:
        raise ConfigError(f"predict.shard='{spec}' under torchrun (WORLD_SIZE={rt.world}): each rank predicts "
                          "shard RANK/WORLD_SIZE already; leave predict.shard empty")
    return rt.rank, rt.world


def wait_for_all_shards(fold_dirs: list[Path], index: pd.DataFrame, rt: Runtime) -> None:
    """Under torchrun: a barrier over every rank (a gloo group: CPU only, also beside GPUs), then
    rank 0 checks that every fold directory holds every test image. A no-op in one process."""
    if not rt.active:
        return
    import torch.distributed as dist
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("gloo", timeout=SHARD_WAIT)
    try:
        dist.barrier()
    finally:
        if owns:
            dist.destroy_process_group()
    if rt.main:
        for d in fold_dirs:
            missing = set(index["id"]) - done_ids(d)
            if missing:
                raise PipelineError(f"{d}: every rank finished but {len(missing)} test images are missing, "
                                    f"e.g. {sorted(missing)[:3]} (is data.cache shared by every node?)")
        print(f"predict: all {rt.world} shards written", flush=True)


# ----------------------------------------------------------------------------- the stage

def run(cfg: Config, graph: Graph | None = None, rt: Runtime | None = None) -> list[PredictResult]:
    """Predict every test image with each fold's best.pt (``predict.folds``) into the folders the
    graph resolves."""
    heap.keep_pages()        # the batches' buffers stay mapped: no page faults every batch
    g = graph or Graph(cfg)
    rt = rt or runtime.resolve(cfg, "predict")
    index = read_test_index(g.prepared_dir / "test_index.csv")
    ckpts, ttas = g.checkpoints(), cfg.spec("predict.tta")
    shard = rank_shard(cfg.predict.shard, rt)
    out = []
    for ckpt in ckpts:
        out.append(predict_fold(index, ckpt, cfg.data.cache, ttas, shard=shard, ckpt_hash=g.checkpoint_hash(ckpt),
                                batch_size=cfg.predict.batch_size, num_workers=cfg.predict.num_workers,
                                device=rt.device, precision=cfg.predict.precision,
                                max_forward=cfg.predict.max_forward, config=cfg.to_dict()))
    wait_for_all_shards([r.maps_dir for r in out], index, rt)
    print(json.dumps({"predict": [str(r.maps_dir) for r in out], "shard": f"{shard[0]}/{shard[1]}",
                      "tta": tta_mod.names(ttas)}))
    return out
