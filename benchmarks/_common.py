"""Helpers shared by the benchmark scripts: the CPU's name, peak memory of a child process tree, result files."""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import psutil

RESULTS = Path(__file__).resolve().parent / "results"


def lscpu() -> str:
    """lscpu's output, or "" where it cannot run."""
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model(out: str | None = None) -> str:
    """lscpu's model name with its family and model numbers: "AMD EPYC (family 26, model 2)".
    The numbers tell CPU generations apart where the name does not (two 2-core "AMD EPYC" VMs
    here ran the same recipe ~2x apart; family 25 is Zen 3/4, 26 is Zen 5)."""
    out = lscpu() if out is None else out

    def field(name: str) -> str | None:
        m = re.search(rf"^{name}:\s*(.+)$", out, re.M)
        return m.group(1).strip() if m else None

    name, family, model = field("Model name"), field("CPU family"), field("Model")
    if not name:
        return "unknown"
    return f"{name} (family {family}, model {model})" if family and model else name


def wait_peak_rss(proc: subprocess.Popen, poll_s: float = 0.02) -> int:
    """Wait for ``proc``; return the peak summed RSS (bytes) of it and its children, polled every ``poll_s``.

    Summing the tree counts joblib/DataLoader workers too, which is what bounds a machine's memory.
    """
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [ps, *ps.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:   # a worker exited between listing and reading
            pass
        time.sleep(poll_s)
    return peak


def write_result(name: str, data: dict) -> Path:
    """Write ``benchmarks/results/<name>.json`` and say where."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(data, indent=2))
    print(f"\nwrote {out}")
    return out
