"""On-disk artifact cache shared by all stages (the DVC idea, in-process).

A stage's artifacts live in ``<cache>/<stage>/<key>/`` where ``key`` hashes the
stage parameters, its code version and its inputs' fingerprints. A finished
stage writes ``manifest.json`` last, so a directory without it is incomplete
and is never trusted. Every file is written to a temporary name in the same
directory and renamed into place, so a killed run never leaves a half-written
file under its final name.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import yaml

from .config import stable_hash

MANIFEST = "manifest.json"
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
    # Temp name starts with "." and ends with the real extension so format-sniffing writers work.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp.", suffix=suffix if suffix is not None else path.suffix,
                               dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


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
