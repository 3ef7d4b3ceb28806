"""Training data: the prepare artifact's index, a Dataset over its resized files, augmentations.

Reads only what prepare wrote (resized images and masks at model size), so no
full-size JPEG is decoded while training. Samples come back as uint8 tensors
and are normalised on the training device by :func:`to_device`: a quarter of
the bytes through the DataLoader's shared memory, and the HWC layout turns
into channels_last NCHW for free (a permute is a view).

Augmentation is reproducible per sample: the sampler hands each index together
with a seed derived from (seed, epoch, index), so the augmented batch does not
depend on the number of DataLoader workers or on which worker drew it, and a
resumed run sees the same images as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from .errors import PipelineError
from .ingest import decode_jpeg
from .probmaps import read_mask

# ImageNet statistics: the default input normalisation (see models.input_stats for others).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

INDEX_COLUMNS = ("id", "car_id", "view", "image", "mask", "mask_full", "orig_height", "orig_width")
FOLD_COLUMNS = ("id", "car_id", "fold")



def load_index(prepared_dir: str | Path) -> pd.DataFrame:
    """train_index.csv with folds from folds.csv and absolute file paths.

    Returns one row per training image with columns id, car_id, view, image,
    mask, mask_full (absolute paths), orig_height, orig_width, fold.
    """
    root = Path(prepared_dir)
    index_path, folds_path = root / "train_index.csv", root / "folds.csv"
    for p in (index_path, folds_path):
        if not p.is_file():
            raise PipelineError(f"{p}: missing (run `make prepare` first)")
    index = pd.read_csv(index_path, dtype={"id": str, "car_id": str})
    folds = pd.read_csv(folds_path, dtype={"id": str, "car_id": str})
    for df, p, cols in ((index, index_path, INDEX_COLUMNS), (folds, folds_path, FOLD_COLUMNS)):
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise PipelineError(f"{p}: missing columns {missing}")
    # folds.csv is the source of truth for the split.
    index = index.drop(columns=[c for c in ("fold",) if c in index.columns])
    df = index.merge(folds[["id", "fold"]], on="id", how="left", validate="one_to_one")
    if df["fold"].isna().any():
        bad = df.loc[df["fold"].isna(), "id"].tolist()
        raise PipelineError(f"{folds_path}: no fold for {len(bad)} images, e.g. {bad[:3]}")
    df["fold"] = df["fold"].astype(int)
    for col in ("image", "mask", "mask_full"):
        df[col] = [str(root / p) for p in df[col]]
    return df.reset_index(drop=True)


def read_image(path: str, reduction: int = 1) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a PNG/JPEG file (or a .npy array).

    JPEGs go through ``ingest.decode_jpeg`` (simplejpeg), as in prepare; cv2 decodes the rest.
    reduction=2 decodes a JPEG at half size, ceil(H/2) x ceil(W/2), by libjpeg's DCT
    scaling (see ``geometry.jpeg_reduction``); other formats ignore it (cv2 would resize
    them after decoding, which prepare does not do).
    """
    if path.endswith(".npy"):
        return np.load(path)
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as e:
        raise PipelineError(f"{path}: cannot read image ({e})") from None
    is_jpeg = data[:2].tobytes() == b"\xff\xd8"
    if is_jpeg:
        try:   # the decoder prepare uses: same pixels as cv2, ~3x faster (ingest.decode_jpeg)
            return decode_jpeg(data, reduction)
        except ValueError:
            pass   # what libjpeg-turbo refuses: cv2 below decodes what it can, or fails with a message
    img = cv2.imdecode(data, (cv2.IMREAD_REDUCED_COLOR_2 if reduction == 2 and is_jpeg else cv2.IMREAD_COLOR) | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise PipelineError(f"{path}: cannot read image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Augmentation seed of one sample in one epoch (a fixed mix, stable across processes)."""
    return (seed * 1_000_003 + epoch * 7_919 * 1_000_033 + index * 2_654_435_761) % (2 ** 32)


class SeededSampler(Sampler):
    """Wraps an index sampler; yields (index, augmentation seed) pairs for the current epoch."""

    def __init__(self, base: Sampler, seed: int):
        self.base, self.seed, self.epoch = base, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __iter__(self):
        for i in self.base:
            yield int(i), sample_seed(self.seed, self.epoch, int(i))

    def __len__(self):
        return len(self.base)


class SegDataset(Dataset):
    """Resized images and masks of a prepare artifact.

    Item ``i`` or ``(i, seed)`` -> ``(image, mask, i)``: image (H, W, 3) uint8
    RGB, mask (H, W) uint8 {0, 1}, i the row number (for OOF bookkeeping).
    With a seed the transform is seeded with it first (reproducible augmentation).
    """

    def __init__(self, images: list[str], masks: list[str], transform=None, mask_scale: int = 1):
        if len(images) != len(masks):
            raise ValueError("images and masks differ in length")
        self.images, self.masks, self.transform = list(images), list(masks), transform
        self.mask_scale = mask_scale      # pseudo.SCALE beside soft targets: {0, 255}

    def __len__(self):
        return len(self.images)

    def pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        img, mask = read_image(self.images[i]), read_mask(self.masks[i])
        if img.shape[:2] != mask.shape[:2]:
            raise PipelineError(f"{self.images[i]}: image {img.shape[:2]} and mask {mask.shape[:2]} differ in size")
        return img, (mask if self.mask_scale == 1 else mask * np.uint8(self.mask_scale))

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)
        img, mask = self.pair(i)
        if self.transform is not None:
            if seed is not None:
                self.transform.set_random_seed(seed)
            out = self.transform(image=img, mask=mask)
            img, mask = out["image"], out["mask"]
        return torch.from_numpy(np.ascontiguousarray(img)), torch.from_numpy(np.ascontiguousarray(mask)), i


class PseudoImages(SegDataset):
    """Test images with a teacher's maps as targets (``pseudo.PseudoSet.frame`` rows): the image
    decoded and placed as predict places it, the target as ``pseudo.target`` places the map.
    Items as :class:`SegDataset`'s, the target (H, W) uint8 0..255 (255 = p 1.0)."""

    def __init__(self, frame: pd.DataFrame, height: int, width: int, transform=None):
        super().__init__(frame["path"], frame["map"], transform)
        self.rows, self.size = frame.to_dict("records"), (height, width)

    def pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        from .geometry import to_model
        from .probmaps import read_prob
        from .pseudo import target
        r = self.rows[i]
        img = to_model(read_image(r["path"], r["reduction"]), r["geom"], *self.size)
        prob = target(read_prob(r["map"]), (r["orig_height"], r["orig_width"]), r["teacher_geom"], r["geom"],
                      *self.size)
        return img, prob


class Joined(Dataset):
    """Datasets one after another, items ``i`` or ``(i, seed)`` as :class:`SegDataset` takes them
    (torch's ConcatDataset takes plain indices only)."""

    def __init__(self, *parts: Dataset):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)
        j = int(np.searchsorted(self.starts, i, side="right")) - 1
        local = i - int(self.starts[j])
        img, mask, _ = self.parts[j][local if seed is None else (local, seed)]
        return img, mask, i


