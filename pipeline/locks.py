"""One writer per artifact: ``with stage_lock(path, what):`` around a stage's uncached work.

Many processes may share one cache (``make train FOLD=0`` and ``FOLD=1`` in two terminals,
predict shards on several machines, two ``make prepare`` by mistake). Work on different
artifacts runs in parallel; work on the same artifact (one training fold, one predict
shard, one prepare key) runs once: the second process waits, printing one line
``<what>: waiting for <lock> held by pid P on host H since T``, and then finds the
artifact cached. The caller checks the cache again after taking the lock.

Locks live in ``<cache>/locks/``, mirroring the artifact they guard (:func:`lock_path`:
``locks/train/<key>/fold0.lock`` for ``train/<key>/fold0/``), so no stage ever lists one as
an artifact; a lock's holder record is ``<lock>.json`` (pid, host, start time, what, command
line). Lock files stay after release (flock needs no cleanup); ``<cache>/locks`` may be
deleted whenever no process runs.

Which mechanism guarantees what:

- Exclusion is ``filelock.FileLock``, i.e. ``fcntl.flock`` on the lock file. The kernel drops
  a flock when the holder's descriptor closes, so a holder that dies in any way (kill -9, the
  OOM killer, a crash) releases it at once: a dead holder on the same host never blocks
  anyone. Nothing else can keep it: Python opens the file close-on-exec (exec'd children do
  not inherit it) and filelock closes it in forked children (DataLoader workers), so a child
  that outlives its parent does not hold the lock.
- The holder record is only words for people: it is removed on release, so a record found by
  the process that just took the lock is stale (its holder died without releasing). That
  process reports it in one line, naming the dead pid, and writes its own ("taken over").
- On a filesystem without flock, filelock falls back to a marker file (``SoftFileLock``) and
  itself breaks a marker whose pid is dead on this host.
- Another host (a shared cache over NFS): its pid cannot be checked from here. Linux NFSv4
  maps flock to byte-range locks that the server arbitrates between clients, and releases a
  dead client's locks when its lease expires (about 90 s); a soft marker (NFS mounted
  ``nolock``) never expires. The waiting line then names the host and the command that
  removes the lock, ``rm -f <lock> <lock>.json``, to run once you know that run is gone.

DDP (torchrun): only rank 0 touches the lock file; every rank of one job shares its hold.
Pass ``main=d.rank == 0`` and ``agree``, a collective that returns rank 0's value on every
rank: rank 0 tries the lock without blocking and the ranks agree on the outcome each poll,
so all ranks wait together (a few collectives a second, none of them long enough to hit
the process group's timeout) and all proceed, or all fail, at once.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

from . import cache
from .errors import PipelineError

POLL_S = 1.0          # between tries while another process holds the lock
LOCKS = "locks"       # <cache>/locks/: every lock file and holder record


def lock_path(cache_root: str | Path, directory: str | Path, part: str = "") -> Path:
    """The lock guarding ``directory`` (or one ``part`` of it, e.g. a predict shard):
    ``<cache>/locks/<directory relative to the cache><part>.lock``.

    In a tree of its own, not beside the artifact: no stage ever lists a lock as an artifact,
    and a run that fails before writing anything (a config error) leaves no artifact directory.
    """
    root, d = Path(cache_root), Path(directory)
    try:
        rel = d.relative_to(root)
    except ValueError:           # not under the cache (never in the pipeline): the lock goes beside it
        return d.parent / f"{d.name}{part}.lock"
    return root / LOCKS / rel.parent / f"{d.name}{part}.lock"


def record_path(lock: str | Path) -> Path:
    """The holder record of ``lock``: ``<lock>.json``."""
    return Path(f"{lock}.json")


def read_holder(lock: str | Path) -> dict | None:
    """The holder record, or None when there is none (or it is unreadable: being written)."""
    try:
        rec = cache.read_json(record_path(lock))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def describe(lock: str | Path, rec: dict | None) -> str:
    """'pid P on host H since T (what)', with what can be known about a holder on another host."""
    if not rec:
        return "a process that has not written its record yet"
    host, pid = rec.get("host", "?"), rec.get("pid", "?")
    text = f"pid {pid} on host {host} since {rec.get('started', '?')} ({rec.get('what', '?')})"
    if host != socket.gethostname():
        text += (f"; another host, whose pid cannot be checked from here: if that run is gone and the wait "
                 f"does not end, remove the lock with: rm -f {lock} {record_path(lock)}")
    return text


def _stale_note(lock: Path, rec: dict) -> str:
    host, pid = rec.get("host", "?"), rec.get("pid", "?")
    if host == socket.gethostname() and isinstance(pid, int):
        fate = "exited" if not cache.pid_alive(pid) else "is running but no longer holds it (pid reused?)"
    else:
        fate = "released it (another host: it died, or its lock lease expired)"
    return (f"taking over {lock}: its last holder, pid {pid} on host {host} since {rec.get('started', '?')} "
            f"({rec.get('what', '?')}), {fate} without removing its record (stale)")


@contextlib.contextmanager
def stage_lock(path: str | Path, what: str, *, log: Callable[[str], None] = print, timeout: float | None = None,
               poll: float = POLL_S, main: bool = True, agree: Callable[[object], object] | None = None):
    """Hold the lock file ``path`` while the block runs; wait while another process holds it.

    what: the work, for the messages ("train fold 0"). timeout: seconds to wait before
    refusing with a PipelineError naming the holder (None: wait as long as it takes).
    main/agree: DDP (module docstring); other ranks never touch the file.
    """
    if not main:
        _follow(agree)
        yield
        return
    path = Path(path)
    lock = FileLock(str(path))
    t0, told = time.monotonic(), None
    while True:
        try:
            try:
                lock.acquire(blocking=False)
                state: object = True
            except Timeout:
                rec = read_holder(path)
                state = False
                if timeout is not None and time.monotonic() - t0 >= timeout:
                    state = f"{what}: {path} is held by {describe(path, rec)}; gave up after {timeout:g} s"
        except Exception as e:     # noqa: BLE001 - e.g. an unwritable cache: the other ranks must not hang
            if agree is not None:
                agree(f"{what}: cannot lock {path}: {e}")
            raise
        if agree is not None:
            agree(state)
        if state is True:
            break
        if isinstance(state, str):
            raise PipelineError(state)
        key = (rec or {}).get("pid"), (rec or {}).get("host")
        if key != told:       # one line per holder, not one per poll
            log(f"{what}: waiting for {path} held by {describe(path, rec)}")
            told = key
        time.sleep(poll)
    try:
        stale = read_holder(path)
        if stale:
            log(f"{what}: {_stale_note(path, stale)}")
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "what": what, "argv": sys.argv}
        cache.write_json(record_path(path), mine)
        yield
    finally:
        # The record goes first: once the lock is free, a record on disk always means a dead holder.
        with contextlib.suppress(OSError):
            if (read_holder(path) or {}).get("pid") == os.getpid():
                record_path(path).unlink()
        lock.release()


def _follow(agree: Callable[[object], object] | None) -> None:
    """A DDP rank other than 0: take part in rank 0's tries until it holds the lock (or gives up)."""
    if agree is None:
        raise ValueError("stage_lock(main=False) needs agree, the collective that shares rank 0's outcome")
    while True:
        state = agree(None)
        if state is True:
            return
        if isinstance(state, str):
            raise PipelineError(state)
