"""The Python cache API: round trips, inputs from torch, errors of the CacheError family."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import target_sft as ts
from target_sft import (
    CacheCorruptionError,
    CacheError,
    CacheInputError,
    CacheKeyError,
    CacheMismatchError,
    CacheVersionError,
    CacheWriter,
    TeacherCache,
)

FIELDS = ("input_ids", "labels", "topk_ids", "topk_logprobs", "label_logprobs", "label_ranks")


def write(path: Path, recs, **kw) -> ts.CacheInfo:
    kw.setdefault("top_k", 8)
    kw.setdefault("vocab_size", 1000)
    with CacheWriter(path, **kw) as w:
        for r in recs:
            w.add(**r)
    assert w.info is not None
    return w.info


def test_exact_roundtrip_and_info(tmp_path, records):
    info = write(tmp_path / "c", records, codec="exact", shard_size=2048, teacher={"name": "t"})
    c = TeacherCache(tmp_path / "c")
    assert len(c) == 12 and c.info.complete and info.records == 12
    assert len(c.info.shards) > 1
    assert c.info.supervised_tokens == sum(r["label_logprobs"].size for r in records)
    assert list(c) == [r["key"] for r in records]
    for pos, r in enumerate(records):
        got = c[r["key"]]
        assert got.key == r["key"] and r["key"] in c
        for f in FIELDS:
            a, b = getattr(got, f), r[f]
            assert a.dtype == b.dtype and a.shape == b.shape, f
            assert np.array_equal(
                a.view(np.uint32) if a.dtype == np.float32 else a,
                b.view(np.uint32) if b.dtype == np.float32 else b,
            ), f
        assert np.array_equal(got.supervised_positions, np.flatnonzero(r["labels"][1:] != -100) + 1)
        assert c.record_at(pos).key == r["key"]
    many = c.records_at(range(12), threads=2)
    assert [m.key for m in many] == [r["key"] for r in records]
    assert c.verify() == 12
    assert "missing" not in c and 10**6 not in c


def _row_kl(want: dict[int, float], have: dict[int, float]) -> float:
    """KL(exact || decoded) of one row, both renormalised over its entries (float64)."""
    ids = sorted(want)
    a = np.array([want[i] for i in ids], dtype=np.float64)
    b = np.array([have[i] for i in ids], dtype=np.float64)
    a, b = a - np.logaddexp.reduce(a), b - np.logaddexp.reduce(b)
    return float(max(0.0, np.sum(np.exp(a) * (a - b))))


def test_compact_with_a_kl_budget_is_the_default(tmp_path, records):
    write(tmp_path / "c", records)
    c = TeacherCache(tmp_path / "c")
    assert c.info.codec == "compact"
    assert c.info.codec_params["max_mean_kl"] == 1e-4
    total, rows = 0.0, 0
    for r in records:
        got = c.get(r["key"], input_ids=r["input_ids"])
        assert np.array_equal(got.label_ranks, r["label_ranks"])
        kls = []
        for row in range(r["label_ranks"].size):
            want = dict(
                zip(r["topk_ids"][row].tolist(), r["topk_logprobs"][row].tolist(), strict=True)
            )
            have = dict(
                zip(got.topk_ids[row].tolist(), got.topk_logprobs[row].tolist(), strict=True)
            )
            assert want.keys() == have.keys()  # ids are lossless
            kls.append(_row_kl(want, have))
        # FORMAT.md §5.1: every record's mean KL per row is within the budget
        assert np.mean(kls) <= 1e-4 * (1 + 1e-6), (r["key"], np.mean(kls))
        total, rows = total + sum(kls), rows + len(kls)
    st = c.info.stats
    assert st.codec_kl_rows == rows
    assert st.codec_kl_mean == pytest.approx(total / rows, rel=1e-6)


def test_compact_with_fixed_steps_is_bounded(tmp_path, records):
    write(tmp_path / "c", records, max_mean_kl=None, compact_sqrt_step=2.5e-3)
    c = TeacherCache(tmp_path / "c")
    assert c.info.codec_params["max_mean_kl"] is None
    assert c.info.codec_params["sqrt_steps"] == [2.5e-3]
    for r in records:
        got = c.get(r["key"], input_ids=r["input_ids"])
        for row in range(r["label_ranks"].size):
            want = dict(
                zip(r["topk_ids"][row].tolist(), r["topk_logprobs"][row].tolist(), strict=True)
            )
            have = dict(
                zip(got.topk_ids[row].tolist(), got.topk_logprobs[row].tolist(), strict=True)
            )
            assert want.keys() == have.keys()
            for i, v in want.items():
                # FORMAT.md §5.1: 2·ln(√p / (√p − h/2)) above √p = 3h, at most s/2 below
                rp, h = np.sqrt(np.exp(v)), 2.5e-3
                bound = 2 * np.log(rp / (rp - h / 2)) + 1e-4 if rp > 3 * h else 1.25 + 1e-4
                assert abs(have[i] - v) <= bound, (i, v, have[i])


def test_budget_and_fixed_steps_are_exclusive(tmp_path):
    with pytest.raises(CacheInputError, match="not both"):
        CacheWriter(tmp_path / "a", vocab_size=100, compact_sqrt_step=1e-3)
    with pytest.raises(CacheInputError, match="fixed codebook steps"):
        CacheWriter(tmp_path / "b", vocab_size=100, max_mean_kl=None)
    with pytest.raises(CacheInputError, match="max_mean_kl"):
        CacheWriter(tmp_path / "c", vocab_size=100, max_mean_kl=2.0)


def test_torch_inputs(tmp_path):
    torch.manual_seed(0)
    v, k, t = 500, 4, 10
    logits = torch.randn(t, v)
    lp = torch.log_softmax(logits, -1)
    ids = torch.randint(0, v, (t,))
    labels = ids.clone()
    labels[:3] = -100
    rows = torch.nonzero(labels[1:] != -100).flatten() + 1
    top = lp[rows - 1].topk(k)  # int64 indices, float32 values
    lab = labels[rows]
    lab_lp = lp[rows - 1].gather(1, lab[:, None]).squeeze(1)
    rank = (lp[rows - 1] > lab_lp[:, None]).sum(1)
    with CacheWriter(tmp_path / "c", top_k=k, vocab_size=v, codec="exact") as w:
        w.add(7, ids, labels, top.indices, top.values.to(torch.bfloat16).float(), lab_lp, rank)
    got = TeacherCache(tmp_path / "c")[7]
    assert np.array_equal(got.topk_ids, top.indices.numpy().astype(np.int32))
    assert np.array_equal(got.label_ranks, rank.numpy().astype(np.int32))
    # the label's rank is below k exactly when it is in the top-k
    assert np.array_equal(got.label_ranks < k, (got.topk_ids == lab.numpy()[:, None]).any(1))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.update(topk_ids=r["topk_ids"][:, :4]), "shape"),
        (lambda r: r.update(topk_ids=r["topk_ids"].reshape(-1)), "must have 2 dimension"),
        (
            lambda r: r["topk_ids"].__setitem__((2, 3), 1000),
            "topk_ids[2, 3] = 1000 is outside the vocabulary",
        ),
        (lambda r: r["topk_ids"].__setitem__((1, 0), -7), "topk_ids[1, 0] = -7"),
        (lambda r: r["topk_logprobs"].__setitem__((0, 5), np.nan), "topk_logprobs[0, 5] = NaN"),
        (lambda r: r["topk_logprobs"].__setitem__((0, 5), np.inf), "topk_logprobs[0, 5] = inf"),
        (lambda r: r["labels"].__setitem__(-1, 5000), "labels[23] = 5000"),
        (lambda r: r["input_ids"].__setitem__(0, -1), "input_ids[0] = -1"),
        (lambda r: r.update(label_ranks=r["label_ranks"][:-1]), "label_ranks has"),
        (lambda r: r.update(topk_logprobs=r["topk_logprobs"].astype(np.int32)), "floating-point"),
        (lambda r: r.update(topk_ids=r["topk_ids"].astype(np.float32)), "must hold integers"),
        (
            lambda r: r.update(input_ids=r["input_ids"].astype(np.int64) + 2**40),
            "does not fit in int32",
        ),
        (lambda r: r.update(key=1.5), "key must be an int or a str"),
    ],
)
def test_bad_input_names_field_and_index(tmp_path, records, mutate, message):
    r = {**records[1], **{f: records[1][f].copy() for f in FIELDS}}
    mutate(r)
    with CacheWriter(tmp_path / "c", top_k=8, vocab_size=1000) as w:
        with pytest.raises(CacheInputError, match=None) as e:
            w.add(**r)
        assert message in str(e.value), str(e.value)
        assert isinstance(e.value, ValueError) and isinstance(e.value, CacheError)
        w.add(**records[0])  # the writer is still usable
    assert len(TeacherCache(tmp_path / "c")) == 1


def test_duplicate_key_and_label_disagreement(tmp_path, records):
    with CacheWriter(tmp_path / "c", top_k=8, vocab_size=1000) as w:
        w.add(**records[0])
        with pytest.raises(CacheInputError, match='duplicate key "doc-0"'):
            w.add(**records[0])
        r = {**records[1], "label_logprobs": records[1]["label_logprobs"] - 1.0}
        in_topk = np.flatnonzero(r["label_ranks"] < 8)[0]
        with pytest.raises(CacheInputError, match=rf"label_logprobs\[{in_topk}\]"):
            w.add(**r)


def test_lookup_errors(tmp_path, records):
    write(tmp_path / "c", records)
    c = TeacherCache(tmp_path / "c")
    with pytest.raises(CacheKeyError, match='key "nope" is not in the cache') as e:
        c["nope"]
    assert isinstance(e.value, KeyError)
    wrong = records[2]["input_ids"].copy()
    wrong[3] += 1
    with pytest.raises(
        CacheMismatchError, match=r"the ids given differ .* at position 3 .*changed after caching"
    ):
        c.get(records[2]["key"], input_ids=wrong)
    with pytest.raises(CacheKeyError, match="out of range"):
        c.record_at(12)


def test_format_version_truncation_and_flipped_byte(tmp_path, records):
    write(tmp_path / "c", records, shard_size=10**9)
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    shard = tmp_path / "c" / m["shards"][0]["file"]
    clean = shard.read_bytes()
    # every shard is a valid safetensors file with our metadata
    with safe_open(str(shard), framework="numpy") as f:
        assert f.metadata()["format"] == "target-sft-shard"
        assert {"record_index", "payload", "codebook", "id_table"} <= set(f.keys())
    # a flipped byte: verify names the shard and the checksum
    shard.write_bytes(clean[:-3] + bytes([clean[-3] ^ 0x10]) + clean[-2:])
    with pytest.raises(CacheCorruptionError, match="checksum"):
        TeacherCache(tmp_path / "c").verify()
    # truncated
    shard.write_bytes(clean[:-50])
    with pytest.raises(CacheCorruptionError, match="truncated"):
        TeacherCache(tmp_path / "c").record_at(0)
    shard.write_bytes(clean)
    assert TeacherCache(tmp_path / "c").verify() == 12
    m["format_version"] = 99
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheVersionError, match="upgrade target-sft"):
        TeacherCache(tmp_path / "c")


def test_exception_in_with_block_keeps_records_and_append_finishes(tmp_path, records):
    with (
        pytest.raises(RuntimeError, match="boom"),
        CacheWriter(tmp_path / "c", top_k=8, vocab_size=1000) as w,
    ):
        for r in records[:5]:
            w.add(**r)
        raise RuntimeError("boom")
    c = TeacherCache(tmp_path / "c")
    assert len(c) == 5 and not c.info.complete
    with pytest.raises(CacheInputError, match="already holds a cache"):
        CacheWriter(tmp_path / "c", top_k=8, vocab_size=1000)
    with pytest.raises(CacheMismatchError, match="teacher"):
        CacheWriter(
            tmp_path / "c", top_k=8, vocab_size=1000, mode="append", teacher={"name": "other"}
        )
    with CacheWriter(tmp_path / "c", top_k=8, vocab_size=1000, mode="append") as w:
        assert w.num_records == 5 and records[0]["key"] in w
        for r in records[5:]:
            w.add(**r)
    c = TeacherCache(tmp_path / "c")
    assert len(c) == 12 and c.info.complete and c.verify() == 12


def test_writer_bad_settings(tmp_path):
    with pytest.raises(CacheInputError, match="top_k = 300"):
        CacheWriter(tmp_path / "a", top_k=300, vocab_size=1000)
    with pytest.raises(CacheInputError, match="unknown codec"):
        CacheWriter(tmp_path / "b", top_k=8, vocab_size=1000, codec="zip")  # type: ignore[arg-type]
    with pytest.raises(CacheInputError, match="larger than vocab_size"):
        CacheWriter(tmp_path / "c", top_k=8, vocab_size=4)
    with pytest.raises(ts.CacheFormatError, match="not a target-sft cache"):
        TeacherCache(tmp_path)


@pytest.mark.parametrize("codec", ["exact", "compact"])
def test_top_k_256_roundtrip(tmp_path, codec):
    """The largest top-k: every column index (0..255) is used."""
    from target_sft.testing.synthetic import generate_list

    recs = generate_list(3, vocab_size=5000, top_k=256, mean_length=40, seed=3)
    with CacheWriter(tmp_path / "c", top_k=256, vocab_size=5000, codec=codec) as w:
        for r in recs:
            w.add(**r.as_kwargs())
    c = TeacherCache(tmp_path / "c")
    assert c.verify() == 3
    for r in recs:
        got = c[r.key]
        assert got.topk_ids.shape == r.topk_ids.shape == (r.label_ranks.size, 256)
        assert np.array_equal(np.sort(got.topk_ids, 1), np.sort(r.topk_ids, 1))
        assert np.array_equal(got.label_ranks, r.label_ranks)
        if codec == "exact":
            assert np.array_equal(got.topk_logprobs, r.topk_logprobs)
