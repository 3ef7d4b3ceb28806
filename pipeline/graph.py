"""The stage graph: every stage, what it reads, which config keys enter its key, and where it writes.

Each stage is declared once (:data:`STAGES`): its upstream stages, its code version, the
config keys that enter its key (declared, not opted out: a key no stage names is a
run-only knob, and ``tests/test_graph.py`` fails when a new key is in neither list) and its
outputs. :class:`Graph` resolves, for one config, every key and artifact folder once per
command (each value is computed on first use and kept): stages, the stage log, ``runs``
and ``inspect`` ask it where their inputs are, so no stage imports another.

Resolved hashes are recorded where they are made, not recomputed downstream (DVC's lock
file): prepare's manifest records its ``train_data`` key and each fold's manifest the
hash of its ``best.pt`` (valid while the file's size and mtime are unchanged); artifacts
written before these records are hashed as before, with the same result. The keys themselves
(unchanged since the caches they name were made): docs/design.md, "Artifacts".
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from . import cache
from .config import Config, check_folds, value
from .errors import ConfigError, PipelineError
from .cache import stable_hash


@dataclass(frozen=True)
class Param:
    """A config key that enters a stage's key.

    ``neutral``: the key was added after the stage's code version; at this value it stays
    out of the key, so runs made before it keep their keys. ``only_with``: the key only
    qualifies another (``ema_decay`` of ``ema``); while that one is off it counts as neutral."""
    key: str
    neutral: object = None
    added: bool = False
    only_with: str = ""


def _added(key: str, neutral, only_with: str = "") -> Param:
    return Param(key, neutral, True, only_with)


@dataclass(frozen=True)
class Stage:
    name: str
    upstream: tuple[str, ...]
    code: str                               # bump when outputs change for the same inputs
    params: tuple[Param, ...] = ()          # the keys that enter the key
    run_only: tuple[str, ...] = ()          # keys the stage reads that never change its outputs
    outputs: tuple[str, ...] = ()
    folder: str = ""                        # where the artifact lives (relative to data.cache)
    resolved: tuple[str, ...] = ()          # keys that enter the key by what they name, not their text


_PREPARE = tuple(Param(f"prepare.{k}") for k in ("height", "width", "n_folds", "seed", "stratify", "check_rle",
                                                  "fit")) + (Param("data.train_dir"), Param("data.test_dir"))
_TRAIN = tuple(Param(f"train.{k}") for k in (
    "arch", "encoder", "encoder_weights", "encoder_depth", "decoder_channels", "epochs", "batch_size",
    "accum_steps", "lr", "weight_decay", "scheduler", "warmup_epochs", "min_lr_ratio", "bce_weight", "dice_weight",
    "precision", "channels_last", "grad_clip", "max_nonfinite", "augment", "seed", "max_train_steps")) + (
    _added("train.ema", False), _added("train.ema_decay", 0.999, only_with="train.ema"),
    _added("train.progressive", ""), _added("train.loss_final", ""),
    _added("train.loss_final_epochs", 1, only_with="train.loss_final"),
    _added("train.boundary_weight", 0.0), _added("train.val_every", 1), _added("train.input_scale", 1.0),
    _added("train.pseudo_images", 0, only_with="train.pseudo"),
    _added("train.pseudo_confidence", 0.0, only_with="train.pseudo"))

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("synth", (), "", run_only=tuple(f"synth.{k}" for k in ("train_cars", "test_cars", "image_height",
                                                                   "image_width", "seed", "workers")),
          outputs=("<data.raw>/",)),
    Stage("prepare", (), "prepare-3", _PREPARE, ("prepare.workers", "prepare.strict", "prepare.chunk_size"),
          ("train_index.csv", "folds.csv", "test_index.csv", "prepare_report.json"), "prepare/<key>"),
    Stage("train", ("prepare",), "train-3", _TRAIN, ("train.fold", "train.num_workers", "train.device",
                                                     "train.compile"),
          ("fold<k>/best.pt", "fold<k>/last.pt", "fold<k>/metrics.csv", "fold<k>/oof/", "fold<k>/oof.json"),
          "train/<key>", resolved=("train.pseudo",)),     # the teacher: by its train and predict keys
    Stage("oof", ("train",), "", outputs=("oof_summary.json",), folder="train/<key>"),
    # predict's key hashes the TTA views and the precision as resolved (runtime), not the raw strings
    Stage("predict", ("train",), "predict-2", (Param("predict.tta"), Param("predict.precision")),
          ("predict.folds", "predict.batch_size", "predict.shard", "predict.num_workers", "predict.device",
           "predict.max_forward"), ("<id>.png", "meta.json"), "predict/<best.pt hash>-<key>"),
    Stage("submit", ("predict", "oof"), "submit-1", (Param("submit.threshold"), Param("submit.gzip"),
                                                     Param("submit.runs"), Param("submit.weights"),
                                                     Param("submit.ensemble_images")),
          ("submit.name", "submit.workers", "submit.images_per_task", "data.submissions"),
          ("<name>.csv", "<name>.json"), "<data.submissions>"),
    Stage("inspect", ("train",), "", run_only=tuple(f"inspect.{k}" for k in ("worst", "submission", "masks", "run",
                                                                             "out", "workers")),
          outputs=("per_image.csv", "per_view.csv", "per_car.csv", "worst.png"), folder="train/<key>/inspect"),
)}
EXPORTS = Path("exports")      # exported runs (pipeline/export.py), outside the cache: they are shipped
# Keys that place or log artifacts without entering any key.
RUN_ONLY = ("data.raw", "data.cache", "tensorboard.enabled", "tensorboard.overlay_every",
            "tensorboard.overlay_images")


def params(cfg: Config, stage: str) -> dict:
    """The declared params of ``stage`` by bare name, neutral added keys left out."""
    out = {}
    for p in STAGES[stage].params:
        v = value(cfg, p.key)
        if p.added and (v == p.neutral or (p.only_with and not value(cfg, p.only_with))):
            continue
        out[p.key.split(".", 1)[1]] = v
    return out


def raw_inputs(scan) -> dict:
    """Prepare's inputs: the raw folders' fingerprints (stat only; ``layout.Scan``)."""
    return {"raw": str(scan.raw.resolve()), "train": scan.train.fingerprint(), "train_masks": scan.masks.fingerprint(),
            "test": scan.test.fingerprint(),
            "csv": {n: (cache.file_fingerprint(p) if p else None) for n, p in scan.csvs.items()}}


def train_data_key(prepared: str | Path) -> str:
    """Hash of the two files train reads from a prepare artifact (content-addressed image names,
    geometry, folds): changes with the training data and nothing else."""
    d, h = Path(prepared), hashlib.sha256()
    for name in ("train_index.csv", "folds.csv"):
        path = d / name
        if not path.is_file():
            raise PipelineError(f"{path}: missing (run `make prepare` first)")
        h.update(name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def file_sha16(path: str | Path) -> str:
    """sha256[:16] of a file's bytes (a checkpoint's identity for predict's folders)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def recorded_hash(path: Path) -> dict:
    """What a manifest records of an output file: its hash and the fingerprint it is valid for."""
    return {"sha256_16": file_sha16(path), "fingerprint": cache.file_fingerprint(path)}


