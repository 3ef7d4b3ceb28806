"""Exported model speed on the CPU: onnxruntime against eager torch, and the cutout runner end to end.

    .venv/bin/python benchmarks/bench_export.py [--quick] [--arch Unet] [--encoder tu-tf_efficientnet_lite0]

1. The network alone (random weights: speed does not depend on them), batch 1, fp32 on both sides,
   every core for both (torch's intra-op threads, onnxruntime's default): images/s of
   ``session.run`` against ``model(x)`` under ``torch.no_grad()``, at 512x512 (the carvana512
   recipe's size) and at 1280x1920 (a Kaggle 1918x1280 photo at its own scale, padded to a
   multiple of 32 as fit=pad places it). One ONNX file serves both sizes (dynamic height/width),
   as ``make export`` writes it. Also the largest |p_onnx - p_torch| on those inputs.
2. ``make cutout`` end to end in a fresh interpreter (no torch): a 512x512 model with TTA hflip on
   real 512x512 Carvana test photos and on copies of the real 1918x1280 photo (decode, EXIF,
   geometry, the model, the way back to the photo's size, RGBA PNG + mask encode and writes):
   images/s from its summary line, and the interpreter's wall time (cold start included).

The CPU model (``lscpu``) is printed beside the figures. Writes benchmarks/results/export.json.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import cpu_model, write_result  # noqa: E402
from pipeline import cache, export, onnxrun  # noqa: E402
from pipeline.models import build_model  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
FULLRES = SHARED / "carvana_fullres" / "train" / "00087a6bd4dc_04.jpg"
TEST512 = SHARED / "carvana512" / "test"


def _timed(fn, n: int) -> float:
    fn()                                   # warm-up (allocations, onnxruntime's first-run planning)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - t)


def bench_network(model, onnx_path: Path, size: tuple[int, int], n: int) -> dict:
    sess = onnxrun.session(onnx_path)          # the cutout runner's session: what `make cutout` runs
    x = np.random.default_rng(0).standard_normal((1, 3, *size)).astype(np.float32)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        ref = torch.sigmoid(model(xt)).numpy()
        got = onnxrun.probabilities(sess, x)
        torch_ips = _timed(lambda: model(xt), n)
    ort_ips = _timed(lambda: sess.run(None, {onnxrun.INPUT: x}), n)
    return {"size": f"{size[0]}x{size[1]}", "images": n, "torch_images_per_s": round(torch_ips, 3),
            "onnxruntime_images_per_s": round(ort_ips, 3), "speedup": round(ort_ips / torch_ips, 2),
            "max_prob_diff": float(np.abs(got - ref).max())}


def fake_run(root: Path, net, arch: str, encoder: str, size: int) -> Path:
    """A one-fold run folder holding ``net``'s weights as train writes a checkpoint, for export."""
    fold = root / "bench" / "fold0"
    fold.mkdir(parents=True)
    torch.save({"model": net.state_dict(), "arch": arch, "encoder": encoder, "height": size, "width": size,
                "model_kwargs": {}, "config": {"prepare": {"fit": "stretch"}}, "train_key": "bench", "epoch": 1,
                "best_score": 0.0}, fold / "best.pt")
    cache.write_manifest(fold, stage="train", key="bench", params={}, inputs={"prepare": "none"}, outputs={})
    return fold.parent


def bench_cutout(model_dir: Path, photos: list[Path], work: Path, copies: int, label: str) -> dict:
    src = work / f"in-{label}"
    src.mkdir()
    for i in range(copies):
        p = photos[i % len(photos)]
        shutil.copy(p, src / f"{i:03d}_{p.name}")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "cutout.py"), "--in", str(src), "--out",
                           str(work / f"out-{label}"), "--model", str(model_dir), "--no-progress"],
                          capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t
    m = re.search(r"cutout: (\d+) done, (\d+) refused .* in ([\d.]+) s, ([\d.]+) images/s", proc.stdout)
    load = re.search(r"loaded in ([\d.]+) s", proc.stderr)
    if proc.returncode != 0 or not m:
        raise SystemExit(f"cutout failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return {"photos": label, "images": int(m.group(1)), "refused": int(m.group(2)),
            "images_per_s": float(m.group(4)), "loop_s": float(m.group(3)),
            "model_load_s": float(load.group(1)) if load else None, "process_wall_s": round(wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--arch", default="Unet")
    ap.add_argument("--encoder", default="tu-tf_efficientnet_lite0")
    a = ap.parse_args()
    n512, nfull, copies = (3, 1, 8) if a.quick else (10, 3, 24)
    cpu = cpu_model()
    print(f"CPU: {cpu}, {torch.get_num_threads()} torch threads; torch {torch.__version__}; "
          f"{a.arch} / {a.encoder}, random weights, fp32, batch 1")
    torch.manual_seed(0)
    model = build_model(a.arch, a.encoder, "none").eval()
    result: dict = {"cpu": cpu, "torch_threads": torch.get_num_threads(), "arch": a.arch, "encoder": a.encoder,
                    "versions": export.versions(), "network": [], "cutout": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = fake_run(tmp, model, a.arch, a.encoder, 512)
        out = export.export(run, tmp / "export", tta="hflip")
        card = json.loads((out / "model.json").read_text())
        result["dynamic_hw"] = card["input"]["dynamic_hw"]
        onnx_file = out / card["folds"][0]["onnx"]
        if card["input"]["dynamic_hw"]:
            for size, n in (((512, 512), n512), ((1280, 1920), nfull)):
                r = bench_network(model, onnx_file, size, n)
                result["network"].append(r)
                print(f"network {r['size']:>9}: torch {r['torch_images_per_s']:7.2f} img/s, onnxruntime "
                      f"{r['onnxruntime_images_per_s']:7.2f} img/s (x{r['speedup']}), max |dp| {r['max_prob_diff']:.1e}"
                      f"   [{cpu}]")
        else:
            print("the export has fixed height/width: only the 512x512 figure")
            result["network"].append(bench_network(model, onnx_file, (512, 512), n512))
        sets = []
        if TEST512.is_dir():
            sets.append(("carvana512-test-512x512", sorted(TEST512.glob("*.jpg"))[:copies]))
        if FULLRES.is_file():
            sets.append(("kaggle-1918x1280", [FULLRES]))
        if not sets:
            print("no ../shared/data photos: the cutout figures are skipped")
        for label, photos in sets:
            r = bench_cutout(out, photos, tmp, copies if "512" in label else max(4, copies // 3), label)
            result["cutout"].append(r)
            print(f"cutout {label}: {r['images']} photos, {r['images_per_s']:.2f} images/s (TTA hflip, 512 model), "
                  f"model load {r['model_load_s']} s, process {r['process_wall_s']} s   [{cpu}]")
    write_result("export", result)


if __name__ == "__main__":
    main()
