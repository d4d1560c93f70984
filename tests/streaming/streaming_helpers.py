"""Helpers shared by the streaming tests and the processes they start (importable by spawned
DataLoader workers and by `torchrun` children: keep it free of pytest)."""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: conftest
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # these helpers

from conftest import make_record
from target_sft import CacheWriter


def make_cache(path: str | os.PathLike[str], n: int, *, shard_size: str = "2KiB", t: int = 24):
    """A small cache: keys 0..n-1, many shards of a few records each."""
    rng = np.random.default_rng(11)
    with CacheWriter(path, top_k=8, vocab_size=1000, shard_size=shard_size, threads=1) as w:
        for i in range(n):
            w.add(**make_record(i, rng, t=t))
    return str(path)


def keys_of(batch):
    """collate_fn: the keys of a batch of CacheSample (picklable: spawn workers import it)."""
    return [s.key for s in batch]


def chunk_streams(worker_streams: list[list], batch_size: int) -> list:
    """What a DataLoader returns from per-worker streams: batch j from worker j % num_workers
    (its round robin), a worker that is exhausted is skipped."""
    its = [iter(s) for s in worker_streams]
    alive = [True] * len(its)
    out: list = []
    j = 0
    while any(alive):
        w = j % len(its)
        j += 1
        if not alive[w]:
            continue
        chunk = [x for _, x in zip(range(batch_size), its[w], strict=False)]
        if not chunk:
            alive[w] = False
            continue
        out.extend(chunk)
    return out
