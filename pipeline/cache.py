"""On-disk artifact cache shared by all stages (the DVC idea, in-process).

A stage's artifacts live in ``<cache>/<stage>/<key>/`` where ``key`` hashes the
stage parameters, its code version and its inputs' fingerprints. A finished
stage writes ``manifest.json`` last, so a directory without it is incomplete
and is never trusted. Every file is written to a temporary name in the same
directory and renamed into place, so a killed run never leaves a half-written
file under its final name.

Temp files are named ``.<name>.tmp.<host>-<pid>.<random><ext>`` (host: a hash of the
hostname): :func:`sweep_temps`, called by each stage as it starts, removes those whose
writer is gone (a process of this host that no longer exists) and, whoever wrote them,
those untouched for ``STALE_TEMP_S`` (another host's, or an older naming without a pid); a
live writer's temp is never touched. A write that fails because the disk is full or a
file-size limit is hit raises a one-line :class:`PipelineError` naming the file; its temp
is removed and nothing is renamed, so no half artifact is ever marked complete.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import socket
import tempfile
import time
from pathlib import Path

import yaml

from . import faults
from .errors import PipelineError

MANIFEST = "manifest.json"
# A temp file not modified for this long has no live writer, whoever wrote it: writes take ms,
# and a long streamed write (submit's CSV) touches its temp with every chunk.
STALE_TEMP_S = 600
# Which host wrote a temp: its pid means something only there (data.cache may be shared by nodes).
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_TEMP = re.compile(r"\.(?P<name>.+)\.tmp\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.[^.]+.*")
# errno values that mean "no room": the disk (or quota) is full, or a file-size limit (ulimit -f).
NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
# mkstemp creates 0600 files; artifacts should get the usual permissions (0666 less the umask).
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None):
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    ``suffix`` keeps the extension for writers that infer the format from it
    (cv2.imwrite, torch.save does not care).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Temp name starts with "." and ends with the real extension so format-sniffing writers work;
    # host and pid tell a later sweep whether its writer is still alive.
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp.{_HOST}-{os.getpid()}.",
                                   suffix=suffix if suffix is not None else path.suffix, dir=path.parent)
    except OSError as e:
        if e.errno in NO_ROOM:
            raise _no_room(path, e.strerror) from None
        raise
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        faults.point("write")
        os.replace(tmp, path)
        faults.point("rename")
    except BaseException as e:
        why = _no_room_reason(e, tmp)   # before the temp goes: its size tells a file-size limit
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if why:
            raise _no_room(path, why) from None
        raise


def _no_room_reason(e: BaseException, tmp: str) -> str | None:
    """Why this write failed, when it failed for want of room; None for any other failure.

    An OSError says so by its errno, also as the cause or context of another error (torch.save
    into a file object). torch.save to a path says only "enforce fail ... unexpected pos" (a
    RuntimeError): then it is for want of room when the file system has no free block left, or
    the temp reached this process's file-size limit (RLIMIT_FSIZE).
    """
    seen = e
    for _ in range(5):
        if isinstance(seen, OSError) and seen.errno in NO_ROOM:
            return seen.strerror or os.strerror(seen.errno)
        seen = seen.__cause__ or seen.__context__
        if seen is None:
            break
    if not isinstance(e, RuntimeError):
        return None
    if _disk_full(os.path.dirname(tmp)):
        return os.strerror(errno.ENOSPC)
    if _at_size_limit(tmp):
        return os.strerror(errno.EFBIG)
    return None


def _disk_full(directory: str) -> bool:
    try:
        return os.statvfs(directory).f_bavail == 0
    except OSError:
        return False


def _at_size_limit(tmp: str) -> bool:
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        return soft != resource.RLIM_INFINITY and os.path.getsize(tmp) >= soft
    except (ImportError, OSError, ValueError):
        return False


def _no_room(path: Path, why: str) -> PipelineError:
    return PipelineError(f"{path}: write failed ({why}): the disk is full or a file-size limit was hit; "
                         "nothing was written under this name and the stage is not marked complete; "
                         "free space (or lift the limit) and rerun the same command")


def sweep_temps(dirs, max_age_s: float = STALE_TEMP_S) -> int:
    """Remove the temp files (see the module docstring) that killed writers left in ``dirs``.

    A temp is removed when its writer was a process of this host that is gone, or when it has
    not been modified for ``max_age_s`` (another host's writer, or a name without a pid). A
    temp of a live process of this host (a concurrent shard, a DDP rank, this very process)
    that is younger is left alone. Only the given directories, not below. Returns the count.
    """
    cutoff, n, me = time.time() - max_age_s, 0, os.getpid()
    for d in dirs:
        try:
            names = [e.name for e in os.scandir(d) if e.name.startswith(".") and ".tmp." in e.name]
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            p = Path(d) / name
            m = _TEMP.fullmatch(name)
            try:
                if m and m["host"] == _HOST and int(m["pid"]) != me and not pid_alive(int(m["pid"])):
                    p.unlink()
                elif p.stat().st_mtime < cutoff and not (m and int(m["pid"]) == me and m["host"] == _HOST):
                    p.unlink()
                else:
                    continue
                n += 1
            except FileNotFoundError:     # another sweep got there first
                pass
    return n


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this host. A zombie (exited, not yet reaped) counts as dead: it
    will never finish a write or release a lock. When it cannot be told, alive (keep, wait)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                  # PermissionError: another user's process
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_png(path: str | Path, arr, level: int = 1) -> None:
    """Encode ``arr`` ((H, W) or (H, W, 3) BGR uint8) as PNG at zlib ``level`` and write it atomically.
    Level 1 is ~3x faster than the default for ~10% more bytes on these smooth images and masks."""
    import cv2
    ok, buf = cv2.imencode(".png", arr, [cv2.IMWRITE_PNG_COMPRESSION, level])
    if not ok:
        raise PipelineError(f"{path}: PNG encoding failed")
    write_bytes(path, buf.tobytes())


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def file_fingerprint(path: str | Path) -> list:
    """Cheap identity of an input file: name, size and mtime (ns). Stat only, no read."""
    st = os.stat(path)
    return [Path(path).name, st.st_size, st.st_mtime_ns]


def fingerprint_files(paths) -> str:
    """One hash over many files' fingerprints, order-independent."""
    return stable_hash(sorted(file_fingerprint(p) for p in paths), n=16)


def stage_key(params: dict, code_version: str, inputs: dict) -> str:
    return stable_hash({"params": params, "code": code_version, "inputs": inputs})


def stage_dir(cache_root: str | Path, stage: str, key: str) -> Path:
    return Path(cache_root) / stage / key


def is_complete(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def write_manifest(directory: str | Path, *, stage: str, key: str, params: dict, inputs: dict,
                   outputs: dict, config: dict | None = None, extra: dict | None = None) -> dict:
    """Write the resolved config (``config.yaml``) and then the manifest, which marks completion."""
    directory = Path(directory)
    if config is not None:
        write_text(directory / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    manifest = {"stage": stage, "key": key, "params": params, "inputs": inputs,
                "outputs": outputs, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **(extra or {})}
    write_json(directory / MANIFEST, manifest)
    return manifest


def read_manifest(directory: str | Path) -> dict | None:
    p = Path(directory) / MANIFEST
    return read_json(p) if p.is_file() else None


def stable_hash(obj, n: int = 12) -> str:
    """Short sha256 of a JSON-serialisable object with sorted keys: the cache key primitive."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]