def predict_key(view_names: list[str], precision: str) -> str:
    """What changes the maps besides the checkpoint: TTA views, resolved precision, code version."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision '{precision}': expected a resolved one (fp32, bf16, fp16)")
    return stable_hash({"tta": list(view_names), "precision": precision, "code": STAGES["predict"].code}, n=8)


def predict_dir(cache_root: str | Path, ckpt_hash: str, view_names: list[str], precision: str) -> Path:
    return cache.stage_dir(cache_root, "predict", f"{ckpt_hash}-{predict_key(view_names, precision)}")


@functools.lru_cache(maxsize=None)
def fold_list(spec: str) -> tuple[int, ...] | None:
    """``predict.folds`` -> its fold numbers, sorted (None = 'all'; the typed value of the key)."""
    if spec.strip() in ("", "all"):
        return None
    try:
        return tuple(sorted({int(s) for s in spec.split(",") if s.strip()}))
    except ValueError:
        raise ConfigError(f"predict.folds='{spec}': 'all' or a comma list of fold numbers") from None


def parse_folds(spec: str, n_folds: int) -> list[int]:
    """``predict.folds``: 'all' or a comma list of fold numbers in 0..n_folds-1."""
    folds = fold_list(spec)
    check_folds(spec, folds, n_folds)
    return list(range(n_folds)) if folds is None else list(folds)


@dataclass
class Graph:
    """One config's stage keys and folders, each resolved once (on first use).

    ``prepared``: use this prepare artifact instead of the one the raw files resolve to
    (tests, and runs named by their manifests). ``precision``: predict's resolved precision
    (the runtime context's); None resolves it from the config when first needed. ``chain``: the
    real paths of the teachers' config files above this one (``train.pseudo``)."""
    cfg: Config
    prepared: Path | None = None
    precision: str | None = None
    chain: tuple[str, ...] = ()
    _hashes: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ prepare
    @cached_property
    def scan(self):
        from . import layout
        return layout.scan(self.cfg)

    @cached_property
    def prepare_key(self) -> str:
        return cache.stage_key(params(self.cfg, "prepare"), STAGES["prepare"].code, raw_inputs(self.scan))

    @cached_property
    def prepare_dir(self) -> Path:
        """The prepare artifact (complete or not): ``<cache>/prepare/<key>``."""
        if self.prepared is not None:
            return Path(self.prepared)
        return cache.stage_dir(self.cfg.data.cache, "prepare", self.prepare_key)

    @cached_property
    def prepared_dir(self) -> Path:
        """The complete prepare artifact, or PipelineError telling the user to prepare first."""
        d = self.prepare_dir
        if self.prepared is None and not cache.is_complete(d):
            raise PipelineError(f"no prepared data for this config and raw data at {d}: run `make prepare` first")
        return d

    @cached_property
    def train_data(self) -> str:
        manifest = cache.read_manifest(self.prepared_dir) or {}
        recorded = manifest.get("train_data")
        return recorded if recorded else train_data_key(self.prepared_dir)

    # ------------------------------------------------------------------ train
    @cached_property
    def train_key(self) -> str:
        weights = self.cfg.train.encoder_weights
        inputs = {"train_data": self.train_data}
        if Path(weights).is_file():      # a local encoder-weights file enters by fingerprint
            inputs["encoder_weights"] = cache.file_fingerprint(weights)
        if self.teacher is not None:     # the teacher's maps: its run and how it predicts
            t = self.teacher
            inputs["teacher"] = {"train": t.train_key, "predict": predict_key(t.view_names, t.predict_precision)}
        return stable_hash({"params": params(self.cfg, "train"), **inputs, "code": STAGES["train"].code})

    @cached_property
    def train_dir(self) -> Path:
        """``<cache>/train/<train_key>``: the parent of every fold's directory."""
        return cache.stage_dir(self.cfg.data.cache, "train", self.train_key)

    def fold_dir(self, k: int) -> Path:
        return self.train_dir / f"fold{k}"

    @cached_property
    def folds(self) -> list[int]:
        """The fold numbers of the prepare artifact's folds.csv."""
        path = self.prepared_dir / "folds.csv"
        if not path.is_file():
            raise PipelineError(f"{path}: missing (run `make prepare` first)")
        import pandas as pd
        return sorted(int(k) for k in pd.read_csv(path, usecols=["fold"])["fold"].unique())

    def finished(self, folds: list[int] | None = None) -> list[int]:
        return [k for k in (self.folds if folds is None else folds) if cache.is_complete(self.fold_dir(k))]

    def require_finished(self, folds: list[int] | None = None) -> list[int]:
        """The finished folds, or PipelineError naming what the cache holds instead."""
        done = self.finished(folds)
        if not done:
            raise PipelineError(f"no finished fold under {self.train_dir} (run `make train` first)"
                                + other_runs_text(self.cfg, self.train_dir))
        return done

    @cached_property
    def teacher(self) -> Graph | None:
        """``train.pseudo``: the teacher run's graph, set to the folds this config trains (None = off)."""
        from .pseudo import teacher_config
        found = teacher_config(self.cfg, self.chain)
        if found is None:
            return None
        cfg, real = found
        return Graph(cfg, chain=(*self.chain, real))

    # ------------------------------------------------------------------ predict
    @cached_property
    def predict_folds(self) -> list[int]:
        return parse_folds(self.cfg.predict.folds, self.cfg.prepare.n_folds)

    def checkpoints(self) -> list[Path]:
        """best.pt of every fold predict uses, or PipelineError naming the missing ones."""
        ckpts = [self.fold_dir(k) / "best.pt" for k in self.predict_folds]
        missing = [f"fold {k}: {c}" for k, c in zip(self.predict_folds, ckpts) if not c.is_file()]
        if missing:
            raise PipelineError(f"no trained checkpoint for {'; '.join(missing)} (run `make train`, "
                                "or choose folds with predict.folds=...)" + other_runs_text(self.cfg, self.train_dir))
        return ckpts

    def checkpoint_hash(self, ckpt: Path) -> str:
        """best.pt's sha256[:16], from its fold manifest while the file is the one recorded there."""
        ckpt = Path(ckpt)
        if ckpt not in self._hashes:
            rec = ((cache.read_manifest(ckpt.parent) or {}).get("hashes") or {}).get(ckpt.name) or {}
            fresh = rec.get("fingerprint") == cache.file_fingerprint(ckpt)
            self._hashes[ckpt] = rec["sha256_16"] if fresh else file_sha16(ckpt)
        return self._hashes[ckpt]

    @cached_property
    def view_names(self) -> list[str]:
        from .tta import view_names
        return view_names(self.cfg.predict.tta)

    @cached_property
    def predict_precision(self) -> str:
        if self.precision is not None:
            return self.precision
        from .precision import resolve_precision
        return resolve_precision(self.cfg.predict.precision, self.cfg.predict.device, "predict.precision")

    def predict_dirs(self) -> list[Path]:
        """Where predict writes (and submit reads) each fold's maps, in predict_folds order."""
        return [self._maps_dir(c) for c in self.checkpoints()]

    def fold_predict_dir(self, k: int) -> Path:
        """Fold ``k``'s maps (its best.pt must exist): what a student of this run learns from."""
        return self._maps_dir(self.fold_dir(k) / "best.pt")

    def _maps_dir(self, ckpt: Path) -> Path:
        return predict_dir(self.cfg.data.cache, self.checkpoint_hash(ckpt), self.view_names, self.predict_precision)

    @cached_property
    def members(self) -> dict:
        """``submit.runs``: each member's config file -> (its Run, its own graph), resolved once for
        the command (the command line predicts with them, submit reads their maps)."""
        from .ensemble import load_runs
        return {r.config_file: (r, Graph(r.cfg)) for r in load_runs(self.cfg)}

    # ------------------------------------------------------------------ export
    @cached_property
    def export_dir(self) -> Path:
        """``exports/<train key>``: where ``make export`` writes and ``make cutout`` reads by default."""
        return EXPORTS / self.train_dir.name

    # ------------------------------------------------------------------ logs
    def log_dirs(self, stage: str) -> list[Path]:
        """Where ``stage``'s log goes: its artifact folder(s)."""
        if stage == "prepare":
            return [self.prepare_dir]
        if stage in ("train", "oof"):
            return [self.train_dir]
        if stage == "predict":
            return self.predict_dirs()
        if stage == "submit":
            return [Path(self.cfg.data.submissions)]
        if stage == "inspect":
            return [inspect_dir(self.cfg, self)]
        return [Path(self.cfg.data.cache) / "logs"]      # synth: data.raw is input data, kept clean


# ---------------------------------------------------------------------- runs and what the cache holds

def named_run(cfg: Config, run: str, key: str = "inspect.run") -> Path:
    """A run folder, or a key under ``<cache>/train`` (as ``make runs`` lists them)."""
    p = Path(run)
    root = p if p.is_dir() else Path(cfg.data.cache) / "train" / run
    if not root.is_dir():
        raise PipelineError(f"{key}={run}: neither a folder nor a run under {Path(cfg.data.cache) / 'train'} "
                            f"(`make runs` lists them)")
    return root


def run_folds(root: Path) -> dict[int, Path]:
    """fold number -> folder, for every ``fold<k>`` in a run folder."""
    return {int(d.name[4:]): d for d in sorted(root.glob("fold*")) if d.is_dir() and d.name[4:].isdigit()}


def inspect_dir(cfg: Config, graph: Graph | None = None) -> Path:
    """``inspect.out``, else ``<submission>.inspect`` or ``<train run>/inspect``."""
    import re
    if cfg.inspect.out:
        return Path(cfg.inspect.out)
    if cfg.inspect.submission:
        sub = Path(cfg.inspect.submission)
        return sub.with_name(re.sub(r"\.csv(\.gz)?$", "", sub.name) + ".inspect")
    if cfg.inspect.run:
        return named_run(cfg, cfg.inspect.run) / "inspect"
    return (graph or Graph(cfg)).train_dir / "inspect"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def other_runs(cfg: Config, exclude: Path | None = None) -> list[dict]:
    """The runs under ``<cache>/train`` with a finished fold: key, folds done, and the keys in which
    their training config differs from ``cfg`` (train and prepare sections, run-only keys aside)."""
    import yaml
    here = _flat({s: getattr(cfg, s).__dict__ for s in ("prepare", "train")})
    skip = set(STAGES["train"].run_only) | set(STAGES["prepare"].run_only)
    out = []
    for root in sorted((Path(cfg.data.cache) / "train").glob("*")):
        if not root.is_dir() or (exclude is not None and root.resolve() == Path(exclude).resolve()):
            continue
        done = [k for k, d in run_folds(root).items() if cache.is_complete(d)]
        if not done:
            continue
        conf = next((d / "config.yaml" for d in run_folds(root).values() if (d / "config.yaml").is_file()), None)
        theirs = _flat({s: v for s, v in (yaml.safe_load(conf.read_text()) or {}).items()
                        if s in ("prepare", "train")}) if conf else {}
        diff = {k: v for k, v in theirs.items() if k in here and k not in skip and here[k] != v}
        out.append({"key": root.name, "folds": done, "differs": diff, "mtime": root.stat().st_mtime})
    return sorted(out, key=lambda r: -r["mtime"])


def other_runs_text(cfg: Config, exclude: Path | None = None, most: int = 5) -> str:
    """'; the cache holds ...' naming other finished runs and how to pick one, or ''."""
    runs = other_runs(cfg, exclude)
    if not runs:
        return ""
    items = []
    for r in runs[:most]:
        diff = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) and not v else v}" for k, v in r["differs"].items())
        items.append(f"{r['key']} (folds {r['folds']}{', trained with ' + diff if diff else ''})")
    more = f" and {len(runs) - most} more" if len(runs) > most else ""
    return (f"; the cache holds {len(runs)} other run(s): {'; '.join(items)}{more}. Pick one by passing the ARGS "
            f"it was trained with (`make inspect` also takes RUN=<key>; `make runs` lists them)")
