"""Command line for every stage: ``python -m pipeline <stage> [--config F] [key=value ...]``.

Only parses arguments, resolves the runtime context (``pipeline.runtime``) and the stage graph
(``pipeline.graph``) once, and calls ``pipeline.<stage>.run(cfg, graph[, rt])``. Configuration and
input errors print one line naming the problem and exit 2 (never a bare traceback).
Each stage's console output is also appended to ``<stage>.log`` beside its artifacts
(``pipeline/stagelog.py``).

  python -m pipeline config [--config F] [key=value ...]   print the resolved config
  python -m pipeline <stage> --help                        every key: type, default, meaning
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import explain, runtime, stagelog
from .config import Config, load
from .errors import ConfigError, PipelineError
from .graph import Graph

STAGES = ("synth", "prepare", "train", "oof", "predict", "submit", "inspect")
COMMANDS = (*STAGES, "config")
WITH_RUNTIME = ("train", "predict")      # stages handed the runtime context (device, precision, ranks)
WITH_PRECISION = ("predict", "submit")   # stages whose graph needs predict's resolved precision


def _stage(stage: str):
    return importlib.import_module(f"pipeline.{stage}")


def _predict_members(graph: Graph) -> None:
    """submit.runs: predict what each member run lacks first (cached maps are reused)."""
    for r, g in graph.members.values():
        try:
            _stage("predict").run(r.cfg, g, runtime.resolve(r.cfg, "predict"))
        except PipelineError as e:     # say which run: its config file is what the user fixes
            raise PipelineError(f"submit.runs: {r.config_file}: {e}") from None


def _teach(graph: Graph) -> None:
    """train.pseudo: the teacher's prepare, its folds this run trains and their test maps first
    (each cached like any run; a teacher with a teacher of its own teaches after it)."""
    t = graph.teacher
    if t is None:
        return
    try:
        _teach(t)
        _stage("prepare").run(t.cfg, t)
        _stage("train").run(t.cfg, t, runtime.resolve(t.cfg, "train"))
        _stage("predict").run(t.cfg, t, runtime.resolve(t.cfg, "predict"))
    except PipelineError as e:     # say which run: its config file is what the user fixes
        raise PipelineError(f"train.pseudo: teacher {graph.cfg.train.pseudo}: {e}") from None


def run_stage(stage: str, cfg: Config, argv: list[str] | None = None) -> None:
    """One stage, with its log: the runtime and graph resolved here, once, for the stage and its log."""
    rt = runtime.resolve(cfg, stage) if stage in WITH_RUNTIME + WITH_PRECISION else runtime.from_env()
    graph = Graph(cfg, precision=rt.precision if stage in WITH_PRECISION else None)
    with stagelog.capture(stage, cfg, argv, graph=graph, main=rt.main):
        if stage == "submit" and cfg.submit.runs.strip():
            _predict_members(graph)
        if stage == "train":
            _teach(graph)
        extra = {"rt": rt} if stage in WITH_RUNTIME else {}
        _stage(stage).run(cfg, graph, **extra)


def _parser(stage: str | None) -> argparse.ArgumentParser:
    if stage is None:
        desc, epilog = __doc__, explain.keys_text()
    else:
        mod = stage
        doc = "print the resolved config (defaults < --config file < key=value)" if stage == "config" else \
            (importlib.import_module(f"pipeline.{mod}").__doc__ or "").strip()
        desc = doc.split("\n\n")[0] + "\n\nThe module docstring has the details (pydoc pipeline." + mod + ")." \
            if stage != "config" else doc
        epilog = explain.keys_text(explain.STAGE_SECTIONS.get(stage))
    ap = argparse.ArgumentParser(prog=f"python -m pipeline{' ' + stage if stage else ''}", description=desc,
                                 epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    if stage is None:
        ap.add_argument("stage", choices=COMMANDS)
    ap.add_argument("--config", "-c", default=None, help="YAML experiment file")
    ap.add_argument("overrides", nargs="*", help="key=value (e.g. epochs=3 or train.epochs=3)")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The stage is the first word that is neither an option nor key=value; its own --help lists
    # the keys it reads (parsed before the stage module is imported: no torch for --help on config).
    words = [a for a in argv if not a.startswith("-") and "=" not in a]
    stage = next((w for w in words if w in COMMANDS), None)
    if stage is None:
        args = _parser(None).parse_intermixed_args(argv)     # prints usage / errors for a bad stage
        stage = args.stage
    rest = list(argv)
    rest.remove(stage)
    args = _parser(stage).parse_intermixed_args(rest)
    try:
        cfg = load(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if stage == "config":
        print(explain.resolved_yaml(cfg), end="")
        return 0
    try:
        run_stage(stage, cfg, rest)
    except (ConfigError, PipelineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
