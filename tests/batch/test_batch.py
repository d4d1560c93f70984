"""The native batch builder (``target_sft.build_batch``): every output tensor equals a numpy
reference built from ``cache.records_at`` (tests/batch_reference.py), for both codecs, padded and
packed layouts, truncation, the label column, several caches and caller-provided buffers."""

from __future__ import annotations

import numpy as np
import pytest

from batch_reference import assert_batches_equal, make_sample, reference_batch
from target_sft import (
    CacheInputError,
    CacheKeyError,
    CacheMismatchError,
    CacheSample,
    CacheWriter,
    TeacherCache,
    build_batch,
)

K, V = 8, 1000


def write_cache(path, codec: str, seed: int, n: int = 14, k: int = K, key_prefix: str = ""):
    rng = np.random.default_rng(seed)
    with CacheWriter(path, top_k=k, vocab_size=V, codec=codec) as w:
        for i in range(n):
            t = int(rng.choice([1, 2, 3, 7, 20, 33, 45, 61]))
            # every 5th record has no supervised token at all
            w.add(**make_sample(f"{key_prefix}{i}", rng, t=t, k=k, vocab=V, supervised=i % 5 != 3))
    return TeacherCache(path)


@pytest.fixture(scope="module", params=["compact", "exact"])
def cache(request, tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("batch") / "c", request.param, seed=11)


@pytest.fixture(scope="module")
def two_caches(tmp_path_factory):
    d = tmp_path_factory.mktemp("two")
    return write_cache(d / "a", "compact", 3, 6, key_prefix="a"), write_cache(
        d / "b", "exact", 4, 6, key_prefix="b"
    )


def samples(cache: TeacherCache, positions) -> list[CacheSample]:
    return [CacheSample(cache, p) for p in positions]


PADDED = [
    {},
    {"pad_to_multiple_of": 8},
    {"pad_to_multiple_of": 64},
    {"max_length": 12},  # truncation
    {"max_length": 40, "padding": "max_length"},
    {"max_length": 25, "pad_to_multiple_of": 8, "pad_token_id": 5},
]
PACKED = [
    {"max_length": 64},
    {"max_length": 50, "pad_to_multiple_of": 8},
    {"max_length": 30},  # samples longer than a row are truncated
    {"max_length": 70, "padding": "max_length", "pad_token_id": 3},
]


