#!/usr/bin/env python
"""Thin entry point: `make download` / `make kaggle-submit` -> `python scripts/kaggle_cli.py download|submit ...`;
the logic is pipeline/kaggle_cli.py. (Not scripts/kaggle.py: it would shadow the kaggle package.)"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.kaggle_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
