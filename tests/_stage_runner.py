"""Run pipeline commands as real processes, cheaply: forked children of one pre-imported parent.

The fault tests run ``python -m pipeline <stage> ...`` some 50 times (every kill point is a
killed run and a rerun). A fresh interpreter spends ~2-3 s of CPU importing torch, smp, timm
and matplotlib before any work, so a *zygote* does those imports once, runs no torch op (no
thread pool exists that a fork could break), and forks one child per command. Each child is
a real process (kill -9 kills it, ``RLIMIT_FSIZE`` limits it, its exit status is the
command's) that runs exactly what ``python -m pipeline`` runs, ``pipeline.cli.main(argv)``,
with its own environment, and its stdout/stderr (pipes) copied into files. Only the interpreter start is shared.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ZYGOTE = r"""
import json, os, resource, signal, sys, threading, traceback
sys.path.insert(0, {repo!r})
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot, torch, cv2, pandas, segmentation_models_pytorch, timm    # noqa: F401
import pipeline.cli, pipeline.prepare, pipeline.train, pipeline.oof, pipeline.predict, pipeline.submit  # noqa


def copy(fd, name):
    with open(fd, "rb") as src, open(name, "wb") as dst:
        for block in iter(lambda: src.read1(1 << 16), b""):
            dst.write(block)


print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    # The child writes into pipes (as to a terminal: no file-size limit applies to them); the
    # zygote copies them into the job's files.
    pipes = [os.pipe(), os.pipe()]
    pid = os.fork()
    if pid == 0:
        rc = 1
        try:
            os.environ.clear()
            os.environ.update(job["env"])
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            for fd, (r, w) in zip((1, 2), pipes):
                os.dup2(w, fd)
                os.close(r)
                os.close(w)
            if job["fsize"] is not None:       # a file-size limit: writes past it fail with EFBIG
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize"], resource.RLIM_INFINITY))
            rc = pipeline.cli.main(job["argv"])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()              # as the interpreter would: a traceback, exit 1
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(rc)
    copiers = []
    for (r, w), name in zip(pipes, (job["stdout"], job["stderr"])):
        os.close(w)
        t = threading.Thread(target=copy, args=(r, name))
        t.start()
        copiers.append(t)
    _, status = os.waitpid(pid, 0)
    for t in copiers:
        t.join()
    print(json.dumps({{"rc": os.waitstatus_to_exitcode(status)}}), flush=True)
"""


@dataclass
class Result:
    rc: int          # exit code, or -signal (-9 for a kill -9)
    out: str
    err: str


class Zygote:
    """``Zygote().run(argv, env=..., fsize=...)`` -> Result; ``close()`` when done."""

    def __init__(self, workdir: Path, timeout: float = 600):
        self.workdir, self.timeout, self.n = Path(workdir), timeout, 0
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE.format(repo=str(REPO))], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)     # its own group: one kill ends every child
        assert self._line() == "ready", "the zygote did not start"

    def _line(self) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        if not ready:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise TimeoutError(f"no answer from the zygote in {self.timeout}s")
        return self.proc.stdout.readline().strip()

    def run(self, argv: list[str], env: dict | None = None, fsize: int | None = None) -> Result:
        """Run ``python -m pipeline *argv`` in a fresh child; ``env``: added to this environment;
        ``fsize``: RLIMIT_FSIZE in bytes (SIGXFSZ ignored, so writes past it raise EFBIG)."""
        self.n += 1
        out, err = self.workdir / f"{self.n}.out", self.workdir / f"{self.n}.err"
        job = {"argv": [str(a) for a in argv], "env": {**os.environ, "HF_HUB_OFFLINE": "1",
                                                       "NO_ALBUMENTATIONS_UPDATE": "1", **(env or {})},
               "fsize": fsize, "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        rc = json.loads(self._line())["rc"]
        return Result(rc, out.read_text(), err.read_text())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
