"""The independent reference reader (tests/cache/reference_reader.py, written from docs/FORMAT.md alone)
against the real writer and reader of target_sft.

Caches are written with ``target_sft.CacheWriter`` (both codecs, several shards, int and str keys,
label exceptions, rows with padding, empty rows, -inf and sub-floor log-probs, fp32 round-off above
0, labels inside and outside the top-k, rows sharing ids with the previous row) and read back
twice: by ``target_sft.TeacherCache`` and by the reference reader. Both must return the same
arrays bit for bit; the exact codec must return what was written bit for bit; the compact codec
must return exactly what FORMAT.md §5 predicts from the written data (ids in the decoded row order
of §5.3, log-probs quantised by the encoding rule of §5.1 with the table of the rung each row's
codebook is, within its error bound). Compact caches are written under the default fidelity budget
(format version 3: a codebook ladder, records at several rungs per shard, each frame's rows section
starting with ``u8 rung_a, u8 rung_b, varint split``: rows ``r < split`` coded with rung ``a``'s
table, the others with rung ``b``'s) and with fixed steps (a one-rung ladder); version 1 and
version 2 frames (one table, no rung bytes) are read from tests/data/v1 and from an append to it.

A second, spec-side *encoder* (in this file, also from FORMAT.md alone) re-encodes every written
record and must reproduce the writer's raw frames byte for byte. It is also used to craft frames
that break one rule of §5.3 at a time (both readers must refuse them) and valid frames the writer
never emits (both readers must decode them identically), and to store damaged or unusual
``codebook_rungs`` (§2).

No test is skipped: codec-specific tests are parametrised over the caches of that codec only.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import reference_reader as rr
import xxhash
import zstandard
from safetensors import safe_open
from safetensors.numpy import save_file

from build_helpers import reseal_shard
from target_sft import CacheWriter, TeacherCache
from target_sft.errors import (
    CacheCorruptionError,
    CacheError,
    CacheFormatError,
    CacheInputError,
    CacheMismatchError,
    CacheVersionError,
)

#: Caches written by format version 1 (target-sft before the region checksums), kept to test
#: that they still read: see tests/cache/test_checksums.py.
V1_CACHES = Path(__file__).resolve().parents[1] / "data" / "v1"

FIELDS = rr.RECORD_FIELDS[1:]  # the array fields
#: §5.1: the version-2 default codebook (one fixed table; still what ``max_mean_kl=None`` with
#: these steps writes, as a one-rung ladder).
DEFAULT_PARAMS = {"sqrt_step": 2.5e-3, "tail_step": 2.5, "floor": -48.0}


#: §5.1: the default ladder's rung whose codebook is the version-2 default (``DEFAULT_PARAMS``),
#: and the rung a record without supervised rows names twice (§4).
DEFAULT_RUNG = 74


def default_ladder() -> dict[str, Any]:
    """§5.1, "The ladder and the fidelity budget", computed from the text alone: 128 rungs,
    ``sqrt_steps[j] = 2.5e-3 · c[e mod 16] · 2^(e div 16)`` with ``e = j − 74`` (floor division)
    and ``c[i]`` the float64 nearest ``2^(i/16)``, ``tail_steps[j] = min(1000 · sqrt_steps[j],
    8)``, ``floor = -48``, budget 1e-4."""
    c = [2.0 ** (i / 16) for i in range(16)]
    e = [j - DEFAULT_RUNG for j in range(128)]
    sqrt_steps = [2.5e-3 * c[x % 16] * 2.0 ** (x // 16) for x in e]
    return {
        "sqrt_steps": sqrt_steps,
        "tail_steps": [min(1000 * h, 8.0) for h in sqrt_steps],
        "floor": -48.0,
        "max_mean_kl": 1e-4,
    }


def fixed_ladder(sqrt_step: float, tail_step: float, floor: float = -48.0) -> dict[str, Any]:
    """§5.1: a fixed codebook of version 3 is a one-rung ladder with ``max_mean_kl = null``."""
    return {
        "sqrt_steps": [sqrt_step],
        "tail_steps": [tail_step],
        "floor": floor,
        "max_mean_kl": None,
    }


def rung_params(codec_params: dict[str, Any], rung: int | None) -> dict[str, float]:
    """The ``(sqrt_step, tail_step, floor)`` of one rung of a ladder (§5.1), or the fixed ones
    of a version 1–2 cache (``rung`` None)."""
    if rung is None:
        return {k: codec_params[k] for k in ("sqrt_step", "tail_step", "floor")}
    return {
        "sqrt_step": codec_params["sqrt_steps"][rung],
        "tail_step": codec_params["tail_steps"][rung],
        "floor": codec_params["floor"],
    }


def escape_threshold(params: dict[str, float]) -> float:
    """§5.1: values below ``float32(levels[L-1] - s/2)`` are escaped."""
    levels = rr.build_codebook(**params)
    return float(np.float32(float(levels[-1]) - params["tail_step"] / 2))


# --------------------------------------------------------------------------------------------
# Test data. Every record respects the writer-enforced rules of FORMAT.md §3: distinct ids,
# padding (-1, -inf) only at row ends, log-probs <= 1e-3 and not NaN, ranks >= 0, and when the
# label is in its row: its log-prob within 1e-4·max(1, |v|) of its entry's and its rank < k.


def make_key(i: int, rng: np.random.Generator) -> int | str:
    """Mixed int and str keys: negative, int64 extremes, unicode, the empty string."""
    special: list[int | str] = [-(2**63), 2**63 - 1, "", "ключ-🔑", 0, -1]
    if i < len(special):
        return special[i]
    if i % 2:
        return f"sample/{i}/{int(rng.integers(1 << 30))}"
    return int(rng.integers(-(2**62), 2**62)) * 2 + (i % 7)


def row_logprobs(rng: np.random.Generator, n: int, threshold: float) -> np.ndarray:
    """``n`` log-probs, descending, with the hard cases: 0, -0.0 and fp32 round-off of log 1
    (``(0, 1e-3]``), ties, values below the codebook floor, -inf entries inside the valid part
    of the row, values around the escape threshold."""
    scale = rng.choice([0.3, 2.0, 6.0, 15.0])
    logits = rng.normal(0.0, scale, n + 1)  # the extra one stands for the mass outside the top-k
    lp = logits - np.logaddexp.reduce(logits) - rng.exponential(0.01)
    lp = np.sort(lp[:n])[::-1].astype(np.float32)
    if n == 0:
        return lp
    u = rng.random()
    if u < 0.1:
        lp[0] = rng.choice([0.0, -0.0, 3e-4, 9e-4, 1e-7])
    elif u < 0.2 and n > 1:  # ties: identical values share a level
        j = int(rng.integers(0, n - 1))
        lp[j + 1 : j + 1 + int(rng.integers(1, 4))] = lp[j]
    if rng.random() < 0.15:  # the tail below the floor: escaped, stored exactly
        j = int(rng.integers(0, n))
        lp[j:] = np.minimum(lp[j:], -48.0 - rng.exponential(30.0, n - j).astype(np.float32))
    if rng.random() < 0.1:  # -inf inside the valid entries: escaped too
        lp[int(rng.integers(0, n)) :] = -np.inf
    if rng.random() < 0.1:  # just around the escape threshold levels[L-1] - s/2
        lp[-1] = np.float32(threshold + rng.normal(0, 0.05))
    return np.sort(lp)[::-1]


def make_record(
    rng: np.random.Generator,
    key: int | str,
    vocab: int,
    k: int,
    max_len: int = 40,
    threshold: float | None = None,
):
    if threshold is None:
        threshold = escape_threshold(DEFAULT_PARAMS)
    t_len = int(rng.integers(1, max_len + 1))
    sup = np.zeros(t_len, dtype=bool)
    if rng.random() > 0.1:  # else: nothing supervised (S = 0)
        sup = np.arange(t_len) >= rng.integers(0, t_len)
        sup &= rng.random(t_len) > 0.1
    sup[0] = rng.random() < 0.3  # labels[0] is stored but never has a row
    positions = np.flatnonzero(sup[1:]) + 1
    s_len = len(positions)

    input_ids = rng.integers(0, vocab, t_len).astype(np.int32)
    labels = np.full(t_len, -100, dtype=np.int32)
    if sup[0]:
        labels[0] = rng.integers(0, vocab)  # usually an exception at t = 0
    topk_ids = np.full((s_len, k), -1, dtype=np.int32)
    topk_lps = np.full((s_len, k), -np.inf, dtype=np.float32)
    label_lps = np.zeros(s_len, dtype=np.float32)
    label_ranks = np.zeros(s_len, dtype=np.int32)
    prev = np.zeros(0, dtype=np.int64)  # the previous row's valid ids
    for r, t in enumerate(positions):
        n = k if rng.random() < 0.7 else int(rng.integers(0, k + 1))
        n = min(n, vocab - 1 - len(prev))
        if rng.random() < 0.5:  # ids concentrated on a few values: the id table is used
            fresh = rng.permutation(min(vocab, max(4 * k, 64) + len(prev)))
        else:
            fresh = rng.choice(vocab, size=n + 1 + len(prev), replace=False)
        if len(prev) and rng.random() < 0.6:  # neighbouring rows share ids (§5.3 share_mask)
            keep = rng.permutation(prev)[: int(rng.integers(0, min(n, len(prev)) + 1))]
            fresh = np.concatenate([keep, fresh[~np.isin(fresh, keep)]])
        cand = fresh[: n + 1].copy()
        cand[:n] = rng.permutation(cand[:n])
        lp = row_logprobs(rng, n, threshold)
        topk_ids[r, :n] = cand[:n]
        topk_lps[r, :n] = lp
        u = rng.random()
        outside_prev = np.setdiff1d(prev, cand[:n])
        if n and u < 0.6:  # the label is in the top-k
            j = int(rng.integers(0, n))
            label, label_ranks[r], label_lps[r] = cand[j], j, lp[j]
            if np.isfinite(lp[j]) and rng.random() < 0.3:  # within the §3 tolerance
                tol = 1e-4 * max(1.0, abs(float(lp[j])))
                label_lps[r] = min(float(lp[j]) + rng.uniform(-0.5, 0.5) * tol, 1e-3)
        else:  # outside: rank >= k, log-prob at most the last valid one's
            if len(outside_prev) and u < 0.8:  # a previous-row id becomes the label
                label = int(rng.choice(outside_prev))
            else:
                label = cand[n]
            label_ranks[r] = k + int(rng.choice([0, 1, 200, 70_000, 2**31 - 1 - k]))
            last = float(lp[n - 1]) if n else 0.0
            label_lps[r] = rng.choice(
                [last - rng.exponential(2.0), -np.inf, -60.0 - rng.exponential(10.0)]
            )
        labels[t] = label
        input_ids[t] = label
        if rng.random() < 0.15:  # label exception: the supervised label differs from input_ids
            input_ids[t] = (label + 1 + rng.integers(0, vocab - 1)) % vocab
        if rng.random() < 0.2 and n:  # writer input need not be sorted
            perm = rng.permutation(n)
            topk_ids[r, :n] = topk_ids[r, :n][perm]
            topk_lps[r, :n] = topk_lps[r, :n][perm]
        prev = topk_ids[r, :n].astype(np.int64)
    return {
        "key": key,
        "input_ids": input_ids,
        "labels": labels,
        "topk_ids": topk_ids,
        "topk_logprobs": topk_lps,
        "label_logprobs": label_lps,
        "label_ranks": label_ranks,
    }


def make_records(
    seed: int, n: int, vocab: int, k: int, threshold: float | None = None
) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    recs = [make_record(rng, make_key(i, rng), vocab, k, threshold=threshold) for i in range(n)]
    recs[1]["input_ids"] = np.array([vocab - 1], dtype=np.int32)  # T = 1, S = 0
    recs[1]["labels"] = np.array([3], dtype=np.int32)
    for f in ("topk_ids", "topk_logprobs"):
        recs[1][f] = recs[1][f][:0]
    for f in ("label_logprobs", "label_ranks"):
        recs[1][f] = recs[1][f][:0]
    return recs


def feature_record(key: int | str = "feature") -> dict[str, Any]:
    """A hand-made record (k = 8, V = 1000) with every case of §5.3 at known rows:

    row 0: label in row, escaped (-60) and -inf entries; no share mask (first row)
    row 1: label in row, 3 ids shared with row 0, new ids ranked past 192 (bucketed numbers)
    row 2: label outside (escaped log-prob), shares row 1's label as a plain entry, padding
    row 3: its label is an entry of row 2 (never a share bit), label log-prob within tolerance
    row 4: no valid entry at all (n = 0)
    row 5: full row right after the empty one (no share-mask bytes), log-prob -0.0 for the label
    row 6: label outside, short row sharing two ids with row 5
    """
    inf = np.inf
    rows = [  # (ids, log-probs, label log-prob, label rank)
        ([10, 20, 30, 40, 50, 60, 70, 80], [-0.1, -2, -3, -4, -5, -60, -inf, -inf], -0.1, 0),
        ([11, 10, 20, 30, 990, 991], [-0.2, -1, -2.5, -3, -7, -9], -0.2, 0),
        ([20, 990, 30, 11, 13], [-0.5, -1, -1.5, -2, -2.5], -70.0, 5000),
        ([13, 11, 20, 40, 41, 42, 43, 44], [-0.3, -1, -2, -3, -4, -5, -6, -47.9], -0.30001, 0),
        ([], [], -5.0, 100),
        ([15, 1, 2, 3, 4, 5, 6, 7], [-0.0, -1, -2, -3, -4, -5, -6, -48.3], -0.0, 0),
        ([1, 2, 999], [-1, -2, -3], -3.5, 8),
    ]
    k = 8
    input_ids = np.array([5, 10, 500, 12, 13, 14, 15, 16], dtype=np.int32)
    labels = np.array([-100, 10, 11, 12, 13, 14, 15, 16], dtype=np.int32)  # exception at t = 2
    ids = np.full((len(rows), k), -1, dtype=np.int32)
    lps = np.full((len(rows), k), -np.inf, dtype=np.float32)
    for r, (i, v, _, _) in enumerate(rows):
        ids[r, : len(i)] = i
        lps[r, : len(v)] = v
    return {
        "key": key,
        "input_ids": input_ids,
        "labels": labels,
        "topk_ids": ids,
        "topk_logprobs": lps,
        "label_logprobs": np.array([row[2] for row in rows], dtype=np.float32),
        "label_ranks": np.array([row[3] for row in rows], dtype=np.int32),
    }


def synthetic_records(n: int, vocab: int, k: int, seed: int) -> list[dict[str, Any]]:
    from target_sft.testing.synthetic import generate_list

    out = []
    for i, r in enumerate(generate_list(n, vocab_size=vocab, top_k=k, seed=seed, mean_length=80)):
        d = r.as_kwargs()
        d["key"] = f"syn-{i}" if i % 3 else int(r.key)
        out.append(d)
    return out


def peakedness_records(n: int, vocab: int, k: int, seed: int) -> list[dict[str, Any]]:
    """Records whose rows all have one peakedness per record, from flat (logit scale 0.3) to very
    peaked (scale 20): under a fidelity budget the writer encodes them at different rungs of the
    ladder (§5.1), several of them in one shard."""
    rng = np.random.default_rng(seed)
    scales = [0.3, 1.0, 3.0, 8.0, 20.0]
    out = []
    for i in range(n):
        t_len = int(rng.integers(10, 40))
        input_ids = rng.integers(0, vocab, t_len).astype(np.int32)
        labels = np.full(t_len, -100, dtype=np.int32)
        s_len = t_len - 1
        ids = np.empty((s_len, k), np.int32)
        lps = np.empty((s_len, k), np.float32)
        label_lps = np.empty(s_len, np.float32)
        ranks = np.empty(s_len, np.int32)
        for r in range(s_len):
            cand = rng.choice(vocab, 4 * k, replace=False)
            logits = rng.normal(0.0, scales[i % len(scales)], 4 * k)
            lp = logits - np.logaddexp.reduce(logits)
            order = np.argsort(-lp, kind="stable")
            ids[r], lps[r] = cand[order[:k]], lp[order[:k]]
            j = int(rng.integers(0, k)) if rng.random() < 0.7 else int(rng.integers(k, 4 * k))
            labels[r + 1] = input_ids[r + 1] = cand[order[j]]
            label_lps[r], ranks[r] = np.float32(lp[order[j]]), j
        out.append(
            {
                "key": f"peaked-{i}",
                "input_ids": input_ids,
                "labels": labels,
                "topk_ids": ids,
                "topk_logprobs": lps,
                "label_logprobs": label_lps,
                "label_ranks": ranks,
            }
        )
    return out


# --------------------------------------------------------------------------------------------
# A spec-side encoder (FORMAT.md §4, §5), independent of the reader's decoding loop.


def put_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def planes(words: np.ndarray) -> bytes:
    """§4.1.1: byte planes of 32-bit words (any 4-byte dtype, taken as its bit pattern)."""
    w = np.ascontiguousarray(words).reshape(-1).view("<u4")
    return w.view(np.uint8).reshape(-1, 4).T.tobytes()


def encode_tokens(input_ids: np.ndarray, labels: np.ndarray) -> bytes:
    mask = labels != -100
    out = planes(input_ids.astype("<i4"))
    out += np.packbits(mask, bitorder="little").tobytes()
    exc = np.flatnonzero(mask & (labels != input_ids))
    out += put_varint(len(exc))
    for t in exc.tolist():
        out += put_varint(t) + struct.pack("<I", int(labels[t]))
    return out


def quantize(u: np.ndarray, levels: np.ndarray, s: float) -> np.ndarray:
    """§5.1 encoding: index 0 for ``u >= 0``; escape ``L`` for -inf, NaN, or below
    ``float32(levels[L-1] - s/2)``; else the smallest ``n`` with ``u >= θ[n]`` (or ``L - 1``)."""
    u = np.asarray(u, dtype=np.float32).reshape(-1)
    lv = levels.astype(np.float64)
    theta = ((lv[:-1] + lv[1:]) / 2).astype(np.float32)
    esc = np.float32(lv[-1] - s / 2)
    q = np.sum(theta[None, :] > u[:, None], axis=1)  # θ decreases: #θ above u = smallest n
    q = np.where(u >= 0, 0, q)
    return np.where(np.isnan(u) | np.isneginf(u) | (u < esc), len(levels), q)


def dequantize(u: np.ndarray, levels: np.ndarray, s: float) -> np.ndarray:
    """What a reader decodes for the written ``u``: ``levels[q]``, or ``u`` itself if escaped."""
    u = np.asarray(u, dtype=np.float32)
    q = quantize(u, levels, s).reshape(u.shape)
    return np.where(q < len(levels), levels[np.minimum(q, len(levels) - 1)], u).astype(np.float32)


@dataclass(frozen=True)
class FrameBooks:
    """The codebooks a compact frame's values are coded with (§5.1, §5.3). With a ladder the rows
    section starts with ``u8 rung_a, u8 rung_b, varint split``: rows ``r < split`` use rung
    ``a``'s table, the others rung ``b``'s. A version 1–2 frame (``a`` None) has no such header
    and one table for every row. ``tables``: rung (None without a ladder) -> (levels, tail step).
    """

    tables: dict[int | None, tuple[np.ndarray, float]]
    a: int | None = None
    b: int | None = None
    split: int = 0

    @staticmethod
    def one_rung(rung: int, levels: np.ndarray, s: float) -> FrameBooks:
        """Every row with rung ``rung``'s table (``rung_a = rung_b``, split 0)."""
        return FrameBooks({rung: (levels, s)}, rung, rung, 0)

    def rung(self, r: int) -> int | None:
        """The rung of row ``r`` (§5.3: ``rung_a`` if ``r < split`` else ``rung_b``)."""
        return self.a if r < self.split else self.b

    def row(self, r: int) -> tuple[np.ndarray, float]:
        """(levels, tail step) of row ``r``'s codebook."""
        return self.tables[self.rung(r)]

    def rungs_used(self, s_len: int) -> set[int | None]:
        """The rungs whose tables the rows of a record of ``s_len`` rows are coded with."""
        return {self.rung(r) for r in range(s_len)}

    def head(self) -> bytes:
        """The first bytes of the rows section (§5.3): the two rungs and the split, or nothing
        (version 1–2)."""
        if self.a is None:
            return b""
        return bytes([self.a, self.b]) + put_varint(self.split)


