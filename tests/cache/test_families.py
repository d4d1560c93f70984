"""Every benchmark data family (target_sft.testing.families) through both codecs: the independent
reference reader (tests/cache/reference_reader.py) decodes every record bit for bit like the Rust
reader, and the exact codec returns what was written.

Small, fast instances: the synthetic generator on short records, and a tiny LM (a few hundred
tokens of vocabulary, trained for a few seconds here on real text of the machine) dumped at
temperature 1 (``text-lm``) and at temperature 2 with its ids spread over 262,144 (``flat-256k``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import reference_reader as rr

from target_sft import CacheWriter, TeacherCache
from target_sft.testing.families import (
    FAMILIES,
    FLAT_TEMPERATURE,
    FLAT_VOCAB_SIZE,
    Family,
    dump_text_lm,
    family_stats,
    load_family,
    real_text,
    split_documents,
    train_text_lm,
)

FIELDS = rr.RECORD_FIELDS[1:]


@pytest.fixture(scope="module")
def tiny_lm():
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    train, held = split_documents(real_text(400_000))
    lm = train_text_lm(
        train,
        vocab_size=320,
        hidden=32,
        layers=1,
        heads=2,
        context=64,
        batch=4,
        steps=40,
        threads=1,
    )
    return lm, held


@pytest.fixture(scope="module")
def families(tiny_lm) -> dict[str, Family]:
    lm, held = tiny_lm
    text = dump_text_lm(lm, held, 6, length=64, seed=1)
    flat = dump_text_lm(
        lm, held, 6, length=64, temperature=FLAT_TEMPERATURE, vocab_size=FLAT_VOCAB_SIZE, seed=2
    )
    return {
        "synthetic": load_family("synthetic", 6, synthetic_length=80, seed=3),
        "text-lm": Family("text-lm", lm.vocab_size, text, dict(lm.info)),
        "flat-256k": Family("flat-256k", FLAT_VOCAB_SIZE, flat, dict(lm.info)),
    }


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint32) if a.dtype == np.float32 else a


def assert_same(a: np.ndarray, b: np.ndarray, where: Any) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (where, a.dtype, b.dtype, a.shape, b.shape)
    assert np.array_equal(bits(a), bits(b)), where


@pytest.mark.parametrize("codec", ["exact", "compact"])
@pytest.mark.parametrize("name", FAMILIES)
def test_reference_reader_decodes_every_family_like_the_rust_reader(
    families, name, codec, tmp_path
):
    fam = families[name]
    path = tmp_path / "cache"
    k = fam.records[0].topk_ids.shape[1]
    with CacheWriter(
        path,
        top_k=k,
        vocab_size=fam.vocab_size,
        codec=codec,
        shard_size=4000,
        prior_records=2,
        threads=1,
    ) as w:
        for r in fam.records:
            w.add(**r.as_kwargs())
    assert len(rr.open_shards(path)[1]) >= 2, "several shards expected"
    refs = rr.read_cache(path)
    cache = TeacherCache(path)
    assert len(refs) == len(cache) == len(fam.records)
    decoded = cache.records_at(range(len(cache)), threads=1)
    for pos, (ref, rec, written) in enumerate(zip(refs, decoded, fam.records, strict=True)):
        where = (name, codec, pos)
        assert ref["key"] == rec.key == written.key, where
        for f in FIELDS:
            assert_same(ref[f], getattr(rec, f), (*where, f))
        for f in ("input_ids", "labels", "label_ranks"):
            assert_same(getattr(written, f), getattr(rec, f), (*where, f))
        if codec == "exact":
            for f in FIELDS:
                assert_same(getattr(written, f), getattr(rec, f), (*where, f))
        else:  # ids are lossless (in the codec's row order), log-probs within the codebook
            got = np.sort(rec.topk_ids, axis=1)
            assert np.array_equal(np.sort(written.topk_ids, axis=1), got), where


def test_families_have_their_documented_shapes(families):
    synthetic, text, flat = (family_stats(families[n].records) for n in FAMILIES)
    for fam in families.values():
        for r in fam.records:
            assert r.topk_ids.min() >= 0 and r.topk_ids.max() < fam.vocab_size
            assert r.input_ids.max() < fam.vocab_size
            assert np.all(np.diff(r.topk_logprobs, axis=1) <= 0)  # sorted descending
    # the same LM read at temperature 2 is flatter than at temperature 1
    assert flat["mean_entropy"] > text["mean_entropy"]
    assert flat["median_top1_p"] < text["median_top1_p"]
    # flat-256k's ids are spread over the large vocabulary, text-lm's are the LM's own
    assert max(int(r.topk_ids.max()) for r in families["flat-256k"].records) >= 4096
    assert all(int(r.topk_ids.max()) < 320 for r in families["text-lm"].records)
    assert synthetic["median_top1_p"] > 0.9
