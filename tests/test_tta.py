"""TTA as data: every (forward, inverse) pair undoes itself; the ensemble is the mean over views."""
import pytest
import torch

from pipeline import tta
from pipeline.config import ConfigError

FLIPS = ["none", "hflip", "vflip", "hvflip"]


def test_parse_identity_first_no_duplicates():
    assert tta.names(tta.parse("hflip")) == ["none", "hflip"]
    assert tta.names(tta.parse("none")) == ["none"]
    assert tta.names(tta.parse("")) == ["none"]
    assert tta.names(tta.parse("vflip, hflip,vflip,scale0.75")) == ["none", "vflip", "hflip", "scale0.75"]
    for bad in ("rot90", "scale", "scale9", "scalex"):
        with pytest.raises(ConfigError):
            tta.parse(bad)


@pytest.mark.parametrize("name", FLIPS)
def test_flip_inverse_of_forward_is_exact(name):
    (t,) = [v for v in tta.parse(name) if v.name == name]
    x = torch.randn(2, 3, 64, 96)
    y = t.forward(x)
    assert y.shape == x.shape
    torch.testing.assert_close(t.inverse(y, (64, 96)), x, rtol=0, atol=0)
    if name != "none":
        assert not torch.equal(y, x)  # it really transforms


@pytest.mark.parametrize("name,size", [("scale0.75", (64, 64)), ("scale1.5", (96, 128)), ("scale2", (128, 192))])
def test_scale_inverse_of_forward(name, size):
    (t,) = [v for v in tta.parse(name) if v.name == name]
    const = torch.full((1, 1, 64, 96), 0.3)
    y = t.forward(const)
    assert tuple(y.shape[-2:]) == size  # multiples of the stride 32 (and >= 32)
    torch.testing.assert_close(t.inverse(y, (64, 96)), const)  # constant maps survive exactly
    # A smooth map comes back within interpolation error (resampling is not exactly invertible).
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 96), indexing="ij")
    smooth = torch.sin(3 * xx + 2 * yy)[None, None]
    back = t.inverse(t.forward(smooth), (64, 96))
    assert (back - smooth)[..., 4:-4, 4:-4].abs().max() < 0.02


def test_predict_proba_is_mean_over_views_known_answer():
    # A model that is not flip-equivariant: logit = x[:, :1] + a horizontal ramp.
    ramp = torch.linspace(-2, 2, 8).view(1, 1, 1, 8)

    class Ramp(torch.nn.Module):
        def forward(self, x):
            return x[:, :1] + ramp

    x = torch.randn(3, 3, 4, 8)
    got = tta.predict_proba(Ramp(), x, tta.parse("hflip"))
    # hflip view: flip x, add ramp, flip back = x + flipped ramp.
    want = (torch.sigmoid(x[:, :1] + ramp) + torch.sigmoid(x[:, :1] + ramp.flip(-1))) / 2
    torch.testing.assert_close(got, want)
    assert got.shape == (3, 1, 4, 8)


def test_predict_proba_batches_views_of_one_scale():
    calls = []

    class Count(torch.nn.Module):
        def forward(self, x):
            calls.append(x.shape[0])
            return x[:, :1]

    x = torch.randn(2, 3, 64, 64)
    out = tta.predict_proba(Count(), x, tta.parse("hflip,vflip,hvflip,scale1.5"))
    assert sorted(calls) == [2, 8]  # the four same-size views in one pass, the scaled one in another
    assert out.shape == (2, 1, 64, 64)
    # A per-pixel model is flip-equivariant: every flip view gives back exactly the identity answer.
    flips = tta.predict_proba(Count(), x, tta.parse("hflip,vflip,hvflip"))
    torch.testing.assert_close(flips, torch.sigmoid(x[:, :1]))
