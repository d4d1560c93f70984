"""Tests of the synthetic teacher data generator (``target_sft.testing.synthetic``)."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from target_sft.testing.synthetic import (
    IGNORE_INDEX,
    QWEN_VOCAB_SIZE,
    SyntheticRecord,
    generate_list,
    generate_records,
    stats,
)

FIELDS = (
    "key",
    "input_ids",
    "labels",
    "topk_ids",
    "topk_logprobs",
    "label_logprobs",
    "label_ranks",
)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return np.log(np.exp(x - m).sum(axis=1)) + m[:, 0]


def check_record(rec: SyntheticRecord, vocab_size: int, top_k: int) -> None:
    """Assert every invariant the cache writer relies on, for one record."""
    assert isinstance(rec.key, int)
    t = rec.input_ids.shape[0]
    assert rec.input_ids.dtype == np.int32 and rec.input_ids.shape == (t,)
    assert rec.labels.dtype == np.int32 and rec.labels.shape == (t,)
    assert t >= 2
    assert rec.input_ids.min() >= 0 and rec.input_ids.max() < vocab_size

    # Labels: -100 on a prompt prefix that includes position 0, input_ids on the rest.
    sup = rec.labels != IGNORE_INDEX
    assert not sup[0]
    first = int(np.argmax(sup)) if sup.any() else t
    assert not sup[:first].any() and sup[first:].all()
    np.testing.assert_array_equal(rec.labels[first:], rec.input_ids[first:])
    s = int(sup[1:].sum())

    ids, lp = rec.topk_ids, rec.topk_logprobs
    assert ids.dtype == np.int32 and ids.shape == (s, top_k)
    assert lp.dtype == np.float32 and lp.shape == (s, top_k)
    assert rec.label_logprobs.dtype == np.float32 and rec.label_logprobs.shape == (s,)
    assert rec.label_ranks.dtype == np.int32 and rec.label_ranks.shape == (s,)
    if s == 0:
        return

    # Top-k ids: in range and distinct within a row.
    assert ids.min() >= 0 and ids.max() < vocab_size
    srt = np.sort(ids, axis=1)
    assert not (srt[:, 1:] == srt[:, :-1]).any(), "duplicate ids in a row"

    # Log-probs: finite, non-increasing, a log-softmax over a larger vocabulary.
    assert np.isfinite(lp).all()
    assert (np.diff(lp, axis=1) <= 0).all()
    lse = _logsumexp(lp)
    assert (lse < 0).all(), f"no mass outside the top-k: max logsumexp {lse.max()}"
    outside_mass = -np.expm1(lse)
    # absolute error of outside_mass due to the float32 storage of the log-probs
    p64 = np.exp(lp.astype(np.float64))
    f32_err = 2.0**-23 * (p64 * np.abs(lp)).sum(axis=1) + 1e-15
    # ... and the outside mass fits into the outside tokens, each at most the last top-k prob
    # (up to the documented float32 floor of 2**-23 on the outside mass, which can bind only
    # for extreme shapes: very wide top-k or very few tokens outside it).
    n_out = vocab_size - top_k
    capacity = n_out * p64[:, -1] * (1 + 1e-6) + f32_err
    assert (outside_mass <= np.maximum(capacity, 3 * 2.0**-23)).all()
    if n_out >= 10_000 and top_k <= 256:
        assert (outside_mass <= capacity).all()

    # Labels vs ranks.
    labels = rec.labels[first:]
    ranks = rec.label_ranks
    label_lp = rec.label_logprobs
    assert np.isfinite(label_lp).all()
    assert (ranks >= 0).all() and (ranks < vocab_size).all()
    in_topk = ranks < top_k
    np.testing.assert_array_equal(in_topk, (ids == labels[:, None]).any(axis=1))
    rows = np.flatnonzero(in_topk)
    np.testing.assert_array_equal(ids[rows, ranks[rows]], labels[rows])
    # bit-for-bit equality with the top-k entry
    np.testing.assert_array_equal(
        label_lp[rows].view(np.int32), lp[rows, ranks[rows]].view(np.int32)
    )
    out = np.flatnonzero(~in_topk)
    assert (label_lp[out] <= lp[out, -1]).all()
    # A label of rank r >= k has r - k tokens at least as likely outside the top-k as itself.
    need = (ranks[out].astype(np.float64) - top_k + 1) * np.exp(label_lp[out].astype(np.float64))
    need_err = need * 2.0**-22 * np.abs(label_lp[out])
    assert (need - need_err <= outside_mass[out] * (1 + 1e-6) + f32_err[out]).all()


# --- invariants ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vocab_size", "top_k", "seed", "extra"),
    [
        (QWEN_VOCAB_SIZE, 64, 0, {}),
        (QWEN_VOCAB_SIZE, 64, 7, {"label_temperature": 4.0}),  # many labels outside the top-k
        (QWEN_VOCAB_SIZE, 1, 1, {}),
        (QWEN_VOCAB_SIZE, 20, 2, {"high_entropy_fraction": 1.0, "share_fraction": 1.0}),
        (50_000, 128, 3, {"prompt_fraction": 0.0, "repeat_fraction": 0.5}),
        (1000, 8, 4, {}),
        (1000, 8, 5, {"label_temperature": 8.0, "high_entropy_fraction": 1.0}),
        (1000, 256, 6, {}),
        (300, 299, 8, {}),  # a single token outside the top-k
        (2, 1, 9, {}),
        (17, 4, 10, {"topic_size": 1, "num_generic": 1}),
        (QWEN_VOCAB_SIZE, 64, 11, {"bf16_logits": True}),
        (1000, 256, 12, {"bf16_logits": True, "label_temperature": 3.0}),
    ],
)
def test_invariants(vocab_size: int, top_k: int, seed: int, extra: dict[str, Any]) -> None:
    recs = generate_list(6, vocab_size=vocab_size, top_k=top_k, seed=seed, mean_length=160, **extra)
    assert [r.key for r in recs] == list(range(6))
    for rec in recs:
        check_record(rec, vocab_size, top_k)
    assert sum(r.num_supervised for r in recs) > 0


def test_labels_outside_topk_are_exercised() -> None:
    """The temperature knob really produces out-of-top-k labels (so the branch is tested)."""
    recs = generate_list(4, seed=3, top_k=16, label_temperature=4.0, mean_length=256)
    ranks = np.concatenate([r.label_ranks for r in recs])
    assert (ranks >= 16).mean() > 0.05
    assert ranks.max() > 1000
    for rec in recs:
        check_record(rec, QWEN_VOCAB_SIZE, 16)


def test_record_fields_and_kwargs() -> None:
    rec = generate_list(1, seed=0, mean_length=64)[0]
    assert tuple(f.name for f in dataclasses.fields(SyntheticRecord)) == FIELDS
    assert not hasattr(rec, "__dict__")  # slots
    kwargs = rec.as_kwargs()
    assert tuple(kwargs) == FIELDS
    assert kwargs["topk_ids"] is rec.topk_ids
    assert rec.num_tokens == rec.input_ids.shape[0]
    assert rec.num_supervised == rec.topk_ids.shape[0]


def test_prompt_fraction_edges() -> None:
    for rec in generate_list(5, seed=1, prompt_fraction=0.0, mean_length=100):
        assert rec.labels[0] == IGNORE_INDEX
        assert (rec.labels[1:] != IGNORE_INDEX).all()
        assert rec.num_supervised == rec.num_tokens - 1
    for rec in generate_list(5, seed=1, prompt_fraction=1.0, mean_length=100, top_k=32):
        assert (rec.labels == IGNORE_INDEX).all()
        assert rec.topk_ids.shape == (0, 32)
        check_record(rec, QWEN_VOCAB_SIZE, 32)


def test_lengths_and_prompt_share() -> None:
    recs = generate_list(60, seed=2, mean_length=300, prompt_fraction=0.25, top_k=8)
    lengths = np.array([r.num_tokens for r in recs])
    assert 230 < lengths.mean() < 380
    assert lengths.std() > 50  # lognormal, not fixed
    assert lengths.min() >= 2
    share = 1 - np.array([r.num_supervised for r in recs]) / lengths
    assert 0.18 < share.mean() < 0.32
    fixed = generate_list(5, seed=2, mean_length=50, length_sigma=0.0, top_k=8)
    assert {r.num_tokens for r in fixed} == {50}
    capped = generate_list(20, seed=2, mean_length=400, max_length=128, top_k=8)
    assert max(r.num_tokens for r in capped) <= 128
    tiny = generate_list(5, seed=2, mean_length=2, length_sigma=0.0, top_k=8)
    for rec in tiny:
        assert rec.num_tokens == 2 and rec.num_supervised == 1
        check_record(rec, QWEN_VOCAB_SIZE, 8)


# --- determinism --------------------------------------------------------------------------------


def _assert_same(a: SyntheticRecord, b: SyntheticRecord) -> None:
    assert a.key == b.key
    for name in FIELDS[1:]:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y, err_msg=name)


def test_deterministic_and_slice_independent() -> None:
    kw: dict[str, Any] = {"seed": 11, "mean_length": 128}
    full = generate_list(8, **kw)
    again = generate_list(8, **kw)
    for a, b in zip(full, again, strict=True):
        _assert_same(a, b)
    for a, b in zip(generate_list(3, **kw), full[:3], strict=True):
        _assert_same(a, b)
    # any slice can be regenerated on its own
    for a, b in zip(generate_list(3, key_offset=5, **kw), full[5:], strict=True):
        _assert_same(a, b)
    # lazily: the iterator yields the same records one by one
    it = generate_records(8, **kw)
    _assert_same(next(it), full[0])
    _assert_same(next(it), full[1])


def test_seeds_and_keys_differ() -> None:
    a = generate_list(2, seed=0, mean_length=128)
    b = generate_list(2, seed=1, mean_length=128)
    assert not np.array_equal(a[0].topk_logprobs[:5], b[0].topk_logprobs[:5])
    assert not np.array_equal(a[0].input_ids[:20], a[1].input_ids[:20])
    assert not np.array_equal(a[0].input_ids[:20], b[0].input_ids[:20])


# --- realism ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_records() -> list[SyntheticRecord]:
    return generate_list(100, seed=0)


def test_stats_realistic(default_records: list[SyntheticRecord]) -> None:
    st = stats(default_records)
    assert st["records"] == 100
    assert 430 < st["mean_tokens"] < 600
    assert 0.45 < st["mean_supervised"] / st["mean_tokens"] < 0.7
    # most response tokens of a reasoning trace are near-deterministic for the teacher ...
    assert 0.75 <= st["frac_top1_gt_0.9"] <= 0.88
    # ... with a high-entropy minority
    assert 0.09 <= st["frac_top1_lt_0.6"] <= 0.2
    assert st["median_entropy"] < 0.15 < st["mean_entropy"] < 0.6
    assert 0.85 <= st["frac_label_rank0"] <= 0.93
    assert 0.99 <= st["frac_label_in_topk"] < 1.0
    assert 1e-4 < st["mean_mass_outside"] < 0.02
    assert 1e-6 < st["median_mass_outside"] < 1e-3
    assert -20 < st["mean_last_topk_logprob"] < -12
    assert st["distinct_input_ids"] > 5000
    assert st["distinct_topk_ids"] > 50_000


def test_regimes(default_records: list[SyntheticRecord]) -> None:
    lp = np.concatenate([r.topk_logprobs for r in default_records]).astype(np.float64)
    ranks = np.concatenate([r.label_ranks for r in default_records])
    p1 = np.exp(lp[:, 0])
    high = p1 < 0.6
    conf = p1 > 0.9
    # confident rows: the label is the argmax almost always
    assert (ranks[conf] == 0).mean() > 0.97
    # high-entropy rows: flat head, label often rank 1..5, sometimes outside the top-k
    assert 0.2 < np.median(p1[high]) < 0.5
    assert np.quantile(p1[high], 0.1) > 0.15
    assert ((ranks[high] >= 1) & (ranks[high] <= 5)).mean() > 0.3
    assert 0.002 < (ranks[high] >= 64).mean() < 0.1
    # tail of the top-64 in probability: ~1e-2 at the second ranks, down to ~1e-7..1e-9
    assert -3.5 < np.median(lp[conf, 1]) / np.log(10) < -1.5
    assert -9.5 < np.median(lp[conf, -1]) / np.log(10) < -6
    # mass outside the top-k grows with entropy
    outside = -np.expm1(_logsumexp(lp))
    assert np.median(outside[high]) > 20 * np.median(outside[conf])
    assert 1e-3 < np.median(outside[high]) < 0.1
    # irregular gaps (not a fixed geometric decay)
    gaps = -np.diff(lp[conf, 10:], axis=1)
    assert np.std(gaps) > 0.5 * np.mean(gaps)


def test_high_entropy_fraction_parameter() -> None:
    def frac_flat(h: float) -> float:
        recs = generate_list(20, seed=4, high_entropy_fraction=h, mean_length=256)
        lp = np.concatenate([r.topk_logprobs[:, 0] for r in recs]).astype(np.float64)
        return float(np.mean(np.exp(lp) < 0.6))

    assert frac_flat(0.0) < 0.03
    assert 0.3 < frac_flat(0.5) < 0.6


def _zipf_slope(records: list[SyntheticRecord], vocab_size: int, max_rank: int) -> float:
    ids = np.concatenate([r.input_ids for r in records])
    freq = np.sort(np.bincount(ids, minlength=vocab_size))[::-1][:max_rank]
    ranks = np.arange(1, max_rank + 1)
    return float(np.polyfit(np.log(ranks), np.log(freq), 1)[0])


def test_zipf_frequencies(default_records: list[SyntheticRecord]) -> None:
    # Defaults: topic burstiness flattens the empirical curve a little around the exponent.
    slope = _zipf_slope(default_records, QWEN_VOCAB_SIZE, 500)
    assert -1.15 < slope < -0.85
    # Without topics and repetition the text is i.i.d. Zipf: the slope is the exponent.
    for exponent in (1.05, 1.3):
        recs = generate_list(
            40, seed=5, zipf_exponent=exponent, topic_weight=0.0, repeat_fraction=0.0, top_k=4
        )
        assert abs(_zipf_slope(recs, QWEN_VOCAB_SIZE, 300) + exponent) < 0.08


def test_ids_not_concentrated_in_low_ids(default_records: list[SyntheticRecord]) -> None:
    v = QWEN_VOCAB_SIZE
    ids = np.concatenate([r.input_ids for r in default_records])
    topk = np.concatenate([r.topk_ids.ravel() for r in default_records])
    # The 100 most frequent ids are spread over the vocabulary (random permutation of ranks).
    counts = np.bincount(ids, minlength=v)
    top = np.argsort(counts)[::-1][:100]
    assert 0.25 * v < np.median(top) < 0.75 * v
    assert abs(np.corrcoef(np.arange(v)[top], counts[top])[0, 1]) < 0.4
    for arr in (ids, topk):
        assert 0.02 < np.mean(arr < v // 10) < 0.25
        assert 0.35 * v < arr.mean() < 0.65 * v


def test_context_structure(default_records: list[SyntheticRecord]) -> None:
    """Top-k sets depend on context: shared with the previous row, generic tail tokens, topic."""
    overlaps = []
    for rec in default_records[:20]:
        ids = rec.topk_ids
        for i in range(1, ids.shape[0]):
            overlaps.append(np.intersect1d(ids[i], ids[i - 1]).size / ids.shape[1])
    ov = np.array(overlaps)
    assert 0.2 < np.mean(ov > 0.7) < 0.45  # rows that share most candidates with the previous
    assert 0.05 < np.median(ov) < 0.5  # others still share generic / topic tokens

    # A stable set of generic ids shows up in the tails of many rows of many records.
    tails = np.concatenate([r.topk_ids[:, 8:] for r in default_records])
    counts = np.bincount(tails.ravel(), minlength=QWEN_VOCAB_SIZE)
    assert np.sort(counts)[::-1][50] > 0.05 * tails.shape[0]

    # Topic words recur within a record far more than across records (burstiness): several of
    # a record's 30 most frequent ids are >= 5x more frequent there than in the other records.
    corpus = np.bincount(
        np.concatenate([r.input_ids for r in default_records]), minlength=QWEN_VOCAB_SIZE
    )
    n_bursty = []
    for rec in default_records[:10]:
        within = np.bincount(rec.input_ids, minlength=QWEN_VOCAB_SIZE)
        others = corpus - within
        top = np.argsort(within)[::-1][:30]
        ratio = (within[top] / rec.num_tokens) / ((others[top] + 1) / others.sum())
        n_bursty.append(int((ratio > 5).sum()))
    assert np.mean(n_bursty) >= 5


def test_stats_keys_and_empty() -> None:
    assert stats([]) == {"records": 0.0}
    st = stats(generate_list(2, seed=0, mean_length=64))
    for key in (
        "mean_tokens",
        "mean_supervised",
        "frac_top1_gt_0.9",
        "mean_entropy",
        "median_entropy",
        "frac_label_in_topk",
        "frac_label_rank0",
        "mean_mass_outside",
        "distinct_input_ids",
        "distinct_topk_ids",
    ):
        assert isinstance(st[key], float)


# --- parameters ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_records": -1},
        {"num_records": 1.5},
        {"top_k": 0},
        {"top_k": 200, "vocab_size": 100},
        {"top_k": 100, "vocab_size": 100},
        {"vocab_size": 1, "top_k": 1},
        {"prompt_fraction": -0.1},
        {"prompt_fraction": 1.5},
        {"prompt_fraction": float("nan")},
        {"high_entropy_fraction": 1.01},
        {"high_entropy_fraction": -1e-9},
        {"topic_weight": 2.0},
        {"repeat_fraction": -0.5},
        {"share_fraction": 3},
        {"mean_length": 1},
        {"max_length": 1},
        {"seed": -1},
        {"key_offset": -3},
        {"length_sigma": -0.1},
        {"zipf_exponent": 0.0},
        {"label_temperature": 0.0},
        {"label_temperature": float("inf")},
        {"topic_size": 0},
        {"num_generic": 0},
        {"prompt_fraction": True},
        {"bf16_logits": "yes"},
        {"bf16_logits": 1},
    ],
)
def test_bad_parameters(kwargs: dict[str, Any]) -> None:
    args = {"num_records": 2, **kwargs}
    n = args.pop("num_records")
    with pytest.raises(ValueError):
        generate_records(n, **args)  # raised eagerly, before iteration
    with pytest.raises(ValueError):
        generate_list(n, **args)


def test_bf16_logits() -> None:
    """bf16 logits: log-prob gaps on the bf16 grid of the (offset) logits, hence ties."""
    plain = np.concatenate([r.topk_logprobs for r in generate_list(10, seed=2, mean_length=200)])
    bf16 = np.concatenate(
        [r.topk_logprobs for r in generate_list(10, seed=2, mean_length=200, bf16_logits=True)]
    )
    assert np.mean(np.diff(plain, axis=1) == 0) < 1e-3
    assert np.mean(np.diff(bf16, axis=1) == 0) > 0.02
    # gaps between consecutive entries are multiples of 2**-7 (bf16 spacing at |logit| <= 1 is
    # finer, at 16..32 it is 2**-3; every spacing >= 2**-7 divides the gap up to float32 error)
    gaps = -np.diff(bf16.astype(np.float64), axis=1)
    big = gaps > 0.05
    frac = gaps[big] * 2**7 - np.round(gaps[big] * 2**7)
    assert np.mean(np.abs(frac) < 1e-3) > 0.9


def test_zero_records() -> None:
    assert generate_list(0) == []
    assert stats(generate_records(0)) == {"records": 0.0}


def test_old_module_path_warns_and_reexports() -> None:
    """``target_sft.synthetic`` (documented before the move) still imports the same names."""
    import target_sft.testing.synthetic as new

    sys.modules.pop("target_sft.synthetic", None)
    with pytest.warns(DeprecationWarning, match=r"target_sft\.testing\.synthetic"):
        old = importlib.import_module("target_sft.synthetic")
    assert old.__all__ == new.__all__
    for name in new.__all__:
        assert getattr(old, name) is getattr(new, name), name


def test_runtime_package_never_imports_testing() -> None:
    """``target_sft.testing`` is for tests and benchmarks: no runtime module imports it, and
    ``import target_sft`` loads neither it nor the deprecated shim."""
    import target_sft

    root = Path(target_sft.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if rel.parts[0] == "testing" or rel == Path("synthetic.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n.startswith(("target_sft.testing", "target_sft.synthetic")) for n in names):
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, f"runtime modules import target_sft.testing: {offenders}"
    code = (
        "import sys, target_sft, target_sft.cache, target_sft.errors\n"
        "bad = [m for m in sys.modules if m.startswith(('target_sft.testing', 'target_sft.synthetic'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
