"""Typed configuration: dataclass defaults < YAML file < ``key=value`` overrides.

Sections mirror the stages. An override names a key either in full
(``train.epochs=3``) or by its bare name when that name is unique across
sections (``epochs=3``). Unknown keys and values of the wrong type are errors
that name the key; a YAML file that cannot be used (bad syntax such as a tab in the
indentation, a list or a scalar at the top, bytes that are not UTF-8) is an error on
one line naming the file and the line.

``data.cache`` may be anywhere, inside the project or not (another disk is a good
reason). A ``data.cache`` set outside the project that does not exist yet gets a one-line
note on stderr (once: the first stage creates it): nothing else in the project points at it, and
``make clean-cache`` removes it only when given the same CONFIG/ARGS (or ``CACHE=``). A cache inside ``data.raw`` (or equal to it) is refused: stage outputs
would be written into the user's input data.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError


FITS = ("stretch", "pad")                          # prepare.fit (pipeline.geometry)
SCHEDULERS = ("cosine", "onecycle", "none")        # train.scheduler (pipeline.train.optim)
FINAL_LOSSES = ("", "lovasz")                 # train.loss_final: "" = BCE + Dice to the end
PRECISIONS = ("auto", "fp32", "bf16", "fp16")      # train.precision, predict.precision (pipeline.precision)


PROJECT = Path(__file__).resolve().parents[1]      # the checkout: where `make clean-cache` works


@dataclass
class DataConfig:
    raw: str = "data/raw"            # Kaggle layout: train/, train_masks/, test/, *.csv
    cache: str = "data/cache"        # every stage's artifacts live under here
    submissions: str = "submissions"
    train_dir: str = "train"         # "train_hq" for the HQ JPEGs
    test_dir: str = "test"           # "test_hq" for the HQ JPEGs


@dataclass
class SynthConfig:
    """The embedded default dataset (``make demo-data``), written to ``data.raw``."""
    train_cars: int = 12
    test_cars: int = 4
    image_height: int = 320          # Kaggle: 1280
    image_width: int = 480           # Kaggle: 1918
    seed: int = 0
    workers: int = -1


@dataclass
class PrepareConfig:
    height: int = 256                # model input size; divisible by 32
    width: int = 256
    n_folds: int = 5
    seed: int = 42
    stratify: bool = True            # balance folds by mean car mask area
    workers: int = -1                # joblib workers; -1 = all cores
    strict: bool = False             # any validation problem -> non-zero exit
    check_rle: bool = True           # compare train_masks.csv RLE with the GIFs
    chunk_size: int = 64             # images per joblib task; bounds memory
    fit: str = "stretch"             # stretch: resize to height x width | pad: keep aspect, centre-pad


@dataclass
class TrainConfig:
    fold: int = -1                   # -1 = all folds in turn
    arch: str = "Unet"               # any smp architecture
    encoder: str = "resnet18"        # smp encoder or "tu-<timm name>"
    encoder_weights: str = "none"    # "imagenet", a local file path, or "none"
    encoder_depth: int = 5           # smp encoder stages used (3..5); fewer = smaller, faster model
    decoder_channels: str = ""       # "" = smp default; "64,32,16" per stage (Unet) or "256" (DeepLabV3)
    epochs: int = 2
    batch_size: int = 8
    accum_steps: int = 1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    scheduler: str = "cosine"        # cosine (with warmup) | onecycle | none
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.01       # cosine decays to lr * this
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    precision: str = "auto"          # auto (bf16 CPU / fp16 CUDA) | bf16 | fp16 | fp32
    channels_last: bool = True
    grad_clip: float = 1.0
    max_nonfinite: int = 10          # consecutive non-finite losses before the fold stops
    augment: str = "basic"           # none | basic | strong
    num_workers: int = 2
    device: str = "auto"             # auto | cpu | cuda
    seed: int = 42
    max_train_steps: int = 0         # >0 caps optimizer steps per epoch (smoke runs)
    # Added after train-3; at these defaults they leave the train key (and so old runs) unchanged.
    ema: bool = False                # also keep an EMA of the weights (timm ModelEmaV3), scored each epoch
    ema_decay: float = 0.999         # EMA decay cap (warmed up from 0: short runs still average)
    progressive: str = ""            # "256:2,384:1": first epochs resized to these sizes; "c320:2": random crops
    loss_final: str = ""             # "" | "lovasz": loss of the last loss_final_epochs epochs
    loss_final_epochs: int = 1       # epochs at the end trained with train.loss_final
    val_every: int = 1               # validate every N epochs and always the last (skipped: NaN, never best)
    boundary_weight: float = 0.0     # BCE weight 1 + this within 3 px of the mask edge
    input_scale: float = 1.0         # the network sees images shrunk by this; logits resized back (loss at full size)
    compile: bool = False            # torch.compile the training model (speed only, not in the key)
    # Pseudo-labelling (pipeline/pseudo.py): test images join training with a teacher run's maps as targets.
    pseudo: str = ""                 # the teacher's config file ("" = off); fold k learns from its fold k's maps
    pseudo_images: int = 0           # test images used (evenly spread over the sorted ids); 0 = all
    pseudo_confidence: float = 0.0   # > 0.5: pixels the teacher puts in (1 - c, c) are left out of the loss


@dataclass
class PredictConfig:
    tta: str = "hflip"               # comma list: none,hflip,vflip,hvflip,scale0.75,...
    batch_size: int = 8
    folds: str = "all"               # "all" or a comma list of fold numbers
    shard: str = ""                  # "i/N" predicts part i of N
    num_workers: int = 2
    device: str = "auto"
    precision: str = "auto"          # as train.precision; was predict.autocast (still accepted)
    max_forward: int = 0             # images per forward pass (TTA views included); 0 = a batch's views at once


@dataclass
class SubmitConfig:
    name: str = "submission"
    threshold: float = -1.0          # <0: best OOF threshold when known, else 0.5
    gzip: bool = False
    workers: int = -1
    images_per_task: int = 32        # images per joblib task; bounds memory, keeps CSV order
    runs: str = ""                   # "a.yaml,b.yaml": average these configs' trained runs (pipeline/ensemble.py)
    weights: str = ""                # with runs: "0.6,0.4"; "" = chosen on the runs' common OOF images
    ensemble_images: int = 400       # OOF images the weight/threshold search reads (0 = all in common)


# inspect + tensorboard: logging and reading only; neither enters any cache key (pipeline.graph).
@dataclass
class InspectConfig:
    """``make inspect``: tables and pictures of where the model fails (pipeline/inspect.py)."""
    worst: int = 16                  # images in the worst-N grids (worst.png, worst_zoom.png)
    submission: str = ""             # a submission CSV to inspect instead of the OOF maps (needs inspect.masks)
    masks: str = ""                  # true masks for inspect.submission (Kaggle's <id>_mask.gif folder)
    run: str = ""                    # a train run's key (as `make runs` lists it) or folder; "" = this config's run
    out: str = ""                    # output folder; "" = <train run>/inspect or <submission>.inspect
    workers: int = -1                # joblib workers for the per-image table; -1 = all cores


@dataclass
class TensorboardConfig:
    """Per-fold TensorBoard events under ``<fold dir>/tb`` (pipeline/tboard.py); logging only."""
    enabled: bool = True             # write events (scalars each epoch, overlays every few epochs)
    overlay_every: int = 2           # epochs between validation overlay images; 0 = none
    overlay_images: int = 4          # validation images per overlay strip


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    submit: SubmitConfig = field(default_factory=SubmitConfig)
    inspect: InspectConfig = field(default_factory=InspectConfig)
    tensorboard: TensorboardConfig = field(default_factory=TensorboardConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def spec(self, key: str):
        """The typed value of a spec key (:data:`SPECS`), parsed by its owner's parser (once per text)."""
        module, name = SPECS[key].split(":")
        return getattr(importlib.import_module(module), name)(value(self, key))


