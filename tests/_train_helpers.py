"""A tiny prepare artifact written directly to the docs/design.md contract (train tests' input).

Each image shows one bright ellipse ("car") on a textured background; the masks
are that ellipse, so a small model learns something within one epoch. Full-size
masks are larger than the model size, as on the real data.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline import config

# Size of the tiny raw set in the Kaggle layout shared by the prepare-validation and hostile-input
# tests (conftest: raw_base, raw).
RAW_H, RAW_W = 64, 96


def make_prepared(root: Path, cars: int = 4, views: int = 4, height: int = 64, width: int = 96,
                  orig: tuple[int, int] = (80, 120), n_folds: int = 2, seed: int = 0) -> Path:
    """Write images/, masks/, full/, train_index.csv, folds.csv under ``root``; returns root."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for sub in ("images", "masks", "full"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    oh, ow = orig
    for c in range(cars):
        car = f"car{c:03d}"
        color = rng.integers(120, 255, 3).tolist()
        for v in range(1, views + 1):
            i = f"{car}_{v:02d}"
            full = np.zeros((oh, ow), np.uint8)
            centre = (int(ow * rng.uniform(0.4, 0.6)), int(oh * rng.uniform(0.4, 0.6)))
            axes = (int(ow * rng.uniform(0.2, 0.35)), int(oh * rng.uniform(0.2, 0.3)))
            cv2.ellipse(full, centre, axes, float(rng.uniform(-15, 15)), 0, 360, 1, -1)
            bg = rng.integers(0, 90, (oh, ow, 3), dtype=np.uint8)
            img = np.where(full[..., None] > 0, np.array(color, np.uint8), bg).astype(np.uint8)
            small = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)
            small_mask = (cv2.resize(full * 255, (width, height), interpolation=cv2.INTER_AREA) >= 128)
            cv2.imwrite(str(root / "images" / f"{i}.png"), cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
            cv2.imwrite(str(root / "masks" / f"{i}.png"), small_mask.astype(np.uint8))
            cv2.imwrite(str(root / "full" / f"{i}.png"), full)
            rows.append({"id": i, "car_id": car, "view": v, "image": f"images/{i}.png",
                         "mask": f"masks/{i}.png", "mask_full": f"full/{i}.png", "orig_height": oh,
                         "orig_width": ow, "mask_area": float(full.mean()), "scaled_height": height,
                         "scaled_width": width, "pad_top": 0, "pad_left": 0, "fold": c % n_folds})
    index = pd.DataFrame(rows)
    index.to_csv(root / "train_index.csv", index=False)
    index[["id", "car_id", "fold"]].to_csv(root / "folds.csv", index=False)
    return root


def tiny_cfg(cache: Path, **overrides) -> config.Config:
    """A config for a seconds-long run: Unet on timm resnet18 cut to 3 stages (0.8M params), 1 epoch."""
    base = {"data.cache": str(cache), "prepare.height": 64, "prepare.width": 96, "prepare.n_folds": 2,
            "train.arch": "Unet", "train.encoder": "tu-resnet18", "train.encoder_depth": 3,
            "train.decoder_channels": "32,16,8", "train.epochs": 1, "train.batch_size": 4,
            "train.num_workers": 0, "train.lr": 3e-3, "train.fold": 0}
    base.update(overrides)
    return config.load(None, base)
