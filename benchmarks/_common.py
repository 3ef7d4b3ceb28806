"""Helpers shared by the benchmark scripts: peak memory of a child process tree, result files."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import psutil

RESULTS = Path(__file__).resolve().parent / "results"


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
