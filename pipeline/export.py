"""Export stage: a trained run as a folder that runs anywhere without torch (``make export``).

    python scripts/export.py [--config F] [--run KEY|FOLDER] [--out DIR] [key=value ...]

Exports the run the config resolves to (or ``--run``: a key from ``make runs`` or a run folder),
every finished fold (``fold<k>/manifest.json``), to ``--out`` (default ``exports/<train key>/``,
``Graph.export_dir``):

- ``fold<k>.onnx``: the network (opset 17, input ``input`` (N, 3, H, W) float32 normalised RGB,
  output ``logits`` (N, 1, H, W); probability = sigmoid). Batch, height and width are dynamic
  when onnxruntime reproduces torch at a second size too; otherwise height and width are fixed
  at the training size (``model.json`` records which);
- ``fold<k>.safetensors``: the same weights (the checkpoint's ``model`` state_dict), with
  arch, encoder and smp arguments in its metadata;
- ``model.json``, the model card: architecture, encoder, input normalisation (the checkpoint's
  ``input_stats``, else ImageNet's), model size and geometry rule (``prepare.fit``), threshold
  and its source (submit's rule, ``probmaps.resolve_threshold``), TTA views (``predict.tta``),
  fold weights (equal: submit's fold mean), OOF Dice, the train key, package versions, the
  date, and each fold's ONNX-vs-torch parity at export time.

``pipeline/onnxrun.py`` runs the folder with onnxruntime alone (``make cutout``). The folder is
written beside its final place and renamed into it, so a killed export leaves the previous one
whole; an export whose inputs (checkpoint hashes, TTA, threshold, code) are unchanged is not redone.

Refused with one line (PipelineError, exit 2): a run with no finished fold; a fold whose
checkpoint fails the safe-loading rules (``safeload.safe_load`` via ``models.load_checkpoint``:
anything but tensors and plain values); an ``--out`` that exists and is not an export folder.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from . import cache, onnxrun
from .config import Config, load
from .errors import ConfigError, PipelineError
from .cache import stable_hash
from .onnxrun import CARD, CARD_FORMAT, INPUT, OUTPUT, VIEWS

CODE_VERSION = "export-2"
OPSET = 17
# Largest |p_onnx - p_torch| accepted: fp32 on both sides differs by rounding only, so more means
# the tracer baked a shape in (then height and width are exported fixed) or an operator differs.
PARITY_TOL = 1e-3
THRESHOLD_RULE = ("mask = prob255 > round(255 * threshold, 6), prob255 = the fold mean of round(255 * p) at "
                  "the photo's size (probmaps.binarize)")
GEOMETRY_RULE = ("stretch: the photo resized to height x width (INTER_AREA); pad: scaled to fit inside keeping "
                 "its aspect ratio, centre-padded with zeros (pipeline/geometry.py geometry, to_model); back: "
                 "padding cropped, bilinear resize to the photo's size (to_original)")
JPEG_RULE = ("RGB JPEGs at least 3x the model size per side are decoded at half size by libjpeg first "
             "(geometry.jpeg_reduction), as in training")


# ---------------------------------------------------------------------------- which run

def run_folder(cfg: Config, run: str = "") -> Path:
    """The train run folder ``<cache>/train/<key>``: ``run`` (a key under ``<cache>/train`` or a
    folder), else the one ``cfg`` resolves to. The one place export looks a run up."""
    from .graph import Graph, named_run       # torch-free
    return named_run(cfg, run, "RUN") if run else Graph(cfg).train_dir


def default_out(cfg: Config, run: str = "") -> Path:
    """The folder ``make export`` writes by default: ``Graph.export_dir`` (``exports/<train key>``,
    where ``make cutout`` looks), or ``exports/<run folder name>`` for a named ``run``."""
    from .graph import EXPORTS, Graph
    return EXPORTS / run_folder(cfg, run).name if run else Graph(cfg).export_dir


def finished_folds(root: Path) -> dict[int, Path]:
    """fold number -> folder, for every finished ``fold<k>`` (manifest.json written) of a run."""
    from .graph import run_folds
    return {k: d for k, d in sorted(run_folds(root).items()) if cache.is_complete(d)}


def oof_info(root: Path, folds: dict[int, Path]) -> dict:
    """OOF Dice: the run's ``oof_summary.json`` (pooled over its folds) and each fold's ``oof.json``."""
    out: dict = {"per_fold": {}}
    summary = root / "oof_summary.json"
    if summary.is_file():
        s = cache.read_json(summary)
        out.update({k: s.get(k) for k in ("dice", "best_threshold", "dice_at_best", "complete", "folds_missing")})
        out["source"] = str(summary)
    for k, d in folds.items():
        p = d / "oof.json"
        if p.is_file():
            o = cache.read_json(p)
            out["per_fold"][str(k)] = {f: o.get(f) for f in ("dice_original", "dice_model", "images",
                                                            "best_epoch_val_dice")}
    return out


def versions() -> dict:
    """The versions of python and of every package the export or its runner depends on."""
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for dist in ("torch", "onnx", "onnxruntime", "segmentation-models-pytorch", "timm", "safetensors", "numpy",
                 "opencv-python-headless", "opencv-python", "pillow", "simplejpeg"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


# ---------------------------------------------------------------------------- ONNX

def _onnx_export(model, path: Path, height: int, width: int, dynamic_hw: bool) -> None:
    import torch
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"}
    x = torch.zeros(1, 3, height, width)
    with warnings.catch_warnings():
        # The TorchScript-based exporter (dynamo=False) needs no onnxscript; its deprecation notice and
        # the tracer's notes on shape arithmetic are checked by the parity below, not shown.
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(model, (x,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                              opset_version=OPSET, dynamic_axes={INPUT: axes, OUTPUT: axes},
                              do_constant_folding=True, dynamo=False)


def _max_prob_diff(model, session, shape: tuple[int, ...], seed: int) -> float:
    """max |sigmoid(onnx) - sigmoid(torch)| on a seeded random normalised input of ``shape`` (N, 3, H, W)."""
    import torch
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    with torch.no_grad():
        ref = torch.sigmoid(model(torch.from_numpy(x))).numpy()
    got = onnxrun.probabilities(session, x)
    if got.shape != ref.shape:
        return float("inf")
    return float(np.abs(got - ref).max())


def export_onnx(model, path: Path, height: int, width: int) -> dict:
    """Write ``model`` to ``path`` as ONNX; dynamic height/width when onnxruntime matches torch at a
    second size as well (else fixed at height x width). Returns the record for the card."""
    import onnx
    info = {"opset": OPSET, "dynamic_batch": True}
    for dynamic_hw in (True, False):
        _onnx_export(model, path, height, width, dynamic_hw)
        onnx.checker.check_model(str(path))
        sess = onnxrun.session(path)
        at_size = _max_prob_diff(model, sess, (2, 3, height, width), 0)
        if not dynamic_hw:
            info.update(dynamic_hw=False, parity_max_prob_diff=at_size)
            break
        try:
            other = _max_prob_diff(model, sess, (1, 3, height + 32, width + 64), 1)
        except Exception:     # noqa: BLE001 - onnxruntime refuses the other size: shapes were baked in
            other = float("inf")
        if max(at_size, other) <= PARITY_TOL:
            info.update(dynamic_hw=True, parity_max_prob_diff=max(at_size, other))
            break
    if info["parity_max_prob_diff"] > PARITY_TOL:
        raise PipelineError(f"{path}: onnxruntime differs from torch by {info['parity_max_prob_diff']:.2e} in "
                            f"probability (limit {PARITY_TOL}); this architecture does not export faithfully")
    return info


# ---------------------------------------------------------------------------- the folds

def _load_folds(folds: dict[int, Path]) -> dict[int, tuple]:
    """Every fold's best.pt through the safe loader, before anything is written: (model, meta, path)."""
    from .models import load_checkpoint
    out = {}
    for k, d in folds.items():
        ckpt = d / "best.pt"
        model, meta = load_checkpoint(ckpt)     # PipelineError for a missing or unsafe file
        out[k] = (model.float().eval(), meta, ckpt)
    ref = next(iter(out.values()))[1]
    for k, (_, meta, ckpt) in out.items():
        for f in ("arch", "encoder", "height", "width"):
            if meta.get(f) != ref.get(f):
                raise PipelineError(f"{ckpt}: {f}={meta.get(f)!r} differs from fold "
                                    f"{next(iter(out))}'s {ref.get(f)!r}; a run's folds must share one model shape")
    return out


