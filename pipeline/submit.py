"""Submit stage: fold mean -> original size -> threshold -> RLE -> validated CSV.

For every test image, in ``sample_submission.csv`` order: each run's fold mean of its uint8
probability maps at the image's own size (``probmaps.fold_mean``), the runs' blend
(``ensemble.blend``; one run of weight 1 is its own map), thresholded by ``probmaps.binarize``
(the rule the OOF threshold was chosen by) and run-length encoded. joblib workers handle
chunks of images; ``Parallel(return_as="generator")`` hands the chunks back in order with
only a few in flight, so the CSV is streamed and memory stays flat.

The CSV (optionally gzipped) is written to a temporary file, checked against
``sample_submission.csv`` (``validate.check_submission``: ids, order, count, every RLE within
its image) and only then renamed to ``<submissions>/<name>.csv[.gz]``; a JSON sidecar
``<name>.json`` records the threshold and where it came from
(``probmaps.resolve_threshold``; a threshold tuned on some folds only is flagged, and warned
about), the models, folds, TTA and config hash.

The maps are read from predict's directories for ``predict.precision`` resolved by device
type (``graph.Graph.predict_dirs``), so submit must be given the precision the predictions
were made in.

Caching: the sidecar records ``submit_key``, a hash of everything the CSV depends on
(checkpoint hashes, TTA, precision, threshold, test index and sample submission
fingerprints, gzip, code version), and the CSV's own fingerprint. A rerun with the same key
and an untouched CSV writes nothing.
"""
from __future__ import annotations

import gzip
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from tqdm import tqdm

from . import cache, faults, probmaps, rle
from .config import Config
from .errors import PipelineError
from .cache import stable_hash
from .ensemble import blend, choose
from .geometry import row_geometry
from .graph import STAGES, Graph
from .probmaps import resolve_threshold
from .testset import read_test_index
from .validate import check_submission, read_ids, sizes_from

CODE_VERSION = STAGES["submit"].code


@dataclass
class RunMaps:
    """One trained run's test maps: its folds' predict directories, its weight in the blend,
    and its test index (each image's geometry in that run's model input; None = the
    submission's own index). A single-run submission is one RunMaps of weight 1."""
    fold_dirs: list[str]
    weight: float = 1.0
    index: pd.DataFrame | None = None


def blend_mask(runs: list[tuple[list[str], float]], image_id: str, size: tuple[int, int], threshold: float,
               geoms: list[dict | None]) -> np.ndarray:
    """(H, W) bool: the blend of the runs' fold means > threshold. runs: (fold dirs, weight) per
    run; geoms: the image's geometry in each run (None = stretch). One run of weight 1 is exactly
    its own fold mean (``ensemble.blend``), so this is the single-run path too."""
    maps = [probmaps.fold_mean((probmaps.read_prob(probmaps.prob_path(d, image_id)) for d in dirs), size, g)
            for (dirs, _), g in zip(runs, geoms)]
    # The same rule as the OOF histograms that chose the threshold (probmaps.prob_hist).
    return probmaps.binarize(blend(maps, [w for _, w in runs]), threshold)


def encode_chunk(runs: list[tuple[list[str], float]], ids: list[str], sizes: list[tuple[int, int]],
                 threshold: float, geoms: list[list[dict | None]]) -> list[str]:
    """One joblib task: RLE strings for a chunk of images (in the given order); geoms: per image,
    its geometry in each run."""
    return [rle.encode(blend_mask(runs, i, s, threshold, g)) for i, s, g in zip(ids, sizes, geoms)]


def other_precisions(fold_dir: Path, ids: pd.Series) -> list[str]:
    """The same checkpoint's other predict directories (another precision or TTA), as
    'name (precision, tta a,b: k of n images)', from their meta.json."""
    prefix = fold_dir.name.split("-")[0] + "-"
    out = []
    for d in sorted(fold_dir.parent.glob(prefix + "*")) if fold_dir.parent.is_dir() else []:
        if d == fold_dir or not (d / "meta.json").is_file():
            continue
        meta = cache.read_json(d / "meta.json")
        have = int(ids.isin(probmaps.done_ids(d)).sum())
        out.append(f"{d.name} ({meta.get('precision', 'precision unknown')}, tta {','.join(meta.get('tta') or [])}: "
                   f"{have} of {len(ids)} images)")
    return out


