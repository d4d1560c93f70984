"""``TargetSFTCollator`` and ``TeacherCacheDataset``: the batches feed ``target_sft_loss`` as they
are (checked against the loss computed from the records in float64), DataLoader workers under
fork/spawn/forkserver, flat worker memory, and errors that name the offending item."""

from __future__ import annotations

import math
import os
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from batch_reference import assert_batches_equal, make_sample, reference_batch
from target_sft import (
    CacheInputError,
    CacheKeyError,
    CacheMismatchError,
    CacheSample,
    CacheWriter,
    TargetSFTCollator,
    TeacherCache,
    TeacherCacheDataset,
    build_batch,
    target_sft_loss,
)

K, V = 8, 300


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    rng = np.random.default_rng(21)
    path = tmp_path_factory.mktemp("collate") / "c"
    with CacheWriter(path, top_k=K, vocab_size=V) as w:
        for i in range(24):
            t = int(rng.integers(2, 40))
            w.add(**make_sample(i if i % 3 else f"doc-{i}", rng, t=t, k=K, vocab=V))
    return TeacherCache(path)


def test_collator_accepts_every_item_kind(cache):
    recs = cache.records_at(range(6))
    items = [
        CacheSample(cache, 0),
        recs[1].key,
        {"key": recs[2].key},
        {"key": recs[3].key, "input_ids": torch.from_numpy(recs[3].input_ids).long()},
        recs[4],
        np.int64(recs[5].key) if isinstance(recs[5].key, int) else recs[5].key,
    ]
    collate = TargetSFTCollator(cache, pad_token_id=0, pad_to_multiple_of=8)
    got = collate(items)
    assert all(isinstance(v, torch.Tensor) for v in got.values())
    assert got["teacher_ids"].dtype == torch.int32 and got["input_ids"].dtype == torch.int64
    want = reference_batch(recs, pad_to_multiple_of=8)
    assert_batches_equal({k: v.numpy() for k, v in got.items()}, want)
    as_np = TargetSFTCollator(cache, pad_token_id=0, pad_to_multiple_of=8, return_tensors="np")
    assert_batches_equal(as_np(items), want)


def per_token_reference(logits, recs, places, lengths, eta, label_in_support):
    """TARGET-SFT from the records themselves, in float64, mean over supervised tokens:
    ℓ = lse − p_y z_y − (1 − p_y) Σ_{a∈S} π̃(a) z_a with π̃ ∝ exp((1−η)(z_a − lse) + η log π_T(a))
    and (γ, π̃) held fixed, so the gradient is p − Q."""
    rows, cols, ys, supports, lts = [], [], [], [], []
    for rec, (row, off), n in zip(recs, places, lengths, strict=True):
        for r, t in enumerate(rec.supervised_positions):
            if t >= n:
                break
            valid = rec.topk_ids[r] >= 0
            ids = list(rec.topk_ids[r][valid])
            lt = list(rec.topk_logprobs[r][valid])
            y = int(rec.labels[t])
            if label_in_support and y not in ids:
                ids.append(y)
                lt.append(rec.label_logprobs[r])
            rows.append(row)
            cols.append(off + t - 1)  # the logits that predict position t
            ys.append(y)
            supports.append(ids)
            lts.append(lt)
    w = max(len(s) for s in supports)
    ids = torch.tensor([s + [0] * (w - len(s)) for s in supports])
    lt = torch.tensor(
        [[float(x) for x in lt] + [-math.inf] * (w - len(lt)) for lt in lts], dtype=torch.float64
    )
    z = logits[torch.tensor(rows), torch.tensor(cols)]  # [N, V]
    y = torch.tensor(ys)[:, None]
    lse = torch.logsumexp(z, -1)
    zs = z.gather(1, ids)
    with torch.no_grad():
        p_y = torch.exp(z.gather(1, y)[:, 0] - lse)
        pi = torch.softmax((1 - eta) * (zs - lse[:, None]) + eta * lt, -1)
    loss = lse - p_y * z.gather(1, y)[:, 0] - (1 - p_y) * (pi * zs).sum(-1)
    return loss.mean()


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("label_in_support", [False, True])
def test_collated_batch_plugs_into_target_sft_loss(cache, packing, label_in_support):
    from batch_reference import first_fit

    positions = [3, 1, 4, 15, 9, 2, 6, 5]
    recs = cache.records_at(positions)
    max_length = 48
    collate = TargetSFTCollator(
        cache,
        pad_token_id=0,
        max_length=max_length,
        packing=packing,
        label_in_support=label_in_support,
    )
    batch = collate(TeacherCacheDataset(cache).__getitems__(positions))
    lengths = [min(r.n_tokens, max_length) for r in recs]
    places = first_fit(lengths, max_length) if packing else [(i, 0) for i in range(len(recs))]
    g = torch.Generator().manual_seed(0)
    b, length = batch["labels"].shape
    base = 3.0 * torch.randn(b, length, V, generator=g, dtype=torch.float64)
    for eta in (0.5, 1.0):
        z1 = base.clone().requires_grad_(True)
        loss = target_sft_loss(
            z1, batch["labels"], batch["teacher_ids"], batch["teacher_logprobs"], eta=eta
        )
        loss.backward()
        z2 = base.clone().requires_grad_(True)
        ref = per_token_reference(z2, recs, places, lengths, eta, label_in_support)
        ref.backward()
        torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(z1.grad, z2.grad, atol=1e-12, rtol=1e-12)


