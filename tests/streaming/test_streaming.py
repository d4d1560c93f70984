"""StreamingTeacherDataset on a local cache: epoch order, partitioning over ranks and DataLoader
workers (simulated and real, under fork / spawn / forkserver), resume (also with another world
size and through torchdata's StatefulDataLoader) and input errors."""

from __future__ import annotations

import json
import math
import types
from collections import Counter

import numpy as np
import pytest
import torch
from streaming_helpers import chunk_streams, keys_of, make_cache
from torch.utils.data import DataLoader

import target_sft.streaming.dataset as st
import target_sft.streaming.order as so
from target_sft import CacheInputError, CacheMismatchError, CacheSample, StreamingTeacherDataset

N = 203  # records; prime-ish so that no world size / batch size divides it


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("stream") / "c", N)


def ds(cache, **kw):
    kw.setdefault("seed", 3)
    kw.setdefault("shuffle_block_size", 40)
    return StreamingTeacherDataset(cache, **kw)


def keys(dataset):
    return [s.key for s in dataset]


class FakeWorker:
    """Run the dataset as DataLoader worker `id` of `num_workers` without processes."""

    def __init__(self, monkeypatch, wid, num):
        self.mp, self.info = monkeypatch, types.SimpleNamespace(id=wid, num_workers=num)

    def __enter__(self):
        self.mp.setattr(st, "get_worker_info", lambda: self.info)

    def __exit__(self, *a):
        self.mp.setattr(st, "get_worker_info", lambda: None)


def rank_stream(cache, monkeypatch, rank, world, workers, **kw):
    """A rank's samples as its DataLoader returns them, computed from per-worker iterators."""
    streams = []
    for w in range(workers):
        d = ds(cache, rank=rank, world_size=world, **kw)
        with FakeWorker(monkeypatch, w, workers):
            streams.append(keys(d))
    return chunk_streams(streams, kw.get("batch_size", 1))


# --- order ------------------------------------------------------------------------------------


def test_yields_cache_samples_in_a_deterministic_order(cache):
    a = list(ds(cache))
    assert all(isinstance(s, CacheSample) for s in a)
    ka = [s.key for s in a]
    assert sorted(ka) == list(range(N)) and ka != list(range(N))
    assert keys(ds(cache)) == ka  # pure function of (manifest, seed, epoch)
    d = ds(cache)
    d.set_epoch(1)
    kb = keys(d)
    assert sorted(kb) == list(range(N)) and kb != ka
    assert keys(ds(cache, seed=4)) != ka
    assert keys(ds(cache, shuffle=False)) == list(range(N))
    rec = a[0].record()
    assert rec.key == ka[0] and rec.topk_ids.shape[1] == 8


def test_epoch_order_is_pinned():
    """The order is part of the checkpoint format: a change would break resuming old runs."""
    records = np.array([5, 7, 3, 9, 6, 2, 8, 4], dtype=np.int64)
    order = so.EpochOrder(records, seed=3, epoch=0, shuffle=True, block_size=10)
    assert order.shard_perm.tolist() == [7, 3, 6, 1, 5, 0, 4, 2]
    assert order.positions(np.arange(20)).tolist() == [
        41, 40, 18, 43, 42, 15, 19, 17, 16, 20,  # block 0: shard 7, then shard 3's first 6
        38, 37, 34, 33, 21, 36, 35, 32, 23, 22,  # block 1: the rest of 3, shard 6's first 7
    ]  # fmt: skip
    order = so.EpochOrder(records, seed=3, epoch=1, shuffle=True, block_size=10)
    assert order.positions(np.arange(10)).tolist() == [18, 15, 31, 19, 22, 30, 20, 17, 21, 16]
    keys = [np.full(10, so.hash_key(2**64 - 1, r), dtype=np.uint64) for r in range(4)]
    assert so.feistel(np.arange(10, dtype=np.uint64), 10, keys).tolist() == [
        6, 1, 0, 5, 4, 3, 9, 8, 7, 2,
    ]  # fmt: skip
    plain = so.EpochOrder(records, seed=3, epoch=0, shuffle=False, block_size=10)
    assert plain.positions(np.arange(44)).tolist() == list(range(44))
    # block permutations are bijections for any block size (cycle-walking), large ones too
    for n in (1, 2, 3, 17, 1000, 65_537):
        one = so.EpochOrder(np.array([n]), seed=1, epoch=0, shuffle=True, block_size=n)
        assert np.array_equal(np.sort(one.positions(np.arange(n))), np.arange(n))


