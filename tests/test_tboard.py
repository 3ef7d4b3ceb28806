"""TensorBoard events per fold: scalars every epoch, overlays every few, training unchanged."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _train_helpers import make_prepared, tiny_cfg

from pipeline import tboard, train
from pipeline.graph import Graph


def _events(fold_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(fold_dir / tboard.SUBDIR), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    prepared = make_prepared(tmp_path_factory.mktemp("prep") / "p")
    out = {}
    for on in (True, False):
        cfg = tiny_cfg(tmp_path_factory.mktemp(f"cache_{on}"), **{
            "train.epochs": 3, "tensorboard.enabled": on, "tensorboard.overlay_every": 2,
            "tensorboard.overlay_images": 3})
        train.run(cfg, Graph(cfg, prepared=prepared))
        out[on] = Graph(cfg, prepared=prepared).fold_dir(0)
    return out


def test_scalars_every_epoch_overlays_every_second(runs):
    acc = _events(runs[True])
    tags = acc.Tags()
    metrics = pd.read_csv(runs[True] / "metrics.csv")
    for tag, col in (("loss/train", "train_loss"), ("loss/val", "val_loss"), ("dice/val", "val_dice"),
                     ("lr", "lr"), ("speed/images_per_s", "images_per_s")):
        assert tag in tags["scalars"], tag
        ev = acc.Scalars(tag)
        assert [e.step for e in ev] == [1, 2, 3]
        np.testing.assert_allclose([e.value for e in ev], metrics[col], rtol=1e-5)
    images = acc.Images("val/overlays")
    assert [e.step for e in images] == [2]        # overlay_every=2 over 3 epochs
    # 3 validation tiles of the 64x96 model size side by side, enlarged to 160 pixels tall
    assert (images[0].height, images[0].width) == (160, 3 * 240)


def test_disabled_writes_nothing_and_training_is_the_same(runs):
    assert not (runs[False] / tboard.SUBDIR).exists()
    on, off = pd.read_csv(runs[True] / "metrics.csv"), pd.read_csv(runs[False] / "metrics.csv")
    # The overlay forward (eval mode, no_grad, no RNG) must not change what training computes.
    for col in ("train_loss", "val_loss", "val_dice", "lr"):
        np.testing.assert_allclose(on[col], off[col], rtol=1e-6, err_msg=col)


def test_overlay_strip_marks_errors():
    """The strip's pixels show the outlines and tints where true and predicted masks differ."""
    import torch
    from pipeline import overlay

    class Half(torch.nn.Module):     # predicts car on the left half of every image
        def forward(self, x):
            out = torch.full((x.shape[0], 1, *x.shape[2:]), -5.0)
            out[..., : x.shape[-1] // 2] = 5.0
            return out

    img = torch.full((32, 48, 3), 128, dtype=torch.uint8)
    mask = torch.zeros((32, 48), dtype=torch.uint8)
    mask[:, 24:] = 1                 # the car is the right half: everything is wrong
    ds = [(img, mask, 0)]
    import contextlib
    strip = tboard.overlay_strip(Half(), ds, 4, autocast=contextlib.nullcontext, device=torch.device("cpu"),
                                 height=32)
    assert strip.shape == (32, 48, 3)
    # missed (right half) tinted orange-ish: red > blue; extra (left half) tinted blue: blue > red
    right, left = strip[8:24, 32:44].reshape(-1, 3).mean(0), strip[8:24, 4:16].reshape(-1, 3).mean(0)
    assert right[0] > right[2] + 40 and left[2] > left[0] + 40
    assert overlay.MISSED_RGB[0] > overlay.MISSED_RGB[2] and overlay.EXTRA_RGB[2] > overlay.EXTRA_RGB[0]
