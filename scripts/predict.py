#!/usr/bin/env python
"""Thin entry point: `make predict` -> `python scripts/predict.py [--config F] [key=value ...]`; the logic is pipeline/predict.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