def _export_fold(folder: Path, k: int, model, meta: dict, train_key: str) -> dict:
    """Write fold ``k``'s ONNX and safetensors files into ``folder``; returns export_onnx's record."""
    import torch
    from safetensors.torch import save_file
    h, w = int(meta["height"]), int(meta["width"])
    with torch.no_grad():         # (a context: the caller's grad mode is left as it was)
        info = export_onnx(model, folder / f"fold{k}.onnx", h, w)
    save_file({n: v.detach().contiguous() for n, v in model.state_dict().items()},
              str(folder / f"fold{k}.safetensors"),
              metadata={"arch": str(meta["arch"]), "encoder": str(meta["encoder"]),
                        "model_kwargs": json.dumps(meta.get("model_kwargs") or {}), "fold": str(k),
                        "height": str(h), "width": str(w), "train_key": train_key})
    return info


def _fold_records(folder: Path, name: str, loaded: dict[int, tuple], hashes: dict[int, str], root: Path,
                  log) -> list[dict]:
    """Export every loaded fold into ``folder`` (the export ``name`` being built); the card's ``folds`` list."""
    records = []
    for k, (model, meta, ckpt) in loaded.items():
        t = time.time()
        info = _export_fold(folder, k, model, meta, str(meta.get("train_key", root.name)))
        records.append({"fold": k, "onnx": f"fold{k}.onnx", "safetensors": f"fold{k}.safetensors",
                        "weight": 1.0 / len(loaded), "checkpoint": str(ckpt), "checkpoint_sha256_16": hashes[k],
                        "epoch": meta.get("epoch"), "best_val_dice": meta.get("best_score"),
                        "weights": meta.get("weights", "raw"), **info})
        log(f"export: fold {k}: {name}/fold{k}.onnx ({'dynamic' if info['dynamic_hw'] else 'fixed'} "
            f"{meta['height']}x{meta['width']}, |p onnx - p torch| <= {info['parity_max_prob_diff']:.1e}) "
            f"in {time.time() - t:.1f} s")
    return records