def test_label_column_changes_the_loss_only_where_the_label_is_outside(cache):
    items = TeacherCacheDataset(cache).__getitems__(range(10))
    plain = TargetSFTCollator(cache, pad_token_id=0, label_in_support=False)(items)
    wide = TargetSFTCollator(cache, pad_token_id=0)(items)  # the default: the label column
    torch.testing.assert_close(wide["teacher_ids"][..., :K], plain["teacher_ids"])
    outside = wide["teacher_ids"][..., K] >= 0
    assert 0 < int(outside.sum()) < int((plain["labels"] != -100).sum())
    z = torch.randn(*plain["labels"].shape, V, dtype=torch.float64)
    a = target_sft_loss(
        z, plain["labels"], plain["teacher_ids"], plain["teacher_logprobs"], reduction="none"
    )
    b = target_sft_loss(
        z, wide["labels"], wide["teacher_ids"], wide["teacher_logprobs"], reduction="none"
    )
    differs = (a - b).abs() > 1e-12  # loss row t - 1 predicts label t
    assert torch.equal(differs[:, :-1], outside[:, 1:])


# ----------------------------------------------------------------------------- DataLoader
def collate_all(cache, batches, **kw):
    c = TargetSFTCollator(cache, pad_token_id=1, **kw)
    return [c(TeacherCacheDataset(cache).__getitems__(b)) for b in batches]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("method", "slots"), [("fork", 8), ("fork", 0), ("spawn", 8), ("forkserver", 8)]
)
def test_dataloader_workers(cache, method, slots):
    ds = TeacherCacheDataset(cache)
    kw = {"max_length": 32, "packing": True}
    # the parent uses the decode pool before forking (rayon's global pool would hang here)
    collate = TargetSFTCollator(cache, pad_token_id=1, threads=2, shared_memory_slots=slots, **kw)
    collate([CacheSample(cache, i) for i in range(8)])
    dl = DataLoader(
        ds,
        batch_size=5,
        num_workers=2,
        collate_fn=collate,
        multiprocessing_context=method,
    )
    got = list(dl)
    want = collate_all(cache, [range(i, min(i + 5, len(ds))) for i in range(0, len(ds), 5)], **kw)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for k in w:
            if isinstance(w[k], torch.Tensor):
                assert torch.equal(g[k], w[k]), k
            else:
                assert g[k] == w[k], k
    # tensors built in a worker come back through shared memory
    assert got[0]["teacher_ids"].is_shared()


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")  # pragma: no cover


class RssCollator(TargetSFTCollator):
    """Reports the worker's resident memory with each batch."""

    def __call__(self, items):
        out = super().__call__(items)
        out["rss_kib"] = _rss_kib()
        out["pid"] = os.getpid()
        return out


@pytest.mark.timeout(120)
def test_worker_memory_stays_flat_over_thousands_of_batches(cache):
    ds = TeacherCacheDataset(cache)
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=4 * 2000)
    dl = DataLoader(
        ds,
        batch_size=4,
        sampler=sampler,
        num_workers=1,
        collate_fn=RssCollator(cache, pad_token_id=0, max_length=64, label_in_support=True),
        multiprocessing_context="fork",
    )
    rss = {}
    for i, b in enumerate(dl):
        assert b["pid"] != os.getpid()
        rss[i] = b["rss_kib"]
    assert len(rss) == 2000
    early, late = rss[200], max(rss[i] for i in range(1900, 2000))
    assert late - early < 4 * 1024, f"worker RSS grew from {early} KiB to {late} KiB"


class AllocCollator(TargetSFTCollator):
    """Reports how many shared-memory storages the worker has created so far."""

    def __call__(self, items):
        from target_sft import _shm

        out = super().__call__(items)
        out["allocations"] = _shm.worker_pool(self.shared_memory_slots).allocations
        return out


@pytest.mark.timeout(120)
def test_worker_shared_memory_is_recycled_and_never_overwritten(cache):
    ds = TeacherCacheDataset(cache)
    kw = {"max_length": 64, "label_in_support": True}
    batches = [[(7 * i + j) % len(ds) for j in range(4)] for i in range(80)]
    want = [build_batch(ds.__getitems__(b), **kw) for b in batches]
    dl = DataLoader(
        ds,
        batch_sampler=batches,
        num_workers=1,
        collate_fn=AllocCollator(cache, pad_token_id=0, shared_memory_slots=8, **kw),
        multiprocessing_context="fork",
    )

    def check(i, got):
        for name, w in want[i].items():
            if isinstance(w, np.ndarray):
                np.testing.assert_array_equal(got[name].numpy(), w, err_msg=f"batch {i} {name}")

    kept, views = [], []
    for i, b in enumerate(dl):
        check(i, b)
        if i in (10, 40):
            kept.append((i, b))  # held to the end: their slots must not be reused
        if i == 25:
            views.append((i, {"teacher_ids": b["teacher_ids"][:, 1:]}))  # a view alone holds too
        allocations = b["allocations"]
    for i, b in kept:
        check(i, b)
    for i, v in views:
        np.testing.assert_array_equal(v["teacher_ids"].numpy(), want[i]["teacher_ids"][:, 1:])
    # the batches not held went back to the pool: a fraction of one storage per output per
    # batch (8 slots x 5 outputs, plus regrowth for longer batches and fallbacks; 52 when written)
    assert allocations <= len(batches) * 5 // 4, allocations


