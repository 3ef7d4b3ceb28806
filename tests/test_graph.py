"""The stage graph: every key declared, each resolved once per command, recorded hashes reused,
and a missing upstream artifact answered with what the cache holds instead."""
from __future__ import annotations

import dataclasses
import os

import pytest
import yaml

from _train_helpers import make_prepared, tiny_cfg
from pipeline import cache, config, errors, graph, layout
from pipeline.errors import PipelineError
from pipeline.graph import STAGES, Graph


def _all_keys() -> set[str]:
    cfg = config.Config()
    return {f"{f.name}.{k}" for f in dataclasses.fields(cfg) for k in dataclasses.asdict(getattr(cfg, f.name))}


def test_every_config_key_is_declared_by_a_stage():
    """A new key must be placed: in a stage's key (as a param, or resolved: by what it names), or
    named run-only (it never changes outputs)."""
    declared = set(graph.RUN_ONLY)
    for s in STAGES.values():
        declared |= {p.key for p in s.params} | set(s.run_only) | set(s.resolved)
    assert _all_keys() - declared == set()
    assert declared - _all_keys() == set()          # no stale names either


def test_no_key_is_both_keyed_and_run_only():
    for s in STAGES.values():
        assert {p.key for p in s.params} & set(s.run_only) == set(), s.name
        assert ({p.key for p in s.params} | set(s.run_only)) & set(s.resolved) == set(), s.name


def test_upstream_names_are_stages():
    for s in STAGES.values():
        assert set(s.upstream) <= set(STAGES), s.name


def test_added_keys_stay_out_at_their_neutral_values():
    base = config.load(None, {})
    assert "ema" not in graph.params(base, "train") and "ema_decay" not in graph.params(base, "train")
    # a qualifier of an option that is off is neutral whatever its value
    assert "ema_decay" not in graph.params(config.load(None, {"train.ema_decay": 0.99}), "train")
    on = graph.params(config.load(None, {"train.ema": True, "train.ema_decay": 0.99}), "train")
    assert on["ema"] is True and on["ema_decay"] == 0.99
    assert graph.params(config.load(None, {"train.progressive": "c64:1", "train.epochs": 2}),
                        "train")["progressive"] == "c64:1"


def test_one_scan_per_graph(raw, tmp_path, monkeypatch):
    """Every folder of one command comes from one listing of the raw files."""
    calls = []
    real = layout.scan
    monkeypatch.setattr(layout, "scan", lambda cfg: calls.append(1) or real(cfg))
    g = Graph(config.load(None, {"data.raw": str(raw), "data.cache": str(tmp_path / "c")}))
    assert g.prepare_dir == g.log_dirs("prepare")[0] and g.prepare_key in str(g.prepare_dir)
    assert len(calls) == 1


def test_prepare_records_the_train_data_key(raw, tmp_path):
    from pipeline import prepare
    cfg = config.load(None, {"data.raw": str(raw), "data.cache": str(tmp_path / "c"), "prepare.height": 64,
                             "prepare.width": 96, "prepare.n_folds": 2, "prepare.workers": 1})
    out = prepare.run(cfg)
    assert cache.read_manifest(out)["train_data"] == graph.train_data_key(out)
    assert Graph(cfg).train_data == graph.train_data_key(out)


def _fold(root, k=0, data=b"weights"):
    d = root / f"fold{k}"
    d.mkdir(parents=True)
    (d / "best.pt").write_bytes(data)
    return d


def test_a_recorded_checkpoint_hash_is_used_while_the_file_is_unchanged(tmp_path, monkeypatch):
    d = _fold(tmp_path)
    cache.write_manifest(d, stage="train", key="k", params={}, inputs={}, outputs={},
                         extra={"hashes": {"best.pt": {"sha256_16": "recorded0000000", "fingerprint":
                                                      cache.file_fingerprint(d / "best.pt")}}})
    g = Graph(config.load(None, {}))
    assert g.checkpoint_hash(d / "best.pt") == "recorded0000000"
    # replaced (another size and mtime): hashed again, so predict gets a new folder
    (d / "best.pt").write_bytes(b"other weights")
    os.utime(d / "best.pt", ns=(1, 1))
    assert Graph(config.load(None, {})).checkpoint_hash(d / "best.pt") == graph.file_sha16(d / "best.pt")


def test_checkpoint_hash_is_computed_once_per_graph(tmp_path, monkeypatch):
    d = _fold(tmp_path)
    calls = []
    real = graph.file_sha16
    monkeypatch.setattr(graph, "file_sha16", lambda p: calls.append(p) or real(p))
    g = Graph(config.load(None, {}))
    assert g.checkpoint_hash(d / "best.pt") == g.checkpoint_hash(d / "best.pt") == real(d / "best.pt")
    assert len(calls) == 1


def test_a_missing_run_names_the_runs_the_cache_holds(tmp_path):
    """`make all ARGS="epochs=2"` then `make inspect`: the error says which run exists and how to reach it."""
    prepared = make_prepared(tmp_path / "prep")
    trained = tiny_cfg(tmp_path / "cache", **{"train.epochs": 2})
    other = Graph(trained, prepared=prepared).fold_dir(0)
    other.mkdir(parents=True)
    (other / "config.yaml").write_text(yaml.safe_dump(dataclasses.replace(
        trained, train=dataclasses.replace(trained.train, fold=0)).to_dict()))
    cache.write_manifest(other, stage="train", key="x", params={}, inputs={}, outputs={})
    g = Graph(tiny_cfg(tmp_path / "cache"), prepared=prepared)
    with pytest.raises(PipelineError) as e:
        g.require_finished()
    msg = str(e.value)
    assert f"no finished fold under {g.train_dir}" in msg
    assert other.parent.name in msg and "train.epochs=2" in msg and "RUN=<key>" in msg and "ARGS" in msg
    assert "\n" not in msg


def test_no_other_run_adds_nothing(tmp_path):
    g = Graph(tiny_cfg(tmp_path / "cache"), prepared=make_prepared(tmp_path / "prep"))
    with pytest.raises(PipelineError, match=r"\(run `make train` first\)$"):
        g.require_finished()


def test_predict_folds_spec_errors_name_the_key():
    with pytest.raises(errors.ConfigError, match="predict.folds"):
        graph.parse_folds("0,x", 5)
    with pytest.raises(errors.ConfigError, match=r"0\.\.4"):
        graph.parse_folds("7", 5)
    assert graph.parse_folds("all", 3) == [0, 1, 2] and graph.parse_folds("2,0,2", 3) == [0, 2]


def test_ensemble_members_are_resolved_once_per_command(tmp_path):
    """submit.runs: the command line predicts with the member graphs submit then reads (one raw scan
    each, not two)."""
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("train:\n  epochs: 1\n")
    b.write_text("train:\n  epochs: 2\n")
    g = Graph(config.load(None, {"data.cache": str(tmp_path / "c"), "submit.runs": f"{a},{b}"}))
    assert list(g.members) == [str(a), str(b)]
    assert g.members is g.members
    (ra, ga), (rb, gb) = g.members.values()
    assert ga.cfg is ra.cfg and ga.cfg.train.epochs == 1 and gb.cfg.train.epochs == 2
    assert ga.cfg.data.cache == str(tmp_path / "c")          # the invoking config's data section
