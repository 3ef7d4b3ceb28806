"""OOF Dice and submit agree at every threshold, also for pixels exactly at a threshold level.

probmaps.prob_hist (OOF histograms, which pick the threshold) and submit.blend_mask (which applies
it) share one rule: the uint8-scale map, resized to the original size by geometry.to_original,
is positive where it is > probmaps.threshold_level(t).
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline import geometry, probmaps, submit
from pipeline.train.oofmaps import oof_one
from pipeline.metrics import dice

MODEL_HW = (32, 48)
ORIG_HW = (60, 90)
GEOMS = {
    "stretch": {"scaled_height": 32, "scaled_width": 48, "pad_top": 0, "pad_left": 0},
    "pad": {"scaled_height": 30, "scaled_width": 44, "pad_top": 1, "pad_left": 2},
}


def _map(rng) -> np.ndarray:
    """(32, 48) uint8: blocks exactly at the 0.4 and 0.6 levels (102, 153) and at 127/128, plus noise."""
    q = rng.integers(0, 256, MODEL_HW).astype(np.uint8)
    q[2:14, 3:20] = 153
    q[16:30, 4:22] = 102
    q[3:12, 24:34] = 128
    q[14:28, 26:44] = 127
    return q


@pytest.mark.parametrize("name", list(GEOMS))
def test_oof_hist_dice_equals_submit_dice(tmp_path, name):
    geom = GEOMS[name]
    rng = np.random.default_rng(3)
    q = _map(rng)
    # The true mask covers the exact-level blocks in part, so counting them wrongly changes Dice.
    up = geometry.to_original(q.astype(np.float32), ORIG_HW, geom)
    assert (up == 153).sum() > 100 and (up == 102).sum() > 100     # exact levels survive the resize
    true = ((up >= 140) ^ (rng.random(ORIG_HW) < 0.1)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "full.png"), true)
    row = {"id": "car_01", "mask_full": str(tmp_path / "full.png"), "orig_height": ORIG_HW[0],
           "orig_width": ORIG_HW[1], **geom}
    fold = tmp_path / "oof"
    _, _, pos, all_ = oof_one(q, (q > 127).astype(np.uint8), row, fold / "car_01.png")
    thresholds = [0.4, 0.5, 0.6]
    got = probmaps.hist_dice(pos, all_, thresholds)[0]
    for t, g in zip(thresholds, got):
        mask = submit.blend_mask([([str(fold)], 1.0)], "car_01", ORIG_HW, t, [geom if name == "pad" else None])
        assert g == dice(mask, true), t
    # At 0.6 the 153 block is not positive (153 > 153 is false), in both.
    assert not submit.blend_mask([([str(fold)], 1.0)], "car_01", ORIG_HW, 0.6, [geom])[up == 153].any()


def test_threshold_level():
    assert probmaps.threshold_level(0.6) == np.float32(153.0)
    assert probmaps.threshold_level(0.4) == np.float32(102.0)
    assert probmaps.threshold_level(0.5) == np.float32(127.5)
    assert probmaps.threshold_level(0.6).dtype == np.float32
