"""A CLI that explains itself: `make help`, `python -m pipeline config`, `<stage> --help`."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline import cache, cli, config, configio, explain

REPO = Path(__file__).resolve().parents[1]


def test_every_key_has_a_type_default_and_meaning():
    keys = explain.keys()
    assert {k.key for k in keys} == set(configio._all_keys())
    missing = [k.key for k in keys if not k.meaning.strip()]
    assert not missing, f"config keys without a meaning (add a # comment in config.py or explain.MEANINGS): {missing}"


@pytest.mark.parametrize("stage", cli.STAGES)
def test_stage_help_lists_every_key(stage, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([stage, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m pipeline {stage}")
    for k in explain.keys():
        assert f"{k.key} ({k.type}) = {k.default!r}" in out, k.key
        assert k.meaning[:30] in out


def test_config_prints_the_resolved_config(capsys):
    assert cli.main(["config", "--config", str(REPO / "configs" / "default.yaml"), "epochs=3", "fit=pad"]) == 0
    out = capsys.readouterr().out
    cfg = yaml.safe_load(out)
    assert cfg["train"]["epochs"] == 3 and cfg["prepare"]["fit"] == "pad"
    assert cfg["prepare"]["height"] == 128                  # from the YAML
    assert cfg["train"]["lr"] == config.TrainConfig().lr    # the default
    expected = config.load(REPO / "configs" / "default.yaml", ["epochs=3", "fit=pad"])
    assert re.search(r"# config hash (\w+)", out).group(1) == cache.stable_hash(expected.to_dict())
    assert cli.main(["config", "epochs=three"]) == 2
    assert "train.epochs" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_help_is_the_default_and_lists_the_targets():
    out = subprocess.run(["make", "-s"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    phony = re.search(r"^\.PHONY:(.*?)(?<!\\)$", (REPO / "Makefile").read_text(), re.S | re.M).group(1)
    targets = phony.replace("\\", " ").split()
    for t in targets:
        assert re.search(rf"^  {re.escape(t)}\s+\S", out.stdout, re.M), t
    for var in ("CONFIG=", "RAW=", "FOLD=", "ARGS=", "SUB=", "MASKS=", "MSG=", "CACHE="):
        assert var in out.stdout
