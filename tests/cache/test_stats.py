"""The manifest's fidelity statistics (docs/FORMAT.md §Statistics): what the top-k kept (mass,
label coverage), the teacher's entropy and what the compact codec cost (KL), checked against a
float64 reference computed here from the records written and, for the entropy, from the logits
of a tiny random Llama run by build_teacher_cache. The statistics survive append and the merge
of several writers exactly, and caches written before them still read."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from build_helpers import make_samples, reference_logprobs, save_tiny_llama, write_manifest
from target_sft import CacheWriter, TeacherCache
from target_sft.build import build_teacher_cache
from target_sft.cache import KEPT_MASS_BINS, FidelityStats, merge_manifests
from target_sft.errors import CacheInputError

VOCAB, K = 500, 8


def varied_record(key, rng: np.random.Generator, t: int = 20) -> dict:
    """A valid record whose rows keep very different teacher mass (0.02 .. 1), some padded rows,
    the label inside the top-k for most rows, and log-probs spread over the whole codebook."""
    ids = rng.integers(0, VOCAB, t).astype(np.int32)
    labels = ids.copy()
    labels[: int(rng.integers(1, t // 2))] = -100
    rows = np.flatnonzero(labels[1:] != -100) + 1
    s = rows.size
    topk = np.full((s, K), -1, np.int32)
    lps = np.full((s, K), -np.inf, np.float32)
    label_lp = np.empty(s, np.float32)
    ranks = np.empty(s, np.int32)
    for r, pos in enumerate(rows):
        lab = labels[pos]
        n = K if rng.random() < 0.8 else int(rng.integers(1, K))
        cand = rng.choice(VOCAB, n + 1, replace=False)
        cand = cand[cand != lab][:n]
        inside = rng.random() < 0.7
        if inside:
            cand[rng.integers(0, n)] = lab
        logits = np.sort(rng.normal(0, rng.uniform(0.5, 6), n))[::-1]
        kept = rng.uniform(0.02, 1.0)  # the top-k's share of the teacher's mass
        row = logits - np.logaddexp.reduce(logits) + math.log(kept)
        topk[r, :n], lps[r, :n] = cand, row.astype(np.float32)
        if inside:
            j = int(np.flatnonzero(cand == lab)[0])
            label_lp[r], ranks[r] = lps[r, j], j
        else:
            label_lp[r], ranks[r] = lps[r, n - 1] - 1.0, K + 3
    return dict(
        key=key,
        input_ids=ids,
        labels=labels,
        topk_ids=topk,
        topk_logprobs=lps,
        label_logprobs=label_lp,
        label_ranks=ranks,
    )


def reference(recs: list[dict], decoded: list | None) -> dict:
    """float64 statistics of `recs` as written; with `decoded` (the records read back from a
    compact cache, same order) also KL(exact ‖ decoded) per row, both renormalised over the row.
    Sums run record by record, row by row, as the writer's do."""
    masses, inside, kls = [], 0, []
    ent_sum = 0.0
    for i, r in enumerate(recs):
        rows = np.flatnonzero(r["labels"][1:] != -100) + 1
        for j, pos in enumerate(rows):
            ids, lp = r["topk_ids"][j], r["topk_logprobs"][j].astype(np.float64)
            valid = ids >= 0
            m = 0.0
            for x in lp[valid]:
                m += math.exp(x)
            masses.append(m)
            inside += int(r["labels"][pos] in ids[valid])
            if decoded is not None:
                d = decoded[i]
                ids_d, lps_d = d.topk_ids[j].tolist(), d.topk_logprobs[j].astype(np.float64)
                by_id = dict(zip(ids_d, lps_d, strict=True))
                b = np.array([by_id[int(x)] for x in ids[valid]])
                a = lp[valid]
                pa = a - np.logaddexp.reduce(a)
                pb = b - np.logaddexp.reduce(b)
                kls.append(float(np.sum(np.exp(pa) * (pa - pb))))
        if "entropy" in r:
            ent_sum += float(np.sum(r["entropy"]))
    masses_a = np.array(masses)
    hist = np.zeros(KEPT_MASS_BINS, np.int64)
    for m in masses:
        hist[min(KEPT_MASS_BINS - 1, max(0, math.floor(m * KEPT_MASS_BINS)))] += 1
    return dict(
        rows=len(masses),
        mass=masses_a,
        hist=hist,
        inside=inside,
        entropy_sum=ent_sum,
        kl=np.array(kls),
    )


