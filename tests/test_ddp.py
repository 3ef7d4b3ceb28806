"""The same train code under torchrun: 2 CPU processes, gloo, one tiny epoch, 2 micro-batches per update.

One launch (``_ddp_helpers.single_node``, shared with test_multinode.py) serves every test here:
the DDP mechanics, only rank 0 writing checkpoints, and equality with one process that trains
on the same micro-batches with the same global batch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from _ddp_helpers import OVERRIDES, no_running_stats, single_node
from _train_helpers import tiny_cfg
from pipeline import cache, train
from pipeline.train import build
from pipeline.graph import Graph

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return single_node(tmp_path_factory)


def test_two_process_gloo_epoch(ddp):
    out_text = ddp.stdout
    # Each rank: 2 updates of 2 micro-batches, the first of each under no_sync (gradients all-reduced once).
    assert "rank 0 of 2 done (2 no_sync)" in out_text and "rank 1 of 2 done (2 no_sync)" in out_text
    # Only rank 0 logs: one header line and one summary line for the epoch.
    assert out_text.count("fold 0 epoch 1/1:") == 1
    assert "2 process(es)" in out_text
    out = Graph(ddp.cfg(), prepared=ddp.prepared).fold_dir(0)
    assert cache.is_complete(out)
    m = pd.read_csv(out / "metrics.csv")
    assert len(m) == 1 and 0 <= m["val_dice"].iloc[0] <= 1
    # 8 training images, sharded 4 + 4, batches of 1, 2 per update: 2 updates per rank, 8 images/epoch.
    assert "2 updates/epoch of 1x2x2 (8 images/epoch)" in out_text
    # Both ranks' validation shards reach the OOF outputs: every fold-0 image once.
    folds = pd.read_csv(ddp.prepared / "folds.csv")
    val_ids = sorted(folds.loc[folds.fold == 0, "id"])
    assert sorted(p.stem for p in (out / "oof").glob("*.png")) == val_ids
    oof = cache.read_json(out / "oof.json")
    assert oof["images"] == len(val_ids)
    ckpt = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"])    # saved unwrapped
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert len(last["rng"]) == 2 and last["world_size"] == 2            # every rank's RNG state
    assert oof["world_size"] == 2


def test_only_rank_0_writes_checkpoints_and_logs(ddp):
    """Rank 1 writes nothing in the cache but its own validation shard's OOF maps; the
    checkpoints, metrics, OOF summary and manifest come from rank 0 alone."""
    out = Graph(ddp.cfg(), prepared=ddp.prepared).fold_dir(0)
    mine = {0: [], 1: []}
    for rank in (0, 1):
        mine[rank] = [Path(p) for p in ddp.writes(rank) if p.startswith(str(ddp.cache))]
    others = [p for p in mine[1] if not (p.parent == out / "oof" and p.name.endswith(".png"))]
    assert others == [], f"rank 1 wrote {others}"
    folds = pd.read_csv(ddp.prepared / "folds.csv")
    val_ids = sorted(folds.loc[folds.fold == 0, "id"])
    assert sorted({p.stem for p in mine[1] if not p.name.startswith(".")}) == val_ids[1::2]   # its shard
    names = {p.name for p in mine[0]}
    for name in ("best.pt", "last.pt", "metrics.csv", "oof.json", "manifest.json"):
        assert name in names, name


def _param_state(state: dict) -> dict:
    return {k: v for k, v in state.items() if v.is_floating_point()}


def test_equals_one_process_with_the_same_global_batch(ddp, tmp_path, monkeypatch):
    """One process, micro-batches of 1 and 4 per update (2 ranks x 2 = the DDP global batch, in
    the same order: rank r's micro-batch j is the single process's 2j + r): the same losses,
    learning rates, validation metrics and weights, to float rounding (gradients are summed in
    another order, and Dice thresholds)."""
    real = build.build_model
    monkeypatch.setattr(build, "build_model", lambda *a, **k: no_running_stats(real(*a, **k)))
    one = tiny_cfg(tmp_path / "cache", **{**OVERRIDES, "train.accum_steps": 4})
    # One thread, as each DDP rank has (OMP_NUM_THREADS=1): with 2, oneDNN's convolutions round
    # differently, and AdamW's first step (lr * g / |g|) turns that into +-lr on every weight
    # whose gradient is near 0: measured, half the weights then differ by up to 2 lr.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.run(one, Graph(one, prepared=ddp.prepared))
    finally:
        torch.set_num_threads(threads)
    got = pd.read_csv(Graph(ddp.cfg(), prepared=ddp.prepared).fold_dir(0) / "metrics.csv")
    want = pd.read_csv(Graph(one, prepared=ddp.prepared).fold_dir(0) / "metrics.csv")
    cols = ["epoch", "lr", "train_loss", "val_loss"]
    np.testing.assert_allclose(got[cols].to_numpy(float), want[cols].to_numpy(float), rtol=1e-5, atol=1e-6)
    # Dice thresholds at 0.5: a pixel within rounding of it may flip (one pixel ~ 1e-3 of an image's Dice).
    np.testing.assert_allclose(got["val_dice"], want["val_dice"], atol=3e-3)
    a = torch.load(Graph(ddp.cfg(), prepared=ddp.prepared).fold_dir(0) / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(Graph(one, prepared=ddp.prepared).fold_dir(0) / "last.pt", map_location="cpu", weights_only=True)
    pa, pb = _param_state(a["model"]), _param_state(b["model"])
    assert pa.keys() == pb.keys() and len(pa) > 10
    steps = {int(st["step"]) for st in a["optimizer"]["state"].values()}
    assert steps == {2}                                   # two updates happened (AdamW's step count)
    # Every weight moved by ~lr per update (3e-3). Summed in another order, gradients differ by
    # rounding, and AdamW divides by their size: measured, 1 of 766k weights differs by 1e-6.
    # A real difference (no all-reduce, wrong shards, another thread count) moves about half.
    diff = torch.cat([(pa[k] - pb[k]).abs().flatten() for k in pa])
    assert float(diff.max()) < 1e-4 and float((diff > 1e-6).float().mean()) < 1e-4, \
        (float(diff.max()), float((diff > 1e-6).float().mean()))

