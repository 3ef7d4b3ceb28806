"""Command line for every stage: ``python -m pipeline <stage> [--config F] [key=value ...]``.

Only parses arguments and calls ``pipeline.<stage>.run(cfg)``. Configuration and
input errors print one line naming the problem and exit 2 (never a bare traceback).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .config import ConfigError, PipelineError, load

STAGES = ("synth", "prepare", "train", "oof", "predict", "submit")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    ap.add_argument("stage", choices=STAGES)
    ap.add_argument("--config", "-c", default=None, help="YAML experiment file")
    ap.add_argument("overrides", nargs="*", help="key=value (e.g. epochs=3 or train.epochs=3)")
    args = ap.parse_intermixed_args(argv)
    try:
        cfg = load(args.config, args.overrides)
        module = importlib.import_module(f"pipeline.{args.stage}")
        module.run(cfg)
    except (ConfigError, PipelineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