def check_against(stats: FidelityStats, ref: dict, *, entropy_rows: int, codec: str) -> None:
    n = ref["rows"]
    assert stats.rows == n
    np.testing.assert_allclose(stats.kept_mass_mean, ref["mass"].mean(), rtol=1e-12)
    np.testing.assert_allclose(stats.kept_mass_min, ref["mass"].min(), rtol=1e-15)
    assert stats.kept_mass_hist == tuple(ref["hist"].tolist())
    p10 = np.sort(ref["mass"])[math.ceil(0.1 * n) - 1]  # nearest rank
    assert stats.kept_mass_p10 <= p10 < stats.kept_mass_p10 + 1 / KEPT_MASS_BINS
    assert stats.label_in_topk_rate == ref["inside"] / n
    assert stats.entropy_rows == entropy_rows
    if entropy_rows:
        np.testing.assert_allclose(
            stats.entropy_mean, ref["entropy_sum"] / entropy_rows, rtol=1e-12
        )
    else:
        assert stats.entropy_mean is None
    if codec == "compact":
        assert stats.codec_kl_rows == n
        np.testing.assert_allclose(stats.codec_kl_mean, ref["kl"].mean(), rtol=1e-8, atol=1e-15)
        np.testing.assert_allclose(stats.codec_kl_max, ref["kl"].max(), rtol=1e-8)
        assert 0 < stats.codec_kl_mean < 1e-3  # the codebook's documented scale
    else:
        assert (stats.codec_kl_rows, stats.codec_kl_mean, stats.codec_kl_max) == (0, None, None)


def with_entropy(rec: dict, rng: np.random.Generator) -> dict:
    s = rec["label_logprobs"].size
    return {**rec, "entropy": rng.uniform(0.0, math.log(VOCAB), s)}


@pytest.fixture
def recs() -> list[dict]:
    rng = np.random.default_rng(7)
    out = [varied_record(i, rng) for i in range(60)]
    return [with_entropy(r, rng) if i % 3 else r for i, r in enumerate(out)]


def write(path: Path, recs: list[dict], **kw) -> object:
    kw.setdefault("top_k", K)
    kw.setdefault("vocab_size", VOCAB)
    kw.setdefault("prior_records", 8)
    with CacheWriter(path, **kw) as w:
        for r in recs:
            w.add(**r)
    return w.info


@pytest.mark.parametrize("codec", ["compact", "exact"])
def test_stats_equal_a_float64_reference(tmp_path, recs, codec):
    info = write(tmp_path / "c", recs, codec=codec, shard_size=2000)
    assert len(info.shards) >= 3  # several shards: the cache's stats are their fold
    cache = TeacherCache(tmp_path / "c")
    decoded = [cache[r["key"]] for r in recs] if codec == "compact" else None
    ref = reference(recs, decoded)
    ent_rows = sum(r["label_logprobs"].size for r in recs if "entropy" in r)
    for stats in (info.stats, cache.info.stats):  # as the writer returned it and as read back
        check_against(stats, ref, entropy_rows=ent_rows, codec=codec)
    # every shard carries its own, and they add up to the cache's
    per_shard = [FidelityStats.from_manifest(s["stats"]) for s in cache.info.shards]
    assert sum(s.rows for s in per_shard) == ref["rows"] == info.supervised_tokens


def test_stats_survive_append_and_merge_exactly(tmp_path, recs):
    # append: the first writer's shard entries are kept verbatim, the summary is their fold
    a = tmp_path / "a"
    write(a, recs[:25], shard_size=3000)
    before = json.loads((a / "manifest.json").read_text())["shards"]
    write(a, recs[25:], mode="append", shard_size=3000)
    m = json.loads((a / "manifest.json").read_text())
    assert m["shards"][: len(before)] == before
    # two writers of one directory (the ranks of a build), merged
    b = tmp_path / "b"
    for rank, part in enumerate((recs[:30], recs[30:])):
        write(
            b, part, mode="append", shard_prefix=f"r{rank}", manifest_name=f"manifest.r{rank}.json"
        )
    parts = [json.loads((b / f"manifest.r{i}.json").read_text()) for i in range(2)]
    merged = merge_manifests(b, ["manifest.r0.json", "manifest.r1.json"])
    mm = json.loads((b / "manifest.json").read_text())
    assert mm["shards"] == parts[0]["shards"] + parts[1]["shards"]
    for man in (m, mm):
        # the summary is the exact fold of the shards (same float64 operations, same order)
        sh = [s["stats"] for s in man["shards"]]
        st = man["stats"]
        assert st["rows"] == sum(s["rows"] for s in sh) == man["num_supervised"]
        for f in ("kept_mass_sum", "entropy_sum", "codec_kl_sum"):
            acc = 0.0
            for s in sh:
                acc += s[f]
            assert st[f] == acc, f
        assert st["kept_mass_min"] == min(s["kept_mass_min"] for s in sh)
        assert st["codec_kl_max"] == max(s["codec_kl_max"] for s in sh)
        assert st["label_in_topk"] == sum(s["label_in_topk"] for s in sh)
        hist = np.zeros(KEPT_MASS_BINS, np.int64)
        for s in sh:
            for bin_, count in s["kept_mass_hist"].items():
                hist[int(bin_)] += count
        assert FidelityStats.from_manifest(st).kept_mass_hist == tuple(hist.tolist())
    # and both equal the one-writer statistics of the same records (up to summation order)
    one = write(tmp_path / "one", recs).stats
    for other in (TeacherCache(a).info.stats, merged.stats):
        assert other.rows == one.rows and other.kept_mass_hist == one.kept_mass_hist
        assert other.label_in_topk_rate == one.label_in_topk_rate
        assert other.kept_mass_min == one.kept_mass_min
        assert other.codec_kl_max == one.codec_kl_max
        np.testing.assert_allclose(other.kept_mass_mean, one.kept_mass_mean, rtol=1e-13)
        np.testing.assert_allclose(other.entropy_mean, one.entropy_mean, rtol=1e-13)
        np.testing.assert_allclose(other.codec_kl_mean, one.codec_kl_mean, rtol=1e-13)


