#!/usr/bin/env python
"""Thin entry point: `make score` -> `python scripts/score.py ...`; the logic is pipeline/score.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.score import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
