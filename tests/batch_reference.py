"""A straightforward numpy reference of the batch layout (docs/DATA.md §Batch layout), written
from the document, and a generator of records that exercise every corner of it."""

from __future__ import annotations

import numpy as np

from target_sft import CacheRecord, CacheWriter, TeacherCache

IGNORE = -100


def make_sample(
    key,
    rng: np.random.Generator,
    *,
    t: int,
    k: int = 8,
    vocab: int = 1000,
    supervised: bool = True,
) -> dict:
    """A valid record of ``t`` tokens: a prompt prefix, labels that sometimes differ from the
    input token (label exceptions), the label inside the top-k for most rows and outside for
    others, and some rows ending with padding (-1 / -inf)."""
    ids = rng.integers(0, vocab, t).astype(np.int32)
    labels = np.full(t, IGNORE, np.int32)
    if supervised:
        start = int(rng.integers(0, max(1, t // 2)))
        labels[start:] = ids[start:]
        flip = rng.random(t) < 0.2
        labels[flip & (labels != IGNORE)] = rng.integers(
            0, vocab, int((flip & (labels != IGNORE)).sum())
        )
        holes = rng.random(t) < 0.1  # a few unsupervised positions inside the answer
        labels[holes] = IGNORE
    return {
        "key": key,
        "input_ids": ids,
        "labels": labels,
        **make_rows(labels, rng, k=k, vocab=vocab),
    }


def make_rows(labels: np.ndarray, rng: np.random.Generator, *, k: int, vocab: int) -> dict:
    """Random rows (``topk_ids``, ``topk_logprobs``, ``label_logprobs``, ``label_ranks``) of
    ``k`` entries for the supervised positions of ``labels``: the label inside the top-k for
    most rows and outside for others, some rows ending with padding (-1 / -inf)."""
    rows = np.flatnonzero(labels[1:] != IGNORE) + 1
    s = rows.size
    topk = np.full((s, k), -1, np.int32)
    lps = np.full((s, k), -np.inf, np.float32)
    label_lp = np.empty(s, np.float32)
    ranks = np.empty(s, np.int32)
    for r, pos in enumerate(rows):
        lab = int(labels[pos])
        n = k if rng.random() < 0.8 else int(rng.integers(1, k + 1))
        cand = rng.choice(vocab, n + 1, replace=False)
        cand = cand[cand != lab][:n]
        inside = rng.random() < 0.7
        if inside:
            j = int(rng.integers(0, n))
            cand[j] = lab
        logits = np.sort(rng.normal(0, 3, n))[::-1]
        row_lp = (logits - np.logaddexp.reduce(logits) - 0.05).astype(np.float32)
        topk[r, :n], lps[r, :n] = cand, row_lp
        if inside:
            label_lp[r], ranks[r] = row_lp[j], j
        else:
            label_lp[r], ranks[r] = row_lp[-1] - 1.5, k + int(rng.integers(0, 50))
    return {
        "topk_ids": topk,
        "topk_logprobs": lps,
        "label_logprobs": label_lp,
        "label_ranks": ranks,
    }


def write_sample_cache(
    path, n: int, *, seed: int, k: int, vocab: int, lengths: tuple[int, int]
) -> TeacherCache:
    """A cache of ``n`` :func:`make_sample` records keyed ``doc-0 …`` with lengths drawn from
    ``[lengths[0], lengths[1])`` (one generator seeded ``seed``, so the data is reproducible)."""
    rng = np.random.default_rng(seed)
    with CacheWriter(path, top_k=k, vocab_size=vocab) as w:
        for i in range(n):
            t = int(rng.integers(*lengths))
            w.add(**make_sample(f"doc-{i}", rng, t=t, k=k, vocab=vocab))
    return TeacherCache(path)


def write_reference_cache(
    path, teacher: TeacherCache, *, seed: int, k: int, reverse: bool = True, **writer
) -> TeacherCache:
    """A reference cache (role ``"reference"``) of the same samples as ``teacher`` (keys, tokens,
    labels) with other rows of ``k`` entries, stored in reverse order by default (so that
    positions differ and records must be found by key); ``writer`` goes to ``CacheWriter``."""
    rng = np.random.default_rng(seed)
    records = teacher.records_at(range(len(teacher)))
    if reverse:
        records = records[::-1]
    writer.setdefault("role", "reference")
    with CacheWriter(path, top_k=k, vocab_size=teacher.vocab_size, **writer) as w:
        for r in records:
            w.add(
                r.key,
                r.input_ids,
                r.labels,
                **make_rows(r.labels, rng, k=k, vocab=teacher.vocab_size),
            )
    return TeacherCache(path)


def _place_rows(
    rec: CacheRecord, ids: np.ndarray, lps: np.ndarray, row: int, off: int, n: int, extra: bool
) -> np.ndarray:
    """Write ``rec``'s rows at its supervised positions (HF alignment) of ``ids``/``lps`` (with
    the label column when ``extra``); return its label log-probs placed the same way."""
    k = rec.topk_ids.shape[1]
    label_lps = np.zeros(ids.shape[1], np.float32)
    for r, t in enumerate(rec.supervised_positions):
        if t >= n:
            break
        ids[row, off + t, :k] = rec.topk_ids[r]
        lps[row, off + t, :k] = rec.topk_logprobs[r]
        label_lps[off + t] = rec.label_logprobs[r]
        lab = rec.labels[t]
        if extra and lab not in rec.topk_ids[r]:
            ids[row, off + t, k] = lab
            lps[row, off + t, k] = rec.label_logprobs[r]
    return label_lps


def first_fit(lengths: list[int], capacity: int) -> list[tuple[int, int]]:
    """(row, offset) of each sample packed greedily into rows of ``capacity`` tokens."""
    fill: list[int] = []
    out = []
    for n in lengths:
        for row, f in enumerate(fill):
            if f + n <= capacity:
                out.append((row, f))
                fill[row] += n
                break
        else:
            out.append((len(fill), 0))
            fill.append(n)
    return out


def reference_batch(
    records: list[CacheRecord],
    *,
    pad_token_id: int = 0,
    max_length: int | None = None,
    packing: bool = False,
    padding: str = "longest",
    pad_to_multiple_of: int | None = None,
    label_in_support: bool = True,  # build_batch's default
    references: list[CacheRecord] | None = None,
) -> dict:
    """The batch of ``records`` (with ``references``: each record's reference record, placed
    in the ``reference_*`` tensors exactly like the teacher rows)."""
    k = records[0].topk_ids.shape[1]
    w = k + int(label_in_support)
    lengths = [min(r.n_tokens, max_length or r.n_tokens) for r in records]
    if packing:
        assert max_length is not None
        places = first_fit(lengths, max_length)
        rows = max(p[0] for p in places) + 1
        fills = [0] * rows
        for (row, off), n in zip(places, lengths, strict=True):
            fills[row] = max(fills[row], off + n)
        longest = max(fills)
    else:
        places = [(i, 0) for i in range(len(records))]
        rows, longest = len(records), max(lengths)
    length = max_length if padding == "max_length" else longest
    m = pad_to_multiple_of or 1
    length = -(-length // m) * m

    input_ids = np.full((rows, length), pad_token_id, np.int64)
    labels = np.full((rows, length), IGNORE, np.int64)
    mask = np.zeros((rows, length), np.int64)
    position_ids = np.zeros((rows, length), np.int64)
    tids = np.full((rows, length, w), -1, np.int32)
    tlps = np.full((rows, length, w), -np.inf, np.float32)
    seq = np.full((rows, length), -1, np.int64)
    if references is not None:
        wr = references[0].topk_ids.shape[1] + int(label_in_support)
        rids = np.full((rows, length, wr), -1, np.int32)
        rlps = np.full((rows, length, wr), -np.inf, np.float32)
        rlab = np.zeros((rows, length), np.float32)
    for i, (rec, (row, off), n) in enumerate(zip(records, places, lengths, strict=True)):
        input_ids[row, off : off + n] = rec.input_ids[:n]
        labels[row, off + 1 : off + n] = rec.labels[1:n]  # a sample's first token: -100
        mask[row, off : off + n] = 1
        position_ids[row, off : off + n] = np.arange(n)
        seq[row, off : off + n] = i
        _place_rows(rec, tids, tlps, row, off, n, label_in_support)
        if references is not None:
            ref = references[i]
            assert ref.key == rec.key and np.array_equal(ref.labels, rec.labels)
            rlab[row] += _place_rows(ref, rids, rlps, row, off, n, label_in_support)
    out = {
        "input_ids": input_ids,
        "labels": labels,
        "teacher_ids": tids,
        "teacher_logprobs": tlps,
        "sequence_ids": seq,
    }
    if references is not None:
        out.update(reference_ids=rids, reference_logprobs=rlps, reference_label_logprobs=rlab)
    if not packing:
        out["attention_mask"] = mask
        return out
    # segments: each sample, then each row's padding tail (its own segment)
    cu = [0]
    for row in range(rows):
        mine = sorted((off, n) for (r, off), n in zip(places, lengths, strict=True) if r == row)
        end = 0
        for off, n in mine:
            end = off + n
            cu.append(row * length + end)
        if end < length:
            position_ids[row, end:] = np.arange(length - end)
            cu.append((row + 1) * length)
    out["position_ids"] = position_ids
    out["cu_seqlens"] = np.asarray(cu, np.int32)
    out["max_seqlen"] = int(np.diff(cu).max())
    return out


def assert_batches_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        if isinstance(w, np.ndarray):
            assert isinstance(g, np.ndarray), name
            assert g.dtype == w.dtype, (name, g.dtype, w.dtype)
            assert g.shape == w.shape, (name, g.shape, w.shape)
            np.testing.assert_array_equal(g, w, err_msg=name)
        else:
            assert g == w, name