def test_manifest_without_stats_still_reads(tmp_path, recs):
    """A cache written before the statistics existed: it reads, its info has no stats, and an
    append adds statistics that cover only the new rows."""
    c = tmp_path / "old"
    write(c, recs[:20])
    m = json.loads((c / "manifest.json").read_text())
    m.pop("stats")
    for s in m["shards"]:
        s.pop("stats")
    write_manifest(c, m)
    cache = TeacherCache(c)
    assert cache.info.stats is None and len(cache) == 20
    assert cache.verify() == 20
    write(c, recs[20:], mode="append")
    info = TeacherCache(c).info
    new_rows = sum(r["label_logprobs"].size for r in recs[20:])
    assert info.stats.rows == new_rows < info.supervised_tokens


def test_bad_entropy_is_an_error_naming_the_record(tmp_path):
    rec = varied_record("k7", np.random.default_rng(0))
    s = rec["label_logprobs"].size
    with CacheWriter(tmp_path / "c", top_k=K, vocab_size=VOCAB) as w:
        msg = rf'record "k7": entropy has {s - 1} entries but the record has {s} supervised rows'
        with pytest.raises(CacheInputError, match=msg):
            w.add(**rec, entropy=np.ones(s - 1))
        for bad, what in ((-0.5, "-0.5"), (math.log(VOCAB) + 0.01, "6.2246"), (math.nan, "NaN")):
            e = np.ones(s)
            e[1] = bad
            with pytest.raises(CacheInputError, match=rf'record "k7": entropy\[1\] = {what}'):
                w.add(**rec, entropy=e)
        w.add(**rec, entropy=np.full(s, 2.0))  # nothing of the refused calls was kept
    assert TeacherCache(tmp_path / "c").info.stats.entropy_mean == 2.0


def test_builder_records_the_teachers_entropy(tmp_path):
    """build_teacher_cache computes each row's full-vocabulary entropy on the device from the
    log-softmax it forms anyway; the manifest's mean equals a float64 reference from the
    logits of unbatched forward passes, and the kept mass / label coverage equal the
    reference's top-k."""
    from transformers import AutoModelForCausalLM

    vocab = 1000
    model_dir = save_tiny_llama(tmp_path / "llama", seed=3, vocab=vocab, tokenizer=False)
    samples = make_samples(12, seed=5, vocab=vocab)
    info = build_teacher_cache(
        str(model_dir),
        samples,
        tmp_path / "c",
        top_k=K,
        codec="exact",
        progress=False,
        device="cpu",
        dtype="float32",
        chunk_bytes=4 * vocab * 7,  # chunks of 7 rows: the entropy is chunked like the rest
    ).info
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ent, mass, inside = [], [], 0
    for smp in samples:
        pos, lp = reference_logprobs(model, smp)
        for p, row in zip(pos, lp, strict=True):
            ent.append(-np.sum(np.exp(row) * row))
            top = np.sort(row)[::-1][:K]
            mass.append(np.exp(top).sum())
            inside += int(row[smp["labels"][p]] >= top[-1])
    st = info.stats
    assert st.rows == st.entropy_rows == len(ent) == info.supervised_tokens
    np.testing.assert_allclose(st.entropy_mean, np.mean(ent), rtol=2e-6)
    np.testing.assert_allclose(st.kept_mass_mean, np.mean(mass), rtol=2e-6)
    np.testing.assert_allclose(st.kept_mass_min, np.min(mass), rtol=2e-6)
    assert st.label_in_topk_rate == inside / len(ent)
    assert st.codec_kl_mean is None  # exact codec