@pytest.mark.parametrize("label_in_support", [False, True])
@pytest.mark.parametrize("opts", PADDED, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_padded_equals_reference(cache, opts, label_in_support):
    pos = list(range(len(cache)))
    got = build_batch(samples(cache, pos), label_in_support=label_in_support, **opts)
    want = reference_batch(cache.records_at(pos), label_in_support=label_in_support, **opts)
    assert_batches_equal(got, want)
    assert got["labels"].shape[1] % opts.get("pad_to_multiple_of", 1) == 0


@pytest.mark.parametrize("label_in_support", [False, True])
@pytest.mark.parametrize("opts", PACKED, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_packed_equals_reference(cache, opts, label_in_support):
    pos = list(range(len(cache)))[::-1]
    got = build_batch(samples(cache, pos), packing=True, label_in_support=label_in_support, **opts)
    want = reference_batch(
        cache.records_at(pos), packing=True, label_in_support=label_in_support, **opts
    )
    assert_batches_equal(got, want)
    # nothing is supervised across a sample boundary: every segment start has label -100
    flat = got["labels"].reshape(-1)
    assert (flat[got["cu_seqlens"][:-1]] == -100).all()
    assert got["cu_seqlens"][-1] == got["labels"].size


def test_supervised_positions_carry_exactly_the_teacher_rows(cache):
    pos = list(range(len(cache)))
    b = build_batch(samples(cache, pos), label_in_support=True)
    sup = b["labels"] != -100
    has_row = b["teacher_ids"][..., :K].max(-1) >= 0
    assert (sup == has_row).all()
    recs = cache.records_at(pos)
    assert int(sup.sum()) == sum(r.n_supervised for r in recs)
    # the label column holds the label exactly where it is outside the top-k
    lab = b["teacher_ids"][..., K]
    outside = sup & ~(b["teacher_ids"][..., :K] == b["labels"][..., None]).any(-1)
    assert ((lab >= 0) == outside).all()
    np.testing.assert_array_equal(lab[outside], b["labels"][outside])


def test_records_without_supervision_and_one_token(cache):
    recs = cache.records_at(range(len(cache)))
    picks = [i for i, r in enumerate(recs) if r.n_supervised == 0 or r.n_tokens == 1]
    assert any(recs[i].n_tokens == 1 for i in picks) and any(recs[i].n_tokens > 1 for i in picks)
    for packing in (False, True):
        got = build_batch(samples(cache, picks), packing=packing, max_length=64)
        want = reference_batch([recs[i] for i in picks], packing=packing, max_length=64)
        assert_batches_equal(got, want)
        assert (got["labels"] == -100).all() and (got["teacher_ids"] == -1).all()


def test_samples_from_two_caches_keys_and_records(two_caches):
    a, b = two_caches
    items = [
        CacheSample(a, 0),
        CacheSample(b, 1),
        b.record_at(2),  # already read
        {"key": "a3", "input_ids": a.record_at(3).input_ids},  # looked up in `cache`
        "a4",
        CacheSample(b, 5),
    ]
    recs = [a.record_at(0), b.record_at(1), b.record_at(2), a.record_at(3), a.record_at(4)]
    recs.append(b.record_at(5))
    for packing in (False, True):
        for lis in (False, True):
            kw = {"packing": packing, "max_length": 80, "label_in_support": lis}
            got = build_batch(items, cache=a, **kw)
            assert_batches_equal(got, reference_batch(recs, **kw))


def test_threads_do_not_change_the_batch(cache):
    pos = list(range(len(cache)))
    one = build_batch(samples(cache, pos), threads=1, packing=True, max_length=64)
    two = build_batch(samples(cache, pos), threads=2, packing=True, max_length=64)
    assert_batches_equal(one, two)


def test_caller_buffers_are_filled_and_returned_as_views(cache):
    pos = list(range(len(cache)))
    want = reference_batch(cache.records_at(pos), label_in_support=True, pad_to_multiple_of=8)
    b, length = want["labels"].shape
    big = 2 * b * length
    out = {
        "input_ids": np.full(big, 99, np.int64),
        "attention_mask": np.full(big, 99, np.int64),
        "labels": np.full((2, b * length), 99, np.int64),  # any shape, C-contiguous
        "teacher_ids": np.full(big * (K + 1), 99, np.int32),
        # teacher_logprobs not given: allocated
    }
    got = build_batch(samples(cache, pos), label_in_support=True, pad_to_multiple_of=8, out=out)
    assert_batches_equal(got, want)
    for name, buf in out.items():
        assert np.shares_memory(got[name], buf), name
        assert (buf.reshape(-1)[got[name].size :] == 99).all()  # nothing past the batch touched
    # a callable allocator
    seen = []

    def alloc(name, shape, dtype):
        seen.append((name, shape, dtype))
        return np.empty(shape, np.dtype(dtype))

    got = build_batch(samples(cache, pos), label_in_support=True, pad_to_multiple_of=8, out=alloc)
    assert_batches_equal(got, want)
    assert {s[0] for s in seen} == set(want) and (
        "teacher_ids",
        (b, length, K + 1),
        "int32",
    ) in seen


def test_caller_buffer_errors(cache):
    items = samples(cache, range(4))
    want = build_batch(items)
    n = want["labels"].size
    with pytest.raises(CacheInputError, match=r"out\['labels'\] holds 3 elements but this batch"):
        build_batch(items, out={"labels": np.zeros(3, np.int64)})
    with pytest.raises(CacheInputError, match=r"out\['teacher_ids'\] has dtype int64 but"):
        build_batch(items, out={"teacher_ids": np.zeros(n * K, np.int64)})
    with pytest.raises(CacheInputError, match=r"out\['labels'\] must be C-contiguous"):
        build_batch(items, out={"labels": np.zeros((n, 2), np.int64)[:, 0]})
    ro = np.zeros(n, np.int64)
    ro.flags.writeable = False
    with pytest.raises(CacheInputError, match=r"out\['labels'\] cannot be written"):
        build_batch(items, out={"labels": ro})
    shared = np.zeros(n, np.int64)
    with pytest.raises(CacheInputError, match="overlaps another output buffer"):
        build_batch(items, out={"labels": shared, "input_ids": shared})
    with pytest.raises(CacheInputError, match="must be a numpy array"):
        build_batch(items, out={"labels": [0] * n})
    with pytest.raises(CacheInputError, match="out must be a dict of arrays or a callable"):
        build_batch(items, out=3)


def test_option_and_item_errors(cache, two_caches, tmp_path):
    items = samples(cache, range(3))
    with pytest.raises(CacheInputError, match="packing=True needs max_length"):
        build_batch(items, packing=True)
    with pytest.raises(CacheInputError, match='padding="max_length" needs max_length'):
        build_batch(items, padding="max_length")
    with pytest.raises(CacheInputError, match="max_length = 0 must be >= 1"):
        build_batch(items, max_length=0)
    with pytest.raises(CacheInputError, match="pad_to_multiple_of = 0 must be >= 1"):
        build_batch(items, pad_to_multiple_of=0)
    with pytest.raises(CacheInputError, match="at least one sample"):
        build_batch([])
    with pytest.raises(CacheKeyError, match="batch item 1: position 999 is out of range"):
        build_batch([CacheSample(cache, 0), CacheSample(cache, 999)])
    other = write_cache(tmp_path / "k4", "compact", 5, n=2, k=4)
    with pytest.raises(CacheMismatchError, match=r"batch item 1: it has top_k = 4 .* batch item 0"):
        build_batch([CacheSample(cache, 0), CacheSample(other, 0)])
    rec = cache.record_at(1)
    bad = type(rec)(**{**{f: getattr(rec, f) for f in rec.__dataclass_fields__}})
    object.__setattr__(bad, "labels", rec.labels[:-1])
    with pytest.raises(CacheInputError, match=r"batch item 0 .*labels has"):
        build_batch([bad])


def test_option_rules_live_in_the_native_core_and_name_the_argument(cache):
    """Python converts types; every layout rule is the native core's (one home), for
    build_batch and for the collator at construction."""
    from target_sft import TargetSFTCollator, _core

    items = samples(cache, range(2))
    cases = [
        (dict(max_length=-3), "max_length = -3 must be >= 1"),
        (dict(pad_to_multiple_of=-1), "pad_to_multiple_of = -1 must be >= 1"),
        (dict(padding="left"), 'padding must be "longest" or "max_length", got "left"'),
        (dict(padding=None), "padding must be a str, got None"),
        (dict(max_length=2.5), r"max_length must be an int, got 2\.5"),
        (dict(max_length=2**70), "max_length = 1180591620717411303424 must be <= "),
        (dict(packing=True, padding="max_length"), "packing=True needs max_length"),
    ]
    for kw, msg in cases:
        with pytest.raises(CacheInputError, match=msg):
            build_batch(items, **kw)
        with pytest.raises(CacheInputError, match=msg):
            TargetSFTCollator(cache, pad_token_id=0, **kw)
    with pytest.raises(CacheInputError, match="max_length = 0 must be >= 1"):
        _core.check_batch_options(max_length=0)
    _core.check_batch_options(packing=True, max_length=8, padding="max_length")


def test_stub_declares_build_batch_with_the_native_signature():
    import ast
    import inspect
    from pathlib import Path

    import target_sft._core as core

    stub = Path(__file__).resolve().parents[2] / "python" / "target_sft" / "_core.pyi"
    funcs = {n.name: n for n in ast.parse(stub.read_text()).body if isinstance(n, ast.FunctionDef)}
    native = {n for n, v in vars(core).items() if inspect.isbuiltin(v)}
    assert set(funcs) == native
    for name in native:
        args = funcs[name].args
        stub_params = [a.arg for a in args.args + args.kwonlyargs]
        assert stub_params == list(inspect.signature(getattr(core, name)).parameters), name
