"""precision=auto: fp16 on CUDA, bf16 on CPUs where oneDNN computes bf16 (AVX-512 core and up), else fp32."""
import os
import platform
from pathlib import Path

import pytest

from pipeline import precision
from pipeline.errors import ConfigError


@pytest.mark.parametrize("native, cpu_auto", [("1", "bf16"), ("0", "fp32")])
def test_auto_follows_the_cpu(monkeypatch, native, cpu_auto):
    monkeypatch.setenv(precision.CPU_BF16_ENV, native)
    assert precision.resolve_precision("auto", "cpu") == cpu_auto
    assert precision.resolve_precision("auto", "cuda") == "fp16"
    for given in ("fp32", "bf16", "fp16"):
        assert precision.resolve_precision(given, "cpu") == given


# oneDNN's rule (ideep::has_bf16_type_support): effective ISA >= avx512_core, i.e. these four flags.
AVX512_CORE = {"avx512f", "avx512bw", "avx512vl", "avx512dq"}


def _cpuinfo_flags() -> set[str] | None:
    """The 'flags' line of /proc/cpuinfo (Linux x86), parsed here, not by the code under test."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.split(":")[0].strip() == "flags":
            return set(line.split(":", 1)[1].split())
    return None


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or _cpuinfo_flags() is None,
                    reason="needs x86 /proc/cpuinfo flags")
@pytest.mark.skipif(any(os.environ.get(v) for v in ("DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA")),
                    reason="oneDNN's ISA is capped by the environment")
def test_without_override_the_answer_follows_the_cpu_flags(monkeypatch):
    """Known answer from the hardware itself: a CPU with AVX-512 core (all AVX512-BF16 / AMX CPUs
    have it) runs bf16, an AVX2-only one (the 2-core EPYC of docs/accuracy.md, "Measured earlier") gets fp32."""
    monkeypatch.delenv(precision.CPU_BF16_ENV, raising=False)
    flags = _cpuinfo_flags()
    want = AVX512_CORE <= flags
    assert precision.cpu_has_fast_bf16() is want, sorted(flags & (AVX512_CORE | {"avx512_bf16", "amx_bf16"}))
    assert precision.resolve_precision("auto", "cpu") == ("bf16" if want else "fp32")
    if flags & {"avx512_bf16", "amx_bf16"}:          # native bf16 instructions: never fp32
        assert precision.resolve_precision("auto", "cpu") == "bf16"


def test_unknown_precision_is_named():
    with pytest.raises(ConfigError, match="'half'.*auto, fp32, bf16, fp16"):
        precision.resolve_precision("half", "cpu")