# ---------------------------------------------------------------------------- the card

def _fit(meta: dict) -> str:
    return str(((meta.get("config") or {}).get("prepare") or {}).get("fit") or "stretch")


def _stats(meta: dict) -> tuple[list[float], list[float], str]:
    stats = meta.get("input_stats")
    if stats:
        return [float(v) for v in stats[0]], [float(v) for v in stats[1]], "checkpoint input_stats"
    from .data import MEAN, STD
    return list(MEAN), list(STD), "ImageNet (pipeline/data.py MEAN/STD: the checkpoint has no input_stats)"


def _threshold_card(threshold: dict) -> dict:
    """``probmaps.resolve_threshold``'s answer as the card records it: ``value``, ``source``
    (the names the cutout runner reads), the OOF completeness when there is one, the rule."""
    extra = {k: threshold[k] for k in ("oof_complete", "oof_folds_missing") if k in threshold}
    return {"value": threshold["threshold"], "source": threshold["threshold_source"], **extra,
            "rule": THRESHOLD_RULE}


def model_card(root: Path, name: str, key: str, meta: dict, records: list[dict], views: list[str],
               threshold: dict, folds: dict[int, Path]) -> dict:
    """The card (``model.json``) of an export of run ``root`` whose first fold's checkpoint has ``meta``."""
    h, w = int(meta["height"]), int(meta["width"])
    mean, std, stats_source = _stats(meta)
    return {
        "format": CARD_FORMAT, "export_key": key, "name": name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "train_key": str(meta.get("train_key", root.name)), "run_dir": str(root),
        "prepared": (cache.read_manifest(next(iter(folds.values()))) or {}).get("inputs", {}).get("prepare"),
        "architecture": meta["arch"], "encoder": meta["encoder"], "model_kwargs": meta.get("model_kwargs") or {},
        "input": {"name": INPUT, "layout": "NCHW", "dtype": "float32", "channels": "RGB",
                  "normalise": "(pixel - 255 * mean) / (255 * std), pixel in 0..255",
                  "mean": mean, "std": std, "source": stats_source, "height": h, "width": w,
                  "dynamic_batch": True, "dynamic_hw": all(r["dynamic_hw"] for r in records)},
        "output": {"name": OUTPUT, "shape": "(N, 1, H, W)", "activation": "sigmoid (probability of car)"},
        "geometry": {"fit": _fit(meta), "height": h, "width": w, "rule": GEOMETRY_RULE, "jpeg_reduction": JPEG_RULE},
        "tta": views,
        "threshold": _threshold_card(threshold),
        "ensemble": {"rule": "equal mean over folds (as submit)", "weights": [r["weight"] for r in records]},
        "folds": records,
        "oof": oof_info(root, folds),
        "versions": versions(),
        "code": CODE_VERSION,
    }


# ---------------------------------------------------------------------------- the folder

