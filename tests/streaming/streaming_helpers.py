"""Helpers shared by the streaming tests and the processes they start (importable by spawned
DataLoader workers and by `torchrun` children: keep it free of pytest)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: conftest
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # these helpers

from conftest import make_record
from target_sft import CacheWriter


def make_cache(
    path: str | os.PathLike[str],
    n: int,
    *,
    shard_size: str = "2KiB",
    t: int = 24,
    tokenizer: str | None = None,
):
    """A small cache: keys 0..n-1, many shards of a few records each."""
    rng = np.random.default_rng(11)
    with CacheWriter(
        path, top_k=8, vocab_size=1000, shard_size=shard_size, threads=1, tokenizer=tokenizer
    ) as w:
        for i in range(n):
            w.add(**make_record(i, rng, t=t))
    return str(path)


def set_role(path: str | os.PathLike[str], role: str | None) -> None:
    """Write the manifest's ``role`` field (``None``: remove it), sealed as docs/FORMAT.md §1
    says (by hand: the seal is XXH3-64 of the text before the ``manifest_checksum`` member)."""
    import xxhash

    p = os.path.join(path, "manifest.json")
    with open(p) as f:
        m = json.load(f)
    m.pop("manifest_checksum", None)
    m.pop("role", None)
    if role is not None:
        m["role"] = role
    body = json.dumps(m, indent=2)
    head = body[: body.rindex("}")].rstrip() + ",\n  "
    seal = xxhash.xxh3_64_hexdigest(head.encode())
    with open(p, "w") as f:
        f.write(f'{head}"manifest_checksum": "xxh3-64:{seal}"\n}}\n')


def make_reference_cache(
    path: str | os.PathLike[str],
    keys,
    *,
    shard_size: str = "3KiB",
    role: str | None = "reference",
    seed: int = 29,
    vocab_size: int = 1000,
    tokenizer: str | None = None,
    t: int = 24,
    temperature: float = 1.0,
):
    """A reference cache over ``keys`` (written in that order, other record contents than
    :func:`make_cache`'s, another shard size), with the manifest ``role`` and ``temperature``."""
    rng = np.random.default_rng(seed)
    with CacheWriter(
        path,
        top_k=8,
        vocab_size=vocab_size,
        shard_size=shard_size,
        threads=1,
        tokenizer=tokenizer,
        temperature=temperature,
    ) as w:
        for k in keys:
            w.add(**make_record(int(k), rng, t=t, vocab=min(vocab_size, 1000)))
    set_role(path, role)
    return str(path)


def reference_view(batch):
    """collate_fn: per sample (key, reference key, reference record's input_ids, topk_ids)."""
    out = []
    for s in batch:
        r = s.reference.record()
        out.append((s.key, s.reference.key, r.input_ids.tolist(), r.topk_ids.tolist()))
    return out


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