def missing_report(fold_dir: Path, ids: pd.Series) -> str | None:
    """None when every id has a probability file in fold_dir, else a message naming ids and shards."""
    missing = ids[~ids.isin(probmaps.done_ids(fold_dir))]
    if missing.empty:
        return None
    msg = f"{fold_dir}: {len(missing)} of {len(ids)} test images not predicted, e.g. {missing.iloc[:3].tolist()}"
    # The directory is keyed by checkpoint, TTA and the resolved precision: shards run on a CPU and a
    # GPU machine with precision=auto (bf16/fp32 vs fp16), or a submit resolving another precision, miss it.
    msg += (" (predictions are keyed by checkpoint, TTA and precision: every shard and submit must use the same "
            "predict.precision and device type (auto = fp16 on CUDA, bf16 or fp32 on CPU by its bf16 support)")
    others = other_precisions(fold_dir, ids)
    msg += f"; this checkpoint also has {'; '.join(others)})" if others else ")"
    markers = sorted((fold_dir / "shards").glob("*of*.json")) if (fold_dir / "shards").is_dir() else []
    by_n: dict[int, set[int]] = {}
    for m in markers:
        i, n = (int(v) for v in m.stem.split("of"))
        by_n.setdefault(n, set()).add(i)
    if by_n:
        parts = [f"{sorted(set(range(n)) - done)} of {n}" for n, done in sorted(by_n.items()) if set(range(n)) - done]
        if parts:
            msg += f"; unfinished shards {'; '.join(parts)} (run `make predict SHARD=i/N` for them)"
    else:
        msg += " (run `make predict`)"
    return msg


def _check_sample_order(index: pd.DataFrame, sample_ids: list[str]) -> None:
    """PipelineError naming the first difference unless the index lists the sample's images in order."""
    if list(index["img"]) != list(sample_ids):
        diff = next((k for k, (a, b) in enumerate(zip(index["img"], sample_ids)) if a != b),
                    min(len(index), len(sample_ids)))
        ours = index["img"].iloc[diff] if diff < len(index) else "(end)"
        theirs = sample_ids[diff] if diff < len(sample_ids) else "(end)"
        raise PipelineError(f"test index ids do not match sample_submission.csv ({len(index)} vs "
                            f"{len(sample_ids)} rows, first difference at row {diff + 1}: {ours} vs {theirs}); "
                            "a test image missing or unreadable? see prepare_report.json, then `make prepare`")


