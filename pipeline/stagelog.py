"""Every stage's console output, also written beside its artifacts as ``<stage>.log``.

:func:`capture` tees ``sys.stdout``/``sys.stderr`` into memory while a stage runs (the
console still sees everything as it happens). At the end, success or failure, the text is
appended to ``<stage>.log`` in the stage's artifact directory (``Graph.log_dirs``), known only
then: keys need the stage's inputs, and prepare's artifact exists only after prepare ran.
Appending (not atomic) is deliberate: a log accumulates the runs of one artifact, and a
killed stage that never reaches the end simply writes no log, as with any other artifact.

tqdm's redraws (``\\r``) keep only their last state per line, so a progress bar costs one
line in the log, not thousands. Output of worker processes (joblib, DataLoader) is not
captured: what they report reaches the main process as results or errors.
"""
from __future__ import annotations

import contextlib
import io
import re
import sys
import time
from pathlib import Path

from .config import Config
from .graph import Graph

_CR = re.compile(r"[^\n]*\r(?!\n)")


class _Tee(io.TextIOBase):
    def __init__(self, stream, sink: io.StringIO):
        self._stream, self._sink = stream, sink

    def write(self, s: str) -> int:
        self._sink.write(s)
        return self._stream.write(s)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self):
        return getattr(self._stream, "encoding", "utf-8")

    def __getattr__(self, name):
        return getattr(self._stream, name)


def clean(text: str) -> str:
    """Drop everything up to the last carriage return of each line (tqdm's redraws)."""
    return _CR.sub("", text)


def log_name(stage: str, cfg: Config) -> str:
    return f"{cfg.submit.name}.log" if stage == "submit" else f"{stage}.log"


@contextlib.contextmanager
def capture(stage: str, cfg: Config, argv: list[str] | None = None, graph: Graph | None = None,
            main: bool = True):
    """Tee the console while the block runs; append it to ``<artifact dir>/<stage>.log`` after.

    Under torchrun only rank 0 writes (the other ranks print nothing of note). A log that
    cannot be placed (the stage failed before its directory could be named) goes to
    ``<cache>/logs/<stage>.log``; failing to write a log never hides the stage's own result.
    """
    if not main:
        yield
        return
    sink = io.StringIO()
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(out, sink), _Tee(err, sink)
    t0 = time.time()
    status = "ok"
    try:
        yield
    except BaseException as e:      # recorded, then re-raised untouched
        status = f"failed: {type(e).__name__}: {e}"
        raise
    finally:
        sys.stdout, sys.stderr = out, err
        body = clean(sink.getvalue())
        text = (f"=== {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t0))} python -m pipeline {stage} "
                f"{' '.join(argv or [])}\n{body}{'' if body.endswith(chr(10)) or not body else chr(10)}"
                f"=== {status} ({time.time() - t0:.1f}s)\n")
        try:
            dirs = (graph or Graph(cfg)).log_dirs(stage)     # the stage's own graph: resolved already
        except Exception:       # noqa: BLE001 - e.g. no prepare artifact yet: the fallback place
            dirs = [Path(cfg.data.cache) / "logs"]
        for d in dirs:
            try:
                d.mkdir(parents=True, exist_ok=True)
                with open(d / log_name(stage, cfg), "a", encoding="utf-8") as f:
                    f.write(text)
            except OSError as e:
                print(f"warning: could not write {d / log_name(stage, cfg)}: {e}", file=sys.stderr)