def test_shuffle_is_bounded_to_blocks_of_records(cache):
    d = ds(cache, shuffle_block_size=30)
    order = so.EpochOrder(d._shard_records, seed=3, epoch=0, shuffle=True, block_size=30)
    pos = order.positions(np.arange(N))
    assert sorted(pos.tolist()) == list(range(N))
    starts = order.starts
    shard_of = {p: int((starts <= p).sum()) - 1 for p in range(N)}
    # each block of 30 records is a permutation of a contiguous range of the shuffled shard
    # sequence, so it touches only the shards that range spans
    min_records = int(d._shard_records.min())
    for b in range(0, N, 30):
        shards = {shard_of[p] for p in pos[b : b + 30].tolist()}
        assert len(shards) <= 30 // min_records + 2
    # a block at least as large as the data set is a full shuffle; 1 only permutes shards
    full = keys(ds(cache, shuffle_block_size=10**9))
    assert sorted(full) == list(range(N))
    by_shard = keys(ds(cache, shuffle_block_size=1))
    runs = [shard_of[k] for k in by_shard]  # keys == positions in this cache
    assert sum(1 for i in range(1, N) if runs[i] != runs[i - 1]) == len(d._shard_records) - 1


# --- partitioning -----------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_partition_the_epoch(cache, world, drop_last):
    b = 4
    per_rank = [
        keys(ds(cache, rank=r, world_size=world, batch_size=b, drop_last=drop_last))
        for r in range(world)
    ]
    lengths = {len(x) for x in per_rank}
    assert len(lengths) == 1  # every rank yields the same number of samples (and batches)
    (n,) = lengths
    assert n == len(ds(cache, rank=0, world_size=world, batch_size=b, drop_last=drop_last))
    full = keys(ds(cache, batch_size=b))
    got = Counter(k for x in per_rank for k in x)
    if drop_last:
        assert n % b == 0 and n == N // (world * b) * b
        assert all(c == 1 for c in got.values())
        assert set(got) == set(full[: n * world])  # a prefix of the epoch order; the rest dropped
    else:
        assert n == -(-N // world)
        assert set(got) == set(range(N))
        pad = n * world - N
        assert sorted(k for k, c in got.items() if c == 2) == sorted(full[:pad])
        assert sum(got.values()) == N + pad
    # position k of the epoch order goes to rank k % world
    for r in range(world):
        assert per_rank[r][: n - 1] == full[r : (n - 1) * world : world]


@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_workers_return_the_rank_stream_in_order(cache, monkeypatch, workers, batch_size):
    for world, drop_last in [(1, False), (2, False), (3, True)]:
        want = keys(
            ds(cache, rank=1 % world, world_size=world, batch_size=batch_size, drop_last=drop_last)
        )
        got = rank_stream(
            cache,
            monkeypatch,
            1 % world,
            world,
            workers,
            batch_size=batch_size,
            drop_last=drop_last,
        )
        assert got == want


@pytest.mark.timeout(180)
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # 3 on 2 cores
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_real_dataloader_workers(cache, method):
    d = ds(cache, rank=1, world_size=2, batch_size=5)
    want = list(DataLoader(d, batch_size=5, collate_fn=keys_of))
    fork = method == "fork"  # spawned workers import torch: fewer of them keep the test fast
    dl = DataLoader(
        d,
        batch_size=5,
        num_workers=3 if fork else 2,
        collate_fn=keys_of,
        multiprocessing_context=method,
    )
    got = list(dl)
    assert got == want and len(got) == len(dl) == math.ceil(math.ceil(N / 2) / 5)
    # the state after k batches resumes exactly, on a fresh loader
    state = d.state_dict(batches_consumed=7)
    json.dumps(state)
    d2 = ds(cache, rank=1, world_size=2, batch_size=5)
    d2.load_state_dict(state)
    rest = list(
        DataLoader(
            d2,
            batch_size=5,
            num_workers=2 if fork else 1,
            collate_fn=keys_of,
            multiprocessing_context=method,
        )
    )
    assert got[:7] + rest == want


# --- resume -----------------------------------------------------------------------------------


@pytest.mark.parametrize("drop_last", [False, True])
def test_resume_in_process_equals_uninterrupted(cache, drop_last):
    want = list(
        DataLoader(ds(cache, batch_size=8, drop_last=drop_last), batch_size=8, collate_fn=keys_of)
    )
    d = ds(cache, batch_size=8, drop_last=drop_last)
    it = iter(DataLoader(d, batch_size=8, collate_fn=keys_of))
    head = [next(it) for _ in range(5)]
    state = d.state_dict()
    assert state["samples_consumed"] == 40 and state == d.state_dict(batches_consumed=5)
    d2 = ds(cache, batch_size=8, drop_last=drop_last)
    d2.load_state_dict(json.loads(json.dumps(state)))
    assert len(d2) == len(want[5:]) * 8 - (0 if drop_last else 8 * len(want) - N)
    assert head + list(DataLoader(d2, batch_size=8, collate_fn=keys_of)) == want
    # end of epoch: nothing remains; set_epoch moves on
    for _ in it:
        pass
    end = d.state_dict()
    assert end["samples_consumed"] == N
    d3 = ds(cache, batch_size=8, drop_last=drop_last)
    d3.load_state_dict(end)
    assert keys(d3) == [] and len(d3) == 0
    d3.set_epoch(1)
    assert len(keys(d3)) == len(d)


@pytest.mark.parametrize(("old", "new"), [(2, 3), (4, 1), (1, 4), (3, 2)])
def test_resume_with_another_world_size_covers_the_rest_once(cache, old, new):
    b = 4
    k = 6  # batches every old rank consumed
    first = []
    for r in range(old):
        d = ds(cache, rank=r, world_size=old, batch_size=b)
        first += keys(d)[: k * b]
    state = ds(cache, rank=0, world_size=old, batch_size=b).state_dict(batches_consumed=k)
    assert state["samples_consumed"] == k * b * old
    rest = []
    lengths = set()
    for r in range(new):
        d = ds(cache, rank=r, world_size=new, batch_size=b)
        d.load_state_dict(state)
        got = keys(d)
        lengths.add(len(got))
        rest += got
    assert len(lengths) == 1
    c = Counter(first + rest)
    assert set(c) == set(range(N))
    remaining = N - k * b * old
    pad = -(-remaining // new) * new - remaining
    assert sum(c.values()) == N + pad and all(v <= 2 for v in c.values())
    # the resumed ranks continue the same epoch order
    full = keys(ds(cache))
    assert sorted(first) == sorted(full[: k * b * old])


def test_set_epoch_keeps_a_resumed_position_only_for_its_epoch(cache):
    d = ds(cache, epoch=2)
    state = d.state_dict(samples_consumed=50)
    assert state["epoch"] == 2 and state["samples_consumed"] == 50
    d2 = ds(cache)
    d2.load_state_dict(state)
    d2.set_epoch(2)  # the usual loop calls set_epoch(epoch) after restoring: keep the position
    assert len(d2) == N - 50
    assert keys(d2) == keys(ds(cache, epoch=2))[50:]
    d2.set_epoch(3)
    assert keys(d2) == keys(ds(cache, epoch=3))
    d2.set_epoch(2)  # back to 2: from its start (the resumed position was dropped)
    assert len(keys(d2)) == N


@pytest.mark.timeout(180)
@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")  # torchdata's
@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_dataloader(cache, workers):
    from torchdata.stateful_dataloader import StatefulDataLoader

    def loader(d):
        return StatefulDataLoader(
            d,
            batch_size=6,
            num_workers=workers,
            collate_fn=keys_of,
            multiprocessing_context="fork" if workers else None,
        )

    want = list(loader(ds(cache, rank=0, world_size=2, batch_size=6)))
    dl = loader(ds(cache, rank=0, world_size=2, batch_size=6))
    it = iter(dl)
    head = [next(it) for _ in range(5)]
    sd = dl.state_dict()
    del it
    # same layout: through the loader's own protocol
    dl2 = loader(ds(cache, rank=0, world_size=2, batch_size=6))
    dl2.load_state_dict(sd)
    assert head + list(dl2) == want
    # another world size: the loader state holds the global position
    g = ds(cache, rank=0, world_size=2, batch_size=6)
    g.load_state_dict(sd)
    assert g.state_dict()["samples_consumed"] == 5 * 6 * 2
    rest = []
    for r in range(3):
        d = ds(cache, rank=r, world_size=3, batch_size=6)
        d.load_state_dict(sd)
        rest += [k for batch in loader(d) for k in batch]
    firsts = []
    for r in range(2):
        firsts += [
            k
            for batch in list(loader(ds(cache, rank=r, world_size=2, batch_size=6)))[:5]
            for k in batch
        ]
    assert set(firsts + rest) == set(range(N))
    assert len(firsts + rest) - N < 3  # padding only


@pytest.mark.timeout(120)
def test_persistent_workers_advance_the_epoch(cache):
    d = ds(cache, batch_size=10)
    dl = DataLoader(
        d,
        batch_size=10,
        num_workers=2,
        collate_fn=keys_of,
        persistent_workers=True,
        multiprocessing_context="fork",
    )
    e0 = [k for b in dl for k in b]
    e1 = [k for b in dl for k in b]
    assert e0 == keys(ds(cache, epoch=0)) and e1 == keys(ds(cache, epoch=1))


# --- errors -----------------------------------------------------------------------------------


def test_state_errors(cache, tmp_path, monkeypatch):
    d = ds(cache)
    s = d.state_dict(samples_consumed=10)
    for change, err in [
        ({"seed": 4}, CacheMismatchError),
        ({"shuffle_block_size": 41}, CacheMismatchError),
        ({"shuffle": False}, CacheMismatchError),
    ]:
        with pytest.raises(err, match=next(iter(change))):
            ds(cache, **change).load_state_dict(s)
    other = StreamingTeacherDataset(make_cache(tmp_path / "o", 20), seed=3, shuffle_block_size=40)
    with pytest.raises(CacheMismatchError, match="another cache"):
        other.load_state_dict(s)
    with pytest.raises(CacheInputError, match="samples_consumed"):
        d.load_state_dict({**s, "samples_consumed": N + 1})
    with pytest.raises(CacheInputError, match="not a StreamingTeacherDataset state"):
        d.load_state_dict({"epoch": 1})
    with pytest.raises(CacheInputError, match="not both"):
        d.state_dict(batches_consumed=1, samples_consumed=1)
    # a worker's own state: only in that worker of that layout
    with FakeWorker(monkeypatch, 1, 2):
        ws = ds(cache, rank=0, world_size=2).state_dict()
    assert ws["worker"]["worker_id"] == 1
    with pytest.raises(CacheInputError, match="one DataLoader worker's state"):
        ds(cache).load_state_dict(ws)
    with FakeWorker(monkeypatch, 1, 3), pytest.raises(CacheInputError, match="fresh"):
        ds(cache, rank=0, world_size=2).load_state_dict(ws)


def test_argument_errors(cache):
    for kw, msg in [
        ({"batch_size": 0}, "batch_size"),
        ({"seed": -1}, "seed"),
        ({"shuffle": 1}, "shuffle"),
        ({"shuffle_block_size": 0}, "shuffle_block_size"),
        ({"rank": 0}, "both"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"cache_limit": "1GiB"}, "remote"),
    ]:
        with pytest.raises(CacheInputError, match=msg):
            StreamingTeacherDataset(cache, **kw)
    with pytest.raises(CacheInputError, match="epoch"):
        ds(cache).set_epoch(-1)


def test_rank_and_world_from_the_environment(cache, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    d = ds(cache)
    assert d.rank_world() == (1, 3)
    assert keys(d) == keys(ds(cache, rank=1, world_size=3))
    assert torch.distributed.is_available()
