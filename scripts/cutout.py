#!/usr/bin/env python
"""Thin entry point: `make cutout` -> `python scripts/cutout.py --in DIR --out DIR [--model EXPORT] [--bg COLOUR]`;
the logic is pipeline/cutout.py (onnxruntime only: no torch)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cutout import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