def write_submission(index: pd.DataFrame, fold_dirs: list[str | Path], out_path: str | Path, threshold: float,
                     sample_ids: list[str], *, workers: int = -1, images_per_task: int = 32,
                     runs: list[RunMaps] | None = None) -> dict:
    """Stream the CSV (gzip when out_path ends in .gz), validate it, then rename it into place.

    index: test index rows (img, id, orig_height, orig_width) in sample order.
    fold_dirs: one run's predict directories; or ``runs``: several runs, weighted (fold_dirs
    then unused). Returns {"rows": n, "seconds": s}.
    """
    t0 = time.time()
    out_path = Path(out_path)
    _check_sample_order(index, sample_ids)
    runs = runs or [RunMaps([str(d) for d in fold_dirs])]
    problems = [m for r in runs for m in (missing_report(Path(d), index["id"]) for d in r.fold_dirs) if m]
    if problems:
        raise PipelineError("; ".join(problems))
    for r in runs:
        if r.index is not None and list(r.index["id"]) != list(index["id"]):
            raise PipelineError("submit.runs: the runs' test indexes list different images (prepare each "
                                "run's config on the same data.raw)")
    specs = [([str(d) for d in r.fold_dirs], float(r.weight)) for r in runs]
    indexes = [index if r.index is None else r.index for r in runs]
    step = max(1, images_per_task)

    def chunk_args(a: int) -> tuple:
        # Built lazily per chunk: only the few chunks in flight exist at any time.
        part = index.iloc[a:a + step]
        sizes = list(zip(part["orig_height"].astype(int), part["orig_width"].astype(int)))
        geoms = [[row_geometry(r) for r in ix.iloc[a:a + step].to_dict("records")] for ix in indexes]
        return part["id"].tolist(), sizes, [list(g) for g in zip(*geoms)]

    jobs = (delayed(encode_chunk)(specs, ids, sizes, threshold, geoms)
            for ids, sizes, geoms in map(chunk_args, range(0, len(index), step)))
    imgs = index["img"].tolist()
    gz = out_path.name.endswith(".gz")
    with cache.atomic_path(out_path, suffix=".csv.gz" if gz else ".csv") as tmp:
        # compresslevel 6 keeps up with the workers; mtime=0 makes the bytes reproducible.
        raw = open(tmp, "wb")
        f = gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) if gz else raw
        try:
            f.write(b"img,rle_mask\n")
            pos = 0
            bar = tqdm(total=len(imgs), desc="submit", unit="img", mininterval=1.0)
            for codes in Parallel(n_jobs=workers, return_as="generator")(jobs):
                f.write("".join(f"{imgs[pos + j]},{c}\n" for j, c in enumerate(codes)).encode())
                pos += len(codes)
                bar.update(len(codes))
                faults.point("submit.chunk")    # kill -9 tests: a half-written temp CSV
            bar.close()
        finally:
            f.close()
            if gz:
                raw.close()
        size_of = dict(zip(imgs, zip(index["orig_height"].astype(int), index["orig_width"].astype(int))))
        rep = check_submission(tmp, sample_ids, sizes_from(size_of))
        if not rep.ok:
            raise PipelineError(f"refusing to write {out_path}: validation failed\n{rep.summary()}")
    return {"rows": len(imgs), "seconds": round(time.time() - t0, 2)}


