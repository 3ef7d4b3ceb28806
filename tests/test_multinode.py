"""Beyond one machine: torchrun across nodes, for training and for prediction.

- Training: two torchrun agents (``--nnodes 2 --nproc-per-node 1``, a c10d rendezvous on
  127.0.0.1, gloo) stand for two machines; the fold they train must equal the single-node
  2-process run (``_ddp_helpers.single_node``, the same world size) exactly.
- Prediction: ``python -m pipeline predict`` under torchrun (what ``make predict-ddp`` runs)
  predicts shard RANK/WORLD_SIZE per process; when the launch returns every shard is on disk,
  and submit's CSV is byte-identical to a one-process run's.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from _ddp_helpers import REPO, free_port, launch_two_nodes, single_node
from pipeline import cache, config, predict, prepare, probmaps, runtime, submit, synth, train
from pipeline.errors import ConfigError
from pipeline.graph import Graph
from pipeline import testset

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")

METRICS = ["epoch", "lr", "train_loss", "val_loss", "val_dice", "val_dice_ema"]


def test_two_nodes_equal_one_node_with_the_same_world_size(tmp_path_factory):
    one = single_node(tmp_path_factory)
    two = launch_two_nodes(tmp_path_factory.mktemp("ddp2nodes"))
    assert "rank 0 of 2 done" in two.stdout and "rank 1 of 2 done" in two.stdout
    a = Graph(one.cfg(), prepared=one.prepared).fold_dir(0)
    b = Graph(two.cfg(), prepared=two.prepared).fold_dir(0)
    assert cache.is_complete(b)
    ma, mb = pd.read_csv(a / "metrics.csv"), pd.read_csv(b / "metrics.csv")
    cols = [c for c in METRICS if c in ma.columns]
    # The same ranks, the same gloo reductions: the same numbers, not merely close ones.
    pd.testing.assert_frame_equal(ma[cols], mb[cols], check_exact=True)
    oa, ob = cache.read_json(a / "oof.json"), cache.read_json(b / "oof.json")
    assert ob["world_size"] == 2 and ob["images"] == oa["images"]
    assert (ob["dice_model"], ob["dice_original"]) == (oa["dice_model"], oa["dice_original"])
    wa = torch.load(a / "last.pt", map_location="cpu", weights_only=True)["model"]
    wb = torch.load(b / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------------------- predict-ddp

def _cfg(root, **extra) -> config.Config:
    base = {"data.raw": str(root / "raw"), "data.cache": str(root / "cache"), "data.submissions": str(root / "subs"),
            "prepare.height": 64, "prepare.width": 96, "prepare.n_folds": 2, "prepare.workers": 1,
            "train.arch": "Unet", "train.encoder": "tu-resnet18", "train.encoder_depth": 3,
            "train.decoder_channels": "32,16,8", "train.epochs": 1, "train.num_workers": 0, "train.fold": 0,
            "train.precision": "fp32", "predict.folds": "0", "predict.num_workers": 0, "predict.batch_size": 2,
            "predict.precision": "fp32", "submit.workers": 1}
    base.update(extra)
    return config.load(None, base)


def _args(cfg: config.Config) -> list[str]:
    keys = ("data.raw", "data.cache", "data.submissions", "prepare.height", "prepare.width", "prepare.n_folds",
            "prepare.workers", "train.arch", "train.encoder", "train.encoder_depth", "train.decoder_channels",
            "train.epochs", "train.num_workers", "train.fold", "train.precision", "predict.folds",
            "predict.num_workers", "predict.batch_size", "predict.precision")
    d = cfg.to_dict()
    return [f"{k}={d[k.split('.')[0]][k.split('.')[1]]}" for k in keys]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The demo set (2 train cars per fold, 1 test car of 16 images), fold 0 trained one epoch."""
    root = tmp_path_factory.mktemp("predict_ddp")
    synth.generate(root / "raw", train_cars=4, test_cars=1, height=128, width=192, seed=2, workers=1)
    cfg = _cfg(root)
    train.run(cfg, Graph(cfg, prepared=prepare.run(cfg)))
    return root, cfg


def test_predict_ddp_shards_by_rank_and_submit_is_byte_identical(trained, tmp_path):
    root, cfg = trained
    (one,) = predict.run(cfg)                        # one process: the reference maps and CSV
    ref = submit.run(_cfg(root, **{"submit.name": "one", "submit.threshold": 0.5})).read_bytes()
    maps_dir = one.maps_dir
    moved = tmp_path / "one_process_maps"
    maps_dir.rename(moved)                           # predict-ddp must make every map again

    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "pipeline", "predict",
           *_args(cfg)]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "predict: all 2 shards written" in proc.stdout
    # Each rank predicted its half: every other row of the test index, 8 of 16.
    assert proc.stdout.count("8 predicted, 0 cached (shard 0/2)") == 1
    assert proc.stdout.count("8 predicted, 0 cached (shard 1/2)") == 1
    assert sorted(p.name for p in (maps_dir / "shards").iterdir()) == ["0of2.json", "1of2.json"]
    assert cache.is_complete(maps_dir)               # the manifest: the whole index is there
    ids = testset.read_test_index(Graph(cfg).prepared_dir / "test_index.csv")["id"]
    for i in ids:
        assert (probmaps.read_prob(probmaps.prob_path(maps_dir, i)) ==
                probmaps.read_prob(probmaps.prob_path(moved, i))).all(), i
    got = submit.run(_cfg(root, **{"submit.name": "ddp", "submit.threshold": 0.5})).read_bytes()
    assert got == ref


def test_rank_shard_rule():
    """(RANK, WORLD_SIZE) under torchrun; predict.shard alone otherwise; both at once is refused."""
    one = runtime.from_env({})
    assert predict.rank_shard("", one) == (0, 1) and predict.rank_shard("1/3", one) == (1, 3)
    ddp = runtime.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert predict.rank_shard("", ddp) == (3, 4)
    with pytest.raises(ConfigError, match="predict.shard='1/3' under torchrun"):
        predict.rank_shard("1/3", ddp)
    assert predict.rank_shard("", runtime.from_env({"WORLD_SIZE": "1"})) == (0, 1)
