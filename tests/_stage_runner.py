"""Run pipeline commands as real processes, cheaply: forked children of one pre-imported parent.

The fault tests run ``python -m pipeline <stage> ...`` some 50 times (every kill point is a
killed run and a rerun). A fresh interpreter spends ~2-3 s of CPU importing torch, smp, timm
and matplotlib before any work, so a *zygote* does those imports once, runs no torch op (no
thread pool exists that a fork could break), and forks one child per command. Each child is
a real process (kill -9 kills it, ``RLIMIT_FSIZE`` limits it, its exit status is the
command's) that runs exactly what ``python -m pipeline`` runs, ``pipeline.cli.main(argv)``,
with its own environment, and its stdout/stderr (pipes) copied into files. Only the interpreter start is shared.

Besides stage commands, a child can run a script, as ``python -c SCRIPT`` would (``run_code``), in
a working directory of its own, and children can run side by side (``spawn``, then ``wait``): the
tests of kill -9, resume and locks between processes get real processes without an interpreter
start each. One zygote serves the whole session (``conftest.zygote``): it never runs a job itself,
so no job can leave anything behind for the next. OMP_NUM_THREADS in a job's environment sets
the child's torch threads (the zygote read the variable once, at its own start).
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
import io, json, os, resource, signal, sys, threading, traceback
sys.path.insert(0, {repo!r})
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot, torch, cv2, pandas, segmentation_models_pytorch, timm    # noqa: F401
import pipeline.cli, pipeline.prepare, pipeline.train, pipeline.oof, pipeline.predict, pipeline.submit  # noqa


def copy(fd, name):
    with open(fd, "rb") as src, open(name, "wb") as dst:
        for block in iter(lambda: src.read1(1 << 16), b""):
            dst.write(block)


def finish(pid, copiers):
    _, status = os.waitpid(pid, 0)
    for t in copiers:
        t.join()
    return os.waitstatus_to_exitcode(status)


running = {{}}
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    if "wait" in job:
        print(json.dumps({{"rc": finish(job["wait"], running.pop(job["wait"]))}}), flush=True)
        continue
    sys.stdout.flush(); sys.stderr.flush()
    # The child writes into pipes (as to a terminal: no file-size limit applies to them); the
    # zygote copies them into the job's files.
    pipes = [os.pipe()] if job["merge"] else [os.pipe(), os.pipe()]     # merge: stderr into stdout
    pid = os.fork()
    if pid == 0:
        rc = 1
        try:
            os.environ.clear()
            os.environ.update(job["env"])
            if job["cwd"]:
                os.chdir(job["cwd"])
            if job["session"]:                 # its own process group, as start_new_session=True
                os.setsid()
            if os.environ.get("OMP_NUM_THREADS", "").isdigit():
                torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
            unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))     # as the interpreter reads it at start
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            for fd, (r, w) in zip((1, 2), pipes * 2 if job["merge"] else pipes):
                os.dup2(w, fd)
            for r, w in pipes:
                os.close(r)
                os.close(w)
            if unbuffered:
                sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
                sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True,
                                              errors="backslashreplace")
            if job["fsize"] is not None:       # a file-size limit: writes past it fail with EFBIG
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize"], resource.RLIM_INFINITY))
            if job["code"] is None:
                rc = pipeline.cli.main(job["argv"])
            else:                              # as `python -c CODE ARGV...` runs it
                sys.argv = ["-c", *job["argv"]]
                exec(compile(job["code"], "<string>", "exec"), {{"__name__": "__main__"}})
                rc = 0
        except SystemExit as e:
            rc = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
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
    if job["detach"]:                          # spawn: answer at once, reaped by a later "wait"
        running[pid] = copiers
        print(json.dumps({{"pid": pid}}), flush=True)
        continue
    print(json.dumps({{"rc": finish(pid, copiers)}}), flush=True)
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

    def _send(self, job: dict) -> dict:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._line())

    def _job(self, argv: list, env: dict | None, fsize: int | None, code: str | None, cwd: Path | str | None,
             merge: bool, detach: bool, unset: tuple = (), session: bool = False) -> tuple[dict, Path, Path]:
        self.n += 1
        out, err = self.workdir / f"{self.n}.out", self.workdir / f"{self.n}.err"
        base = {k: v for k, v in os.environ.items() if k not in unset}
        job = {"argv": [str(a) for a in argv], "env": {**base, "HF_HUB_OFFLINE": "1",
                                                       "NO_ALBUMENTATIONS_UPDATE": "1", **(env or {})},
               "fsize": fsize, "stdout": str(out), "stderr": str(err), "code": code,
               "cwd": None if cwd is None else str(cwd), "merge": merge, "detach": detach, "session": session}
        return job, out, err

    @staticmethod
    def _result(rc: int, out: Path, err: Path, merge: bool) -> Result:
        return Result(rc, out.read_text(), "" if merge else err.read_text())

    def run(self, argv: list[str], env: dict | None = None, fsize: int | None = None, code: str | None = None,
            cwd: Path | str | None = None, merge: bool = False, unset: tuple = ()) -> Result:
        """Run ``python -m pipeline *argv`` in a fresh child, or with ``code`` what ``python -c code
        *argv`` runs; ``env``: added to this environment; ``fsize``: RLIMIT_FSIZE in bytes (SIGXFSZ
        ignored, so writes past it raise EFBIG); ``cwd``: the child's working directory (default: the
        repository); ``merge``: stderr into ``out``, as ``stderr=subprocess.STDOUT``; ``unset``: names
        of this environment's variables the child goes without."""
        job, out, err = self._job(argv, env, fsize, code, cwd, merge, detach=False, unset=unset)
        return self._result(self._send(job)["rc"], out, err, merge)

    def spawn(self, argv: list[str], session: bool = False, **kw) -> "Child":
        """``run``'s child, started and left running: ``Child.wait()`` -> Result; ``Child.pid``;
        ``session``: the child leads a process group of its own (``os.killpg(child.pid, ...)``)."""
        job, out, err = self._job(argv, kw.get("env"), kw.get("fsize"), kw.get("code"), kw.get("cwd"),
                                  kw.get("merge", False), detach=True, unset=kw.get("unset", ()), session=session)
        return Child(self, self._send(job)["pid"], out, err, job["merge"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_ok(zygote: "Zygote", stage: str, config: Path, tmp: Path, *extra: str) -> Result:
    """``python -m pipeline <stage> --config config`` on the data under ``tmp`` (raw/, cache/,
    subs/), asserted to exit 0 (the output's tail in the message)."""
    argv = [stage, "--config", str(config), f"data.raw={tmp / 'raw'}", f"data.cache={tmp / 'cache'}",
            f"data.submissions={tmp / 'subs'}", "submit.workers=1", *extra]
    proc = zygote.run(argv)
    assert proc.rc == 0, f"{stage} {Path(config).name} failed:\n{proc.out[-3000:]}\n{proc.err[-3000:]}"
    return proc


@dataclass
class Child:
    """A spawned child: ``pid`` (signal it with os.kill), ``poll()``, ``wait()`` -> Result (once)."""
    zygote: Zygote
    pid: int
    out: Path
    err: Path
    merge: bool
    result: Result | None = None

    def poll(self) -> bool:
        """True while the child runs (a zombie, exited but not reaped, counts as exited)."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    def wait(self) -> Result:
        if self.result is None:
            rc = self.zygote._send({"wait": self.pid})["rc"]
            self.result = Zygote._result(rc, self.out, self.err, self.merge)
        return self.result
