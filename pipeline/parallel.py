"""Chunked joblib work with bounded memory: prepare's train pairs and test-image checks."""
from __future__ import annotations

import sys

from joblib import Parallel, delayed, effective_n_jobs
from tqdm import tqdm


def run_chunks(fn, chunks: list, workers: int, total: int, desc: str):
    """Yield fn(chunk) results as they finish (any order), with a progress bar counting items.

    Results stream back (joblib generator), and joblib dispatches only 2 chunks per
    worker ahead, so memory stays bounded whatever the number of images.
    """
    n_jobs = max(1, min(effective_n_jobs(workers), len(chunks)))
    bar = tqdm(total=total, desc=desc, unit="img", disable=None, leave=False, file=sys.stderr)
    try:
        for res in Parallel(n_jobs=n_jobs, return_as="generator_unordered")(delayed(fn)(c) for c in chunks):
            bar.update(len(res))
            yield res
    finally:
        bar.close()


def chunks(items: list, size: int, workers: int) -> list[list]:
    """Split into chunks of at most ``size``, small enough that every worker gets ~4 (balance)."""
    if not items:
        return []
    n_jobs = max(1, effective_n_jobs(workers))
    size = max(1, min(size, -(-len(items) // (4 * n_jobs))))
    return [items[i:i + size] for i in range(0, len(items), size)]