@dataclass
class Row:
    """One compact row as §5.3 codes it (absolute ranks; gaps are formed on serialisation)."""

    n: int
    n_levels: int  # L of the row's codebook (§5.1: rung_a's or rung_b's table)
    flag: int
    mask: bytes
    ranks: list[int]
    label_code: int  # q of the label's log-prob
    value_codes: list[int]  # L - q per entry after the label
    exact: list[np.float32]  # escaped values in decoding order
    label_rank: int
    order: list[int] = field(default_factory=list)  # decoded ids
    decoded: list[np.float32] = field(default_factory=list)  # label's value, then the entries'


def compact_rows(
    rec: dict[str, Any], books: FrameBooks, id_table: np.ndarray
) -> tuple[list[Row], dict[str, np.ndarray]]:
    """The rows of ``rec`` as the writer must code them (§5.3), each row's values with its own
    codebook (``books.row(r)``), and what a reader must decode."""
    M = len(id_table)
    rank_of = {int(x): i for i, x in enumerate(id_table.tolist())}
    labels = rec["labels"]
    row_labels = labels[1:][labels[1:] != -100]
    ids, lps = rec["topk_ids"], rec["topk_logprobs"]
    s_len, k = ids.shape
    out_ids = np.full((s_len, k), -1, dtype=np.int32)
    out_lps = np.full((s_len, k), -np.inf, dtype=np.float32)
    out_label = np.zeros(s_len, dtype=np.float32)
    rows: list[Row] = []
    prev: list[int] = []
    for r in range(s_len):
        levels, s = books.row(r)
        L = len(levels)
        n = int(np.sum(ids[r] != -1))
        valid = [int(x) for x in ids[r, :n]]
        lp_of = dict(zip(valid, lps[r, :n].tolist(), strict=True))
        label = int(row_labels[r])
        flag = int(label in lp_of)
        shared = [x for x in prev if x in lp_of and x != label]
        new = sorted(set(valid) - {label} - set(shared), key=lambda x: rank_of.get(x, M + x))
        order = [label] * flag + shared + new
        bits = np.zeros(8 * ((len(prev) + 7) // 8), dtype=np.uint8)
        bits[[j for j, x in enumerate(prev) if x in shared]] = 1
        u_label = np.float32(lp_of[label] if flag else rec["label_logprobs"][r])
        q_label = int(quantize(u_label, levels, s)[0])
        exact = [u_label] if q_label == L else []
        codes = []
        for x in order[flag:]:
            q = int(quantize(np.float32(lp_of[x]), levels, s)[0])
            codes.append(L - q)
            if q == L:
                exact.append(np.float32(lp_of[x]))
        rows.append(
            Row(
                n=n,
                n_levels=L,
                flag=flag,
                mask=np.packbits(bits, bitorder="little").tobytes() if r else b"",
                ranks=[rank_of.get(x, M + x) for x in new],
                label_code=q_label,
                value_codes=codes,
                exact=exact,
                label_rank=int(rec["label_ranks"][r]),
                order=order,
            )
        )
        out_ids[r, :n] = order
        out_lps[r, :n] = dequantize(np.array([lp_of[x] for x in order], np.float32), levels, s)
        out_label[r] = out_lps[r, 0] if flag else dequantize(u_label, levels, s)
        rows[-1].decoded = [out_label[r], *out_lps[r, flag:n]]
        prev = order
    decoded = {
        "topk_ids": out_ids,
        "topk_logprobs": out_lps,
        "label_logprobs": out_label,
        "label_ranks": np.asarray(rec["label_ranks"], dtype=np.int32),
    }
    return rows, decoded


def put_numbers(values: list[int]) -> tuple[bytes, bytes]:
    """§5.3 number streams: ``v < 192`` is a symbol; else symbol ``192 + b`` and ``b - 1`` bits."""
    sym, acc, nbits = bytearray(), 0, 0
    for v in values:
        if v < 192:
            sym.append(v)
            continue
        w = v - 191
        b = w.bit_length()
        sym.append(192 + b)
        acc |= (w ^ (1 << (b - 1))) << nbits
        nbits += b - 1
    return bytes(sym), acc.to_bytes((nbits + 7) // 8, "little")


def compact_streams(rows: list[Row], k: int, full_flag: bool | None = None) -> tuple[int, dict]:
    """Flags and the 11 streams of §5.3 (``full_flag=None``: bit 0 iff every row is full)."""
    if full_flag is None:
        full_flag = all(row.n == k for row in rows)
    st = {"nvalid": b"" if full_flag else b"".join(put_varint(row.n) for row in rows)}
    st["row_flags"] = bytes(row.flag for row in rows)
    st["share_mask"] = b"".join(row.mask for row in rows)
    gaps = []
    for row in rows:
        gaps += [x if i == 0 else x - row.ranks[i - 1] - 1 for i, x in enumerate(row.ranks)]
    st["rank_sym"], st["rank_bits"] = put_numbers(gaps)
    st["value_sym"], st["value_bits"] = put_numbers([c for row in rows for c in row.value_codes])
    st["label_sym"], st["label_bits"] = put_numbers([row.label_code for row in rows])
    st["label_rank"] = b"".join(put_varint(row.label_rank) for row in rows)
    st["exact_values"] = np.array([x for row in rows for x in row.exact], "<f4").tobytes()
    assert tuple(st) == rr._COMPACT_STREAMS
    return int(full_flag), st


def join_streams(flags: int, st: dict[str, bytes]) -> bytes:
    return bytes([flags]) + b"".join(put_varint(len(v)) + v for v in st.values())


def encode_frame(
    rec: dict[str, Any],
    codec: str,
    books: FrameBooks | None = None,
    id_table=None,
    full_flag=None,
) -> bytes:
    """The raw frame FORMAT.md §4 prescribes for ``rec`` (compact: the rows section starts with
    ``books``' rungs and split, or nothing for a version 1–2 frame, and each row's values are
    coded with its codebook: §5.1, §5.3)."""
    t_len, s_len = len(rec["input_ids"]), len(rec["label_ranks"])
    out = put_varint(t_len) + put_varint(s_len) + encode_tokens(rec["input_ids"], rec["labels"])
    if codec == "exact":
        for f, dt in (
            ("topk_ids", "<i4"),
            ("topk_logprobs", "<f4"),
            ("label_logprobs", "<f4"),
            ("label_ranks", "<i4"),
        ):
            out += planes(np.asarray(rec[f], dtype=dt))
        return out
    assert books is not None
    rows, _ = compact_rows(rec, books, id_table)
    out += books.head()
    return out + join_streams(*compact_streams(rows, rec["topk_ids"].shape[1], full_flag))


def frame_books(shard: rr.RefShard, raw: bytes) -> FrameBooks:
    """The codebooks a compact frame is coded with (§5.1), read from the frame: with a ladder
    the rows section starts with ``u8 rung_a, u8 rung_b, varint split`` (§5.3), two rungs the
    shard's ``codebook_rungs`` lists and ``split <= S``; without one (version 1–2) there are no
    rung bytes and one table."""
    _, s_len, start = tokens_end(shard, raw)
    if not shard.rung_byte:
        return FrameBooks({None: (shard.codebooks[0], shard.codec_params["tail_step"])})
    cur = rr.Cursor(raw, "frame")
    cur.pos = start
    a, b, split = cur.u8(), cur.u8(), cur.varint()
    where = (shard.name, a, b, split, s_len, list(shard.codebooks))
    assert a in shard.codebooks and b in shard.codebooks and split <= s_len, where
    tails = shard.codec_params["tail_steps"]
    return FrameBooks({j: (shard.codebooks[j], tails[j]) for j in (a, b)}, a, b, split)


# --------------------------------------------------------------------------------------------
# Caches


@dataclass
class Built:
    path: Path
    codec: str
    k: int
    vocab: int
    params: dict[str, Any]  # compact: the codec_params the manifest must hold (zstd_level aside)
    written: dict[Any, dict[str, Any]]


#: ``max_mean_kl=None`` with fixed steps: one fixed codebook (a one-rung ladder, §5.1).
FIXED = {"max_mean_kl": None, "compact_sqrt_step": 2.5e-3, "compact_tail_step": 2.5}
CONFIGS = {
    # name: (codec, top_k, vocab, data, writer kwargs); compact without kwargs: the default
    # fidelity budget over the default ladder (§5.1), records at several rungs per shard
    "exact-k1-v1000": ("exact", 1, 1000, "local", {}),
    "compact-k1-v1000": ("compact", 1, 1000, "local", {}),
    "exact-k8-v1000": ("exact", 8, 1000, "local", {}),
    "compact-k8-v1000": ("compact", 8, 1000, "local", {}),
    "compact-k8-v1000-fixed": ("compact", 8, 1000, "local", FIXED),
    "exact-k64-v151936": ("exact", 64, 151_936, "local", {}),
    "compact-k64-v151936": ("compact", 64, 151_936, "local", {}),
    "compact-k64-v1000-steps": (  # 2h/s > h: the other branch of max(2h/s, h) in §5.1
        "compact",
        64,
        1000,
        "local",
        {
            "max_mean_kl": None,
            "compact_sqrt_step": 1e-2,
            "compact_tail_step": 1.0,
            "compact_floor": -30.0,
        },
    ),
    "compact-k8-synthetic": ("compact", 8, 1000, "synthetic", {}),
    "exact-k8-synthetic": ("exact", 8, 1000, "synthetic", {}),
    "compact-k16-v4000-peakedness": ("compact", 16, 4000, "peakedness", {}),
}
EXACT = sorted(n for n, c in CONFIGS.items() if c[0] == "exact")
COMPACT = sorted(n for n, c in CONFIGS.items() if c[0] == "compact")


def expected_codec_params(kw: dict[str, Any]) -> dict[str, Any]:
    """The compact ``codec_params`` (zstd_level aside) a writer given ``kw`` must store."""
    if "max_mean_kl" in kw and kw["max_mean_kl"] is None:
        return fixed_ladder(
            kw.get("compact_sqrt_step", DEFAULT_PARAMS["sqrt_step"]),
            kw.get("compact_tail_step", DEFAULT_PARAMS["tail_step"]),
            kw.get("compact_floor", DEFAULT_PARAMS["floor"]),
        )
    ladder = default_ladder()
    if "max_mean_kl" in kw:
        ladder["max_mean_kl"] = kw["max_mean_kl"]
    return ladder


def write_cache(path: Path, codec: str, k: int, vocab: int, recs, **kw) -> None:
    kw.setdefault("shard_size", 2000)
    kw.setdefault("prior_records", 4)
    with CacheWriter(path, top_k=k, vocab_size=vocab, codec=codec, **kw) as w:
        for r in recs:
            w.add(**r)


_BUILT: dict[str, Built] = {}


def build(name: str, tmp_path_factory) -> Built:
    """Each configuration's cache, written once per session."""
    if name not in _BUILT:
        codec, k, vocab, data, kw = CONFIGS[name]
        seed = sorted(CONFIGS).index(name)
        params = expected_codec_params(kw)
        # the values around the escape threshold are placed for the fixed table, or for the
        # ladder's rung 74 (the version-2 default)
        rung = min(DEFAULT_RUNG, len(params["sqrt_steps"]) - 1)
        threshold = escape_threshold(rung_params(params, rung))
        if data == "synthetic":
            recs = synthetic_records(24, vocab, k, seed)
        elif data == "peakedness":
            recs = peakedness_records(30, vocab, k, seed)
        else:
            recs = make_records(seed, 36 if k < 64 else 20, vocab, k, threshold)
            if k == 8 and vocab == 1000:
                recs.insert(3, feature_record())
        path = tmp_path_factory.mktemp(name) / "cache"
        write_cache(path, codec, k, vocab, recs, **kw)
        _BUILT[name] = Built(path, codec, k, vocab, params, {r["key"]: r for r in recs})
    return _BUILT[name]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def built(request, tmp_path_factory) -> Built:
    return build(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=COMPACT)
def compact_built(request, tmp_path_factory) -> Built:
    return build(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=EXACT)
def exact_built(request, tmp_path_factory) -> Built:
    return build(request.param, tmp_path_factory)


_REFS: dict[Path, list[dict[str, Any]]] = {}


def ref_records_of(b: Built) -> list[dict[str, Any]]:
    if b.path not in _REFS:
        _REFS[b.path] = rr.read_cache(b.path)
    return _REFS[b.path]


# --------------------------------------------------------------------------------------------
# Comparison helpers


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint32) if a.dtype == np.float32 else a


def assert_same_arrays(a: np.ndarray, b: np.ndarray, where: Any) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (where, a.dtype, b.dtype, a.shape, b.shape)
    assert np.array_equal(bits(a), bits(b)), where


def assert_same_record(ref: dict[str, Any], rec: Any, where: str) -> None:
    assert ref["key"] == rec.key and type(ref["key"]) is type(rec.key), where
    for f in FIELDS:
        assert_same_arrays(ref[f], getattr(rec, f), (where, f))


def error_bound_check(u: np.ndarray, d: np.ndarray, levels: np.ndarray, s: float, where: Any):
    """FORMAT.md §5.1 error bound: ``d`` (decoded) vs ``u`` (written), element-wise."""
    lv = levels.astype(np.float64)
    q = quantize(u, levels, s)
    for ui, di, qi in zip(u.astype(np.float64), d.astype(np.float64), q, strict=True):
        if qi == len(lv):  # escaped: exact
            assert np.float32(ui).tobytes() == np.float32(di).tobytes(), (where, ui, di)
            continue
        assert di in lv, (where, ui, di)
        if ui >= 0:
            assert di == 0.0, (where, ui, di)
            continue
        tol = 1e-6 * max(1.0, abs(ui))
        if ui < lv[-1]:  # in the tail below the last level, above the escape threshold
            assert di == lv[-1] and lv[-1] - di <= s / 2 + tol, (where, ui, di)
            continue
        j = int(np.searchsorted(-lv, -ui, side="right")) - 1  # lv[j] >= ui > lv[j + 1]
        assert di in (lv[j], lv[min(j + 1, len(lv) - 1)]), (where, ui, di)
        bound = (lv[j] - lv[j + 1]) / 2 if j + 1 < len(lv) else 0.0
        assert abs(di - ui) <= bound + tol, (where, ui, di, bound)


def shard_of_record(b: Built) -> dict[Any, rr.RefShard]:
    return {key: sh for sh in rr.open_shards(b.path)[1] for key in sh.keys}


# --------------------------------------------------------------------------------------------
# Tests on every cache configuration


def test_reference_matches_teacher_cache(built):
    refs = ref_records_of(built)
    cache = TeacherCache(built.path)
    assert len(cache) == len(refs) == len(built.written)
    for pos, ref in enumerate(refs):
        assert_same_record(ref, cache.record_at(pos), f"position {pos}")
        assert cache.key_at(pos) == ref["key"]
        assert cache.position(ref["key"]) == pos
    for ref in refs[::5]:
        assert_same_record(ref, cache[ref["key"]], f"key {ref['key']!r}")
        assert_same_record(ref, cache.get(ref["key"], ref["input_ids"]), f"key {ref['key']!r}")
    many = cache.records_at(list(range(len(cache)))[::-1], threads=2)
    for ref, rec in zip(refs[::-1], many, strict=True):
        assert_same_record(ref, rec, "records_at")


def test_writer_frames_are_the_spec_encoding(built):
    """Every raw frame the writer stored is, byte for byte, what FORMAT.md §4/§5 prescribes for
    the written record (the compact encoder here uses only the shard's id table and, for each
    row, the table of the rung the frame names for it: rows ``r < split`` rung_a's, the others
    rung_b's; which rungs and split a budget picks is the writer's choice, §5.1, checked in
    test_budget_splits_rows_between_two_rungs)."""
    shards = rr.open_shards(built.path)[1]
    assert len(shards) >= 2, "shard_size is small: the cache must span several shards"
    for shard in shards:
        for i in range(len(shard)):
            w = built.written[shard.keys[i]]
            raw = shard.frame(i)
            if built.codec == "exact":
                expect = encode_frame(w, "exact")
            else:
                books = frame_books(shard, raw)
                assert books.a is not None, "version 3 frames carry their rungs and split"
                expect = encode_frame(w, "compact", books, shard.id_table)
            assert raw == expect, (shard.name, i, shard.keys[i])


def test_reference_returns_what_was_written(exact_built):
    """Exact codec (§4.2): every field round-trips bit for bit."""
    refs = ref_records_of(exact_built)
    assert {r["key"] for r in refs} == set(exact_built.written)
    for got in refs:
        w = exact_built.written[got["key"]]
        for f in FIELDS:
            assert_same_arrays(got[f], np.asarray(w[f]), (got["key"], f))


def test_compact_decodes_what_the_spec_predicts(compact_built):
    """Compact codec: ids, labels and ranks exact; rows in the §5.3 decoded order (label, shared
    entries in the previous row's order, new ids by ascending rank); log-probs quantised by the
    §5.1 rule, within its error bound; a label in its row decodes to its entry's value."""
    b = compact_built
    refs = ref_records_of(b)
    shard_of = shard_of_record(b)
    for got in refs:
        w = b.written[got["key"]]
        where = f"key {got['key']!r}"
        for f in ("input_ids", "labels", "label_ranks"):
            assert np.array_equal(got[f], w[f]), (where, f)
        shard = shard_of[got["key"]]
        books = frame_books(shard, shard.frame(shard.keys.index(got["key"])))
        where += f" rungs {books.a}, {books.b}, split {books.split}"
        _, expect = compact_rows(w, books, shard.id_table)
        for f in FIELDS[2:]:
            assert_same_arrays(got[f], expect[f], (where, f))
        positions = np.flatnonzero(w["labels"][1:] != -100) + 1
        for r in range(len(positions)):
            codebook, s = books.row(r)  # §5.3: rung_a's table if r < split, else rung_b's
            n = int(np.sum(w["topk_ids"][r] != -1))
            gid, glp = got["topk_ids"][r], got["topk_logprobs"][r]
            assert np.all(gid[n:] == -1) and np.all(np.isneginf(glp[n:])), (where, r)
            assert sorted(gid[:n].tolist()) == sorted(w["topk_ids"][r, :n].tolist()), (where, r)
            by_id = dict(zip(w["topk_ids"][r, :n].tolist(), w["topk_logprobs"][r, :n], strict=True))
            written = np.array([by_id[x] for x in gid[:n].tolist()], dtype=np.float32)
            error_bound_check(written, glp[:n], codebook, s, (where, r))
            label = w["labels"][positions[r]]
            if n and gid[0] == label:  # §3: rank < k; §5.3: the entry's value, also for the label
                assert got["label_ranks"][r] < b.k, (where, r)
                assert bits(got["label_logprobs"][r : r + 1]) == bits(glp[:1]), (where, r)
                error_bound_check(np.float32([by_id[int(label)]]), glp[:1], codebook, s, (where, r))
            else:
                assert label not in gid[:n].tolist(), (where, r)
                error_bound_check(
                    w["label_logprobs"][r : r + 1],
                    got["label_logprobs"][r : r + 1],
                    codebook,
                    s,
                    (where, r),
                )


def test_shards_are_safetensors(built):
    """§2: the tensors and metadata of a version-3 shard; a compact shard lists in
    ``codebook_rungs`` exactly the rungs its frames name (rung_a and rung_b of each; §5.1: "each
    shard stores the tables of the rungs its records use"), each with its table's length, and its
    ``codebook`` tensor is those tables end to end."""
    m = rr.read_manifest(built.path)
    expected = {name for name, _ in rr._TENSORS[built.codec]}
    for e in m["shards"]:
        with safe_open(str(built.path / e["file"]), framework="numpy") as st:
            assert set(st.keys()) == expected
            meta = st.metadata()
            assert meta["format"] == "target-sft-shard" and meta["format_version"] == "3"
            assert meta["codec"] == built.codec and int(meta["top_k"]) == built.k
            assert int(meta["vocab_size"]) == built.vocab and int(meta["records"]) == e["records"]
            assert json.loads(meta["codec_params"]) == m["codec_params"]
            assert st.get_tensor("record_index").shape == (e["records"], 5)
            if built.codec == "exact":
                assert "codebook_rungs" not in meta
                continue
            listed = json.loads(meta["codebook_rungs"])
            codebook = st.get_tensor("codebook")
        shard = rr.RefShard(built.path / e["file"], m, e)
        used = set()
        for i in range(len(shard)):
            books = frame_books(shard, shard.frame(i))
            used |= {books.a, books.b}
        assert sorted(j for j, _ in listed) == sorted(used), e["file"]
        assert sum(n for _, n in listed) == len(codebook)
        tables = [shard.codebooks[j] for j, _ in listed]
        assert [len(t) for t in tables] == [n for _, n in listed]
        assert_same_arrays(np.concatenate(tables), codebook, e["file"])


def test_writer_uses_the_tensor_order_of_section_2(built):
    for shard in rr.open_shards(built.path)[1]:
        assert shard.tensor_order == [name for name, _ in rr._TENSORS[built.codec]]


def test_manifest(built):
    m = rr.read_manifest(built.path)
    assert m["format"] == "target-sft-cache" and m["format_version"] == 3
    assert m["codec"] == built.codec and m["top_k"] == built.k and m["vocab_size"] == built.vocab
    assert m["complete"] is True
    assert m["num_records"] == len(built.written)
    assert m["num_tokens"] == sum(len(r["input_ids"]) for r in built.written.values())
    assert m["num_supervised"] == sum(len(r["label_ranks"]) for r in built.written.values())
    expected_keys = {"zstd_level"} | (set(built.params) if built.codec == "compact" else set())
    assert set(m["codec_params"]) == expected_keys
    if built.codec == "compact":  # §5.1: the ladder, exactly as the text computes it
        assert {k: m["codec_params"][k] for k in built.params} == built.params
    for e in m["shards"]:
        assert (built.path / e["file"]).stat().st_size == e["bytes"]


def test_checksums_and_verify(built):
    assert rr.verify_checksums(built.path) == len(rr.read_manifest(built.path)["shards"])
    assert TeacherCache(built.path).verify() == len(built.written)


def test_token_and_key_hashes(built):
    for shard in rr.open_shards(built.path)[1]:
        for i in range(len(shard)):
            key = shard.keys[i]
            w = built.written[key]
            expected = xxhash.xxh3_64_intdigest(w["input_ids"].astype("<i4").tobytes())
            assert int(shard.record_index[i, 4]) == expected
            assert int(shard.key_hash[i]) == xxhash.xxh3_64_intdigest(rr.encode_key(key))
            assert int(shard.record_index[i, 2]) == len(w["input_ids"])
            assert int(shard.record_index[i, 3]) == len(w["label_ranks"])


def test_codebook_is_built_from_codec_params(compact_built):
    """§5.1: every table a shard stores is the codebook of its rung's ``(h, s, floor)``."""
    p = compact_built.params
    for shard in rr.open_shards(compact_built.path)[1]:
        assert shard.codebooks
        for rung, table in shard.codebooks.items():
            expected = rr.build_codebook(**rung_params(p, rung))
            assert 1 <= len(expected) <= rr.MAX_LEVELS
            assert_same_arrays(table, expected, (shard.name, rung))


def test_id_table(compact_built):
    """§5.2: distinct ids in [0, V), at most 8192 of them."""
    for shard in rr.open_shards(compact_built.path)[1]:
        t = shard.id_table
        assert len(t) <= 8192 and len(np.unique(t)) == len(t)
        assert np.all(t < compact_built.vocab)


def test_compact_stream_layout(compact_built):
    """§5.3 stream by stream: the two rung bytes name rungs the shard stores and the split varint
    is at most S, row_flags is S bytes of 0/1 telling whether the label is in the row, share_mask
    holds ceil(n_{r-1}/8) bytes per row r >= 1 and never flags the current label, label_rank is S
    varints, the bit streams are whole bytes with zero padding, and a record with S = 0 has its
    two rung bytes (§4: the writer names rung 74 twice under a budget; the one rung of a one-rung
    ladder), split 0, the flags byte (the writer sets it to 1) and 11 empty streams."""
    b = compact_built
    shard_of = shard_of_record(b)
    for key, w in b.written.items():
        shard = shard_of[key]
        raw = shard.frame(shard.keys.index(key))
        _, s_len, start = tokens_end(shard, raw)
        cur = rr.Cursor(raw, "frame")
        cur.pos = start
        rung_a, rung_b, split = cur.u8(), cur.u8(), cur.varint()
        assert rung_a in shard.codebooks and rung_b in shard.codebooks, (key, rung_a, rung_b)
        assert split <= s_len, (key, split, s_len)
        flags = cur.u8()
        st = {name: cur.stream() for name in rr._COMPACT_STREAMS}
        assert cur.done()
        if s_len == 0:
            assert all(v == b"" for v in st.values()), key
            assert flags == 1 and split == 0, (key, flags, split)
            one_rung = len(b.params["sqrt_steps"]) == 1
            assert rung_a == rung_b == (0 if one_rung else DEFAULT_RUNG), (key, rung_a, rung_b)
            continue
        nvalid = np.sum(w["topk_ids"] != -1, axis=1).tolist()
        assert flags == int(all(n == b.k for n in nvalid)), key
        assert (st["nvalid"] == b"") == bool(flags & 1), key
        row_labels = w["labels"][1:][w["labels"][1:] != -100]
        in_row = [int(lab in w["topk_ids"][r].tolist()) for r, lab in enumerate(row_labels)]
        assert list(st["row_flags"]) == in_row, key
        assert len(st["share_mask"]) == sum((n + 7) // 8 for n in nvalid[:-1]), key
        assert len(rr.varints(st["label_rank"], "")) == s_len
        assert len(st["label_sym"]) == s_len
        assert len(st["value_sym"]) == sum(nvalid) - sum(in_row)
        for x in ("rank", "value", "label"):
            rr.read_numbers(st[x + "_sym"], st[x + "_bits"], x)  # consumed exactly, zero padding


# --------------------------------------------------------------------------------------------
# Single-cache tests


def test_error_bound_numbers_of_section_5_1():
    """The numbers FORMAT.md §5.1 quotes for the default codebook (h = 2.5e-3, s = 2.5,
    floor = -48): <= 0.0026 nats at p = 0.9, <= 0.025 at p = 0.01, <= 0.25 at p = 1e-4 (all
    "+ O(h²)"), <= 1.25 = s/2 everywhere, and the coarse tail starts at the last sqrt level."""
    h, s = DEFAULT_PARAMS["sqrt_step"], DEFAULT_PARAMS["tail_step"]
    lv = rr.build_codebook(**DEFAULT_PARAMS).astype(np.float64)
    half = (lv[:-1] - lv[1:]) / 2  # worst error between lv[j] and lv[j + 1]

    def worst_at(p: float) -> float:
        j = int(np.searchsorted(-lv, -math.log(p), side="right")) - 1
        return float(half[j])

    # h/sqrt(p) is the first-order bound; the O(h²) term is below h²/p (checked here).
    for p, quoted in ((0.9, 0.0026), (0.01, 0.025), (1e-4, 0.25)):
        assert worst_at(p) <= h / math.sqrt(p) + h * h / p, p
        assert worst_at(p) <= quoted * 1.02, (p, worst_at(p), quoted)
    assert np.max(half) <= s / 2 + 1e-6
    assert lv[0] == 0 and np.all(np.diff(lv) < 0) and lv[-1] >= -48.0 > lv[-1] - s
    # The sqrt part runs while r = 1 - n·h >= max(2h/s, h) = h (with these defaults), and in
    # float64 1 - 399·h = 0.00249999... < h: it stops at r = 2h, p = 2.5e-5. The coarse tail
    # (errors up to s/2 = 1.25 nats) therefore starts below p = 2.5e-5, not (2h/s)² = 4e-6 as
    # §5.1 says (at p = 1e-5 the worst error is already 1.25 nats).
    n_sqrt = int(np.sum(np.abs(np.diff(lv) + s) > 1e-4)) + 1
    assert n_sqrt == 399 and math.isclose(math.exp(lv[n_sqrt - 1]), (2 * h) ** 2, rel_tol=1e-5)
    assert worst_at(1e-5) == pytest.approx(s / 2, rel=1e-6)


def test_codebook_levels_decode_to_themselves():
    """§5.1 encoding is idempotent on levels: quantize(levels[q]) = q, so re-encoding a decoded
    record reproduces it (used by the crafted-frame tests below)."""
    for params in (DEFAULT_PARAMS, {"sqrt_step": 1e-2, "tail_step": 1.0, "floor": -30.0}):
        lv = rr.build_codebook(**params)
        assert np.array_equal(quantize(lv, lv, params["tail_step"]), np.arange(len(lv)))
        assert quantize(np.float32([-0.0, 5e-4, -np.inf, np.nan]), lv, 0.5).tolist() == [
            0,
            0,
            len(lv),
            len(lv),
        ]


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> Path:
    recs = make_records(99, 16, 1000, 8)
    path = tmp_path_factory.mktemp("small") / "cache"
    write_cache(path, "compact", 8, 1000, recs, shard_size=1500)
    return path


def copy_cache(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def read_both(path: Path) -> list[tuple[dict[str, Any], Any]]:
    cache = TeacherCache(path)
    refs = rr.read_cache(path)
    assert len(cache) == len(refs)
    return [(ref, cache.record_at(i)) for i, ref in enumerate(refs)]


def test_ignores_tmp_and_unlisted_files(small_cache, tmp_path):
    path = copy_cache(small_cache, tmp_path / "c")
    before = rr.read_cache(path)
    m = rr.read_manifest(path)
    shutil.copy(path / m["shards"][0]["file"], path / "shard-999999.safetensors")
    (path / ".tmp-12345-shard-000007.safetensors").write_bytes(b"garbage")
    (path / ".tmp-12345-manifest.json").write_text("{")
    for i, (ref, rec) in enumerate(read_both(path)):
        assert_same_record(ref, rec, f"position {i}")
        assert_same_record(before[i], rec, f"position {i}")


def test_append_mode(tmp_path):
    recs = make_records(7, 20, 1000, 8)
    path = tmp_path / "cache"
    write_cache(path, "compact", 8, 1000, recs[:12])
    with CacheWriter(path, top_k=8, vocab_size=1000, mode="append", shard_size=3000) as w:
        for r in recs[12:]:
            w.add(**r)
    pairs = read_both(path)
    assert {ref["key"] for ref, _ in pairs} == {r["key"] for r in recs}
    for i, (ref, rec) in enumerate(pairs):
        assert_same_record(ref, rec, f"position {i}")
    assert rr.verify_checksums(path) >= 2


def test_newer_format_version_is_refused(small_cache, tmp_path):
    path = copy_cache(small_cache, tmp_path / "c")
    m = json.loads((path / "manifest.json").read_text())
    m["format_version"] = 4
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(rr.RefVersionError):
        rr.read_manifest(path)
    with pytest.raises(CacheVersionError):
        TeacherCache(path)


def test_truncated_shard_is_refused(small_cache, tmp_path):
    path = copy_cache(small_cache, tmp_path / "c")
    f = path / rr.read_manifest(path)["shards"][-1]["file"]
    f.write_bytes(f.read_bytes()[:-3])
    with pytest.raises(rr.RefCorruptionError):
        rr.read_cache(path)
    with pytest.raises(CacheError):
        cache = TeacherCache(path)
        for i in range(len(cache)):
            cache.record_at(i)


def test_flipped_payload_byte_is_refused(small_cache, tmp_path):
    path = copy_cache(small_cache, tmp_path / "c")
    shard = rr.open_shards(path)[1][0]
    off, length = (int(x) for x in shard.record_index[0, :2])
    raw = bytearray(shard.path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    begin = json.loads(raw[8 : 8 + n])["payload"]["data_offsets"][0]
    raw[8 + n + begin + off + length // 2] ^= 0x55
    shard.path.write_bytes(bytes(raw))
    with pytest.raises(rr.RefCorruptionError):
        rr.verify_checksums(path)
    with pytest.raises(rr.RefCorruptionError):
        rr.open_shards(path)[1][0].record(0)
    cache = TeacherCache(path)
    with pytest.raises(CacheError):
        cache.record_at(0)
    with pytest.raises(CacheError):
        cache.verify()


# --------------------------------------------------------------------------------------------
# §3 writer-enforced rules: the writer refuses a record breaking one, accepts the edge cases.


def one_row(**over: Any) -> dict[str, Any]:
    """T = 2, one row (k = 4) whose label 7 is the first entry."""
    rec = {
        "key": "r",
        "input_ids": np.array([1, 7], np.int32),
        "labels": np.array([-100, 7], np.int32),
        "topk_ids": np.array([[7, 3, 4, -1]], np.int32),
        "topk_logprobs": np.array([[-0.5, -1.5, -2.5, -np.inf]], np.float32),
        "label_logprobs": np.array([-0.5], np.float32),
        "label_ranks": np.array([0], np.int32),
    }
    for name, value in over.items():
        rec[name] = np.array(value, dtype=rec[name].dtype)
    return rec


REJECTED = {
    # §3: exact equality when either the label log-prob or its entry is infinite
    "label-entry-neg-inf-finite-label-logprob": {
        "topk_ids": [[3, 4, 7, -1]],
        "topk_logprobs": [[-1.0, -2.0, -np.inf, -np.inf]],
        "label_logprobs": [-3.0],
        "label_ranks": [2],
    },
    "label-logprob-disagrees-with-entry": {"label_logprobs": [-0.6]},
    "label-logprob-just-past-tolerance": {"label_logprobs": [-0.5 - 1.5e-4]},
    "label-logprob-past-relative-tolerance": {
        "topk_logprobs": [[-20.0, -21, -22, -np.inf]],
        "label_logprobs": [-20.0 - 3e-3],
    },
    "label-logprob-positive-vs-zero-entry": {
        "topk_logprobs": [[0.0, -1.5, -2.5, -np.inf]],
        "label_logprobs": [5e-4 + 2e-4],
    },
    "label-in-row-rank-k": {"label_ranks": [4]},
    "label-logprob-neg-inf-vs-finite-entry": {
        "topk_ids": [[3, 4, 7, -1]],
        "topk_logprobs": [[-1.0, -2.0, -3.0, -np.inf]],
        "label_logprobs": [-np.inf],
        "label_ranks": [2],
    },
    "topk-logprob-above-1e-3": {"topk_logprobs": [[2e-3, -1.5, -2.5, -np.inf]]},
    "label-logprob-above-1e-3": {
        "topk_ids": [[3, 4, 5, -1]],
        "label_logprobs": [2e-3],
        "label_ranks": [5],
    },
    "topk-logprob-nan": {"topk_logprobs": [[-0.5, np.nan, -2.5, -np.inf]]},
    "topk-logprob-pos-inf": {"topk_logprobs": [[np.inf, -1.5, -2.5, -np.inf]]},
    "label-logprob-nan": {"topk_ids": [[3, 4, 5, -1]], "label_logprobs": [np.nan]},
    "padding-with-finite-logprob": {"topk_logprobs": [[-0.5, -1.5, -2.5, -3.0]]},
    "padding-not-at-row-end": {
        "topk_ids": [[7, -1, 4, -1]],
        "topk_logprobs": [[-0.5, -np.inf, -2.5, -np.inf]],
    },
    "repeated-id": {"topk_ids": [[7, 3, 3, -1]]},
    "padding-id-other-than-minus-1": {"topk_ids": [[7, 3, 4, -2]]},
    "negative-rank": {"topk_ids": [[3, 4, 5, -1]], "label_ranks": [-1]},
}

ACCEPTED = {
    "label-logprob-within-tolerance": {"label_logprobs": [-0.5 - 5e-5]},
    "label-logprob-within-relative-tolerance": {
        "topk_logprobs": [[-20.0, -21, -22, -np.inf]],
        "label_logprobs": [-20.0 - 1.5e-3],
    },
    "fp32-roundoff-of-log-1": {
        "topk_logprobs": [[9e-4, -1.5, -2.5, -np.inf]],
        "label_logprobs": [9e-4],
    },
    "minus-zero": {"topk_logprobs": [[-0.0, -1.5, -2.5, -np.inf]], "label_logprobs": [0.0]},
    "neg-inf-inside-valid-entries": {"topk_logprobs": [[-0.5, -1.5, -np.inf, -np.inf]]},
    "label-entry-neg-inf": {
        "topk_ids": [[3, 4, 7, -1]],
        "topk_logprobs": [[-1.0, -2.0, -np.inf, -np.inf]],
        "label_logprobs": [-np.inf],
        "label_ranks": [2],
    },
    # §3 describes label_ranks as ">= k when the label is outside a full top-k row", but does
    # not list it among the writer-enforced rules; the writer accepts this.
    "label-outside-full-row-rank-below-k": {
        "topk_ids": [[3, 4, 5, 6]],
        "topk_logprobs": [[-1.0, -2.0, -3.0, -4.0]],
        "label_ranks": [1],
    },
    "label-outside-row-any-logprob": {
        "topk_ids": [[3, 4, 5, -1]],
        "label_logprobs": [-0.1],
        "label_ranks": [4],
    },
    "all-padding-row": {
        "topk_ids": [[-1, -1, -1, -1]],
        "topk_logprobs": [[-np.inf] * 4],
        "label_ranks": [7],
    },
}


@pytest.mark.parametrize("codec", ["exact", "compact"])
@pytest.mark.parametrize("case", sorted(REJECTED))
def test_writer_rejects_records_breaking_section_3(case, codec, tmp_path):
    with CacheWriter(tmp_path / "c", top_k=4, vocab_size=100, codec=codec) as w:
        with pytest.raises(CacheInputError):
            w.add(**one_row(**REJECTED[case]))
        w.add(**one_row())  # the writer is still usable
    assert len(TeacherCache(tmp_path / "c")) == 1


def test_writer_rejects_label_logprob_disagreeing_with_its_entry(tmp_path):
    """§3: when the label's id is in its row, ``label_logprobs[r]`` must equal that entry's
    log-prob within 1e-4·max(1, |value|) — the writer refuses the record otherwise, also when the
    label is not the row's first entry and the row is not sorted."""
    rec = one_row(
        topk_ids=[[3, 7, 4, -1]],
        topk_logprobs=[[-1.5, -0.5, -2.5, -np.inf]],
        label_logprobs=[-1.5],  # the value of entry 0, not of the label's entry 1
        label_ranks=[1],
    )
    for codec in ("exact", "compact"):
        with CacheWriter(tmp_path / codec, top_k=4, vocab_size=100, codec=codec) as w:
            with pytest.raises(CacheInputError, match=r"(?i)label"):
                w.add(**rec)
            rec["label_logprobs"] = np.float32([-0.5])
            w.add(**rec)
            rec["label_logprobs"] = np.float32([-1.5])


@pytest.mark.parametrize("codec", ["exact", "compact"])
def test_writer_accepts_section_3_edge_cases(codec, tmp_path):
    recs = []
    for i, case in enumerate(sorted(ACCEPTED)):
        rec = one_row(**ACCEPTED[case])
        rec["key"] = i
        recs.append(rec)
    write_cache(tmp_path / "c", codec, 4, 100, recs, shard_size=1 << 20)
    pairs = read_both(tmp_path / "c")
    shard = rr.open_shards(tmp_path / "c")[1][0]
    for i, (ref, rec) in enumerate(pairs):
        where = sorted(ACCEPTED)[i]
        assert_same_record(ref, rec, where)
        w = recs[ref["key"]]
        if codec == "exact":
            expect = w
        else:
            books = frame_books(shard, shard.frame(i))
            expect = compact_rows(w, books, shard.id_table)[1]
        for f in FIELDS[2:]:
            assert_same_arrays(ref[f], np.asarray(expect[f]), (where, f))


# --------------------------------------------------------------------------------------------
# Rewritten frames: shards rebuilt from the spec alone, then read by both readers.


def write_shard(path: Path, meta: dict[str, str], tensors: list[tuple[str, str, np.ndarray]]):
    """A shard container written by hand from FORMAT.md §2 (tensors in the listed order). A
    shard of version 2 or later gets its ``checksums`` tensor computed here from §7 (any
    ``checksums`` given is replaced)."""
    tensors = [t for t in tensors if t[0] != "checksums"]
    checked = meta.get("format_version") in ("2", "3")
    if checked:
        regions = [name for name, _, _ in tensors if name != "payload"]
        meta = {**meta, "checksums": ",".join(["header", *regions])}
        at = [name for name, _, _ in tensors].index("key_offsets") + 1
        tensors.insert(at, ("checksums", "U64", np.zeros(len(regions) + 1, np.uint64)))
    header: dict[str, Any] = {"__metadata__": meta}
    pos, blobs = 0, []
    for name, dtype, arr in tensors:
        blob = np.ascontiguousarray(arr, dtype=rr._DTYPES[dtype]).tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(arr.shape),
            "data_offsets": [pos, pos + len(blob)],
        }
        blobs.append(blob)
        pos += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    head = struct.pack("<Q", len(text)) + text
    if checked:
        by_name = {name: blob for (name, _, _), blob in zip(tensors, blobs, strict=True)}
        sums = [xxhash.xxh3_64_intdigest(head)]
        sums += [xxhash.xxh3_64_intdigest(by_name[r]) for r in regions]
        by_name["checksums"] = np.array(sums, dtype="<u8").tobytes()
        blobs = [by_name[name] for name, _, _ in tensors]
    path.write_bytes(head + b"".join(blobs))


def write_manifest(path: Path, m: dict[str, Any]) -> None:
    """``manifest.json`` written by hand from FORMAT.md §1: pretty JSON whose last member is the
    ``manifest_checksum``, XXH3-64 of every byte before the member's opening quote."""
    body = {k: v for k, v in m.items() if k != "manifest_checksum"}
    head = json.dumps(body, indent=2).encode().rstrip()
    assert head.endswith(b"}")
    head = head[:-1].rstrip() + b",\n  "
    seal = f'"manifest_checksum": "xxh3-64:{xxhash.xxh3_64_hexdigest(head)}"\n}}\n'
    (path / "manifest.json").write_bytes(head + seal.encode())


def rewrite_shards(path: Path, fn) -> None:
    """Rewrite every shard of the cache at ``path`` by hand (§2, §7) through ``fn(shard, meta,
    tensors) -> (meta, tensors)`` (``tensors``: name -> array, in the order of §2), then fix the
    manifest's sizes and checksums and reseal it (§1)."""
    m = rr.read_manifest(path)
    for e in m["shards"]:
        shard = rr.RefShard(path / e["file"], m, e)
        with safe_open(str(shard.path), framework="numpy") as st:
            meta, t = st.metadata(), {k: st.get_tensor(k) for k in st.keys()}
        meta, t = fn(shard, dict(meta), t)
        write_shard(shard.path, meta, [(n, d, t[n]) for n, d in rr._TENSORS[shard.codec] if n in t])
        data = shard.path.read_bytes()
        e["bytes"] = len(data)
        e["checksum"] = "xxh3-128:" + xxhash.xxh3_128_hexdigest(data)
    write_manifest(path, m)


def store_codebooks(shard: rr.RefShard, meta: dict[str, str], t: dict, codebooks: dict) -> None:
    """Store ``codebooks`` (rung -> table, in that order) as the shard's ``codebook`` tensor and,
    with a ladder, its ``codebook_rungs`` (§2); without one, ``codebooks`` is ``{0: table}``."""
    t["codebook"] = np.concatenate([np.zeros(0, np.float32), *codebooks.values()])
    if shard.rung_byte:
        meta["codebook_rungs"] = json.dumps([[j, len(x)] for j, x in codebooks.items()])
    else:
        assert list(codebooks) == [0]


def rewrite_frames(path: Path, mutate, codebooks: dict[int, np.ndarray] | None = None) -> None:
    """Re-encode every frame of every shard of the cache at ``path`` through ``mutate(shard, i,
    raw) -> raw`` and a fresh zstd compressor (storing the tables ``codebooks``, rung -> table,
    instead of the shard's if given), then fix the manifest's sizes and checksums."""

    def fn(shard: rr.RefShard, meta: dict[str, str], t: dict) -> tuple[dict, dict]:
        cctx = zstandard.ZstdCompressor(level=9, write_checksum=True, write_content_size=True)
        frames = [cctx.compress(mutate(shard, i, shard.frame(i))) for i in range(len(shard))]
        index = shard.record_index.copy()
        index[:, 1] = [len(f) for f in frames]
        index[:, 0] = np.concatenate([[0], np.cumsum(index[:-1, 1])]) if len(frames) else []
        t["record_index"] = index
        t["payload"] = np.frombuffer(b"".join(frames), dtype=np.uint8)
        if shard.codec == "compact":
            store_codebooks(shard, meta, t, shard.codebooks if codebooks is None else codebooks)
        return meta, t

    rewrite_shards(path, fn)


def tokens_end(shard: rr.RefShard, raw: bytes) -> tuple[int, int, int]:
    """(T, S, offset of the rows section) of a raw frame."""
    cur = rr.Cursor(raw, "frame")
    t_len, s_len = cur.varint(), cur.varint()
    rr.decode_tokens(cur, t_len, s_len, shard.vocab_size)
    return t_len, s_len, cur.pos


@pytest.mark.parametrize("codec", ["exact", "compact"])
def test_rewritten_shards_read_identically(codec, tmp_path):
    """Shards re-containered by hand and frames recompressed at another level: both readers
    still agree with each other and with the original cache."""
    recs = make_records(5, 12, 1000, 8)
    path = tmp_path / "cache"
    write_cache(path, codec, 8, 1000, recs)
    before = rr.read_cache(path)
    rewrite_frames(path, lambda shard, i, raw: raw)
    pairs = read_both(path)
    for i, (ref, rec) in enumerate(pairs):
        assert_same_record(ref, rec, f"position {i}")
        assert_same_record(before[i], rec, f"position {i}")
    assert TeacherCache(path).verify() == len(recs)


@pytest.fixture(scope="module", params=["exact", "compact"])
def crafted_base(request, tmp_path_factory) -> tuple[str, Path]:
    """One shard: the feature record first, then records that all have rows."""
    rng = np.random.default_rng(3)
    recs = [feature_record(0)] + [make_record(rng, i, 1000, 8, max_len=30) for i in range(1, 6)]
    for r in recs:  # every record has rows, so every frame has a rows section to corrupt
        if len(r["label_ranks"]) == 0:
            r["input_ids"] = np.array([1, 7], np.int32)
            r["labels"] = np.array([-100, 7], np.int32)
            r["topk_ids"] = np.array([[7, 3, 4, 5, 6, 8, 9, 10]], np.int32)
            r["topk_logprobs"] = -np.arange(1, 9, dtype=np.float32)[None]
            r["label_logprobs"] = np.float32([-1.0])
            r["label_ranks"] = np.int32([0])
    path = tmp_path_factory.mktemp("crafted-" + request.param) / "cache"
    write_cache(path, request.param, 8, 1000, recs, shard_size=1 << 20)
    return request.param, path


def craft(base: Path, tmp_path: Path, mutate) -> Path:
    path = copy_cache(base, tmp_path / "c")
    rewrite_frames(path, lambda shard, i, raw: mutate(shard, i, raw) if i == 0 else raw)
    return path


def assert_record0_refused_by_both(path: Path) -> None:
    shard = rr.open_shards(path)[1][0]
    with pytest.raises(rr.RefCorruptionError):
        shard.record(0)
    shard.record(1)  # the others are untouched
    cache = TeacherCache(path)
    cache.record_at(1)
    with pytest.raises(CacheError):
        cache.record_at(0)


# Byte-level damage that applies to both codecs (§4, §4.1, §8).


def _leftover(shard, i, raw):
    return raw + b"\x00"


def _wrong_t(shard, i, raw):
    cur = rr.Cursor(raw, "frame")
    t_len, s_len = cur.varint(), cur.varint()
    assert t_len < 127 and s_len < 128  # one-byte varints
    return bytes([t_len + 1]) + raw[1:]


def _input_id_out_of_vocab(shard, i, raw):
    t_len = raw[0]
    buf = bytearray(raw)
    v = shard.vocab_size
    for b in range(4):
        buf[2 + b * t_len] = (v >> (8 * b)) & 0xFF  # input_ids[0] = V
    return bytes(buf)


def _mask_bit_flipped(shard, i, raw):
    """A supervised position t >= 1 loses its mask bit: S disagrees with the mask."""
    t_len = raw[0]
    buf = bytearray(raw)
    buf[2 + 4 * t_len] &= 0xFF ^ 0b10  # position 1 of the feature record / one_row is supervised
    return bytes(buf)


def _exception_past_vocab(shard, i, raw):
    """The feature record's label exception (t = 2) gets the label V."""
    t_len, _, _ = tokens_end(shard, raw)
    at = 2 + 4 * t_len + (t_len + 7) // 8
    assert raw[at] >= 1 and raw[at + 1] == 2, "the feature record has its exception at t = 2"
    return raw[: at + 2] + struct.pack("<I", shard.vocab_size) + raw[at + 6 :]


def _exception_at_unmasked_position(shard, i, raw):
    t_len, _, _ = tokens_end(shard, raw)
    at = 2 + 4 * t_len + (t_len + 7) // 8
    assert raw[at + 1] == 2
    return raw[: at + 1] + b"\x00" + raw[at + 2 :]  # t = 0 is not supervised


def _topk_id_out_of_vocab(shard, i, raw):
    """Exact: the first top-k id becomes V (compact: the first new rank maps to id V)."""
    _, s_len, start = tokens_end(shard, raw)
    if shard.codec == "compact":
        return remux(shard, raw, rows_fn=_first_rank_past_vocab)
    buf = bytearray(raw)
    n = s_len * shard.top_k
    for b in range(4):
        buf[start + b * n] = (shard.vocab_size >> (8 * b)) & 0xFF
    return bytes(buf)


GENERIC_DAMAGE = [
    _leftover,
    _wrong_t,
    _input_id_out_of_vocab,
    _mask_bit_flipped,
    _exception_past_vocab,
    _exception_at_unmasked_position,
    _topk_id_out_of_vocab,
]


@pytest.mark.parametrize("mutate", GENERIC_DAMAGE, ids=lambda f: f.__name__.strip("_"))
def test_corrupt_frames_are_refused_by_both(crafted_base, mutate, tmp_path):
    _, base = crafted_base
    assert_record0_refused_by_both(craft(base, tmp_path, mutate))


# Compact rows crafted by the spec-side encoder: one §5.3 rule broken at a time.


def remux(
    shard: rr.RefShard,
    raw: bytes,
    rows_fn=None,
    streams_fn=None,
    full_flag=None,
    head_fn=None,
    books_fn=None,
) -> bytes:
    """Re-encode the compact rows of ``raw`` from the reference decoding (checking that this
    reproduces the writer's bytes), first with other codebooks ``books_fn(shard, books, S) ->
    FrameBooks`` if given, apply ``rows_fn(rows, rank_of)`` to the coded rows (each
    row knows its codebook's ``n_levels``), ``streams_fn(flags, streams) -> (flags, streams)``
    to the serialised streams and ``head_fn(books, S) -> bytes`` to the bytes before the flags
    byte (§5.3: ``u8 rung_a, u8 rung_b, varint split`` with a ladder)."""
    cur = rr.Cursor(raw, "frame")
    t_len, s_len = cur.varint(), cur.varint()
    rec = rr.decode_tokens(cur, t_len, s_len, shard.vocab_size)
    start = cur.pos
    row_labels = rec["labels"][1:][rec["labels"][1:] != -100]
    rec.update(
        rr.decode_compact_rows(
            cur,
            row_labels,
            shard.top_k,
            shard.vocab_size,
            shard.codebooks,
            shard.rung_byte,
            shard.id_table,
        )
    )
    books = frame_books(shard, raw)
    rows, _ = compact_rows(rec, books, shard.id_table)
    flags, st = compact_streams(rows, shard.top_k)
    head = books.head()
    assert raw[start:] == head + join_streams(flags, st), "the spec encoder reproduces the writer"
    if books_fn is not None:
        books = books_fn(shard, books, len(row_labels))
        head = books.head()
        rows, _ = compact_rows(rec, books, shard.id_table)
        flags, st = compact_streams(rows, shard.top_k)
    if rows_fn is not None:
        rank_of = {int(x): j for j, x in enumerate(shard.id_table.tolist())}
        rows_fn(rows, lambda x: rank_of.get(x, len(rank_of) + x))
        flags, st = compact_streams(rows, shard.top_k, full_flag)
    elif full_flag is not None:
        flags, st = compact_streams(rows, shard.top_k, full_flag)
    if streams_fn is not None:
        flags, st = streams_fn(flags, dict(st))
    if head_fn is not None:
        assert books.a is not None
        head = head_fn(books, len(row_labels))
    return raw[:start] + head + join_streams(flags, st)


def reorder_entries(row: Row, entries: list[int]) -> None:
    """Code the entries after the label in the order ``entries`` (value codes and escaped values
    follow their ids; the label's own value stays first)."""
    old = row.order[row.flag :]
    code = dict(zip(old, row.value_codes, strict=True))
    value = dict(zip(old, row.decoded[1:], strict=True))
    row.value_codes = [code[x] for x in entries]
    row.exact = [row.decoded[0]] * (row.label_code == row.n_levels) + [
        value[x] for x in entries if code[x] == 0
    ]


def _first_rank_past_vocab(rows, rank_of):
    rows[0].ranks = [rank_of(1000 + j) for j in range(len(rows[0].ranks))]  # ids V, V+1, ...


def _label_index_past_escape(rows, rank_of):
    rows[1].label_code = rows[1].n_levels + 1


def _value_code_past_escape(rows, rank_of):
    rows[0].value_codes[0] = rows[0].n_levels + 1


def _share_bit_for_the_label(rows, rank_of):
    """Row 3's label is an entry of row 2: flag it as shared too (a repeated id)."""
    j = rows[2].order.index(rows[3].order[0])
    mask = bytearray(rows[3].mask)
    mask[j // 8] |= 1 << (j % 8)
    rows[3].mask = bytes(mask)
    rows[3].ranks = rows[3].ranks[:-1]


def _new_id_repeats_a_shared_one(rows, rank_of):
    shared = rows[1].order[1]
    rows[1].ranks = sorted({rank_of(shared), *rows[1].ranks[1:]})


def _share_bit_past_previous_row(rows, rank_of):
    assert rows[1].n == 6 and len(rows[2].mask) == 1
    rows[2].mask = bytes([rows[2].mask[0] | 0x80])  # bit 7 of a 6-entry row


def _more_shared_than_nvalid(rows, rank_of):
    assert rows[6].n == 3 and rows[5].n == 8
    rows[6].mask = b"\xff"


def _label_flag_on_empty_row(rows, rank_of):
    assert rows[4].n == 0
    rows[4].flag = 1


def _label_among_ids_but_not_flagged(rows, rank_of):
    """Row 0 (no previous row) codes its label as a new id, by rank, with row_flags 0."""
    row = rows[0]
    assert row.flag == 1 and row.label_code < row.n_levels
    new = sorted(row.order, key=rank_of)
    reorder_entries(row, [x for x in new if x != row.order[0]])
    row.value_codes.insert(new.index(row.order[0]), row.n_levels - row.label_code)
    row.flag = 0
    row.ranks = [rank_of(x) for x in new]


def _nvalid_past_k(rows, rank_of):
    rows[6].n = 9


def _label_rank_past_int32(rows, rank_of):
    rows[2].label_rank = 1 << 31


def _row_flags_byte_2(flags, st):
    return flags, {**st, "row_flags": b"\x02" + st["row_flags"][1:]}


def _row_flags_short(flags, st):
    return flags, {**st, "row_flags": st["row_flags"][:-1]}


def _reserved_flags_bit(flags, st):
    return flags | 2, st


def _full_flag_with_nvalid(flags, st):
    assert st["nvalid"]
    return flags | 1, st


def _number_symbol_192(flags, st):
    return flags, {**st, "rank_sym": b"\xc0" + st["rank_sym"][1:]}


def _bit_stream_nonzero_padding(flags, st):
    for x in ("rank", "value", "label"):
        nbits = sum(max(0, s - 193) for s in st[x + "_sym"])
        if nbits % 8:
            b = bytearray(st[x + "_bits"])
            b[-1] |= 0x80
            return flags, {**st, x + "_bits": bytes(b)}
    raise AssertionError("no bit stream with padding in the feature record")


def _bit_stream_extra_byte(flags, st):
    return flags, {**st, "rank_bits": st["rank_bits"] + b"\x00"}


def _share_mask_extra_byte(flags, st):
    return flags, {**st, "share_mask": st["share_mask"] + b"\x00"}


def _exact_values_extra(flags, st):
    return flags, {**st, "exact_values": st["exact_values"] + b"\x00\x00\x80\xff"}


def _exact_values_ragged(flags, st):
    return flags, {**st, "exact_values": st["exact_values"][:-1]}


def _label_rank_extra(flags, st):
    return flags, {**st, "label_rank": st["label_rank"] + b"\x00"}


def _value_sym_extra(flags, st):
    return flags, {**st, "value_sym": st["value_sym"] + b"\x01"}


ROW_DAMAGE = [
    _label_index_past_escape,
    _value_code_past_escape,
    _first_rank_past_vocab,
    _share_bit_past_previous_row,
    _more_shared_than_nvalid,
    _label_flag_on_empty_row,
    _nvalid_past_k,
    _label_rank_past_int32,
]
# Frames whose decoded record breaks §3 (ids in a row are distinct) or contradicts §5.3's
# definition of row_flags ("1 if the row's label id is among its valid entries, else 0"), with
# every stream consumed exactly. §8 does not list these among the reader's rejections; the
# reference reader refuses them, the Rust reader returns the inconsistent record.
INCONSISTENT_ROWS = [
    _share_bit_for_the_label,
    _new_id_repeats_a_shared_one,
    _label_among_ids_but_not_flagged,
]
STREAM_DAMAGE = [
    _row_flags_byte_2,
    _row_flags_short,
    _reserved_flags_bit,
    _full_flag_with_nvalid,
    _number_symbol_192,
    _bit_stream_nonzero_padding,
    _bit_stream_extra_byte,
    _share_mask_extra_byte,
    _exact_values_extra,
    _exact_values_ragged,
    _label_rank_extra,
    _value_sym_extra,
]


@pytest.fixture(scope="module")
def compact_crafted_base(tmp_path_factory) -> Path:
    rng = np.random.default_rng(3)
    recs = [feature_record(0)] + [make_record(rng, i, 1000, 8, max_len=30) for i in range(1, 4)]
    empty = make_records(0, 2, 1000, 8)[1]  # T = 1, S = 0
    empty["key"] = 4
    recs.append(empty)
    path = tmp_path_factory.mktemp("crafted-compact-rows") / "cache"
    write_cache(path, "compact", 8, 1000, recs, shard_size=1 << 20, prior_records=2)
    return path


@pytest.mark.parametrize("damage", ROW_DAMAGE, ids=lambda f: f.__name__.strip("_"))
def test_compact_rows_breaking_section_5_3_are_refused(compact_crafted_base, damage, tmp_path):
    path = craft(compact_crafted_base, tmp_path, lambda sh, i, raw: remux(sh, raw, rows_fn=damage))
    assert_record0_refused_by_both(path)


@pytest.mark.parametrize("damage", INCONSISTENT_ROWS, ids=lambda f: f.__name__.strip("_"))
def test_compact_rows_contradicting_sections_3_and_5_3_are_refused(
    compact_crafted_base, damage, tmp_path
):
    """The reference reader refuses a row with a repeated id or an unflagged label."""
    path = craft(compact_crafted_base, tmp_path, lambda sh, i, raw: remux(sh, raw, rows_fn=damage))
    shard = rr.open_shards(path)[1][0]
    with pytest.raises(rr.RefCorruptionError, match=r"repeated id|row_flags is 0"):
        shard.record(0)
    shard.record(1)
    TeacherCache(path).record_at(1)


@pytest.mark.parametrize("damage", INCONSISTENT_ROWS, ids=lambda f: f.__name__.strip("_"))
def test_rust_decode_is_lean_and_verify_reports_rows_breaking_section_3(
    compact_crafted_base, damage, tmp_path
):
    """FORMAT.md §8: decoding does not re-check the per-row rules of §3; verify() does. A row
    that repeats an id is reported as corruption; a label coded as a new id with row_flags 0 is a
    non-canonical but valid encoding of a valid record, which verify accepts."""
    path = craft(compact_crafted_base, tmp_path, lambda sh, i, raw: remux(sh, raw, rows_fn=damage))
    cache = TeacherCache(path)
    rec = cache.record_at(0)
    repeated = any(
        len(set(row[row >= 0].tolist())) != int((row >= 0).sum()) for row in rec.topk_ids
    )
    if repeated:
        with pytest.raises(CacheCorruptionError, match="appears twice"):
            cache.verify()
    else:
        assert cache.verify() == len(cache)


@pytest.mark.parametrize("damage", STREAM_DAMAGE, ids=lambda f: f.__name__.strip("_"))
def test_compact_streams_breaking_section_5_3_are_refused(compact_crafted_base, damage, tmp_path):
    path = craft(
        compact_crafted_base, tmp_path, lambda sh, i, raw: remux(sh, raw, streams_fn=damage)
    )
    assert_record0_refused_by_both(path)


def _resplit(shard, books, s_len):
    """Rows 0-2 at the stored rung of fewest levels (rung_a), the others at the one of most."""
    few = min(shard.codebooks, key=lambda j: len(shard.codebooks[j]))
    many = max(shard.codebooks, key=lambda j: len(shard.codebooks[j]))
    assert len(shard.codebooks[few]) + 1 < len(shard.codebooks[many]) and s_len > 3
    tails = shard.codec_params["tail_steps"]
    return FrameBooks({j: (shard.codebooks[j], tails[j]) for j in (few, many)}, few, many, 3)


@pytest.mark.parametrize(
    "damage",
    [None, _label_index_past_escape, _value_code_past_escape],
    ids=lambda f: "none" if f is None else f.__name__.strip("_"),
)
def test_rows_before_the_split_use_rung_a_table(compact_crafted_base, damage, tmp_path):
    """§5.3: rows ``r < split`` use rung_a's table. Record 0 re-coded with rows 0-2 at a table of
    few levels (rung_a) and the others at one of many (rung_b) reads identically in both readers,
    as the spec predicts; a code one past the table of row 1's label or row 0's first value
    (``L_a + 1``, a valid index of rung_b's table) is refused by both."""
    path = craft(
        compact_crafted_base,
        tmp_path,
        lambda sh, i, raw: remux(sh, raw, rows_fn=damage, books_fn=_resplit),
    )
    if damage is not None:
        assert_record0_refused_by_both(path)
        return
    shard = rr.open_shards(path)[1][0]
    books = frame_books(shard, shard.frame(0))
    assert (books.split, len(books.row(0)[0]) + 1 < len(books.row(3)[0])) == (3, True), books
    ref = shard.record(0)
    assert_same_record(ref, TeacherCache(path).record_at(0), "position 0")
    before = rr.open_shards(compact_crafted_base)[1][0].record(0)
    expect = compact_rows(before, books, shard.id_table)[1]
    for f in FIELDS[2:]:
        assert_same_arrays(ref[f], expect[f], f)


# Valid frames the writer never emits: both readers decode them, identically.


def _no_sharing(rows, rank_of):
    """Every row codes its shared ids as new ids (share_mask all zero)."""
    for row in rows:
        new = sorted(row.order[row.flag :], key=rank_of)
        reorder_entries(row, new)
        row.ranks = [rank_of(x) for x in new]
        row.mask = bytes(len(row.mask))


def _escape_everything(rows, rank_of):
    """Every value escaped (index L of the row's table, code 0) and stored exactly, even when it
    is a level."""
    for row in rows:
        row.label_code = row.n_levels
        row.value_codes = [0] * len(row.value_codes)
        row.exact = list(row.decoded)


NON_CANONICAL = {
    "nvalid-explicit": {"full_flag": False},
    "no-sharing": {"rows_fn": _no_sharing},
    "escape-everything": {"rows_fn": _escape_everything},
}


@pytest.mark.parametrize("variant", sorted(NON_CANONICAL))
def test_non_canonical_compact_frames_read_identically(compact_crafted_base, variant, tmp_path):
    """§5.3 leaves these choices to the writer (bit 0 of flags, which shared ids are flagged,
    which values are escaped): both readers must decode such frames, and identically."""
    before = rr.read_cache(compact_crafted_base)

    def mutate(sh, i, raw):
        return remux(sh, raw, **NON_CANONICAL[variant])

    path = copy_cache(compact_crafted_base, tmp_path / "c")
    rewrite_frames(path, mutate)
    for i, (ref, rec) in enumerate(read_both(path)):
        assert_same_record(ref, rec, f"position {i}")
        b = before[i]
        for f in ("input_ids", "labels", "label_logprobs", "label_ranks"):
            assert_same_arrays(ref[f], b[f], (i, f))
        for r in range(len(b["label_ranks"])):  # same entries, maybe in another order
            got = list(
                zip(
                    ref["topk_ids"][r].tolist(), bits(ref["topk_logprobs"][r]).tolist(), strict=True
                )
            )
            exp = list(
                zip(b["topk_ids"][r].tolist(), bits(b["topk_logprobs"][r]).tolist(), strict=True)
            )
            assert sorted(got) == sorted(exp), (i, r)


def test_any_stored_rungs_and_split_read_as_the_spec_predicts(compact_crafted_base, tmp_path):
    """§5.3 leaves the rungs and the split to the writer (any rungs the shard stores, split <=
    S): frames re-encoded with their first ``S // 2`` rows at the finest rung the shard stores
    and the others at its coarsest (rung_a < rung_b, which the writer never emits), or with every
    row at rung_a (split = S) and rung_b another stored rung, decode in both readers to exactly
    what the spec predicts from each row's table."""
    (shard0,) = rr.open_shards(compact_crafted_base)[1]  # positions are the shard's indices
    assert len(shard0.codebooks) >= 2, "the test needs a shard storing several rungs"
    expected: dict[int, dict[str, np.ndarray]] = {}

    def mutate(shard, i, raw):
        rec = shard.record(i)
        s_len = len(rec["label_ranks"])
        fine, coarse = min(shard.codebooks), max(shard.codebooks)
        a, b, split = (fine, coarse, s_len // 2) if i % 2 == 0 else (coarse, fine, s_len)
        tails = shard.codec_params["tail_steps"]
        books = FrameBooks({j: (shard.codebooks[j], tails[j]) for j in (a, b)}, a, b, split)
        expected[i] = {**rec, **compact_rows(rec, books, shard.id_table)[1]}
        return encode_frame(rec, "compact", books, shard.id_table)

    path = copy_cache(compact_crafted_base, tmp_path / "c")
    rewrite_frames(path, mutate)
    pairs = read_both(path)
    assert any(0 < len(e["label_ranks"]) // 2 for e in expected.values())
    for i, (ref, rec) in enumerate(pairs):
        assert_same_record(ref, rec, f"position {i}")
        for f in FIELDS:
            assert_same_arrays(ref[f], np.asarray(expected[i][f]), (i, f))
    assert TeacherCache(path).verify() == len(pairs)


@pytest.mark.parametrize("n_levels", [65000, 65001])
def test_codebook_size_limit(compact_crafted_base, n_levels, tmp_path):
    """§5.1: ``1 <= L <= 65000``. Frames re-encoded against a table of ``n_levels`` levels (the
    levels of record 0's rung_b, then fine extra ones below them), stored as that rung's table
    and named as both rungs of every frame: both readers accept 65000 levels, and decode
    identically; both refuse 65001."""
    shard0 = rr.open_shards(compact_crafted_base)[1][0]
    rung = frame_books(shard0, shard0.frame(0)).b
    old, s = shard0.codebooks[rung], shard0.codec_params["tail_steps"][rung]
    extra = old[-1] - 1.0 - 1e-3 * np.arange(n_levels - len(old))
    levels = np.concatenate([old, extra]).astype(np.float32)
    assert len(levels) == n_levels and np.all(np.diff(levels) < 0)

    def reencode(shard, i, raw):
        rec = shard.record(i)
        return encode_frame(rec, "compact", FrameBooks.one_rung(rung, levels, s), shard.id_table)

    path = copy_cache(compact_crafted_base, tmp_path / "c")
    rewrite_frames(path, reencode, codebooks={rung: levels})
    if n_levels <= rr.MAX_LEVELS:
        for i, (ref, rec) in enumerate(read_both(path)):
            assert_same_record(ref, rec, f"position {i}")
        return
    with pytest.raises(rr.RefCorruptionError, match="codebook"):
        rr.read_cache(path)
    with pytest.raises(CacheError):
        TeacherCache(path).record_at(0)


def test_compact_test_data_covers_every_path(tmp_path_factory, legacy_cache):
    """The compact caches above exercise every branch of §5.3 and of the codebook choice of §5.1
    (else the byte-for-byte encoder comparison would prove little): frames with and without rung
    bytes, shards storing one table and several, fixed one-rung ladders and the budget, records
    whose rows all use rung_b (split 0) and records split between rung_a and rung_b."""
    seen: dict[str, int] = dict.fromkeys(
        (
            "label in row",
            "label outside",
            "label in previous row, outside its own",
            "label in previous row and in its own",
            "empty row",
            "padded row",
            "shared entry",
            "rank number >= 192",
            "value number >= 192",
            "label number >= 192",
            "escaped entry",
            "escaped label",
            "bit stream with padding",
            "S = 0",
            "label exception",
            "positive log-prob",
            "-inf entry",
            "rung bytes and split",
            "no rung bytes (version 1-2 frame)",
            "one-rung ladder (max_mean_kl null)",
            "budget ladder",
            "shard with several rungs",
            "rung 0",
            "rung past 74",
            "split inside the record (0 < split < S)",
            "split = 0",
        ),
        0,
    )
    caches = [build(name, tmp_path_factory) for name in COMPACT]
    # the version-1 fixture and its version-2 append: decoded records stand for the written
    # ones (§5.1 encoding maps a level to itself, test_codebook_levels_decode_to_themselves)
    caches.append(
        Built(
            legacy_cache, "compact", 8, 1000, {}, {r["key"]: r for r in rr.read_cache(legacy_cache)}
        )
    )
    for b in caches:
        for shard in rr.open_shards(b.path)[1]:
            seen["shard with several rungs"] += len(shard.codebooks) >= 2
            if shard.rung_byte:
                budget = shard.codec_params["max_mean_kl"] is not None
                seen["budget ladder"] += budget
                seen["one-rung ladder (max_mean_kl null)"] += not budget
            for i, key in enumerate(shard.keys):
                w = b.written[key]
                books = frame_books(shard, shard.frame(i))
                s_len = len(w["label_ranks"])
                used = books.rungs_used(s_len)
                seen["rung bytes and split"] += books.a is not None
                seen["no rung bytes (version 1-2 frame)"] += books.a is None
                seen["rung 0"] += 0 in used
                seen["rung past 74"] += any(j is not None and j > DEFAULT_RUNG for j in used)
                seen["split inside the record (0 < split < S)"] += 0 < books.split < s_len
                seen["split = 0"] += books.a is not None and books.split == 0 and s_len > 0
                rows, _ = compact_rows(w, books, shard.id_table)
                labels = w["labels"][1:][w["labels"][1:] != -100]
                for r, row in enumerate(rows):
                    seen["label in row"] += row.flag
                    seen["label outside"] += 1 - row.flag
                    in_prev = r > 0 and int(labels[r]) in rows[r - 1].order
                    seen["label in previous row, outside its own"] += in_prev and not row.flag
                    seen["label in previous row and in its own"] += in_prev and row.flag
                    seen["empty row"] += row.n == 0
                    seen["padded row"] += 0 < row.n < b.k
                    seen["shared entry"] += row.n - row.flag - len(row.ranks)
                    seen["rank number >= 192"] += any(
                        x - (row.ranks[j - 1] + 1 if j else 0) >= 192
                        for j, x in enumerate(row.ranks)
                    )
                    seen["value number >= 192"] += any(c >= 192 for c in row.value_codes)
                    seen["label number >= 192"] += row.label_code >= 192
                    seen["escaped entry"] += 0 in row.value_codes
                    seen["escaped label"] += row.label_code == row.n_levels
                    seen["-inf entry"] += bool(np.isneginf(row.decoded[1:]).any())
                _, st = compact_streams(rows, b.k)
                seen["bit stream with padding"] += any(
                    sum(max(0, c - 193) for c in st[x + "_sym"]) % 8 for x in ("rank", "value")
                )
                seen["S = 0"] += not rows
                seen["label exception"] += bool(
                    np.any((w["labels"] != -100) & (w["labels"] != w["input_ids"]))
                )
                seen["positive log-prob"] += bool(np.any(w["topk_logprobs"] > 0))
    assert all(seen.values()), {k: v for k, v in seen.items() if not v}


# --------------------------------------------------------------------------------------------
# Damaged shard containers and indexes (§8): both readers refuse them.


def patch_shard(path: Path, fn, reseal: bool = False) -> Path:
    """Apply ``fn(raw: bytearray, header_len, header)`` to the first shard of the cache (and
    recompute its region checksums with ``reseal``)."""
    f = path / rr.read_manifest(path)["shards"][0]["file"]
    raw = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    fn(raw, n, json.loads(raw[8 : 8 + n]))
    if reseal:
        reseal_shard(raw)
    f.write_bytes(bytes(raw))
    return f


def index_patch(row: int, col: int, value: int):
    def fn(raw: bytearray, n: int, header: dict[str, Any]) -> None:
        at = 8 + n + header["record_index"]["data_offsets"][0] + 8 * (5 * row + col)
        raw[at : at + 8] = struct.pack("<Q", value % (1 << 64))

    return fn


def tiling_patch(raw: bytearray, n: int, header: dict[str, Any]) -> None:
    """key_bytes and payload overlap by one byte (same header length, spaces absorb it)."""
    old = json.dumps(header["payload"]["data_offsets"], separators=(",", ":")).encode()
    begin, end = header["payload"]["data_offsets"]
    new = json.dumps([begin - 1, end], separators=(",", ":")).encode()
    text = bytes(raw[8 : 8 + n]).replace(old, new, 1)
    assert text != bytes(raw[8 : 8 + n]), "offsets not found in the header text"
    text = text.rstrip(b" ")
    raw[8 : 8 + n] = text + b" " * (n - len(text))


def header_garbage(raw: bytearray, n: int, header: dict[str, Any]) -> None:
    raw[8] = ord("x")


_DAMAGES = [
    pytest.param(index_patch(0, 0, 10**9), id="offset-past-payload"),
    pytest.param(index_patch(1, 0, -1), id="offset-wraps-u64"),
    pytest.param(index_patch(1, 1, -1), id="length-wraps-u64"),
    pytest.param(index_patch(0, 2, 5), id="n_tokens-disagrees"),
    pytest.param(index_patch(0, 3, 1 << 40), id="n_supervised-disagrees"),
    pytest.param(tiling_patch, id="tensors-overlap"),
]


# A header that does not parse has no checksums to recompute: header-garbage is only "as damaged".
@pytest.mark.parametrize(
    ("damage", "reseal"),
    [
        *(pytest.param(*d.values, False, id=f"{d.id}-as-damaged") for d in _DAMAGES),
        *(pytest.param(*d.values, True, id=f"{d.id}-checksums-recomputed") for d in _DAMAGES),
        pytest.param(header_garbage, False, id="header-garbage-as-damaged"),
    ],
)
def test_damaged_shard_is_refused_by_both(damage, reseal, small_cache, tmp_path):
    """Refused by the region checksums (§7), and with checksums recomputed over the damage (a
    writer bug) by the structural checks behind them (§8)."""
    path = copy_cache(small_cache, tmp_path / "c")
    patch_shard(path, damage, reseal=reseal)
    with pytest.raises(rr.RefFormatError):
        rr.read_cache(path)
    with pytest.raises(CacheError):
        cache = TeacherCache(path)
        for i in range(len(cache)):
            cache.record_at(i)


def test_shard_metadata_disagreeing_with_manifest(small_cache, tmp_path):
    """§2: the shard's ``codec_params`` metadata must equal the manifest's once parsed (spelling
    may differ). The reference reader accepts a respelling and refuses another value (the Rust
    reader does not compare them: reported, not asserted here)."""
    path = copy_cache(small_cache, tmp_path / "c")
    m = rr.read_manifest(path)
    for e in m["shards"]:
        f = path / e["file"]
        with safe_open(str(f), framework="numpy") as st:
            meta, t = st.metadata(), {k: st.get_tensor(k) for k in st.keys()}
        params = json.loads(meta["codec_params"])
        meta["codec_params"] = json.dumps(params, indent=1, sort_keys=True)  # respelled
        write_shard(f, meta, [(n, d, t[n]) for n, d in rr._TENSORS["compact"]])
        data = f.read_bytes()
        e["bytes"], e["checksum"] = len(data), "xxh3-128:" + xxhash.xxh3_128_hexdigest(data)
    write_manifest(path, m)
    for i, (ref, rec) in enumerate(read_both(path)):
        assert_same_record(ref, rec, f"position {i}")
    m["codec_params"]["floor"] = -47.0
    write_manifest(path, m)
    with pytest.raises(rr.RefFormatError, match="codec_params"):
        rr.read_cache(path)


def test_wrong_token_hash(small_cache, tmp_path):
    """§3/§7: a reader given token ids compares hashes; verify recomputes every token_hash."""
    path = copy_cache(small_cache, tmp_path / "c")
    patch_shard(path, index_patch(0, 4, 12345), reseal=True)  # a writer's wrong token_hash
    with pytest.raises(rr.RefCorruptionError):
        rr.read_cache(path)
    ref = rr.read_cache(path, check_token_hash=False)[0]
    cache = TeacherCache(path)
    assert_same_record(ref, cache.record_at(0), "position 0")  # plain reads need not hash
    with pytest.raises(CacheMismatchError):
        cache.get(ref["key"], ref["input_ids"])
    with pytest.raises(CacheError):
        cache.verify()


def _resave_with_safetensors(path: Path, seal: bool = True) -> None:
    """Re-serialise every shard with ``safetensors.numpy.save_file``, fix the manifest."""
    m = rr.read_manifest(path)
    for e in m["shards"]:
        f = path / e["file"]
        with safe_open(str(f), framework="numpy") as st:
            meta, tensors = st.metadata(), {k: st.get_tensor(k) for k in st.keys()}
        save_file(tensors, str(f), metadata=meta)
        data = f.read_bytes()
        e["bytes"], e["checksum"] = len(data), "xxh3-128:" + xxhash.xxh3_128_hexdigest(data)
    if seal:
        write_manifest(path, m)
    else:
        (path / "manifest.json").write_text(json.dumps(m))


def test_shard_resaved_by_safetensors_is_refused_by_its_header_checksum(small_cache, tmp_path):
    """A version-2 shard re-serialised by ``safetensors.numpy.save_file`` (its own tensor order
    and header spelling) no longer has the header bytes its ``checksums[0]`` covers (§7): both
    readers refuse it, naming the header region, rather than trust a header nobody checked."""
    path = copy_cache(small_cache, tmp_path / "c")
    _resave_with_safetensors(path)
    with pytest.raises(rr.RefCorruptionError, match="region header"):
        rr.read_cache(path)
    with pytest.raises(CacheCorruptionError, match="region header"):
        TeacherCache(path).record_at(0)


def test_version1_shard_resaved_by_safetensors_reads_identically(tmp_path):
    """A version-1 shard (no checksums) re-serialised by ``safetensors.numpy.save_file``
    (tensors in the library's own order, not the order listed in §2) still tiles its data
    buffer: both readers accept it."""
    path = tmp_path / "c"
    shutil.copytree(V1_CACHES / "compact", path)
    before = rr.read_cache(path)
    _resave_with_safetensors(path, seal=False)  # version 1: no manifest_checksum
    assert rr.open_shards(path)[1][0].tensor_order[0] != "record_index"
    with pytest.warns(UserWarning, match="format-version-1"):
        cache = TeacherCache(path)
    for i, ref in enumerate(rr.read_cache(path)):
        assert_same_record(ref, cache.record_at(i), f"position {i}")
        assert_same_record(before[i], cache.record_at(i), f"position {i}")
    assert cache.verify() == len(before)


# --------------------------------------------------------------------------------------------
# Format version 3: the codebook ladder (§5.1), the rung bytes and split (§5.3), codebook_rungs
# (§2), and the version 1-2 frames without rung bytes that readers still read.


def row_kl(exact: np.ndarray, decoded: np.ndarray) -> float:
    """§1.1: one row's codec KL, ``KL(exact ‖ decoded)`` of its top-k log-probs (``exact[e]``
    and ``decoded[e]`` of the same entry), both renormalised over the row (entries of log-prob
    -inf carry no mass; a row without mass costs 0)."""
    p = np.exp(np.asarray(exact, np.float64))
    q = np.exp(np.asarray(decoded, np.float64))
    if p.sum() <= 0:
        return 0.0
    p, q = p / p.sum(), q / q.sum()
    on = p > 0
    return max(0.0, float(np.sum(p[on] * (np.log(p[on]) - np.log(q[on])))))


def row_kls(written: dict[str, Any], decoded: dict[str, Any]) -> list[float]:
    """§1.1: each row's codec KL between the written record and its decoding (the label's
    log-prob outside the top-k is not counted)."""
    kls = []
    for r in range(len(written["label_ranks"])):
        n = int(np.sum(written["topk_ids"][r] != -1))
        ids, lps = written["topk_ids"][r, :n].tolist(), written["topk_logprobs"][r, :n]
        exact = dict(zip(ids, lps, strict=True))
        ids, lps = decoded["topk_ids"][r, :n].tolist(), decoded["topk_logprobs"][r, :n]
        dec = dict(zip(ids, lps, strict=True))
        kls.append(row_kl(np.array(list(exact.values())), np.array([dec[x] for x in exact])))
    return kls


def row_kls_at(written: dict[str, Any], levels: np.ndarray, s: float) -> list[float]:
    """§1.1: each row's codec KL were all its values coded with the table ``levels`` (tail step
    ``s``): what a reader decodes is the §5.1 quantisation of each written value."""
    kls = []
    for r in range(len(written["label_ranks"])):
        n = int(np.sum(written["topk_ids"][r] != -1))
        lps = written["topk_logprobs"][r, :n]
        kls.append(row_kl(lps, dequantize(lps, levels, s)))
    return kls


def codec_kl(written: dict[str, Any], decoded: dict[str, Any]) -> float:
    """§5.1: a record's codec KL, the mean over its rows of the rows' codec KL (§1.1)."""
    kls = row_kls(written, decoded)
    return float(np.mean(kls)) if kls else 0.0


def rungs_of(path: Path) -> list[tuple[str, FrameBooks, int]]:
    """(shard name, codebooks, S) of every record of the cache, in global order, read from the
    frames."""
    out = []
    for shard in rr.open_shards(path)[1]:
        for i in range(len(shard)):
            raw = shard.frame(i)
            out.append((shard.name, frame_books(shard, raw), tokens_end(shard, raw)[1]))
    return out


def test_records_of_every_rung_read_identically(tmp_path_factory):
    """Records of different peakedness under the default budget: the writer codes their rows
    with several rungs (read from the frames: at least 2 in the cache and in one shard); every
    record decodes identically in both readers and as the spec predicts from its rows' tables
    (rung_a's below the split, rung_b's from it), and its codec KL (§5.1's definition, computed
    here) is within the budget ``max_mean_kl``."""
    b = build("compact-k16-v4000-peakedness", tmp_path_factory)
    rungs = rungs_of(b.path)
    used = [(name, j) for name, books, s_len in rungs for j in books.rungs_used(s_len)]
    assert len({j for _, j in used}) >= 2, rungs
    by_shard: dict[str, set] = {}
    for name, j in used:
        by_shard.setdefault(name, set()).add(j)
    assert max(len(js) for js in by_shard.values()) >= 2, by_shard
    cache = TeacherCache(b.path)
    shard_of = shard_of_record(b)
    budget = b.params["max_mean_kl"]
    for pos, (ref, (_, books, _)) in enumerate(zip(ref_records_of(b), rungs, strict=True)):
        where = f"position {pos}, rungs {books.a}, {books.b}, split {books.split}"
        assert_same_record(ref, cache.record_at(pos), where)
        shard = shard_of[ref["key"]]
        w = b.written[ref["key"]]
        for j, (levels, s) in books.tables.items():  # the tables of the ladder's rungs (§5.1)
            assert s == b.params["tail_steps"][j], (where, j)
            assert_same_arrays(levels, rr.build_codebook(**rung_params(b.params, j)), (where, j))
        _, expect = compact_rows(w, books, shard.id_table)
        for f in FIELDS[2:]:
            assert_same_arrays(ref[f], expect[f], (where, f))
        assert codec_kl(w, ref) <= budget * (1 + 1e-9), where


def test_every_record_meets_the_budget(compact_built):
    """§5.1: with a budget B, every record's codec KL with its rows' rungs is at most B (so every
    shard's and the cache's mean is too); a fixed ladder (``max_mean_kl`` null) has one rung,
    rung 0, which every frame names twice. The shards' statistics (§1.1: ``codec_kl_rows``,
    ``codec_kl_sum``, ``codec_kl_max``) are those of the rows' codec KL as defined there,
    computed here from the written and decoded log-probs."""
    b = compact_built
    budget = b.params["max_mean_kl"]
    m = rr.read_manifest(b.path)
    refs = iter(ref_records_of(b))
    for e, shard in zip(m["shards"], rr.open_shards(b.path)[1], strict=True):
        kls: list[float] = []
        for i, key in enumerate(shard.keys):
            ref = next(refs)
            assert ref["key"] == key
            books = frame_books(shard, shard.frame(i))
            rows = row_kls(b.written[key], ref)
            kls += rows
            if budget is None:
                assert books.a == books.b == 0 and len(b.params["sqrt_steps"]) == 1
            elif rows:
                assert float(np.mean(rows)) <= budget * (1 + 1e-9), (key, books)
        stats = e["stats"]
        assert stats["codec_kl_rows"] == len(kls) == e["supervised"]
        assert math.isclose(stats["codec_kl_sum"], sum(kls), rel_tol=1e-6, abs_tol=1e-12)
        if kls:
            assert math.isclose(stats["codec_kl_max"], max(kls), rel_tol=1e-6, abs_tol=1e-12)


def test_budget_splits_rows_between_two_rungs(compact_built):
    """§5.1, the writer's choice under a budget B, read from the frames and checked with the
    codec KL of §1.1 computed here (rows at a rung: the §5.1 quantisation with its table):

    - rung_b is the rung ``f`` the walk ends at: the record's codec KL at ``f`` is at most B and,
      unless ``f`` is the last rung, above B at ``f + 1`` (the walk stops there);
    - rung_a = f + 1 with split > 0, or rung_a = f with split = 0; split < S (all S rows at
      ``f + 1`` would be above B), and split = 0 at the last rung;
    - the prefix is the longest: its mixed mean KL is at most B, every longer prefix's above B;
    - a record without supervised rows names rung 74 twice, split 0 (§4).

    Records split inside (0 < split < S, rung_a = rung_b + 1) occur in every budget cache whose
    rows have several entries. With k = 1 a row renormalised over its one entry costs no KL at
    any rung, so every record goes to the last rung. A fixed ladder names rung 0 twice."""
    b = compact_built
    budget = b.params["max_mean_kl"]
    rungs = rungs_of(b.path)
    if budget is None:
        for name, books, s_len in rungs:
            assert books.a == books.b == 0 and books.split <= s_len, (name, books)
        return
    tol = 1e-9  # the writer sums the rows' KL in its own order and arithmetic
    last = len(b.params["sqrt_steps"]) - 1
    tables: dict[int, tuple[np.ndarray, float]] = {}

    def table(j: int) -> tuple[np.ndarray, float]:  # rung j's codebook, from §5.1 alone
        if j not in tables:
            tables[j] = (rr.build_codebook(**rung_params(b.params, j)), b.params["tail_steps"][j])
        return tables[j]

    split_inside = 0
    for (name, books, s_len), ref in zip(rungs, ref_records_of(b), strict=True):
        w = b.written[ref["key"]]
        where = (name, ref["key"], books.a, books.b, books.split, s_len)
        if s_len == 0:
            assert (books.a, books.b, books.split) == (DEFAULT_RUNG, DEFAULT_RUNG, 0), where
            continue
        f = books.b
        assert books.split < s_len and books.a == (f + 1 if books.split else f), where
        kl_f = row_kls_at(w, *table(f))
        assert math.fsum(kl_f) <= budget * s_len * (1 + tol), where
        if b.k == 1:
            assert f == last and max(kl_f) == 0.0, where
        if f == last:
            assert books.split == 0, where
            continue
        kl_c = row_kls_at(w, *table(f + 1))
        assert math.fsum(kl_c) > budget * s_len * (1 - tol), where
        # the record's KL sum with its first m rows at f + 1, the others at f
        mixed = [math.fsum(kl_c[:m] + kl_f[m:]) for m in range(s_len + 1)]
        assert mixed[books.split] <= budget * s_len * (1 + tol), where
        assert math.isclose(mixed[books.split], math.fsum(row_kls(w, ref)), rel_tol=1e-9), where
        longer = mixed[books.split + 1 :]
        assert all(x > budget * s_len * (1 - tol) for x in longer), (where, longer)
        split_inside += 0 < books.split < s_len
    if b.k > 1:
        assert split_inside, "no record of the cache is split between two rungs"


def _rung_unlisted(shard, rung):
    return min(set(range(len(shard.codec_params["sqrt_steps"]))) - set(shard.codebooks))


def _head(rung_a: int, rung_b: int, split: int) -> bytes:
    """The start of a rows section with a ladder (§5.3)."""
    return bytes([rung_a, rung_b]) + put_varint(split)


def _rungs_missing(shard, books, s_len):
    """A version-2 style frame (no rung bytes, no split) in a shard with a ladder: its flags
    byte is read as rung_a (0: the feature record has padded rows), and this shard does not
    store rung 0."""
    assert 0 not in shard.codebooks, "the test needs a shard without rung 0"
    return b""


def _split_missing(shard, books, s_len):
    """The two rungs but no split varint: the flags byte (0: the feature record has padded
    rows) is read as split 0, then the nvalid stream's length (7 rows) as the flags byte, whose
    reserved bits are set."""
    return bytes([books.a, books.b])


#: name: (fn(shard, books, S) -> the bytes before the flags byte, what both readers' errors name)
RUNG_HEADS = {
    "rung-bytes-missing": (_rungs_missing, "rung"),
    "rung-a-not-listed": (
        lambda sh, bk, n: _head(_rung_unlisted(sh, None), bk.b, bk.split),
        "rung",
    ),
    "rung-b-not-listed": (
        lambda sh, bk, n: _head(bk.a, _rung_unlisted(sh, None), bk.split),
        "rung",
    ),
    "rung-a-past-ladder": (
        lambda sh, bk, n: _head(len(sh.codec_params["sqrt_steps"]), bk.b, bk.split),
        "rung",
    ),
    "rung-b-past-ladder": (
        lambda sh, bk, n: _head(bk.a, len(sh.codec_params["sqrt_steps"]), bk.split),
        "rung",
    ),
    "rung-a-255": (lambda sh, bk, n: _head(255, bk.b, bk.split), "rung"),
    "rung-b-255": (lambda sh, bk, n: _head(bk.a, 255, bk.split), "rung"),
    "split-above-S": (lambda sh, bk, n: _head(bk.a, bk.b, n + 1), "split"),
    "split-missing": (_split_missing, None),
}


@pytest.mark.parametrize("case", sorted(RUNG_HEADS))
def test_rungs_or_split_breaking_section_5_3_are_refused_by_both(
    compact_crafted_base, case, tmp_path
):
    """§5.1/§5.3: rung bytes naming a rung the shard's ``codebook_rungs`` does not list (a rung
    of the ladder whose table the shard does not store, a rung past the ladder, 255; rung_a or
    rung_b), a split above S, or a rows section missing its rung bytes or its split, is
    corruption: both readers refuse the record (the Rust reader with CacheCorruptionError)."""
    fn, names = RUNG_HEADS[case]

    def mutate(shard, i, raw):
        return remux(shard, raw, head_fn=lambda books, s_len: fn(shard, books, s_len))

    path = craft(compact_crafted_base, tmp_path, mutate)
    shard = rr.open_shards(path)[1][0]
    with pytest.raises(rr.RefCorruptionError, match=names):
        shard.record(0)
    shard.record(1)
    cache = TeacherCache(path)
    cache.record_at(1)
    with pytest.raises(CacheCorruptionError, match=names):
        cache.record_at(0)
    with pytest.raises(CacheCorruptionError, match=names):
        cache.verify()


def _naming_rung_1(which: str):
    """A mutation of a fixed-ladder frame: rung_a (``which`` "a") or rung_b named 1."""

    def head(books: FrameBooks, s_len: int) -> bytes:
        if which == "a":
            return _head(1, books.b, books.split)
        return _head(books.a, 1, books.split)

    return lambda shard, i, raw: remux(shard, raw, head_fn=head)


def test_fixed_ladder_frames_name_rung_0(tmp_path):
    """§5.1: a fixed codebook (``max_mean_kl`` null) is a one-rung ladder: frames name rung 0
    twice (split <= S), the shard lists ``[[0, L]]``; a frame naming rung 1 as rung_a or as
    rung_b is refused by both readers."""
    path = tmp_path / "written"
    recs = [one_row(), {**one_row(), "key": "s"}]
    write_cache(path, "compact", 4, 100, recs, shard_size=1 << 20, **FIXED)
    shard = rr.open_shards(path)[1][0]
    assert (
        shard.codec_params["sqrt_steps"] == [2.5e-3] and shard.codec_params["max_mean_kl"] is None
    )
    assert list(shard.codebooks) == [0] and len(shard.codebooks[0]) == 413
    for i in range(2):
        books = frame_books(shard, shard.frame(i))
        assert (books.a, books.b) == (0, 0) and books.split <= 1, books
    for which in ("a", "b"):
        assert_record0_refused_by_both(craft(path, tmp_path / which, _naming_rung_1(which)))


def test_codebook_level_minus_infinity(compact_crafted_base, tmp_path):
    """§5.1 asks a stored table for finite, strictly decreasing float32 levels from 0: a table
    whose last level is -inf is refused by both readers (CacheCorruptionError)."""

    def last_level_minus_inf(shard, listed, tables):
        tables = [t.copy() for t in tables]
        tables[0][-1] = -np.inf
        return listed, tables

    path = copy_cache(compact_crafted_base, tmp_path / "c")
    damage_codebook_rungs(path, last_level_minus_inf)
    with pytest.raises(rr.RefCorruptionError, match="finite levels"):
        rr.read_cache(path)
    with pytest.raises(CacheCorruptionError, match="codebook"):
        TeacherCache(path).record_at(0)


def _drop_rung_of_record_0(shard, listed, tables):
    """A rung record 0 uses (rung_b, the rung of its rows from the split on) is no longer listed
    (nor its table stored)."""
    used = frame_books(shard, shard.frame(0)).b
    keep = [i for i, (j, _) in enumerate(listed) if j != used]
    return [listed[i] for i in keep], [tables[i] for i in keep]


def _extra_rung(shard, listed, tables):
    """An unused rung of the ladder listed too (its table built from codec_params, §5.1)."""
    j = _rung_unlisted(shard, None)
    table = rr.build_codebook(**rung_params(shard.codec_params, j))
    return [*listed, [j, len(table)]], [*tables, table]


def _shift_boundary(shard, listed, tables):
    listed, tables = _extra_rung(shard, listed, tables)
    return [[listed[0][0], listed[0][1] + 1], [listed[1][0], listed[1][1] - 1], *listed[2:]], tables


#: name: (fn(shard, listed pairs, tables) -> metadata text or (pairs, tables), the reference
#: reader's error, the Rust reader's error, when the error comes: "open" (any read) or
#: "record 0" (only the record using the dropped rung)
CODEBOOK_RUNGS_DAMAGE: dict[str, tuple[Any, type, type, str]] = {
    "missing": (lambda sh, ls, ts: None, rr.RefFormatError, CacheFormatError, "open"),
    "not-json": (lambda sh, ls, ts: "[[0, 4", rr.RefFormatError, CacheFormatError, "open"),
    "object": (
        lambda sh, ls, ts: json.dumps({str(j): n for j, n in ls}),
        rr.RefFormatError,
        CacheFormatError,
        "open",
    ),
    "pair-of-one": (
        lambda sh, ls, ts: json.dumps([[j] for j, _ in ls]),
        rr.RefFormatError,
        CacheFormatError,
        "open",
    ),
    "triple": (
        lambda sh, ls, ts: json.dumps([[j, n, 0] for j, n in ls]),
        rr.RefFormatError,
        CacheFormatError,
        "open",
    ),
    "fractional-rung": (
        lambda sh, ls, ts: json.dumps([[j + 0.5, n] for j, n in ls]),
        rr.RefFormatError,
        CacheFormatError,
        "open",
    ),
    "string-levels": (
        lambda sh, ls, ts: json.dumps([[j, str(n)] for j, n in ls]),
        rr.RefFormatError,
        CacheFormatError,
        "open",
    ),
    # -1 is no rung at all: the Rust reader's parse of [rung, levels] as unsigned integers
    # fails (a format error); the reference reader reads it as a rung outside the ladder
    "negative-rung": (
        lambda sh, ls, ts: json.dumps([[-1, ls[0][1]], *ls[1:]]),
        rr.RefCorruptionError,
        CacheFormatError,
        "open",
    ),
    "levels-sum-short": (
        lambda sh, ls, ts: json.dumps([*ls[:-1], [ls[-1][0], ls[-1][1] - 1]]),
        rr.RefCorruptionError,
        CacheCorruptionError,
        "open",
    ),
    "levels-sum-long": (
        lambda sh, ls, ts: json.dumps([*ls[:-1], [ls[-1][0], ls[-1][1] + 1]]),
        rr.RefCorruptionError,
        CacheCorruptionError,
        "open",
    ),
    "empty-list": (lambda sh, ls, ts: "[]", rr.RefCorruptionError, CacheCorruptionError, "open"),
    "rung-twice": (
        lambda sh, ls, ts: ([*ls, ls[0]], [*ts, ts[0]]),
        rr.RefCorruptionError,
        CacheCorruptionError,
        "open",
    ),
    "rung-past-ladder": (
        lambda sh, ls, ts: ([[len(sh.codec_params["sqrt_steps"]), ls[0][1]], *ls[1:]], ts),
        rr.RefCorruptionError,
        CacheCorruptionError,
        "open",
    ),
    "zero-levels": (
        lambda sh, ls, ts: ([*ls, [_rung_unlisted(sh, None), 0]], ts),
        rr.RefCorruptionError,
        CacheCorruptionError,
        "open",
    ),
    "table-boundary-shifted": (
        _shift_boundary,
        rr.RefCorruptionError,
        CacheCorruptionError,
        "open",
    ),
    "used-rung-not-listed": (
        _drop_rung_of_record_0,
        rr.RefCorruptionError,
        CacheCorruptionError,
        "record 0",
    ),
}


def damage_codebook_rungs(path: Path, fn) -> None:
    """Rewrite the cache's shards with ``codebook_rungs`` (and maybe the ``codebook`` tensor)
    changed by ``fn``, the region checksums and the manifest recomputed over the change (a
    writer that wrote this), so only the checks of §2/§5.1 are left to catch it."""

    def change(shard, meta, t):
        listed = json.loads(meta["codebook_rungs"])
        tables = [shard.codebooks[j] for j, _ in listed]
        out = fn(shard, listed, tables)
        if out is None:
            del meta["codebook_rungs"]
        elif isinstance(out, str):
            meta["codebook_rungs"] = out
        else:
            pairs, tables = out
            meta["codebook_rungs"] = json.dumps(pairs)
            t["codebook"] = np.concatenate([np.zeros(0, np.float32), *tables])
        return meta, t

    rewrite_shards(path, change)


@pytest.mark.parametrize("case", sorted(CODEBOOK_RUNGS_DAMAGE))
def test_codebook_rungs_breaking_section_2_are_refused(compact_crafted_base, case, tmp_path):
    """§2: ``codebook_rungs`` is a JSON list of [rung, levels] pairs, rungs distinct and each
    below the ladder's length, levels >= 1 and summing to the ``codebook`` tensor's length, each
    table a valid codebook (§5.1). The reference reader refuses any breach when it opens the
    shard; so does the Rust reader (with the error class listed in CODEBOOK_RUNGS_DAMAGE). A
    rung used by a frame but not listed is refused when that record is read (§5.1)."""
    fn, ref_error, rust_error, when = CODEBOOK_RUNGS_DAMAGE[case]
    path = copy_cache(compact_crafted_base, tmp_path / "c")
    damage_codebook_rungs(path, fn)
    if when == "open":
        with pytest.raises(ref_error) as e:
            rr.read_cache(path)
        assert "codebook" in str(e.value), e.value
        with pytest.raises(rust_error, match="codebook"):
            TeacherCache(path).record_at(0)
        return
    shard = rr.open_shards(path)[1][0]
    with pytest.raises(ref_error, match="rung"):
        shard.record(0)
    cache = TeacherCache(path)
    with pytest.raises(rust_error, match="rung"):
        cache.record_at(0)
    read = 0
    for i in range(1, len(shard)):  # records of the rungs still listed read, identically
        raw = shard.frame(i)
        cur = rr.Cursor(raw, "frame")
        cur.pos = tokens_end(shard, raw)[2]
        if {cur.u8(), cur.u8()} <= set(shard.codebooks):
            assert_same_record(shard.record(i), cache.record_at(i), f"position {i}")
            read += 1
            continue
        with pytest.raises(ref_error, match="rung"):  # the others name the dropped rung
            shard.record(i)
        with pytest.raises(rust_error, match="rung"):
            cache.record_at(i)
    assert read, "the shard has records of other rungs"


def test_non_canonical_codebook_rungs_read_identically(compact_crafted_base, tmp_path):
    """§2 lists the rungs "in tensor order": any order, and a rung no record uses may be stored
    too. Both readers read such a shard (the writer stores exactly the rungs used, ascending)
    like the original."""
    before = rr.read_cache(compact_crafted_base)

    def reorder(shard, listed, tables):
        listed, tables = _extra_rung(shard, listed, tables)
        return listed[::-1], tables[::-1]

    path = copy_cache(compact_crafted_base, tmp_path / "c")
    damage_codebook_rungs(path, reorder)
    shard = rr.open_shards(path)[1][0]
    listed = list(shard.codebooks)
    assert len(listed) >= 2 and listed != sorted(listed), listed
    for i, (ref, rec) in enumerate(read_both(path)):
        assert_same_record(ref, rec, f"position {i}")
        assert_same_record(before[i], rec, f"position {i}")
    assert TeacherCache(path).verify() == len(before)


@pytest.fixture(scope="module")
def legacy_cache(tmp_path_factory) -> Path:
    """The version-1 compact fixture (tests/data/v1: one fixed codebook, no rung bytes) with
    records appended by today's writer: §5.1 says the append keeps the fixed codebook and writes
    version-2 frames and shards (no rung bytes), whatever budget the writer was given."""
    path = tmp_path_factory.mktemp("legacy") / "cache"
    shutil.copytree(V1_CACHES / "compact", path)
    recs = make_records(21, 12, 1000, 8, escape_threshold(DEFAULT_PARAMS))
    settings = {"teacher": {"name": "t"}, "tokenizer": "tok"}  # as the fixture was written
    with CacheWriter(
        path, top_k=8, vocab_size=1000, mode="append", shard_size=2000, **settings
    ) as w:
        for r in recs:
            w.add(**r)
    return path


@pytest.mark.parametrize("codec", ["exact", "compact"])
def test_version1_fixture_read_identically_by_both(codec, tmp_path):
    """tests/data/v1 (format version 1) still reads, identically in both readers; its compact
    frames carry no rung bytes and are, byte for byte, the spec encoding of what they decode to
    with the one stored table (§5.1: ``levels[q]`` encodes back to ``q``)."""
    path = copy_cache(V1_CACHES / codec, tmp_path / "c")
    with pytest.warns(UserWarning, match="format-version-1"):
        pairs = read_both(path)
    assert len(pairs) == 4
    for i, (ref, rec) in enumerate(pairs):
        assert_same_record(ref, rec, f"position {i}")
    for shard in rr.open_shards(path)[1]:
        assert shard.format_version == 1
        for i in range(len(shard)):
            raw, rec = shard.frame(i), shard.record(i)
            if codec == "exact":
                assert raw == encode_frame(rec, "exact")
                continue
            assert not shard.rung_byte
            books = frame_books(shard, raw)
            assert books.a is None
            assert raw == encode_frame(rec, "compact", books, shard.id_table), (shard.name, i)


def test_append_to_a_version1_cache_writes_frames_without_a_rung_byte(legacy_cache):
    """§5.1/§7: the appended shards are version 2 with the fixed codebook (no ``codebook_rungs``,
    no rung bytes: the spec encoder reproduces their frames), the manifest a sealed version 3
    keeping the fixed ``codec_params``; both readers read old and new records identically."""
    m = rr.read_manifest(legacy_cache)
    assert m["format_version"] == 3
    assert {k: m["codec_params"][k] for k in DEFAULT_PARAMS} == DEFAULT_PARAMS
    assert "sqrt_steps" not in m["codec_params"]
    shards = rr.open_shards(legacy_cache)[1]
    assert [sh.format_version for sh in shards][:2] == [1, 1] and len(shards) >= 4
    for shard in shards:
        assert not shard.rung_byte and list(shard.codebooks) == [0]
        with safe_open(str(shard.path), framework="numpy") as st:
            assert "codebook_rungs" not in st.metadata()
        assert_same_arrays(shard.codebooks[0], rr.build_codebook(**DEFAULT_PARAMS), shard.name)
        for i in range(len(shard)):
            raw = shard.frame(i)
            books = frame_books(shard, raw)
            assert books.a is None
            expect = encode_frame(shard.record(i), "compact", books, shard.id_table)
            assert raw == expect, (shard.name, i)
    assert {sh.format_version for sh in shards[2:]} == {2}
    for i, (ref, rec) in enumerate(read_both(legacy_cache)):
        assert_same_record(ref, rec, f"position {i}")
