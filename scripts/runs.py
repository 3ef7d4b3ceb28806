#!/usr/bin/env python
"""Thin entry point: `make runs` -> `python scripts/runs.py ...`; the logic is pipeline/runs.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.runs import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