# ----------------------------------------------------------------------------- errors
def test_token_hash_mismatch_names_the_key(cache):
    rec = cache.record_at(4)
    collate = TargetSFTCollator(cache, pad_token_id=0)
    ids = rec.input_ids.copy()
    ids[-1] = (ids[-1] + 1) % V
    n = len(ids)
    with pytest.raises(
        CacheMismatchError,
        match=rf"batch item 1 \(key {rec.key}\): the batch's ids differ .* at position {n - 1} ",
    ):
        collate([CacheSample(cache, 0), {"key": rec.key, "input_ids": ids}])
    # a truncated sample is reported as a truncation, not as changed data
    with pytest.raises(
        CacheMismatchError,
        match=rf"the batch's ids are a prefix of the cached ids \({n - 1} of {n} tokens\).*"
        rf"max_length={n - 1}",
    ):
        collate([{"key": rec.key, "input_ids": rec.input_ids[:-1]}])


def test_labels_given_with_a_key_are_checked(cache):
    rec = next(r for r in map(cache.record_at, range(len(cache))) if r.n_supervised > 0)
    collate = TargetSFTCollator(cache, pad_token_id=0)
    b = collate([{"key": rec.key, "input_ids": rec.input_ids, "labels": rec.labels}])
    np.testing.assert_array_equal(b["labels"][0, 1:].numpy(), rec.labels[1:])
    t = int(rec.supervised_positions[0])
    labels = rec.labels.copy()
    labels[t] = -100
    with pytest.raises(
        CacheMismatchError,
        match=r"batch item 0 \(key .*\): the batch's labels differ from the cached labels at position "
        rf"{t} \(batch -100 \(not supervised\), cache {rec.labels[t]} \(supervised\)",
    ):
        collate([{"key": rec.key, "input_ids": rec.input_ids, "labels": labels}])


def test_unknown_key_and_bad_items(cache):
    collate = TargetSFTCollator(cache, pad_token_id=0)
    with pytest.raises(CacheKeyError, match='batch item 2: key "nope" is not in the cache'):
        collate([1, 2, "nope"])
    with pytest.raises(KeyError):  # CacheKeyError is a KeyError
        collate([10**12])
    with pytest.raises(TypeError, match=r"batch item 1 is a float \(1\.5\)"):
        collate([1, 1.5])
    with pytest.raises(TypeError, match="batch item 0 is a bool"):
        collate([True])
    with pytest.raises(TypeError, match="batch item 0 is a list"):
        collate([[1, 2]])
    with pytest.raises(CacheInputError, match="batch item 1 is a dict without a 'key' entry"):
        collate([1, {"input_ids": [1, 2]}])
    with pytest.raises(CacheInputError, match=r"batch item 0 .*input_ids must be 1-D"):
        collate([{"key": 1, "input_ids": np.zeros((2, 2), np.int32)}])
    with pytest.raises(CacheInputError, match="no cache was given"):
        TargetSFTCollator(pad_token_id=0)([3])
    with pytest.raises(CacheInputError, match="packing=True needs max_length"):
        TargetSFTCollator(cache, pad_token_id=0, packing=True)
    with pytest.raises(CacheInputError, match="pad_token_id must be an int"):
        TargetSFTCollator(cache, pad_token_id="0")
    with pytest.raises(CacheInputError, match=r"pad_token_id is required.*tokenizer with a pad"):
        TargetSFTCollator(cache)  # neither a pad id nor a tokenizer
    with pytest.raises(CacheInputError, match='return_tensors must be "pt" or "np"'):
        TargetSFTCollator(cache, pad_token_id=0, return_tensors="tf")


def test_dataset_indexing_and_pickling(cache):
    ds = TeacherCacheDataset(cache.path)
    assert len(ds) == len(cache)
    assert ds[-1] == CacheSample(ds.cache, len(cache) - 1)
    assert ds[np.int64(2)].position == 2
    with pytest.raises(IndexError, match="index 24 is out of range for 24 records"):
        ds[24]
    with pytest.raises(TypeError):
        ds["a"]
    clone = pickle.loads(pickle.dumps(ds))
    assert len(clone) == len(ds) and clone.cache.path == ds.cache.path
    collate = pickle.loads(pickle.dumps(TargetSFTCollator(cache.path, pad_token_id=0)))
    assert_batches_equal(
        {k: v.numpy() for k, v in collate([clone[0], clone[1]]).items()},
        build_batch([ds[0], ds[1]]),
    )
