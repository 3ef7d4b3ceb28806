"""benchmarks/bench_prepare.py's raw limit decodes each JPEG at the scale prepare uses
(``geometry.jpeg_reduction``), so the prepare/limit ratio is fair at small model sizes."""
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_prepare import limit_decode  # noqa: E402


def test_bench_limit_decodes_at_the_scale_prepare_uses(tmp_path):
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.integers(0, 256, (240, 360, 3), dtype=np.uint8), (0, 0), 2)
    p = tmp_path / "x.jpg"
    cv2.imwrite(str(p), img)
    assert limit_decode(str(p), 64, 96).shape == (120, 180, 3)     # >= 3x the model size: half size
    assert limit_decode(str(p), 128, 192).shape == (240, 360, 3)   # < 3x: full size, as prepare
