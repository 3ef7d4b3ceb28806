"""Architecture names and arguments: smp's architecture registry, encoder names, decoder widths.

Torch-free at import (segmentation_models_pytorch and timm are imported by the functions that
need them), so the config checks ``train.decoder_channels`` at load time; ``pipeline.models``
builds the network from these names and arguments.
"""
from __future__ import annotations

import difflib
import functools

from .errors import ConfigError


def _smp():
    import segmentation_models_pytorch as smp
    return smp


def architectures() -> dict[str, type]:
    """smp's architectures by their class name (smp's own MODEL_ARCHITECTURES_MAPPING)."""
    return {cls.__name__: cls for cls in _smp().MODEL_ARCHITECTURES_MAPPING.values()}


def encoders() -> list[str]:
    """smp's own encoders; any timm model is also valid as ``tu-<timm name>``."""
    return sorted(_smp().encoders.get_encoder_names())


def _close(name: str, names) -> str:
    close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6) or \
        [n for n in names if n.lower() == name.lower()]
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_names(arch: str, encoder: str) -> None:
    """Raise ConfigError listing the valid names (and the closest) when arch or encoder is unknown."""
    archs = sorted(architectures())
    if arch not in archs:
        raise ConfigError(f"unknown architecture '{arch}'{_close(arch, archs)}. Valid: {', '.join(archs)}")
    if encoder.startswith("tu-"):
        return _check_timm(encoder)
    names = encoders()
    if encoder not in names:
        raise ConfigError(f"unknown encoder '{encoder}'{_close(encoder, names)}. Valid smp encoders: "
                          f"{', '.join(names)}; or any timm model as 'tu-<name>'")


def _check_timm(encoder: str) -> None:
    import timm
    # 'tu-<model>' or 'tu-<model>.<pretrained tag>' (smp 0.6: the tag picks timm's weights).
    # timm.list_models() has no tags, so the model is checked by its base name and the tag
    # against timm's pretrained list (timm rejects an unknown tag with a bare RuntimeError).
    name, _, tag = encoder[3:].partition(".")
    all_models = timm.list_models()
    if name not in all_models:
        close = difflib.get_close_matches(name, all_models, n=20, cutoff=0.6) or \
            timm.list_models(f"*{name.split('_')[0]}*")[:20]
        raise ConfigError(f"unknown timm encoder '{encoder}'. Similar timm models: "
                          f"{', '.join('tu-' + c for c in close) or '(none)'}")
    if tag:
        tagged = timm.list_pretrained(f"{name}.*")
        if f"{name}.{tag}" not in tagged:
            raise ConfigError(f"unknown pretrained tag '{tag}' for timm encoder 'tu-{name}'. Tags: "
                              f"{', '.join(t.partition('.')[2] for t in tagged) or '(none)'}")


@functools.lru_cache(maxsize=None)
def parse_decoder_channels(text: str) -> tuple[int, ...]:
    """``train.decoder_channels``: "" (the architecture's default) or "64,32,16" -> (64, 32, 16)."""
    try:
        return tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        raise ConfigError(f"decoder_channels='{text}': expected ints like 64,32,16") from None


def model_kwargs(encoder_depth: int = 5, decoder_channels: str = "", input_scale: float = 1.0) -> dict:
    """Extra ``models.build_model`` arguments from config values (defaults give smp's own defaults).

    decoder_channels: "" (architecture default), "64,32,16" (one per decoder stage:
    Unet, UnetPlusPlus, MAnet; as many as encoder_depth) or "128" (one int:
    DeepLabV3, PAN). Architectures without this argument (FPN) reject it.
    input_scale: see ``models.scale_input`` (recorded only when not 1, so older checkpoints match).
    """
    kw: dict = {}
    if input_scale != 1.0:
        kw["input_scale"] = float(input_scale)
    if encoder_depth != 5:
        kw["encoder_depth"] = int(encoder_depth)
    chans = list(parse_decoder_channels(decoder_channels))
    if chans:       # a list, as checkpoints have always recorded it
        kw["decoder_channels"] = chans[0] if len(chans) == 1 else chans
    return kw
