"""The same train code under torchrun: 2 CPU processes, gloo, one tiny epoch, 2 micro-batches per update."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from _train_helpers import make_prepared, tiny_cfg
from pipeline import cache, train

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import os, sys
sys.path[:0] = [{tests!r}, {repo!r}]
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from _train_helpers import tiny_cfg
from pipeline import train
no_sync, entered = DDP.no_sync, []
DDP.no_sync = lambda self: entered.append(1) or no_sync(self)   # count the accumulate-locally micro-batches
summary = train.run(tiny_cfg({cache!r}, **{overrides!r}), prepared_dir={prepared!r})
print(f"rank {{os.environ['RANK']}} of {{os.environ['WORLD_SIZE']}} done ({{len(entered)}} no_sync): {{summary}}",
      flush=True)
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_process_gloo_epoch(tmp_path):
    prepared = make_prepared(tmp_path / "prep")
    overrides = {"train.epochs": 1, "train.batch_size": 2, "train.accum_steps": 2}
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT.format(tests=str(REPO / "tests"), repo=str(REPO), cache=str(tmp_path / "cache"),
                                    overrides=overrides, prepared=str(prepared)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Each rank: 2 micro-batches per update, the first under no_sync (gradients all-reduced once).
    assert "rank 0 of 2 done (1 no_sync)" in proc.stdout and "rank 1 of 2 done (1 no_sync)" in proc.stdout
    # Only rank 0 logs: one header line and one summary line for the epoch.
    assert proc.stdout.count("fold 0 epoch 1/1:") == 1
    assert "2 process(es)" in proc.stdout

    cfg = tiny_cfg(tmp_path / "cache", **overrides)
    out = train.fold_dir(cfg, 0, prepared)
    assert cache.is_complete(out)
    m = pd.read_csv(out / "metrics.csv")
    assert len(m) == 1 and 0 <= m["val_dice"].iloc[0] <= 1
    # 8 training images, sharded 4 + 4, batches of 2, 2 per update: 1 update per rank, 8 images/epoch.
    assert "1 updates/epoch of 2x2x2 (8 images/epoch)" in proc.stdout
    # Both ranks' validation shards reach the OOF outputs: every fold-0 image once.
    folds = pd.read_csv(prepared / "folds.csv")
    val_ids = sorted(folds.loc[folds.fold == 0, "id"])
    assert sorted(p.stem for p in (out / "oof").glob("*.png")) == val_ids
    oof = cache.read_json(out / "oof.json")
    assert oof["images"] == len(val_ids)
    ckpt = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"])    # saved unwrapped
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert len(last["rng"]) == 2 and last["world_size"] == 2            # every rank's RNG state
    assert oof["world_size"] == 2
