"""kill -9 at points of every stage, then the same command again: the artifacts of an uninterrupted run.

A tiny synthetic set (2 train cars, 1 test car: 32 + 16 images at 80x40, a 0.7M-parameter Unet
at 64x32, 2 epochs on fold 0) runs through prepare, train, oof, predict and submit once,
uninterrupted, with ``pipeline.faults`` tracing every kill point it reaches; that cache is the
reference. Then, per stage, at seeded random points drawn from that trace (``write``: an
atomic write's temp is complete, not renamed; ``rename``: just after the rename;
``submit.chunk``: a half-streamed CSV) and, for train, mid-epoch (``train.batch``): the
stage's outputs are removed, the command is run with the kill armed (it must die by SIGKILL),
then run again as it was, and the stage's outputs are compared with the reference's.

The commands run as forked children of the session's pre-imported process (tests/_stage_runner.py):
real processes, killed for real, running ``pipeline.cli.main`` as ``python -m pipeline`` does.
Both runs use the same cache path (the artifacts record absolute paths).

Compared byte for byte: every file of the stage (maps, masks, images, CSVs, best.pt, curve.png,
oof.json, oof/hist.npz, meta.json, the submission CSV, ...) and the list of files itself (so a temp left by
the kill and not swept by the rerun fails). Compared as values, for the reasons given:
``manifest.json`` and ``shards/*.json`` less ``finished_at`` and recorded files' mtimes (clocks), and prepare's
``stats`` counts of images processed vs reused (how that run got there, not what it made);
``metrics.csv`` less ``seconds`` and ``images_per_s``; ``last.pt``: every tensor, RNG state and
number equal, its history less the same two timing columns; the submission sidecar less ``created``,
``seconds`` and ``submission_fingerprint`` (the CSV's mtime). Stage logs (``*.log``) are
records of each run and are not compared.
"""
from __future__ import annotations

import json
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from _stage_runner import REPO, Zygote
from pipeline import faults, synth

STAGES = ("prepare", "train", "oof", "predict", "submit")
TINY = ["prepare.height=32", "prepare.width=64", "n_folds=2", "epochs=2", "train.batch_size=8",
        "train.arch=Unet", "train.encoder=tu-resnet18", "train.encoder_depth=3", "train.decoder_channels=32,16,8",
        "encoder_weights=none", "train.fold=0", "predict.folds=0", "train.num_workers=0", "predict.num_workers=0",
        "predict.batch_size=4", "prepare.workers=1", "submit.workers=1", "submit.images_per_task=4",
        "tta=hflip", "tensorboard.enabled=false", "predict.precision=fp32", "train.precision=fp32"]
# Kill points drawn per stage from the uninterrupted run's writes and renames (oof has 2 in all),
# plus train's mid-epoch kills: the n-th micro-batch (1-based, 2 per epoch here: epoch 1's second
# and epoch 2's first).
DRAWN = {"prepare": 8, "train": 4, "oof": 2, "predict": 6, "submit": 8}
MID_EPOCH = "train.batch"
TRAIN_STEPS = [f"{MID_EPOCH}:2", f"{MID_EPOCH}:3"]
SEED = 13
TIMING = ["seconds", "images_per_s"]
EXCLUDED = {"manifest.json": {"finished_at"}, "shard": {"finished_at"},
            "sidecar": {"created", "seconds", "submission_fingerprint"}}
PREPARE_RUN_STATS = {"processed", "reused", "test_checked", "test_reused"}


class World:
    def __init__(self, tmp: Path, zygote: Zygote, trace: dict[str, list[str]]):
        self.tmp, self.z, self.trace = tmp, zygote, trace
        self.live, self.ref = tmp / "live", tmp / "ref"

    def argv(self, stage: str) -> list[str]:
        return [stage, "--config", REPO / "configs" / "default.yaml", f"data.raw={self.tmp / 'raw'}",
                f"data.cache={self.live / 'cache'}", f"data.submissions={self.live / 'subs'}", *TINY]

    def outputs(self, stage: str, root: Path) -> list[Path]:
        """The files and folders ``stage`` writes, under ``root`` (live or ref)."""
        run = [p.parent for p in (root / "cache" / "train").glob("*/fold0")]
        assert len(run) == 1, f"one train run expected under {root / 'cache' / 'train'}"
        return {"prepare": [root / "cache" / "prepare"], "train": [run[0] / "fold0"],
                "oof": [run[0] / "oof_summary.json"], "predict": [root / "cache" / "predict"],
                "submit": [root / "subs"]}[stage]

    def restore_without(self, stage: str) -> None:
        """The live cache as the reference left it, less ``stage``'s outputs."""
        shutil.rmtree(self.live)
        shutil.copytree(self.ref, self.live, symlinks=True)
        for p in self.outputs(stage, self.live):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


@pytest.fixture(scope="module")
def world(tmp_path_factory, zygote):
    tmp = tmp_path_factory.mktemp("kill")
    synth.generate(tmp / "raw", train_cars=2, test_cars=1, height=40, width=80, seed=3, workers=1)
    w = World(tmp, zygote, {})
    for stage in STAGES:
        trace = tmp / f"{stage}.trace"
        r = zygote.run(w.argv(stage), env={faults.TRACE_ENV: str(trace)})
        assert r.rc == 0, f"reference {stage} failed:\n{r.out[-2000:]}\n{r.err[-3000:]}"
        w.trace[stage] = trace.read_text().split() if trace.exists() else []
    shutil.copytree(w.live, w.ref, symlinks=True)
    return w


