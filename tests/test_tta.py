"""TTA as data: every (forward, inverse) pair undoes itself, each flip flips the axis it names (a known
answer), and the ensemble is the mean over views."""
import pytest
import torch

from pipeline import tta
from pipeline.errors import ConfigError

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


# Where each flip sends the top-left pixel of an H x W image (row, col), and the image it makes.
# Pinned by hand: inverse(forward(x)) == x holds for any self-inverse map (a transpose, or hflip
# under the name vflip), so only a known answer shows that each name flips the axis it says.
CORNER = {"none": (0, 0), "hflip": (0, 3), "vflip": (2, 0), "hvflip": (2, 3)}
GRID = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]       # 3 x 4: value = 4 * row + col
FLIPPED = {"none": GRID, "hflip": [r[::-1] for r in GRID], "vflip": GRID[::-1], "hvflip": [r[::-1] for r in GRID[::-1]]}


@pytest.mark.parametrize("name", FLIPS)
def test_flip_direction_known_answer(name):
    (t,) = [v for v in tta.parse(name) if v.name == name]
    x = torch.zeros(1, 1, 3, 4)
    x[0, 0, 0, 0] = 1.0
    y = t.forward(x)
    assert tuple(torch.nonzero(y[0, 0])[0].tolist()) == CORNER[name] and y.sum() == 1
    grid = torch.tensor(GRID, dtype=torch.float32).view(1, 1, 3, 4)
    assert t.forward(grid)[0, 0].tolist() == FLIPPED[name]
    # The inverse sends the model's answer at the moved pixel back to the top-left corner.
    assert t.inverse(y, (3, 4))[0, 0, 0, 0] == 1.0


@pytest.mark.parametrize("name,size", [("scale0.75", (64, 64)), ("scale1.5", (96, 128)), ("scale2", (128, 192))])
def test_scale_view_size_is_rounded_to_the_stride(name, size):
    (t,) = [v for v in tta.parse(name) if v.name == name]
    y = t.forward(torch.zeros(1, 1, 64, 96))
    assert tuple(y.shape[-2:]) == size  # multiples of the stride 32 (and >= 32): 64x96 at 0.75 is 64x64
    assert tta.scaled_size((1280, 1920), 0.75) == (960, 1440) and tta.scaled_size((320, 480), 0.75) == (256, 352)


@pytest.mark.parametrize("name", ["scale0.5", "scale0.75", "scale1.5"])
def test_scale_inverse_is_approximate_as_documented(name):
    """tta.py's account of scale<S>: constants exact, smooth maps close, sharp edges smeared
    (not exact) but symmetrically, so that a 0.5 threshold keeps them on the same pixel."""
    (t,) = [v for v in tta.parse(name) if v.name == name]
    size = (256, 384)
    const = torch.full((1, 1) + size, 0.3)
    torch.testing.assert_close(t.inverse(t.forward(const), size), const)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size[0]), torch.linspace(0, 1, size[1]), indexing="ij")
    smooth = torch.sin(3 * xx + 2 * yy)[None, None]
    err = (t.inverse(t.forward(smooth), size) - smooth).abs()
    assert err[..., 4:-4, 4:-4].max() < 1e-3 and err.max() < 2e-2
    for offset in range(4):
        edge = torch.zeros((1, 1) + size)
        edge[..., size[1] // 2 + offset:] = 1.0
        back = t.inverse(t.forward(edge), size)
        assert (back - edge).abs().max() > 0.1                               # not an exact inverse
        assert int(((back - edge).abs()[0, 0].amax(0) > 0.01).sum()) <= 6     # only near the edge
        assert torch.equal(back > 0.5, edge > 0.5)                            # the edge stays put


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


class TinyConv(torch.nn.Module):
    """Not flip-equivariant and not per-pixel (3x3 conv + a horizontal ramp), and records the
    batch size of every call: chunks that mixed up images or views would change the answer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)
        self.calls = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return self.conv(x) + torch.linspace(-2, 2, x.shape[-1]).view(1, 1, 1, -1)


@pytest.mark.parametrize("max_forward", [1, 3, 4, 7, 100])
def test_max_forward_caps_images_per_call_same_result(max_forward):
    x = torch.randn(5, 3, 64, 64)
    ttas = tta.parse("hflip,vflip,hvflip,scale1.5")
    whole = TinyConv()
    want = tta.predict_proba(whole, x, ttas)                    # 0 = every view of a scale at once
    assert sorted(whole.calls) == [5, 20]
    capped = TinyConv()
    got = tta.predict_proba(capped, x, ttas, max_forward=max_forward)
    assert max(capped.calls) <= max_forward
    assert sum(capped.calls) == 25                              # each view of each image exactly once
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_max_forward_negative_is_an_error():
    with pytest.raises(ConfigError, match="max_forward=-1"):
        tta.predict_proba(TinyConv(), torch.randn(1, 3, 32, 32), tta.parse("hflip"), max_forward=-1)


def test_chunks_split_view_major_runs():
    # 3 views x 2 images = 6, runs of 4: (view 0: both, view 1: both) then (view 2: both).
    assert list(tta._chunks(3, 2, 4)) == [[(0, 0, 2), (1, 0, 2)], [(2, 0, 2)]]
    # Runs of 3 cut through a view: image 0 of view 1 ends the first run, image 1 starts the second.
    assert list(tta._chunks(3, 2, 3)) == [[(0, 0, 2), (1, 0, 1)], [(1, 1, 2), (2, 0, 2)]]
    assert list(tta._chunks(3, 2, 0)) == [[(0, 0, 2), (1, 0, 2), (2, 0, 2)]]
