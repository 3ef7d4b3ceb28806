#!/usr/bin/env python
"""Thin entry point: `make export` -> `python scripts/export.py [--config F] [--run KEY] [--out DIR] [key=value ...]`;
the logic is pipeline/export.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