def sidecar_path(out_path: Path) -> Path:
    name = out_path.name
    for ext in (".csv.gz", ".csv"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return out_path.with_name(name + ".json")


@dataclass
class Resolved:
    """What the CSV is written from, and what its key and sidecar record."""
    index: pd.DataFrame            # the submission's test index, in sample order
    test_index: Path
    runs: list[RunMaps]
    thr: dict                      # threshold and its provenance (probmaps.resolve_threshold)
    key: dict                      # what the CSV depends on besides test index, sample, gzip and code
    sidecar: dict                  # models, folds, TTA, precision (and the blended runs)


def _maps_of(cfg: Config, g: Graph) -> dict:
    """One config's trained folds and where predict wrote their maps (the graph resolves predict's
    precision by device type, as predict did, without needing that device here)."""
    ckpts, dirs = g.checkpoints(), g.predict_dirs()
    hashes = [g.checkpoint_hash(c) for c in ckpts]
    models = []
    for k, c, h, d in zip(g.predict_folds, ckpts, hashes, dirs):
        meta = cache.read_json(d / "meta.json") if (d / "meta.json").is_file() else {}
        models.append({"fold": k, "checkpoint": str(c), "checkpoint_sha256_16": h, "predictions": str(d),
                       **{key: meta.get(key) for key in ("arch", "encoder", "height", "width", "precision")}})
    test_index = g.prepared_dir / "test_index.csv"
    return {"test_index": test_index, "folds": g.predict_folds, "hashes": hashes, "precision": g.predict_precision,
            "dirs": dirs, "models": models, "tta": g.view_names, "index": read_test_index(test_index)}


def _single(cfg: Config, g: Graph) -> Resolved:
    m = _maps_of(cfg, g)
    thr = resolve_threshold(cfg.submit.threshold, g.train_dir)
    key = {"checkpoints": m["hashes"], "tta": m["tta"], "precision": m["precision"], "threshold": thr["threshold"]}
    return Resolved(m["index"], m["test_index"], [RunMaps([str(d) for d in m["dirs"]])], thr, key,
                    {"precision": m["precision"], "folds": m["folds"], "tta": m["tta"], "models": m["models"]})


def _blend(cfg: Config, graph: Graph) -> Resolved:
    """submit.runs: the runs' maps (the command line predicted what each lacked), weights and
    threshold chosen on the runs' common OOF images (ensemble.choose), their maps blended."""
    members, maps = [r for r, _ in graph.members.values()], []
    for r, g in graph.members.values():
        try:
            m = _maps_of(r.cfg, g)
        except PipelineError as e:     # say which run: its config file is what the user fixes
            raise PipelineError(f"submit.runs: {r.config_file}: {e}") from None
        r.prepared, r.train_dir, r.folds = g.prepared_dir, g.train_dir, m["folds"]
        maps.append(m)
    choice = choose(cfg, members, cfg.submit.ensemble_images)
    thr = resolve_threshold(cfg.submit.threshold, search=choice)
    runs = [RunMaps([str(d) for d in m["dirs"]], w, m["index"]) for m, w in zip(maps, choice["weights"])]
    key = {"runs": [{"checkpoints": m["hashes"], "tta": m["tta"], "precision": m["precision"], "weight": w,
                     "test_index": cache.file_fingerprint(m["test_index"])}
                    for m, w in zip(maps, choice["weights"])], "threshold": thr["threshold"]}
    side = {"runs": [{"config": r.config_file, "weight": w, "train_dir": str(r.train_dir), "folds": r.folds,
                      "tta": m["tta"], "precision": m["precision"], "models": m["models"]}
                     for r, m, w in zip(members, maps, choice["weights"])],
            "ensemble": {k: choice[k] for k in ("weights", "oof_dice", "images", "solo", "grid_size")}}
    return Resolved(maps[0]["index"], maps[0]["test_index"], runs, thr, key, side)


def run(cfg: Config, graph: Graph | None = None) -> Path:
    graph = graph or Graph(cfg)
    r = _blend(cfg, graph) if cfg.submit.runs.strip() else _single(cfg, graph)
    sample = Path(cfg.data.raw) / "sample_submission.csv"
    sample_ids = read_ids(sample)
    threshold, source = r.thr["threshold"], r.thr["threshold_source"]
    if r.thr.get("oof_complete") is False:
        print(f"submit: warning: threshold {threshold} from an incomplete OOF summary "
              f"(folds missing {r.thr.get('oof_folds_missing')}): {source}")
    out = Path(cfg.data.submissions) / (cfg.submit.name + (".csv.gz" if cfg.submit.gzip else ".csv"))
    cache.sweep_temps([out.parent])     # CSV temps of killed runs (a live writer's stay)
    key = stable_hash({**r.key, "test_index": cache.file_fingerprint(r.test_index),
                       "sample": cache.file_fingerprint(sample), "gzip": cfg.submit.gzip, "code": CODE_VERSION})
    side = sidecar_path(out)
    if out.is_file() and side.is_file():
        old = cache.read_json(side)
        if old.get("submit_key") == key and old.get("submission_fingerprint") == cache.file_fingerprint(out):
            # The CSV stands; the sidecar's account of the threshold may not (an OOF summary rewritten
            # with more folds and the same best threshold): bring it up to date, nothing else.
            if any(old.get(k) != v for k, v in r.thr.items()):
                cache.write_json(side, {**{k: v for k, v in old.items() if not k.startswith("oof_")}, **r.thr})
                print(f"submit: sidecar {side} updated (threshold source)")
            print(f"submit: cached, nothing to do ({old.get('rows')} rows, threshold {threshold}) -> {out}")
            return out
    stats = write_submission(r.index, [], out, threshold, sample_ids, workers=cfg.submit.workers,
                             images_per_task=cfg.submit.images_per_task, runs=r.runs)
    cache.write_json(side, {
        "submission": str(out), "submit_key": key, "submission_fingerprint": cache.file_fingerprint(out),
        "rows": stats["rows"], **r.thr, **r.sidecar,
        "test_index": str(r.test_index), "sample_submission": str(sample),
        "config_hash": stable_hash(cfg.to_dict()), "config": cfg.to_dict(),
        "seconds": stats["seconds"], "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    print(json.dumps({"submission": str(out), "rows": stats["rows"], "threshold": threshold,
                      "threshold_source": source, "seconds": stats["seconds"]}))
    return out