# The spec strings: key -> "module:parser". Each parser lives beside the code that uses the
# value, in a torch-free module, takes the key's text alone, returns an immutable typed value (cached
# per text) and raises a ConfigError naming the key; load() parses every one. Checks that need other
# keys (epochs, n_folds, the number of runs) are in check(), on the typed values.
SPECS = {
    "train.progressive": "pipeline.schedule:parse",
    "train.decoder_channels": "pipeline.arch:parse_decoder_channels",
    "train.augment": "pipeline.augment:parse",
    "train.pseudo": "pipeline.pseudo:teacher_file",
    "predict.tta": "pipeline.tta:parse",
    "predict.folds": "pipeline.graph:fold_list",
    "predict.shard": "pipeline.runtime:parse_shard",
    "submit.runs": "pipeline.ensemble:run_files",
    "submit.weights": "pipeline.ensemble:weight_list",
}


def value(cfg: Config, key: str):
    """The value of a dotted key ("train.epochs")."""
    section, name = key.split(".", 1)
    return getattr(getattr(cfg, section), name)


SECTIONS = [f.name for f in dataclasses.fields(Config)]


def load(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Defaults, then the YAML file (nested sections or flat keys), then overrides."""
    from .configio import apply, parse_overrides, read_yaml     # reading; this module is the schema
    cfg = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        doc = read_yaml(p)
        try:
            for k, v in doc.items():
                if k in SECTIONS and isinstance(v, dict):
                    for kk, vv in v.items():
                        apply(cfg, f"{k}.{kk}", vv)
                elif k in SECTIONS:
                    raise ConfigError(f"section '{k}' must be a mapping of keys, got {type(v).__name__}")
                else:
                    apply(cfg, k, v)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = parse_overrides(overrides or [])
    for k, v in items:
        apply(cfg, k, v)
    check(cfg)
    cache, _ = cache_location(cfg)
    if cfg.data.cache != DataConfig.cache and not _inside(cache, PROJECT) and not os.path.exists(cache):
        # Allowed (another disk is a good reason). Said when a chosen cache is new, not on every
        # command after: nothing in the project cleans it, and a typo shows up here.
        shown = cfg.data.cache + (f" ({cache})" if cache != cfg.data.cache else "")
        print(f"config: note: data.cache={shown} is outside the project {PROJECT} and new: allowed, "
              "and `make clean-cache` removes it only with the same CONFIG/ARGS (or CACHE=)", file=sys.stderr)
    return cfg


# What a config loaded on behalf of another (an ensemble member, a pseudo-label teacher) takes from
# the one that loads it, besides its data section (the same raw data, cache and submissions): the
# knobs of where and how fast it runs, which never change an artifact.
INHERITED = ("train.device", "train.num_workers", "train.compile", "predict.device", "predict.num_workers",
             "predict.batch_size", "predict.max_forward")


def load_related(path: str | Path, cfg: Config, extra: dict | None = None) -> Config:
    """``path`` loaded with ``cfg``'s data section and :data:`INHERITED` keys, then ``extra``."""
    shared = {f"data.{k}": v for k, v in dataclasses.asdict(cfg.data).items()}
    shared.update({k: value(cfg, k) for k in INHERITED})
    return load(path, {**shared, **(extra or {})})


def _inside(path: str, root: str | Path) -> bool:
    """``path`` is ``root`` or below it (both absolute, links resolved)."""
    root = os.path.realpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def cache_location(cfg: Config) -> tuple[str, str]:
    """(data.cache, data.raw) resolved (relative to the working directory, links followed);
    ConfigError when the cache is data.raw or inside it (stage outputs would land in the input data)."""
    cache, raw = os.path.realpath(cfg.data.cache), os.path.realpath(cfg.data.raw)
    if _inside(cache, raw):
        raise ConfigError(f"data.cache={cfg.data.cache} is inside data.raw={cfg.data.raw} ({cache}): "
                          "stage outputs would be written into the input data; choose a cache outside it")
    return cache, raw


def check(cfg: Config) -> None:
    """Every range and choice check of the config, and every spec parsed (config.load calls it once)."""
    for key in SPECS:
        cfg.spec(key)
    _check_prepare(cfg.prepare)
    _check_synth(cfg.synth)
    _check_train(cfg.train, cfg.prepare)
    _check_predict_submit(cfg)
    cache_location(cfg)


def _positive(key: str, v, minimum=1) -> None:
    if v < minimum:
        raise ConfigError(f"{key}={v}: must be >= {minimum}")


def _check_prepare(p: PrepareConfig) -> None:
    for name in ("height", "width"):
        v = getattr(p, name)
        if v <= 0 or v % 32:
            raise ConfigError(f"prepare.{name}={v}: must be a positive multiple of 32 (encoder stride)")
    if p.n_folds < 2:
        raise ConfigError(f"prepare.n_folds={p.n_folds}: need at least 2 folds")
    check_choice("prepare.fit", p.fit, FITS)
    _positive("prepare.chunk_size", p.chunk_size)
    if p.workers == 0:
        raise ConfigError("prepare.workers=0: use -1 for all cores or a positive count")


def _check_synth(sy: SynthConfig) -> None:
    if sy.train_cars < 1 or sy.test_cars < 1:
        raise ConfigError(f"synth.train_cars={sy.train_cars}, synth.test_cars={sy.test_cars}: need at least 1 each")
    if sy.image_height < 32 or sy.image_width < 32:
        raise ConfigError(f"synth.image_height={sy.image_height}, synth.image_width={sy.image_width}: "
                          "need at least 32x32 pixels")


def _check_train(t: TrainConfig, p: PrepareConfig) -> None:
    if t.fold >= p.n_folds or t.fold < -1:
        raise ConfigError(f"train.fold={t.fold}: -1 (all folds) or one of 0..{p.n_folds - 1}")
    for name in ("batch_size", "epochs", "max_nonfinite", "accum_steps", "val_every"):
        _positive(f"train.{name}", getattr(t, name))
    check_choice("train.scheduler", t.scheduler, SCHEDULERS)
    check_choice("train.precision", t.precision, PRECISIONS)
    check_choice("train.loss_final", t.loss_final, FINAL_LOSSES)
    if t.loss_final_epochs < 1 or (t.loss_final and t.loss_final_epochs >= t.epochs):
        raise ConfigError(f"train.loss_final_epochs={t.loss_final_epochs}: must be >= 1 and, with a final loss, "
                          f"below train.epochs={t.epochs} (the final loss fine-tunes a BCE + Dice model)")
    if not 0.0 < t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay={t.ema_decay}: must lie in (0, 1)")
    _positive("train.boundary_weight", t.boundary_weight, 0)
    from .schedule import parse_progressive     # the items against epochs and the prepared size
    shapes = parse_progressive(t.progressive, t.epochs, (p.height, p.width))
    _positive("train.pseudo_images", t.pseudo_images, 0)
    if t.pseudo_confidence and not 0.5 < t.pseudo_confidence < 1.0:
        raise ConfigError(f"train.pseudo_confidence={t.pseudo_confidence}: 0 (soft targets everywhere) or in "
                          "(0.5, 1): the teacher's pixels with p in (1 - c, c) are left out of the loss")
    if not 0.0 < t.input_scale <= 1.0:
        raise ConfigError(f"train.input_scale={t.input_scale}: must lie in (0, 1] (1 = the network sees the "
                          f"prepared size)")
    for h, w, _ in sorted(set(shapes)) if t.input_scale != 1.0 else ():
        sh, sw = round(h * t.input_scale), round(w * t.input_scale)
        if sh % 32 or sw % 32:
            raise ConfigError(f"train.input_scale={t.input_scale}: {h}x{w} inputs would run at {sh}x{sw}; "
                              f"the network needs sides that are multiples of 32 (e.g. 0.5 of 512 = 256, "
                              f"0.625 of 512 = 320)")


def _check_predict_submit(cfg: Config) -> None:
    _positive("predict.batch_size", cfg.predict.batch_size)
    from .tta import check_max_forward     # the check lives beside the code that uses the cap
    check_max_forward(cfg.predict.max_forward)
    check_choice("predict.precision", cfg.predict.precision, PRECISIONS)
    check_folds(cfg.predict.folds, cfg.spec("predict.folds"), cfg.prepare.n_folds)
    runs, weights = cfg.spec("submit.runs"), cfg.spec("submit.weights")
    if weights is not None and not runs:
        raise ConfigError("submit.weights: set submit.runs too (the weights are one per listed run)")
    check_weights(cfg.submit.weights, weights, len(runs))
    _positive("submit.ensemble_images", cfg.submit.ensemble_images, 0)


def check_folds(spec: str, folds: tuple[int, ...] | None, n_folds: int) -> None:
    """``predict.folds``' numbers (None = all) against ``prepare.n_folds``."""
    if folds is not None and (not folds or any(not 0 <= k < n_folds for k in folds)):
        raise ConfigError(f"predict.folds='{spec}': folds must be in 0..{n_folds - 1}")


def check_weights(spec: str, weights: tuple[float, ...] | None, n_runs: int) -> None:
    """``submit.weights`` (None = chosen on OOF): one non-negative weight per run, a positive sum."""
    if weights is not None and (len(weights) != n_runs or min(weights) < 0 or sum(weights) <= 0):
        raise ConfigError(f"submit.weights='{spec}': need {n_runs} non-negative weights (one per submit.runs "
                          "entry) with a positive sum")


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    """ConfigError naming ``key`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        close = difflib.get_close_matches(str(value), [c for c in choices if c], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{key}='{value}'{hint}: choose one of {', '.join(repr(c) if not c else c for c in choices)}")