@functools.lru_cache(maxsize=16)
def _norm_tensors(device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 3, 1, 1) float32 mean * 255 and std * 255 on ``device``, built once per (device, stats).

    Building them per batch from Python lists is a synchronous host-to-device copy on CUDA,
    which stalls the stream and defeats the batch's non_blocking copy. Callers must not
    modify the returned tensors in place (they are shared).
    """
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0
    return m, s


def to_device(images: torch.Tensor, masks: torch.Tensor | None, device: torch.device,
              channels_last: bool = True, stats: tuple = (MEAN, STD)) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 batch -> float model input on ``device``.

    images: (N, H, W, 3) uint8 -> (N, 3, H, W) float32, (x / 255 - mean) / std with
    ``stats`` = (mean, std) per channel (default ImageNet; the encoder's own come from
    ``models.input_stats``), channels_last memory when asked (the permute of HWC is
    already that layout).
    masks: (N, H, W) uint8 {0,1} -> (N, 1, H, W) float32.
    """
    non_blocking = device.type == "cuda"
    x = images.to(device, non_blocking=non_blocking).permute(0, 3, 1, 2).float()
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:   # the cache entry must name the GPU it lives on
        dev = torch.device("cuda", torch.cuda.current_device())
    mean, std = _norm_tensors(dev, tuple(map(float, stats[0])), tuple(map(float, stats[1])))
    x = (x - mean) / std
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    y = None if masks is None else masks.to(device, non_blocking=non_blocking).unsqueeze(1).float()
    return x, y


@contextlib.contextmanager
def cv2_single_thread():
    """cv2 without its thread pool while DataLoader workers may be forked.

    A forked worker inherits cv2's pool state but not its threads: any cv2 call
    there that touches the pool (even cv2.setNumThreads) can wait forever on a
    lock that no thread will release. With 1 thread in the parent, the children
    never touch the pool; it also keeps the workers from oversubscribing the cores.
    """
    prev = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(prev)
