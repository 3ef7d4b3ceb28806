"""Command line for every stage: ``python -m pipeline <stage> [--config F] [key=value ...]``.

Only parses arguments and calls ``pipeline.<stage>.run(cfg)``. Configuration and
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

from . import explain, stagelog
from .config import ConfigError, PipelineError, load

STAGES = ("synth", "prepare", "train", "oof", "predict", "submit", "inspect")
COMMANDS = (*STAGES, "config")
MODULES = {"inspect": "inspection"}      # stage -> module where the names differ


def _parser(stage: str | None) -> argparse.ArgumentParser:
    if stage is None:
        desc, epilog = __doc__, explain.keys_text()
    else:
        mod = MODULES.get(stage, stage)
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
        with stagelog.capture(stage, cfg, rest):
            importlib.import_module(f"pipeline.{MODULES.get(stage, stage)}").run(cfg)
    except (ConfigError, PipelineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
