#!/usr/bin/env python
"""Thin entry point: `make train` -> `python scripts/train.py [--config F] [key=value ...]`; the logic is pipeline/train/."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