def _temps(paths: list[Path]) -> list[Path]:
    out = []
    for p in paths:
        if p.is_dir():
            out += [q for q in p.rglob(".*") if ".tmp." in q.name]
    return out


def _same_value(a, b, where: str) -> None:
    """Deep equality of loaded checkpoint values: tensors and arrays exactly, containers by item."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), f"{where}: arrays differ"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            _same_value(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _same_value(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} vs {b!r}"   # NaN == NaN here


def _same_file(a: Path, b: Path, rel: str, stage: str) -> None:
    """``b`` (after kill + rerun) holds what ``a`` (uninterrupted) holds; see the module docstring."""
    name = a.name
    if name == "last.pt":
        x, y = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
        for ckpt in (x, y):
            ckpt["history"] = [{k: v for k, v in row.items() if k not in TIMING} for row in ckpt["history"]]
        _same_value(x, y, rel)
    elif name == "metrics.csv":
        pd.testing.assert_frame_equal(pd.read_csv(a).drop(columns=TIMING), pd.read_csv(b).drop(columns=TIMING),
                                      check_exact=True, obj=rel)
    elif name.endswith(".json") and (name == "manifest.json" or a.parent.name == "shards" or stage == "submit"):
        kind = "manifest.json" if name == "manifest.json" else "shard" if a.parent.name == "shards" else "sidecar"
        x, y = (json.loads(p.read_text()) for p in (a, b))
        for d in (x, y):
            for k in EXCLUDED[kind]:
                d.pop(k, None)
            if kind == "manifest.json" and stage == "prepare":
                d["stats"] = {k: v for k, v in d["stats"].items() if k not in PREPARE_RUN_STATS}
            for rec in d.get("hashes", {}).values():     # (name, size, mtime_ns): the mtime is a clock
                rec["fingerprint"] = rec["fingerprint"][:2]
        assert x == y, f"{rel}: {x} vs {y}"
    else:
        assert a.read_bytes() == b.read_bytes(), f"{rel}: bytes differ"


def _compare(w: World, stage: str) -> int:
    """Assert the live outputs of ``stage`` equal the reference's; returns the files compared."""
    n = 0
    for ref, live in zip(w.outputs(stage, w.ref), w.outputs(stage, w.live)):
        if ref.is_file():
            _same_file(ref, live, str(ref.relative_to(w.ref)), stage)
            n += 1
            continue
        want = sorted(str(p.relative_to(ref)) for p in ref.rglob("*") if p.is_file() and p.suffix != ".log")
        got = sorted(str(p.relative_to(live)) for p in live.rglob("*") if p.is_file() and p.suffix != ".log")
        assert got == want, (f"{live}: files differ from an uninterrupted run: extra {sorted(set(got) - set(want))}, "
                             f"missing {sorted(set(want) - set(got))}")
        for rel in want:
            _same_file(ref / rel, live / rel, str((ref / rel).relative_to(w.ref)), stage)
        n += len(want)
    return n


def _points(w: World, stage: str) -> list[tuple[str, str]]:
    """(env var, value) for each kill point of ``stage``: seeded draws from the trace, and train's steps."""
    assert w.trace[stage], f"{stage}: the uninterrupted run reached no kill point"
    # Drawn from the points in a fixed order: predict's two writer threads interleave the trace.
    pool = sorted({p for p in w.trace[stage] if not p.startswith(MID_EPOCH + ":")},
                  key=lambda p: (p.split(":")[0], int(p.split(":")[1])))
    drawn = sorted(random.Random(f"{SEED}-{stage}").sample(pool, min(DRAWN[stage], len(pool))),
                   key=lambda p: (int(p.split(":")[1]), p))
    if stage == "train":
        assert set(TRAIN_STEPS) <= set(w.trace[stage]), "train: a mid-epoch point was never reached"
        drawn += TRAIN_STEPS
    return [(faults.KILL_ENV, p) for p in drawn]


KILLED: dict[str, int] = {}


@pytest.mark.parametrize("stage", STAGES)
def test_kill_then_rerun_gives_the_uninterrupted_artifacts(world, stage):
    w, temps_seen = world, 0
    points = _points(w, stage)
    for var, point in points:
        w.restore_without(stage)
        killed = w.z.run(w.argv(stage), env={var: point})
        assert killed.rc == -signal.SIGKILL, \
            f"{stage} {var}={point}: exit {killed.rc}, not killed (point never reached?)\n{killed.err[-2000:]}"
        where = w.outputs(stage, w.live) if stage != "oof" else [w.outputs(stage, w.live)[0].parent]
        left = _temps(where)
        temps_seen += len(left)
        if point.startswith("write:"):      # the temp of the write it was killed in is there
            assert left, f"{stage} {point}: no temp file left by a kill before the rename"
        again = w.z.run(w.argv(stage))
        assert again.rc == 0, f"{stage} after {var}={point}: rerun failed\n{again.out[-2000:]}\n{again.err[-3000:]}"
        assert not _temps(where), f"{stage} after {point}: temps not swept by the rerun: {_temps(where)}"
        assert _compare(w, stage) > 0
    if any(p.startswith("write:") for _, p in points):
        assert temps_seen, f"{stage}: no kill left a temp file, so the sweep was not exercised"
    KILLED[stage] = len(points)
    print(f"{stage}: {len(points)} kill points {[p for _, p in points]} of {len(w.trace[stage])} traced")
