"""Carvana Image Masking pipeline: prepare -> train -> predict -> submit.

Each stage is ``pipeline.<stage>.run(cfg)``; stages talk only through files under
``cfg.data.cache`` (see docs/design.md).
"""
import os

# albumentations phones home for updates on import; there is no network here.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
