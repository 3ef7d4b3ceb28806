"""Fault injection for the kill -9 tests: named points where a process may SIGKILL itself.

The stages call :func:`point` where a kill is worth testing: ``write`` (an atomic write's
temp file is complete, not yet renamed: a kill leaves the temp behind), ``rename`` (just
after the rename onto the final name; ``pipeline.cache.atomic_path`` calls both),
``submit.chunk`` (after each chunk of the streamed CSV: a half-written temp) and
``train.batch`` (before each training micro-batch: a kill mid-epoch). With the
environment variable ``PIPELINE_KILL_AT=<point>:<n>`` the process sends itself SIGKILL the
n-th time (1-based, counted per process) it reaches ``<point>``; with
``PIPELINE_FAULT_TRACE=<file>`` every point reached is appended to that file as a line, so
a test can count an uninterrupted run's points and pick some to kill at
(tests/test_kill_points.py). Without either variable a point costs one dict lookup.
"""
from __future__ import annotations

import os
import signal
import threading
from collections import Counter

KILL_ENV = "PIPELINE_KILL_AT"
TRACE_ENV = "PIPELINE_FAULT_TRACE"

_hits: Counter = Counter()
_lock = threading.Lock()     # predict writes its maps from two threads: counts must not race


def point(name: str) -> None:
    """A named kill point (see the module docstring); nothing happens unless the env asks."""
    spec, trace = os.environ.get(KILL_ENV), os.environ.get(TRACE_ENV)
    if not spec and not trace:
        return
    with _lock:
        _hits[name] += 1
        n = _hits[name]
        if trace:
            with open(trace, "a") as f:
                f.write(f"{name}:{n}\n")
        if spec == f"{name}:{n}":
            os.kill(os.getpid(), signal.SIGKILL)