def _sweep(out: Path) -> None:
    """Remove the temp/old folders of exports to ``out`` whose process is gone (killed exports)."""
    for d in out.parent.glob(f".{out.name}.*-*"):
        tail = d.name.rsplit("-", 1)[-1]
        if d.is_dir() and tail.isdigit() and int(tail) != os.getpid() and not cache.pid_alive(int(tail)):
            shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def _building(out: Path):
    """Yield an empty folder beside ``out``; when the block succeeds it replaces ``out`` (the old
    export moved aside first, removed after), when it fails it is removed. Folders rather than
    ``cache.atomic_path``'s files, as an export is several files that must change together."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = out.with_name(f".{out.name}.old-{os.getpid()}") if out.exists() else None
        if old is not None:
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _up_to_date(out: Path, key: str) -> bool:
    """Whether ``out`` holds a whole export with this ``export_key``."""
    if not (out / CARD).is_file():
        return False
    old = cache.read_json(out / CARD)
    return old.get("export_key") == key and all((out / f["onnx"]).is_file() and (out / f["safetensors"]).is_file()
                                                for f in old.get("folds", []))


def export(root: Path, out: Path, *, tta: str = "hflip", threshold: dict | None = None, log=print) -> Path:
    """Export every finished fold of the run folder ``root`` to ``out``; returns ``out``.

    tta: the views recorded for the runner (``predict.tta``); threshold: ``probmaps.resolve_threshold``'s
    {threshold, threshold_source, ...} (default: its default, 0.5)."""
    from .graph import file_sha16
    from .probmaps import resolve_threshold
    from .tta import view_names
    root, out = Path(root), Path(out)
    folds = finished_folds(root)
    if not folds:
        raise PipelineError(f"no finished fold under {root} (a fold is finished when its manifest.json is "
                            f"written: run `make train` first, or pick a finished run with RUN=, see `make runs`)")
    if out.exists() and not (out / CARD).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise PipelineError(f"OUT={out} exists and is not an export folder (no {CARD}); choose another OUT")
    views = view_names(tta)
    threshold = threshold or resolve_threshold(-1)
    hashes = {k: file_sha16(d / "best.pt") for k, d in folds.items() if (d / "best.pt").is_file()}
    key = stable_hash({"checkpoints": hashes, "tta": views, "threshold": threshold["threshold"], "opset": OPSET,
                       "code": CODE_VERSION})
    if _up_to_date(out, key):
        log(f"export: {out} is up to date ({len(folds)} fold(s) of {root})")
        return out
    loaded = _load_folds(folds)           # refuses an unsafe checkpoint before anything is written
    unsupported = [v for v in views if v not in VIEWS]
    if unsupported:
        log(f"export: note: TTA view(s) {', '.join(unsupported)} are recorded in the card, but `make cutout` "
            f"runs only {', '.join(VIEWS)} and will refuse this export (ARGS=\"predict.tta=hflip\" to change it)")
    t0 = time.time()
    meta = next(iter(loaded.values()))[1]
    with _building(out) as tmp:
        records = _fold_records(tmp, out.name, loaded, hashes, root, log)
        cache.write_json(tmp / CARD, model_card(root, out.name, key, meta, records, views, threshold, folds))
    log(f"export: {len(records)} fold(s) of {root} -> {out} ({meta['height']}x{meta['width']} {_fit(meta)}, TTA "
        f"{','.join(views)}, threshold {threshold['threshold']:g} from {threshold['threshold_source']}) "
        f"in {time.time() - t0:.1f} s")
    return out


def run(cfg: Config, run: str = "", out: str = "") -> Path:
    """The stage: export the config's run (or ``run``) to ``out`` (default :func:`default_out`)
    with the config's TTA and submit's threshold rule on that run."""
    from .probmaps import resolve_threshold
    root = run_folder(cfg, run)
    dest = Path(out) if out else default_out(cfg, run)
    return export(root, dest, tta=cfg.predict.tta, threshold=resolve_threshold(cfg.submit.threshold, root))


# ---------------------------------------------------------------------------- the weights again

def torch_models(folder: str | Path) -> list:
    """An export's folds as eager torch models (eval mode), rebuilt from its safetensors files."""
    from safetensors.torch import load_file
    from .models import build_model
    card = onnxrun.read_card(folder)
    models = []
    for f in card["folds"]:
        m = build_model(card["architecture"], card["encoder"], "none", **(card.get("model_kwargs") or {}))
        m.load_state_dict(load_file(str(Path(folder) / f["safetensors"])))
        models.append(m.eval())
    return models


# ---------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    """scripts/export.py [--config F] [--run KEY|DIR] [--out DIR] [key=value ...]"""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="make export", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", "-c", default=None, help="YAML experiment file")
    ap.add_argument("--run", default="", help="a run key from `make runs`, or a run folder (default: the config's)")
    ap.add_argument("--out", default="", help="export folder (default exports/<train key>)")
    ap.add_argument("--print-dir", action="store_true", help="print the export folder and exit")
    ap.add_argument("overrides", nargs="*", help="key=value (e.g. predict.tta=hflip submit.threshold=0.5)")
    a = ap.parse_intermixed_args(argv)
    try:
        cfg = load(a.config, a.overrides)
        if a.print_dir:
            print(Path(a.out) if a.out else default_out(cfg, a.run))
            return 0
        run(cfg, a.run, a.out)
    except (ConfigError, PipelineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
