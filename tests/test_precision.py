"""precision=auto: fp16 on CUDA, bf16 only on CPUs with native bf16, else fp32."""
import pytest

from pipeline import precision
from pipeline.config import ConfigError


@pytest.mark.parametrize("native, cpu_auto", [("1", "bf16"), ("0", "fp32")])
def test_auto_follows_the_cpu(monkeypatch, native, cpu_auto):
    monkeypatch.setenv(precision.CPU_BF16_ENV, native)
    assert precision.resolve_precision("auto", "cpu") == cpu_auto
    assert precision.resolve_precision("auto", "cuda") == "fp16"
    for given in ("fp32", "bf16", "fp16"):
        assert precision.resolve_precision(given, "cpu") == given


def test_without_override_the_answer_is_onednns(monkeypatch):
    monkeypatch.delenv(precision.CPU_BF16_ENV, raising=False)
    import torch
    assert precision.cpu_has_fast_bf16() == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_unknown_precision_is_named():
    with pytest.raises(ConfigError, match="'half'.*auto, fp32, bf16, fp16"):
        precision.resolve_precision("half", "cpu")
