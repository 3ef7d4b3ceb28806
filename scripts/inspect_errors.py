#!/usr/bin/env python
"""Thin entry point: `make inspect` -> `python scripts/inspect_errors.py [--config F] [key=value ...]`;
the logic is pipeline/inspection.py. (Not scripts/inspect.py: it would shadow the stdlib's inspect.)"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["inspect", *sys.argv[1:]]))
