"""Safe to load what others share: every checkpoint train writes loads with torch's weights-only
unpickler, and every checkpoint the pipeline reads is read that way, so a best.pt / last.pt from
someone else (a Kaggle dataset) that carries pickled code is refused before the code runs.
"""
from __future__ import annotations

import random
import re

import numpy as np
import pandas as pd
import pytest
import torch

from _train_helpers import make_prepared, tiny_cfg
from pipeline import predict, train, tta
from pipeline.train import resume, rng
from pipeline.errors import PipelineError
from pipeline.train.optim import build_optimizer, build_scheduler
from pipeline.models import build_model, load_checkpoint
from pipeline.graph import Graph

TINY = {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}


class Payload:
    """Unpickling this calls exec, which writes ``marker``: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _refused(path) -> str:
    """The message a refusal of ``path`` must match: the file, the reason, one line."""
    return rf"^{re.escape(str(path))}: refused to load, it holds non-tensor objects \(e\.g\. [^\n]*\)[^\n]*$"


def test_every_checkpoint_a_run_writes_loads_weights_only(tmp_path):
    """best.pt and last.pt of a tiny run (EMA on, so last.pt carries both weight sets) load with
    torch.load(weights_only=True), and last.pt's RNG states come back in their types."""
    prepared = make_prepared(tmp_path / "prep")
    cfg = tiny_cfg(tmp_path / "cache", **{"train.ema": True})
    train.run(cfg, Graph(cfg, prepared=prepared))
    out = Graph(cfg, prepared=prepared).fold_dir(0)
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in best["model"].values()) and best["config"]["train"]["ema"]
    assert last["ema"] and last["optimizer"]["state"] and last["scheduler"]["last_epoch"] > 0
    rng = last["rng"][0]
    assert isinstance(rng["python"], tuple) and isinstance(rng["torch"], torch.Tensor)
    assert rng["numpy"][0] == "MT19937" and rng["numpy"][1].shape == (624,)


@pytest.mark.parametrize("scheduler", ["cosine", "onecycle"])
def test_optimizer_scheduler_and_scaler_states_load_weights_only(tmp_path, scheduler):
    """The states last.pt saves for each scheduler, after a step, and an enabled (fp16) GradScaler's."""
    model = torch.nn.Linear(3, 1)
    opt = build_optimizer(model, 1e-3, 0.01)
    sched = build_scheduler(opt, scheduler, 10, 5, 0.5, 0.1)
    model(torch.ones(2, 3)).sum().backward()
    opt.step()
    sched.step()
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict()},
               tmp_path / "s.pt")
    got = torch.load(tmp_path / "s.pt", weights_only=True)
    sched.load_state_dict(got["scheduler"])
    opt.load_state_dict(got["optimizer"])
    assert got["scaler"]["scale"] == scaler.get_scale()


def test_rng_state_through_a_weights_only_file_continues_identically(tmp_path):
    """Saved, loaded with weights_only=True and restored, the Python, NumPy and torch generators
    draw exactly what they drew right after the save (a resume's continuation)."""
    rng.seed_everything(123)
    np.random.standard_normal()              # a cached Gaussian in NumPy's state too
    torch.save({"rng": [rng.rng_state(torch.device("cpu"))]}, tmp_path / "rng.pt")
    want = (random.random(), np.random.random(4).tolist(), np.random.standard_normal(), torch.rand(4))
    rng.seed_everything(7)
    state = torch.load(tmp_path / "rng.pt", weights_only=True)["rng"][0]
    rng.set_rng_state(state, torch.device("cpu"))
    got = (random.random(), np.random.random(4).tolist(), np.random.standard_normal(), torch.rand(4))
    assert got[:3] == want[:3] and torch.equal(got[3], want[3])


def test_predict_refuses_a_checkpoint_carrying_code(tmp_path):
    """A best.pt that is a valid checkpoint plus one pickled callable: predict (and the OOF's
    load_best) refuse it with a one-line error naming the file, and the callable never runs."""
    marker = tmp_path / "ran.txt"
    model = build_model("Unet", "resnet18", "none", **TINY)
    ckpt = tmp_path / "shared" / "best.pt"
    ckpt.parent.mkdir()
    state = {"model": model.state_dict(), "arch": "Unet", "encoder": "resnet18", "height": 32, "width": 32,
             "model_kwargs": TINY, "config": {}, "epoch": 1, "best_score": 0.9}
    torch.save({**state, "note": Payload(marker)}, ckpt)
    index = pd.DataFrame({"id": ["a"], "path": [str(tmp_path / "a.jpg")]})
    with pytest.raises(PipelineError, match=_refused(ckpt)):
        predict.predict_fold(index, ckpt, tmp_path / "cache", tta.parse("hflip"), num_workers=0, device="cpu",
                             precision="fp32", log=lambda m: None)
    with pytest.raises(PipelineError, match=_refused(ckpt)):
        load_checkpoint(ckpt)
    with pytest.raises(PipelineError, match=_refused(ckpt)):
        resume.load_best(model, ckpt.parent, "fold 0")
    assert not marker.exists()
    # The same file without the payload loads: the refusal is about the payload alone.
    torch.save(state, ckpt)
    assert load_checkpoint(ckpt)[1]["best_score"] == 0.9


def test_resume_refuses_a_last_pt_carrying_code(tmp_path):
    """A last.pt of this very config (same train_key) whose RNG entry is a pickled callable:
    the rerun refuses it, naming the file, without running it. A last.pt from before safe
    loading (NumPy's RNG state as an ndarray) is refused the same way, not silently resumed."""
    marker = tmp_path / "ran.txt"
    prepared = make_prepared(tmp_path / "prep")
    cfg = tiny_cfg(tmp_path / "cache")
    out = Graph(cfg, prepared=prepared).fold_dir(0)
    out.mkdir(parents=True)
    key = Graph(cfg, prepared=prepared).train_key
    torch.save({"train_key": key, "world_size": 1, "epoch": 0, "rng": [Payload(marker)]}, out / "last.pt")
    with pytest.raises(PipelineError, match=_refused(out / "last.pt")):
        train.run(cfg, Graph(cfg, prepared=prepared))
    assert not marker.exists()
    torch.save({"train_key": key, "world_size": 1, "epoch": 0, "rng": [{"numpy": np.random.get_state()}]},
               out / "last.pt")
    with pytest.raises(PipelineError, match=_refused(out / "last.pt").replace(r"e\.g\. ", r"e\.g\. numpy")):
        train.run(cfg, Graph(cfg, prepared=prepared))
