"""Out-of-fold predictions of the best checkpoint: ``oof/<id>.png`` maps, their histograms and scores.

Every rank predicts its own validation shard and writes those maps; rank 0 gathers the scores
and writes ``oof/hist.npz``, ``oof.json`` and, last, the fold's manifest.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import cache
from ..errors import PipelineError
from ..data import MEAN, STD, to_device
from ..probmaps import read_mask
from ..distributed import gather
from ..geometry import row_geometry, to_original
from ..graph import params, recorded_hash
from ..probmaps import DEFAULT_THRESHOLD, hist_dice, prob_hist, write_prob
from .resume import Progress

if TYPE_CHECKING:      # the fold's parts, built by build (types only: build imports the step)
    from .build import Data, Fold, Parts


def oof_one(q: np.ndarray, mask_small: np.ndarray, row: dict, out_png: Path) -> tuple:
    """Write one OOF map and score it. q: (h, w) uint8 = round(255 p) at model size;
    mask_small: (h, w) {0, 1}. Returns (id, Dice at model size, pos hist, all hist at original size).

    The original-size map is made exactly as submit makes it from one fold's map (uint8
    scale float32, ``geometry.to_original``), so the histograms give submit's Dice.
    """
    write_prob(out_png, q)
    qf = q.astype(np.float32)
    dice_model = float(hist_dice(*prob_hist(qf, mask_small), [DEFAULT_THRESHOLD])[0, 0])
    full = read_mask(row["mask_full"])
    oh, ow = int(row["orig_height"]), int(row["orig_width"])
    if full.shape != (oh, ow):
        raise PipelineError(f"{row['mask_full']}: mask is {full.shape[1]}x{full.shape[0]} but the index says "
                            f"{ow}x{oh}")
    pos, all_ = prob_hist(to_original(qf, (oh, ow), row_geometry(row, *q.shape[:2])), full)
    return row["id"], dice_model, pos, all_


@torch.no_grad()
def predict_oof(model: torch.nn.Module, val: pd.DataFrame, loader, out_dir: Path, *, autocast,
                device: torch.device, channels_last: bool = True, stats: tuple = (MEAN, STD)) -> list[tuple]:
    """Predict this rank's validation shard; write ``out_dir/<id>.png``; score at both sizes.

    Returns [(id, dice at model size, pos hist, all hist at original size)] (see :func:`oof_one`).
    """
    model.eval()
    rows = val.to_dict("records")
    out, pending = [], []
    with ThreadPoolExecutor(max_workers=2) as pool:   # PNG I/O and full-size resizes overlap the model
        for images, masks, idx in loader:
            x, _ = to_device(images, None, device, channels_last, stats)
            with autocast():
                logits = model(x)
            q = (torch.sigmoid(logits.float())[:, 0] * 255).round_().to(torch.uint8).cpu().numpy()
            for j, i in enumerate(idx.tolist()):
                r = rows[i]
                pending.append(pool.submit(oof_one, q[j], masks[j].numpy(), r, out_dir / f"{r['id']}.png"))
            while len(pending) > 64:
                out.append(pending.pop(0).result())
        out += [f.result() for f in pending]
    return out


def write_oof(f: Fold, data: Data, parts: Parts, progress: Progress, prepared: Path) -> dict:
    """The OOF maps of the weights in ``parts.model`` (best.pt's); rank 0 writes oof/hist.npz,
    oof.json and, last, the manifest. Returns the summary ({} on other ranks)."""
    t, k, d, out = f.cfg.train, f.k, f.d, f.out
    results = predict_oof(parts.model, data.val_df, data.val_dl, out / "oof", autocast=f.autocast, device=f.device,
                          channels_last=t.channels_last, stats=parts.stats)
    results = [r for part in gather(results, d) for r in part]
    if not d.main:
        return {}
    results.sort(key=lambda r: r[0])
    ids = [r[0] for r in results]
    pos, all_ = np.stack([r[2] for r in results]), np.stack([r[3] for r in results])
    with cache.atomic_path(out / "oof" / "hist.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, ids=np.array(ids), pos=pos.astype(np.int64), all=all_.astype(np.int64))
    dice_orig = hist_dice(pos, all_, [DEFAULT_THRESHOLD])[:, 0]
    summary = {"fold": k, "images": len(ids), "dice_model": float(np.mean([r[1] for r in results])),
               "dice_original": float(dice_orig.mean()), "threshold": DEFAULT_THRESHOLD,
               "best_epoch_val_dice": progress.best, "epochs": t.epochs, "nonfinite": parts.step.guard.total,
               "height": f.height, "width": f.width, "world_size": d.world, "precision": f.precision}
    cache.write_json(out / "oof.json", summary)
    # predict reads best.pt's hash from here while the file is unchanged (recorded, not recomputed)
    cache.write_manifest(out, stage="train", key=f.key, params=params(f.cfg, "train"),
                         inputs={"prepare": str(prepared), "fold": k,
                                 **({"pseudo": {"maps": str(data.pseudo.maps_dir), "images": len(data.pseudo.frame)}}
                                    if data.pseudo else {})},
                         outputs={"best": "best.pt", "last": "last.pt", "metrics": "metrics.csv",
                                  "curve": "curve.png", "oof": "oof/", "oof_summary": "oof.json"},
                         config=parts.meta["config"],
                         extra={"fold": k, "oof": summary, "hashes": {"best.pt": recorded_hash(out / "best.pt")}})
    f.log(f"fold {k}: OOF Dice {summary['dice_model']:.4f} at {f.height}x{f.width}, {summary['dice_original']:.4f} "
          f"at original size ({len(ids)} images) -> {out}")
    return summary
