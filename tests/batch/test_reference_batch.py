"""Batches with a reference cache (docs/DATA.md §Several caches): the ``reference_*`` tensors are
the reference records decoded one by one and placed like the teacher rows (padded and packed, with
and without the label column), ``sequence_ids`` name each position's item, every alignment error
names the key, and DataLoader workers (shared memory) give the main process's batches."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from batch_reference import (
    assert_batches_equal,
    make_rows,
    reference_batch,
    write_reference_cache,
    write_sample_cache,
)
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
)

K, KR, V = 8, 5, 300

LAYOUTS = [
    {},
    {"max_length": 24, "pad_to_multiple_of": 8},
    {"packing": True, "max_length": 48},
    {"packing": True, "max_length": 40, "padding": "max_length", "pad_to_multiple_of": 16},
]


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("refbatch")
    teacher = write_sample_cache(root / "t", 20, seed=3, k=K, vocab=V, lengths=(2, 40))
    reference = write_reference_cache(root / "r", teacher, seed=4, k=KR)
    return teacher, reference


def ref_records(teacher, reference, positions):
    """The reference records of the teacher's records at ``positions``, looked up by key one by
    one (the numpy reference's side)."""
    return [reference.get(teacher.key_at(p)) for p in positions]


@pytest.mark.parametrize("label_in_support", [False, True])
@pytest.mark.parametrize("opts", LAYOUTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_reference_tensors_are_the_reference_records_placed_like_the_teacher(
    caches, opts, label_in_support
):
    teacher, reference = caches
    order = [7, 0, 13, 2, 19, 5, 11]
    want = reference_batch(
        teacher.records_at(order),
        label_in_support=label_in_support,
        references=ref_records(teacher, reference, order),
        **opts,
    )
    ds = TeacherCacheDataset(teacher, reference=reference)
    kw = {"label_in_support": label_in_support, **opts}
    # the dataset's attached references, a lookup by key in reference=, keys and dicts
    assert_batches_equal(build_batch(ds.__getitems__(order), **kw), want)
    plain = [CacheSample(teacher, p) for p in order]
    assert_batches_equal(build_batch(plain, reference=reference, **kw), want)
    keys = [teacher.key_at(p) for p in order]
    assert_batches_equal(build_batch(keys, teacher=teacher, reference=reference, **kw), want)
    dicts = [{"key": k} for k in keys]
    assert_batches_equal(build_batch(dicts, cache=teacher, reference=reference, **kw), want)
    # without a reference the batch is the teacher's alone (sequence_ids included)
    alone = build_batch(plain, **kw)
    assert sorted(alone) == sorted(k for k in want if not k.startswith("reference_"))
    assert_batches_equal(alone, {k: v for k, v in want.items() if k in alone})


def test_sequence_ids_and_sample_keys(caches):
    teacher, reference = caches
    order = [3, 1, 4, 15, 9, 2, 6]
    collate = TargetSFTCollator(
        teacher, reference=reference, pad_token_id=0, packing=True, max_length=48, return_keys=True
    )
    b = collate(TeacherCacheDataset(teacher).__getitems__(order))
    seq, keys = b["sequence_ids"], b["sample_keys"]
    assert seq.dtype == torch.int64 and keys == [teacher.key_at(p) for p in order]
    assert sorted(set(seq.flatten().tolist()) - {-1}) == list(range(len(order)))
    # every item's tokens, wherever packing put them, are where sequence_ids says
    for i, p in enumerate(order):
        ids = b["input_ids"][seq == i]
        np.testing.assert_array_equal(ids.numpy(), teacher.record_at(p).input_ids)
    assert (b["input_ids"][seq == -1] == 0).all()
    padded = TargetSFTCollator(teacher, pad_token_id=0)(
        [CacheSample(teacher, p) for p in order[:3]]
    )
    lens = [teacher.record_at(p).n_tokens for p in order[:3]]
    for b_, n in enumerate(lens):
        row = padded["sequence_ids"][b_]
        assert (row[:n] == b_).all() and (row[n:] == -1).all()


def test_dataset_pickles_and_splits_with_its_reference(caches):
    teacher, reference = caches
    ds = TeacherCacheDataset(teacher, reference=reference)
    s = ds[4]
    assert s.reference is not None and s.reference.key == s.key
    back = pickle.loads(pickle.dumps(s))
    assert back.position == s.position and back.reference.position == s.reference.position
    assert back.reference.cache.path == reference.path
    ds2 = pickle.loads(pickle.dumps(ds))
    assert ds2[4].reference.position == s.reference.position
    train, held = ds.split_by_key(0.3, seed=1)
    for part in (train, held):
        for i in range(len(part)):
            assert part[i].reference.key == part[i].key
    assert "reference=" in repr(ds)


# ----------------------------------------------------------------------------- errors
def edited_reference(tmp_path, teacher, edit, name="r"):
    """A reference cache of ``teacher``'s samples whose record at position 0 is changed by
    ``edit(input_ids, labels)`` (in place), rows remade for its labels."""
    rng = np.random.default_rng(0)
    with CacheWriter(tmp_path / name, top_k=KR, vocab_size=V, role="reference") as w:
        for i, r in enumerate(teacher.records_at(range(len(teacher)))):
            ids, labels = r.input_ids.copy(), r.labels.copy()
            if i == 0:
                edit(ids, labels)
            w.add(r.key, ids, labels, **make_rows(labels, rng, k=KR, vocab=V))
    return TeacherCache(tmp_path / name)


def supervised(labels):
    return np.flatnonzero(labels[1:] != -100) + 1


@pytest.mark.parametrize(
    ("what", "edit", "message"),
    [
        (
            "tokens",
            lambda ids, labels: ids.__setitem__(0, (ids[0] + 1) % V),
            "the reference record's tokens differ from the teacher record's at position 0",
        ),
        (
            "labels",
            lambda ids, labels: labels.__setitem__(
                supervised(labels)[-1], (labels[supervised(labels)[-1]] + 1) % V
            ),
            "the reference record's labels differ from the teacher record's at position",
        ),
        (
            "supervision",
            lambda ids, labels: labels.__setitem__(supervised(labels)[-1], -100),
            "supervised tokens but the teacher record has",
        ),
    ],
)
def test_a_reference_record_of_another_sample_is_refused(caches, tmp_path, what, edit, message):
    teacher, _ = caches
    assert supervised(teacher.record_at(0).labels).size >= 2
    ref = edited_reference(tmp_path, teacher, edit)
    key = teacher.key_at(0)
    for items in (
        [CacheSample(teacher, 1), CacheSample(teacher, 0)],
        TeacherCacheDataset(teacher, reference=ref).__getitems__([1, 0]),
    ):
        with pytest.raises(CacheMismatchError) as e:
            build_batch(items, reference=ref)
        text = str(e.value)
        assert text.startswith(f'batch item 1 (key "{key}"): '), text
        assert message in text, text
        assert str(teacher.path) in text and str(ref.path) in text, text


def test_a_key_missing_from_the_reference_cache_is_named(caches, tmp_path):
    teacher, _ = caches
    with CacheWriter(tmp_path / "part", top_k=KR, vocab_size=V, role="reference") as w:
        rng = np.random.default_rng(1)
        for r in teacher.records_at(range(1, len(teacher))):  # all but position 0
            w.add(r.key, r.input_ids, r.labels, **make_rows(r.labels, rng, k=KR, vocab=V))
    part = TeacherCache(tmp_path / "part")
    key = teacher.key_at(0)
    with pytest.raises(
        CacheKeyError,
        match=f"key '{key}' of the teacher cache at .* is not in the reference cache at .*part",
    ):
        TeacherCacheDataset(teacher, reference=part)
    with pytest.raises(
        CacheKeyError, match=f"batch item 1: key '{key}' is not in the reference cache at .*part"
    ):
        build_batch([teacher.key_at(2), key], cache=teacher, reference=part)
    collate = TargetSFTCollator(teacher, reference=part, pad_token_id=0)
    with pytest.raises(CacheKeyError, match="is not in the reference cache"):
        collate([CacheSample(teacher, 0)])


def test_roles_must_match_their_slots(caches):
    teacher, reference = caches
    assert (teacher.role, reference.role) == ("teacher", "reference")
    with pytest.raises(
        CacheMismatchError,
        match=r"TargetSFTCollator\(teacher=...\): the cache at .* holds a reference .* passed as the teacher",
    ):
        TargetSFTCollator(reference, pad_token_id=0)
    with pytest.raises(
        CacheMismatchError,
        match=r"TargetSFTCollator\(reference=...\): the cache at .* holds a teacher .* passed as the reference",
    ):
        TargetSFTCollator(teacher, reference=teacher, pad_token_id=0)
    with pytest.raises(CacheMismatchError, match=r"TeacherCacheDataset: .* holds a reference"):
        TeacherCacheDataset(reference, reference=reference)
    with pytest.warns(UserWarning, match=r"holds a teacher .* passed as the reference"):
        c = TargetSFTCollator(teacher, reference=teacher, pad_token_id=0, allow_role_mismatch=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = c([CacheSample(teacher, 1)])
    np.testing.assert_array_equal(b["reference_ids"].numpy(), b["teacher_ids"].numpy())
    # a batch's items are checked too: a reference-role cache as an item's teacher
    collate = TargetSFTCollator(pad_token_id=0)
    with pytest.raises(
        CacheMismatchError, match=r"batch item 0: the cache at .* holds a reference"
    ):
        collate([CacheSample(reference, 0)])
    with pytest.raises(CacheMismatchError, match=r"batch item 0's reference: .* holds a teacher"):
        collate([CacheSample(teacher, 0, CacheSample(teacher, 0))])


def test_a_reference_cached_at_another_temperature_is_refused(caches, tmp_path):
    """π_ref is the reference model's softmax at temperature 1: a reference cache built at T = 2
    holds another distribution and would shift every importance weight silently."""
    teacher, _ = caches
    hot = write_reference_cache(tmp_path / "hot", teacher, seed=4, k=KR, temperature=2.0)
    assert hot.info.temperature == 2.0
    match = (
        r"the reference cache at .*hot was built at temperature 2.*rebuild it with temperature=1"
    )
    with pytest.raises(CacheMismatchError, match=r"TargetSFTCollator\(reference=...\): " + match):
        TargetSFTCollator(teacher, reference=hot, pad_token_id=0)
    with pytest.raises(CacheMismatchError, match=r"TeacherCacheDataset: " + match):
        TeacherCacheDataset(teacher, reference=hot)
    collate = TargetSFTCollator(pad_token_id=0)
    with pytest.raises(CacheMismatchError, match=r"batch item 0's reference: " + match):
        collate([CacheSample(teacher, 0, CacheSample(hot, 0))])
    with pytest.warns(UserWarning, match=match):
        TargetSFTCollator(teacher, reference=hot, pad_token_id=0, allow_role_mismatch=True)
    # a teacher may be cached at any temperature (distillation at T = 2)
    warm_teacher = write_reference_cache(
        tmp_path / "warm", teacher, seed=5, k=K, temperature=2.0, role="teacher"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TargetSFTCollator(warm_teacher, pad_token_id=0)


def test_items_with_and_without_a_reference_do_not_mix(caches):
    teacher, reference = caches
    ds = TeacherCacheDataset(teacher, reference=reference)
    with pytest.raises(
        CacheInputError, match="batch item 0 carries a reference record but batch item 1"
    ):
        build_batch([ds[0], CacheSample(teacher, 1)])
    # a CacheRecord cannot be paired with a reference record
    with pytest.raises(CacheInputError, match="batch item 1 is a CacheRecord"):
        build_batch([ds[0], teacher.record_at(1)], reference=reference)
    with pytest.raises(CacheInputError, match="cache= is the old name of teacher="):
        TargetSFTCollator(teacher, cache=reference, pad_token_id=0)
    with pytest.raises(CacheInputError, match="cache= is the old name of teacher="):
        build_batch([0], teacher=teacher, cache=reference)
    same = TargetSFTCollator(teacher, cache=teacher, pad_token_id=0)
    assert same.teacher is teacher and same.cache is teacher


# ----------------------------------------------------------------------------- DataLoader
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("method", "slots"), [("fork", 8), ("fork", 0), ("spawn", 8)])
def test_dataloader_workers_give_the_main_process_batches(caches, method, slots):
    teacher, reference = caches
    ds = TeacherCacheDataset(teacher, reference=reference)
    kw = {"max_length": 32, "packing": True, "return_keys": True}
    collate = TargetSFTCollator(
        teacher, reference=reference, pad_token_id=1, threads=2, shared_memory_slots=slots, **kw
    )
    collate(ds.__getitems__(range(4)))  # the decode pool is used before forking
    dl = DataLoader(
        ds, batch_size=6, num_workers=2, collate_fn=collate, multiprocessing_context=method
    )
    got = list(dl)
    main = TargetSFTCollator(teacher, reference=reference, pad_token_id=1, **kw)
    want = [main(ds.__getitems__(range(i, min(i + 6, len(ds))))) for i in range(0, len(ds), 6)]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        assert {"reference_ids", "reference_logprobs", "reference_label_logprobs"} <= set(w)
        for k in w:
            if isinstance(w[k], torch.Tensor):
                assert torch.equal(g[k], w[k]), k
            else:
                assert g[k] == w[k], k
    if slots:
        assert got[0]["reference_logprobs"].is_shared()
