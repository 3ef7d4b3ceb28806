"""A CLI that explains itself: every config key with its type, default and meaning.

``python -m pipeline <stage> --help`` and ``python -m pipeline config --help`` print
:func:`keys_text`; ``python -m pipeline config [--config F] [key=value ...]`` prints the
resolved config (:func:`resolved_yaml`).

Meanings come from the trailing ``# comment`` of each field in ``pipeline/config.py`` (the
one place a key is defined), else from :data:`MEANINGS` below for fields without one.
``tests/test_explain.py`` fails when a key has neither, so a new key cannot go undocumented.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import typing

import yaml

from . import cache, config

# Keys whose field in config.py has no trailing comment (their meaning is plain from the name to
# someone who has trained a model, but not to a new user).
MEANINGS = {
    "data.submissions": "folder for submission CSVs and their JSON sidecars",
    "synth.train_cars": "synthetic train cars (16 views each)",
    "synth.test_cars": "synthetic test cars (16 views each)",
    "synth.seed": "seed of the synthetic set (same seed = same files)",
    "synth.workers": "joblib workers writing the set; -1 = all cores",
    "prepare.width": "model input width; divisible by 32",
    "prepare.n_folds": "cross-validation folds (cars grouped, never split)",
    "prepare.seed": "seed of the fold assignment",
    "train.epochs": "passes over the fold's training images",
    "train.batch_size": "images per micro-batch (per process under DDP)",
    "train.accum_steps": "micro-batches per optimizer update (gradient accumulation)",
    "train.lr": "peak learning rate (AdamW)",
    "train.weight_decay": "AdamW weight decay (not on biases and norm weights)",
    "train.warmup_epochs": "linear LR warmup, in epochs (fractions allowed)",
    "train.bce_weight": "weight of BCE in the loss",
    "train.dice_weight": "weight of soft Dice in the loss",
    "train.channels_last": "NHWC memory layout (faster convolutions on most hardware)",
    "train.grad_clip": "clip the gradient norm to this; 0 = no clipping",
    "train.num_workers": "DataLoader worker processes",
    "train.seed": "seed of shuffling, augmentation and initialisation",
    "predict.batch_size": "test images per forward pass (before TTA views)",
    "predict.num_workers": "DataLoader worker processes decoding test JPEGs",
    "predict.device": "auto | cpu | cuda",
    "submit.name": "file name of the submission (without .csv)",
    "submit.gzip": "write <name>.csv.gz instead of .csv",
    "submit.workers": "joblib workers encoding RLE; -1 = all cores",
}

# The sections each stage reads (its --help lists them first).
STAGE_SECTIONS = {
    "synth": ("data", "synth"),
    "prepare": ("data", "prepare"),
    "train": ("data", "prepare", "train", "tensorboard"),
    "oof": ("data", "prepare", "train"),
    "predict": ("data", "prepare", "train", "predict"),
    "submit": ("data", "prepare", "train", "predict", "submit"),
    "inspect": ("data", "prepare", "train", "submit", "inspect"),
}


@dataclasses.dataclass(frozen=True)
class Key:
    key: str          # "train.epochs"
    type: str         # "int"
    default: object
    meaning: str


@functools.lru_cache(maxsize=1)
def keys() -> tuple[Key, ...]:
    """Every config key in section order, with its type, default and one-line meaning."""
    out = []
    for sec in config.SECTIONS:
        cls = typing.get_type_hints(config.Config)[sec]
        hints = typing.get_type_hints(cls)
        comments = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+?)\s*$", inspect.getsource(cls), re.M))
        for f in dataclasses.fields(cls):
            full = f"{sec}.{f.name}"
            out.append(Key(full, hints[f.name].__name__, f.default, comments.get(f.name) or MEANINGS.get(full, "")))
    return tuple(out)


def keys_text(sections: tuple[str, ...] | None = None) -> str:
    """The key table as text: the given sections first, then the others (all keys either way)."""
    first = list(sections or config.SECTIONS)
    rest = [s for s in config.SECTIONS if s not in first]
    all_keys = keys()
    width = max(len(k.key) + len(k.type) + len(repr(k.default)) for k in all_keys) + 9

    def block(secs: list[str]) -> list[str]:
        lines = []
        for k in all_keys:
            if k.key.split(".", 1)[0] in secs:
                left = f"  {k.key} ({k.type}) = {k.default!r}"
                lines.append(f"{left:<{width}} {k.meaning}")
        return lines

    text = ["config keys (key=value on the command line; a bare name like epochs=3 when unique):"]
    text += block(first)
    if rest and sections:
        text += ["", "other keys (accepted, not read by this stage):"] + block(rest)
    return "\n".join(text)


def resolved_yaml(cfg: config.Config) -> str:
    """The resolved config as YAML, headed by its hash (the one submit's sidecar records)."""
    return f"# config hash {cache.stable_hash(cfg.to_dict())}\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False)
