"""Synthetic teacher top-k data that looks like a real LLM teacher on reasoning traces.

The cache, its codecs and the losses are tested and benchmarked on data produced here. Each
:class:`SyntheticRecord` carries exactly the arguments of the cache writer's ``add``: the token
ids of one SFT example, its HF-style labels (``-100`` on the prompt and on position 0) and, for
every supervised position, the teacher's top-k token ids and log-probs, the log-prob of the label
token and the label's rank in the teacher's full distribution.

The numbers are not independent noise. Each supervised row is a full-vocabulary distribution:
an explicit top-k head plus an analytic power-law continuation over the remaining
``vocab_size - top_k`` tokens. Log-probs are a log-softmax over the full vocabulary (the mass
outside the top-k is positive), the label's rank and log-prob are drawn from that same
distribution, and so the invariants the cache relies on hold exactly:

* ``topk_ids[r]`` are distinct, in ``[0, vocab_size)``, sorted by log-prob (descending);
* ``topk_logprobs[r]`` is finite, non-increasing and ``logsumexp(topk_logprobs[r]) < 0``;
* ``label_ranks[r] < top_k`` iff the label is in the top-k, and then
  ``topk_ids[r, label_ranks[r]] == label`` and ``label_logprobs[r]`` equals
  ``topk_logprobs[r, label_ranks[r]]`` bit for bit; otherwise ``label_ranks[r] >= top_k`` and
  ``label_logprobs[r] <= topk_logprobs[r, -1]``.

How the token ids, the text and the probabilities are modelled, and why this resembles a real
teacher (Qwen-like vocabulary of 151,936 ids, reasoning traces), is documented in
``docs/SYNTHETIC_DATA.md``. Only numpy is needed; everything is vectorised per record and each
record depends only on ``(seed, key)``, so any slice of a data set can be regenerated on its own.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "IGNORE_INDEX",
    "QWEN_VOCAB_SIZE",
    "SyntheticRecord",
    "generate_list",
    "generate_records",
    "stats",
]

IGNORE_INDEX = -100
"""Label value of positions that are not supervised (HF convention)."""

QWEN_VOCAB_SIZE = 151_936
"""Vocabulary size (embedding rows) of the Qwen2/Qwen2.5/Qwen3 model families."""

I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

# Independent random streams derived from the user's seed (SeedSequence spawn keys).
_STREAM_VOCAB = 0
_STREAM_RECORD = 1

# --- model constants (see docs/SYNTHETIC_DATA.md for the reasoning behind each) ---------------
_TOPIC_INNER_EXPONENT = 1.0  # Zipf weights of the words inside one record's topic set
_PROMPT_CONCENTRATION = 20.0  # per-record prompt share ~ Beta(c*f, c*(1-f))
_MEAN_COPY_SPAN = 8.0  # mean length of a repeated (copied) span of text
_NEARBY_WINDOW = 8  # "nearby text" candidates come from positions t-8 .. t+8
_SHARE_DROP = 0.1  # share of the previous row's candidates that a sharing row drops
_SHARE_JITTER = 2.0  # std of the rank jitter applied to the shared candidates

# Candidate sources of a top-k row: topic set, global Zipf, generic set, nearby text.
_HEAD_SOURCES = (0.45, 0.30, 0.10, 0.15)
_TAIL_SOURCES = (0.20, 0.35, 0.35, 0.10)

# Confident rows: the non-argmax mass eps has log10(eps) ~ Normal(-2.5, 0.9) clipped to
# [-5, log10(0.5)], so ~95% of confident rows have top-1 p > 0.9 (median 0.997).
_CONF_LOG10_EPS_MEAN = -2.5
_CONF_LOG10_EPS_STD = 0.9
_CONF_LOG10_EPS_MIN = -5.0
_CONF_EPS_MAX = 0.5


@dataclass(frozen=True, slots=True)
class _Regime:
    """Shape parameters of one kind of row (uniform ranges are ``(low, high)``)."""

    min_alts: int  # plausible alternatives besides the argmax: min_alts + Poisson(mean_extra_alts)
    mean_extra_alts: float
    alt_gap: tuple[float, float]  # mean logit gap between consecutive alternatives (nats)
    drop: tuple[float, float]  # gap between the last alternative and the junk tail (nats)
    tail_beta: tuple[float, float]  # tail power law in rank inside the top-k
    out_beta: tuple[float, float]  # continuation power law outside the top-k (the bulk)


_CONFIDENT = _Regime(
    min_alts=0,
    mean_extra_alts=0.7,
    alt_gap=(0.5, 1.5),
    drop=(0.5, 2.5),
    tail_beta=(1.8, 2.8),
    out_beta=(0.6, 1.0),
)
_HIGH_ENTROPY = _Regime(
    min_alts=2,
    mean_extra_alts=3.0,
    alt_gap=(0.25, 0.8),
    drop=(0.5, 2.0),
    tail_beta=(1.3, 2.0),
    out_beta=(0.85, 1.15),
)
_TAIL_KNEE = 64  # tail index where the top-k decay flattens into the bulk (matters for top_k > 64)
_ZIPF_HEAD = 4096  # Zipf ranks sampled from an exact table; the rest by a continuous inverse
_MIN_OUTSIDE_MASS = 2.0**-23  # stored rows keep at least ~1.2e-7 of mass outside the top-k


@dataclass(slots=True, eq=False)
class SyntheticRecord:
    """One synthetic SFT example with its teacher top-k targets.

    Field names are the argument names of the cache writer's ``add``, so a record can be passed
    as ``writer.add(**record.as_kwargs())``. With ``T`` tokens and ``S`` supervised positions
    (``t >= 1`` with ``labels[t] != -100``, rows ordered by ``t``):

    Attributes:
        key: record key.
        input_ids: int32 ``[T]`` token ids.
        labels: int32 ``[T]``; ``-100`` on the prompt prefix and position 0, else ``input_ids``.
        topk_ids: int32 ``[S, top_k]`` teacher top-k ids for predicting ``labels[t]``,
            by log-prob descending.
        topk_logprobs: float32 ``[S, top_k]`` log-softmax over the full vocabulary.
        label_logprobs: float32 ``[S]`` teacher log-prob of the label token.
        label_ranks: int32 ``[S]`` 0-based rank of the label in the full distribution.
    """

    key: int
    input_ids: I32
    labels: I32
    topk_ids: I32
    topk_logprobs: F32
    label_logprobs: F32
    label_ranks: I32

    @property
    def num_tokens(self) -> int:
        """Number of tokens ``T``."""
        return int(self.input_ids.shape[0])

    @property
    def num_supervised(self) -> int:
        """Number of supervised rows ``S``."""
        return int(self.topk_ids.shape[0])

    def as_kwargs(self) -> dict[str, Any]:
        """The fields as a dict (arrays are not copied), e.g. for ``writer.add(**kwargs)``."""
        return {
            "key": self.key,
            "input_ids": self.input_ids,
            "labels": self.labels,
            "topk_ids": self.topk_ids,
            "topk_logprobs": self.topk_logprobs,
            "label_logprobs": self.label_logprobs,
            "label_ranks": self.label_ranks,
        }


@dataclass(frozen=True, slots=True)
class _Config:
    vocab_size: int
    top_k: int
    mean_length: int
    prompt_fraction: float
    seed: int
    high_entropy_fraction: float
    length_sigma: float
    max_length: int
    zipf_exponent: float
    topic_size: int
    topic_weight: float
    repeat_fraction: float
    num_generic: int
    share_fraction: float
    label_temperature: float
    bf16_logits: bool


@dataclass(frozen=True, slots=True)
class _Vocab:
    """Seed-wide token model: which id has which Zipf rank, and the samplers' CDFs."""

    size: int
    rank_to_id: I64  # random permutation: Zipf rank -> token id
    zipf_exponent: float
    zipf_cdf: F64  # CDF of the global Zipf distribution over ranks
    num_generic: int  # ranks [0, num_generic) are the generic high-frequency tokens
    generic_cdf: F64  # CDF over the generic ranks (Zipf restricted to them)

    def zipf(self, rng: np.random.Generator, n: int) -> I64:
        """``n`` token ids from the global Zipf distribution."""
        return self.rank_to_id[self._zipf_ranks(rng.random(n))]

    def zipf_content(self, rng: np.random.Generator, n: int) -> I64:
        """``n`` token ids from the global Zipf distribution restricted to non-generic ranks."""
        return self.rank_to_id[self.content_ranks(rng, n)]

    def content_ranks(self, rng: np.random.Generator, n: int) -> I64:
        """``n`` Zipf ranks conditioned on ``rank >= num_generic``."""
        lo = self.zipf_cdf[self.num_generic - 1]
        return np.maximum(self._zipf_ranks(lo + (1.0 - lo) * rng.random(n)), self.num_generic)

    def generic(self, rng: np.random.Generator, n: int) -> I64:
        """``n`` token ids from the generic set (Zipf-weighted)."""
        ranks = np.searchsorted(self.generic_cdf, rng.random(n), side="right")
        return self.rank_to_id[ranks]

    def _zipf_ranks(self, u: F64) -> I64:
        """Inverse CDF of the Zipf distribution (0-based ranks) at ``u`` in ``[0, 1)``.

        Exact (binary search in a small, cache-resident table) for the first
        :data:`_ZIPF_HEAD` ranks; beyond, the continuous inverse of ``x**-s`` on
        ``[r - 1/2, r + 1/2]`` intervals, whose relative error per rank is ~1e-8 there.
        """
        head = min(_ZIPF_HEAD, self.size)
        split = self.zipf_cdf[head - 1]
        ranks = np.searchsorted(self.zipf_cdf[:head], u, side="right")
        tail = u >= split
        if head < self.size and tail.any():
            v = (u[tail] - split) / (1.0 - split)  # uniform within the tail
            lo, hi = head + 0.5, self.size + 0.5  # 1-based ranks head+1 .. size
            c = 1.0 - self.zipf_exponent
            if abs(c) < 1e-12:
                x = lo * (hi / lo) ** v
            else:
                x = (lo**c + v * (hi**c - lo**c)) ** (1.0 / c)
            ranks[tail] = np.clip(np.floor(x + 0.5).astype(np.int64) - 1, head, self.size - 1)
        return np.minimum(ranks, self.size - 1)


def _cdf(weights: F64) -> F64:
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    cdf[-1] = 1.0  # rng.random() < 1, so searchsorted(..., side="right") stays in range
    return cdf


@functools.lru_cache(maxsize=8)
def _vocab(seed: int, vocab_size: int, zipf_exponent: float, num_generic: int) -> _Vocab:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_STREAM_VOCAB,)))
    rank_to_id = rng.permutation(vocab_size).astype(np.int64)
    ranks = np.arange(1, vocab_size + 1, dtype=np.float64)
    zipf_w = ranks**-zipf_exponent
    n_gen = max(1, min(num_generic, vocab_size // 16))
    return _Vocab(
        size=vocab_size,
        rank_to_id=rank_to_id,
        zipf_exponent=zipf_exponent,
        zipf_cdf=_cdf(zipf_w),
        num_generic=n_gen,
        generic_cdf=_cdf(zipf_w[:n_gen].copy()),
    )


# --- validation -------------------------------------------------------------------------------


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_number(name: str, value: object, *, low: float, high: float, open_low: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    ok = (v > low if open_low else v >= low) and v <= high and math.isfinite(v)  # rejects NaN
    if not ok:
        bracket = "(" if open_low else "["
        upper = "inf)" if math.isinf(high) else f"{high:g}]"
        raise ValueError(f"{name} must be in {bracket}{low:g}, {upper}, got {value!r}")
    return v


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _check_fraction(name: str, value: object) -> float:
    return _check_number(name, value, low=0.0, high=1.0, open_low=False)


def _check_positive(name: str, value: object) -> float:
    return _check_number(name, value, low=0.0, high=math.inf, open_low=True)


# --- public API -------------------------------------------------------------------------------


def generate_records(
    num_records: int,
    *,
    vocab_size: int = QWEN_VOCAB_SIZE,
    top_k: int = 64,
    mean_length: int = 512,
    prompt_fraction: float = 0.4,
    seed: int = 0,
    high_entropy_fraction: float = 0.15,
    key_offset: int = 0,
    length_sigma: float = 0.5,
    max_length: int | None = None,
    zipf_exponent: float = 1.05,
    topic_size: int = 300,
    topic_weight: float = 0.3,
    repeat_fraction: float = 0.1,
    num_generic: int = 128,
    share_fraction: float = 0.3,
    label_temperature: float = 1.0,
    bf16_logits: bool = False,
) -> Iterator[SyntheticRecord]:
    """Yield ``num_records`` synthetic records with keys ``key_offset .. key_offset+num_records-1``.

    Arguments are validated eagerly (a bad one raises :class:`ValueError` here, not on the first
    ``next``). Record ``key`` depends only on ``(seed, key)`` and the model parameters, so
    ``generate_records(n, seed=s)`` starts with ``generate_records(m, seed=s)`` for ``m <= n``
    and ``key_offset`` regenerates any slice on its own.

    Args:
        num_records: number of records (>= 0).
        vocab_size: vocabulary size; the default is Qwen's 151,936.
        top_k: teacher top-k width, ``1 <= top_k < vocab_size`` (at least one token must lie
            outside the top-k so that the outside mass is positive).
        mean_length: mean number of tokens per record (lengths are lognormal, at least 2).
        prompt_fraction: mean share of each record that is prompt (``labels == -100``);
            0 leaves only position 0 unsupervised, 1 supervises nothing.
        seed: non-negative seed of the whole data set (vocabulary model and records).
        high_entropy_fraction: share of supervised rows with a flat head (top-1 p 0.2-0.6).
        key_offset: key of the first record (>= 0).
        length_sigma: sigma of the lognormal record length (0 gives a fixed length).
        max_length: optional cap on the record length (>= 2).
        zipf_exponent: exponent of the global Zipf token distribution.
        topic_size: number of topic slots per record (i.i.d. content-Zipf draws with weights
            ``1/m`` in the record; frequent words can take several slots).
        topic_weight: probability that a text token is drawn from the record's topic.
        repeat_fraction: approximate share of text tokens that repeat an earlier span.
        num_generic: size of the generic set of high-frequency tokens that fill many tails
            (capped at ``vocab_size // 16``).
        share_fraction: share of rows whose candidates mostly repeat the previous row's.
        label_temperature: labels are drawn from the teacher distribution raised to
            ``1 / label_temperature``; 1 means the text follows the teacher, > 1 makes the
            text more surprising to the teacher (more labels off the top-1 / out of the top-k).
        bf16_logits: round each row's logits (offset to a typical magnitude of 15-35) to
            bfloat16 before the log-softmax, like a teacher run in bf16 whose logits are upcast
            to float32: log-prob differences then lie on the bf16 grid and ties appear. Off by
            default (full float32 mantissas, the harder case for a lossless codec).

    Returns:
        An iterator of :class:`SyntheticRecord`.

    Raises:
        ValueError: if an argument is out of range.
    """
    n = _check_int("num_records", num_records, 0)
    v = _check_int("vocab_size", vocab_size, 2)
    k = _check_int("top_k", top_k, 1)
    if k >= v:
        raise ValueError(
            f"top_k must be < vocab_size (some mass must lie outside the top-k), "
            f"got top_k={k}, vocab_size={v}"
        )
    mean_len = _check_int("mean_length", mean_length, 2)
    max_len = (
        np.iinfo(np.int32).max if max_length is None else _check_int("max_length", max_length, 2)
    )
    cfg = _Config(
        vocab_size=v,
        top_k=k,
        mean_length=mean_len,
        prompt_fraction=_check_fraction("prompt_fraction", prompt_fraction),
        seed=_check_int("seed", seed, 0),
        high_entropy_fraction=_check_fraction("high_entropy_fraction", high_entropy_fraction),
        length_sigma=_check_number(
            "length_sigma", length_sigma, low=0.0, high=math.inf, open_low=False
        ),
        max_length=max_len,
        zipf_exponent=_check_positive("zipf_exponent", zipf_exponent),
        topic_size=_check_int("topic_size", topic_size, 1),
        topic_weight=_check_fraction("topic_weight", topic_weight),
        repeat_fraction=_check_fraction("repeat_fraction", repeat_fraction),
        num_generic=_check_int("num_generic", num_generic, 1),
        share_fraction=_check_fraction("share_fraction", share_fraction),
        label_temperature=_check_positive("label_temperature", label_temperature),
        bf16_logits=_check_bool("bf16_logits", bf16_logits),
    )
    offset = _check_int("key_offset", key_offset, 0)
    vocab = _vocab(cfg.seed, cfg.vocab_size, cfg.zipf_exponent, cfg.num_generic)
    return (_make_record(cfg, vocab, offset + i) for i in range(n))


def generate_list(num_records: int, **kwargs: Any) -> list[SyntheticRecord]:
    """``list(generate_records(num_records, **kwargs))``; see :func:`generate_records`."""
    return list(generate_records(num_records, **kwargs))


def stats(records: Iterable[SyntheticRecord]) -> dict[str, float]:
    """Summary statistics of a set of records, to compare against a real teacher.

    Returns a dict of floats: ``records``, ``mean_tokens``, ``mean_supervised`` (per record),
    ``rows``, ``frac_top1_gt_0.9`` and ``frac_top1_lt_0.6`` (top-1 probability), ``mean_top1_p``,
    ``mean_entropy`` / ``median_entropy`` (nats, of the renormalised top-k),
    ``frac_label_in_topk``, ``frac_label_rank0``, ``mean_label_nll`` (nats),
    ``mean_mass_outside`` / ``median_mass_outside`` (probability mass outside the top-k),
    ``mean_last_topk_logprob``, ``distinct_input_ids`` and ``distinct_topk_ids``.
    """
    recs = list(records)
    n = len(recs)
    out: dict[str, float] = {"records": float(n)}
    if n == 0:
        return out
    lp = np.concatenate([r.topk_logprobs for r in recs]).astype(np.float64)
    ranks = np.concatenate([r.label_ranks for r in recs])
    label_lp = np.concatenate([r.label_logprobs for r in recs]).astype(np.float64)
    k = recs[0].topk_logprobs.shape[1]
    out["mean_tokens"] = float(np.mean([r.num_tokens for r in recs]))
    out["mean_supervised"] = float(np.mean([r.num_supervised for r in recs]))
    out["rows"] = float(lp.shape[0])
    input_ids = np.unique(np.concatenate([r.input_ids for r in recs]))
    topk_ids = np.unique(np.concatenate([r.topk_ids.ravel() for r in recs]))
    if lp.shape[0] > 0:
        p1 = np.exp(lp[:, 0])
        mass_in = np.exp(lp).sum(axis=1)
        q = np.exp(lp - np.log(mass_in)[:, None])
        entropy = -(q * np.log(np.maximum(q, 1e-300))).sum(axis=1)
        outside = 1.0 - mass_in
        out.update(
            {
                "frac_top1_gt_0.9": float(np.mean(p1 > 0.9)),
                "frac_top1_lt_0.6": float(np.mean(p1 < 0.6)),
                "mean_top1_p": float(np.mean(p1)),
                "mean_entropy": float(np.mean(entropy)),
                "median_entropy": float(np.median(entropy)),
                "frac_label_in_topk": float(np.mean(ranks < k)),
                "frac_label_rank0": float(np.mean(ranks == 0)),
                "mean_label_nll": float(-np.mean(label_lp)),
                "mean_mass_outside": float(np.mean(outside)),
                "median_mass_outside": float(np.median(outside)),
                "mean_last_topk_logprob": float(np.mean(lp[:, -1])),
            }
        )
    out["distinct_input_ids"] = float(input_ids.size)
    out["distinct_topk_ids"] = float(topk_ids.size)
    return out


# --- one record -------------------------------------------------------------------------------


def _make_record(cfg: _Config, vocab: _Vocab, key: int) -> SyntheticRecord:
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(_STREAM_RECORD, key)))

    # Length: lognormal with mean `mean_length`.
    mu = math.log(cfg.mean_length) - 0.5 * cfg.length_sigma**2
    length = round(math.exp(mu + cfg.length_sigma * rng.standard_normal()))
    length = int(min(max(length, 2), cfg.max_length))

    # Prompt prefix: a Beta-distributed share around prompt_fraction; position 0 is never
    # supervised and, unless prompt_fraction == 1, at least one position is.
    f = cfg.prompt_fraction
    if 0.0 < f < 1.0:
        f = float(rng.beta(_PROMPT_CONCENTRATION * f, _PROMPT_CONCENTRATION * (1.0 - f)))
    prompt_len = round(f * length)
    prompt_len = min(max(prompt_len, 1), length if cfg.prompt_fraction >= 1.0 else length - 1)

    topic_ids, topic_cdf = _sample_topic(rng, cfg, vocab)
    ids, copied = _sample_text(rng, cfg, vocab, length, topic_ids, topic_cdf)
    labels = ids.copy()
    labels[:prompt_len] = IGNORE_INDEX

    topk_ids, topk_lp, label_lp, label_rank = _teacher_rows(
        rng, cfg, vocab, ids, copied, prompt_len, topic_ids, topic_cdf
    )
    return SyntheticRecord(
        key=int(key),
        input_ids=ids.astype(np.int32),
        labels=labels.astype(np.int32),
        topk_ids=topk_ids.astype(np.int32),
        topk_logprobs=topk_lp,
        label_logprobs=label_lp,
        label_ranks=label_rank.astype(np.int32),
    )


def _sample_topic(rng: np.random.Generator, cfg: _Config, vocab: _Vocab) -> tuple[I64, F64]:
    """The record's topic: ``topic_size`` slots and the CDF of their weights in the record.

    Each slot is an independent draw from the global Zipf distribution restricted to content
    (non-generic) ranks, and slot ``m`` has weight ``1/m`` in the record. Because the slots are
    i.i.d., a topic token is marginally a content-Zipf draw whatever the slot weights: the topic
    makes words bursty (the first slots recur dozens of times in one record) but keeps their
    expected corpus frequency Zipfian. Frequent content words can fill several slots.
    """
    size = cfg.topic_size
    topic_ids = vocab.zipf_content(rng, size)
    weights = np.arange(1, size + 1, dtype=np.float64) ** -_TOPIC_INNER_EXPONENT
    return topic_ids, _cdf(weights)


def _draw_topic(rng: np.random.Generator, topic_ids: I64, topic_cdf: F64, n: int) -> I64:
    return topic_ids[np.searchsorted(topic_cdf, rng.random(n), side="right")]


def _sample_text(
    rng: np.random.Generator,
    cfg: _Config,
    vocab: _Vocab,
    length: int,
    topic_ids: I64,
    topic_cdf: F64,
) -> tuple[I64, BoolArray]:
    """Token ids from the topic + Zipf mixture, with copied spans; also which are copies."""
    # Source of each token: topic (content words) with prob. topic_weight; otherwise generic
    # with prob. a and content-Zipf with prob. 1 - a, where a = P(generic) / (1 - topic_weight)
    # compensates the content mass that the topic adds, so that the expected corpus frequency
    # of every token is exactly its Zipf weight (possible while topic_weight <= P(content)).
    ids = np.empty(length, dtype=np.int64)
    p_generic = float(vocab.zipf_cdf[vocab.num_generic - 1])
    a = 1.0 if cfg.topic_weight >= 1.0 else min(1.0, p_generic / (1.0 - cfg.topic_weight))
    u = rng.random(length)
    from_topic = u < cfg.topic_weight
    from_generic = ~from_topic & (u < cfg.topic_weight + (1.0 - cfg.topic_weight) * a)
    from_content = ~(from_topic | from_generic)
    ids[from_topic] = _draw_topic(rng, topic_ids, topic_cdf, int(from_topic.sum()))
    ids[from_generic] = vocab.generic(rng, int(from_generic.sum()))
    ids[from_content] = vocab.zipf_content(rng, int(from_content.sum()))

    # Repetition: spans copied from earlier in the document (equations, names, restated
    # sub-results). Copies of copies are allowed (spans are applied left to right).
    copied = np.zeros(length, dtype=np.bool_)  # predictable positions: inside a copy, not its 1st
    n_spans = int(rng.poisson(cfg.repeat_fraction * length / _MEAN_COPY_SPAN)) if length > 2 else 0
    if n_spans:
        starts = np.sort(rng.integers(1, length, n_spans))
        spans = rng.geometric(1.0 / _MEAN_COPY_SPAN, n_spans)
        src_u = rng.random(n_spans)
        for start, span, frac in zip(starts.tolist(), spans.tolist(), src_u.tolist(), strict=True):
            src = int(frac * start)  # uniform over the text so far
            span = min(span, start - src, length - start)
            ids[start : start + span] = ids[src : src + span]
            copied[start + 1 : start + span] = True
    return ids, copied


# --- teacher rows -----------------------------------------------------------------------------


def _logsumexp(x: F64, axis: int = -1) -> F64:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.log(np.sum(np.exp(x - m), axis=axis)) + np.squeeze(m, axis=axis)


def _power_integral(lo: F64, hi: F64, beta: F64) -> F64:
    """``integral_lo^hi y**-beta dy`` (lo, hi > 0), stable around beta == 1."""
    log_ratio = np.log(hi / lo)
    u = (1.0 - beta) * log_ratio
    safe_u = np.where(np.abs(u) < 1e-9, 1.0, u)
    factor = np.where(np.abs(u) < 1e-9, 1.0 + 0.5 * u, np.expm1(safe_u) / safe_u)
    return lo ** (1.0 - beta) * log_ratio * factor


def _tail_sum(a: F64, beta: F64, n: int) -> F64:
    """``sum_{i=0}^{n-1} (1 + i/a)**-beta`` as ``1 + integral_{0.5}^{n-0.5}`` (an upper bound:
    the midpoint rule underestimates the integral of a convex function)."""
    if n <= 1:
        return np.ones_like(a)
    lo = 1.0 + 0.5 / a
    hi = 1.0 + (n - 0.5) / a
    return 1.0 + a * _power_integral(lo, hi, beta)


def _tail_index(q: F64, a: F64, beta: F64, n: int) -> I64:
    """Inverse of :func:`_tail_sum`: the index ``i`` whose cumulative mass reaches ``q``
    (``q`` in units of the first outside token's mass)."""
    qc = np.maximum(q - 1.0, 0.0)  # mass beyond the first term, covered by the integral
    lo = 1.0 + 0.5 / a
    w = qc / (a * lo ** (1.0 - beta))
    c = 1.0 - beta
    arg = np.maximum(c * w, -1.0 + 1e-12)
    safe_c = np.where(np.abs(c) < 1e-9, 1.0, c)
    log_y = np.where(np.abs(c) < 1e-9, w, np.log1p(arg) / safe_c)
    x = a * (lo * np.exp(np.minimum(log_y, 700.0)) - 1.0)
    idx = np.where(q <= 1.0, 0, np.floor(x + 0.5))
    return np.clip(idx, 0, n - 1).astype(np.int64)


def _teacher_rows(
    rng: np.random.Generator,
    cfg: _Config,
    vocab: _Vocab,
    ids: I64,
    copied: BoolArray,
    prompt_len: int,
    topic_ids: I64,
    topic_cdf: F64,
) -> tuple[I64, F32, F32, I64]:
    """Top-k ids, top-k log-probs, label log-probs and label ranks of the supervised rows."""
    k = cfg.top_k
    length = ids.shape[0]
    s = length - prompt_len
    if s <= 0:
        return (
            np.zeros((0, k), np.int64),
            np.zeros((0, k), np.float32),
            np.zeros(0, np.float32),
            np.zeros(0, np.int64),
        )
    pos = np.arange(prompt_len, length)
    labels = ids[pos]

    # Regime per row. Positions inside a copied span are predictable (induction), hence
    # confident; the other rows get a raised high-entropy rate so the total matches.
    predictable = copied[pos]
    n_free = s - int(predictable.sum())
    h = min(1.0, cfg.high_entropy_fraction * s / n_free) if n_free else 0.0
    high = ~predictable & (rng.random(s) < h)

    lp, first_out_lp, tail_a, beta_out = _row_distributions(rng, cfg, high)
    label_rank, label_lp = _sample_label_ranks(rng, cfg, lp, first_out_lp, tail_a, beta_out)
    topk_ids = _row_ids(rng, cfg, vocab, ids, pos, labels, label_rank, high, topic_ids, topic_cdf)

    lp32 = _to_float32_with_outside_mass(lp)
    in_topk = label_rank < k
    rows = np.arange(s)
    label_lp32 = np.minimum(label_lp.astype(np.float32), lp32[:, -1])
    label_lp32[in_topk] = lp32[rows[in_topk], label_rank[in_topk]]
    return topk_ids, lp32, label_lp32, label_rank


def _to_float32_with_outside_mass(lp: F64) -> F32:
    """Cast log-probs to float32 keeping at least :data:`_MIN_OUTSIDE_MASS` outside the top-k.

    Rounding to float32 can push ``sum(exp(row))`` over 1 when the modelled outside mass is
    tiny (ultra-confident rows, or few tokens outside the top-k); such rows are shifted down
    by the missing amount (a change of the order of 1e-7 in log space).
    """
    target = math.log1p(-2.0 * _MIN_OUTSIDE_MASS)
    lp32 = lp.astype(np.float32)
    for _ in range(4):
        lse = _logsumexp(lp32.astype(np.float64))
        bad = lse > math.log1p(-_MIN_OUTSIDE_MASS)
        if not bad.any():
            break
        lp32[bad] = (lp[bad] - (lse[bad] - target)[:, None]).astype(np.float32)
        lp = lp.copy()
        lp[bad] -= (lse[bad] - target)[:, None]
    return lp32


def _row_distributions(
    rng: np.random.Generator, cfg: _Config, high: BoolArray
) -> tuple[F64, F64, F64, F64]:
    """Full-vocabulary distributions of the rows (log-probs, descending).

    Returns the top-k log-probs ``[S, k]``, the log-prob of the first token outside the top-k
    ``[S]``, and the parameters ``a``, ``beta`` of the outside continuation: the ``i``-th token
    outside the top-k has log-prob ``first_out - beta * log(1 + i / a)``.
    """
    k = cfg.top_k
    s = high.shape[0]
    n_out = cfg.vocab_size - k

    def per_row(field: str) -> F64:
        lo_c, hi_c = getattr(_CONFIDENT, field)
        lo_h, hi_h = getattr(_HIGH_ENTROPY, field)
        return np.where(high, rng.uniform(lo_h, hi_h, s), rng.uniform(lo_c, hi_c, s))

    # Head: the argmax (logit 0) and n_alt plausible alternatives with exponential gaps.
    n_alt = np.where(
        high,
        _HIGH_ENTROPY.min_alts + rng.poisson(_HIGH_ENTROPY.mean_extra_alts, s),
        _CONFIDENT.min_alts + rng.poisson(_CONFIDENT.mean_extra_alts, s),
    )
    n_alt = np.minimum(n_alt, k - 1)
    alt = -np.cumsum(rng.exponential(1.0, (s, k)) * per_row("alt_gap")[:, None], axis=1)
    rows = np.arange(s)
    last_alt = np.where(n_alt > 0, alt[rows, np.maximum(n_alt - 1, 0)], 0.0)

    # Tail: a drop below the last alternative, then a power law in rank with irregular
    # (order-statistics) gaps: value_j = start - beta_t * log(x_j), x_1 = 1, x_{j+1} = x_j +
    # Exp(1). Past the knee (tail index _TAIL_KNEE, only reached when top_k is large) the
    # slope flattens to the bulk's beta_out.
    drop = per_row("drop")
    beta_t = per_row("tail_beta")
    beta_out = per_row("out_beta")
    x = np.ones((s, k))
    x[:, 1:] += np.cumsum(rng.exponential(1.0, (s, k - 1)) + 1e-9, axis=1)
    rank = np.arange(1, k + 1)  # ranks 1..k (rank k is the first token outside the top-k)
    j = np.clip(rank[None, :] - n_alt[:, None], 1, k)  # 1-based tail index
    log_x = np.log(np.take_along_axis(x, j - 1, axis=1))
    log_knee = np.log(x[:, min(_TAIL_KNEE, k) - 1])[:, None]
    decay = np.where(
        log_x <= log_knee,
        beta_t[:, None] * log_x,
        beta_t[:, None] * log_knee + beta_out[:, None] * (log_x - log_knee),
    )
    is_alt = rank[None, :] <= n_alt[:, None]
    start = last_alt - drop

    # Outside the top-k: the i-th outside token has value y[:, k-1] - beta_out*log(1 + i/a),
    # a = x at the first outside tail index (j0 = k - n_alt): a flatter power law (the bulk).
    tail_a = x[rows, k - n_alt - 1]
    log_tail_sum = np.log(_tail_sum(tail_a, beta_out, n_out))

    def shape(r: I64, lam: F64) -> tuple[F64, F64, F64]:
        """Rows ``r`` with the tail decay scaled by ``lam``: values of ranks 1..k, log of
        the outside mass and log of the whole residual, all relative to the argmax."""
        y_r = np.where(is_alt[r], alt[r], start[r, None] - lam[:, None] * decay[r])
        log_out_r = y_r[:, k - 1] + log_tail_sum[r]
        in_topk = _logsumexp(y_r[:, : k - 1]) if k > 1 else np.full(r.shape[0], -np.inf)
        return y_r, log_out_r, np.logaddexp(in_topk, log_out_r)

    # Residual (everything but the argmax) relative to the argmax, R: confident rows get
    # exactly eps / (1 - eps) (top-1 p = 1 - eps); high-entropy rows keep their natural head.
    log_eps = np.clip(
        rng.normal(_CONF_LOG10_EPS_MEAN, _CONF_LOG10_EPS_STD, s),
        _CONF_LOG10_EPS_MIN,
        math.log10(_CONF_EPS_MAX),
    ) * math.log(10.0)
    target = log_eps - np.log1p(-np.exp(log_eps))

    # Floor: outside mass = share * R / (1 + R) >= 2 * _MIN_OUTSIDE_MASS (share = outside part
    # of the residual), so that float32 storage cannot round it away. First R is raised (the
    # row keeps its shape; only while the rank-1 token stays below the argmax). Rows whose tail
    # is too deep for that (tail and outside tokens below ~1e-12) get their tail decay
    # compressed, by bisection on a factor lam in [0, 1], until the floor fits. (With very few
    # tokens outside the top-k even that can fail; _to_float32_with_outside_mass then applies.)
    floor = 2.0 * _MIN_OUTSIDE_MASS

    def residual(y_r: F64, log_out_r: F64, rest_r: F64, r: I64) -> F64:
        log_res = np.where(high[r], rest_r, target[r])
        share = np.exp(log_out_r - rest_r)
        ok = share > 2.0 * floor
        log_res_min = math.log(floor) - np.log(np.where(ok, share - floor, 1.0))
        log_res = np.where(ok, np.maximum(log_res, log_res_min), log_res)
        return np.minimum(log_res, rest_r - y_r[:, 0])

    def outside_mass(log_out_r: F64, rest_r: F64, log_res: F64) -> F64:
        return np.exp(log_out_r - rest_r + log_res - np.logaddexp(0.0, log_res))

    y, log_out, rest = shape(rows, np.ones(s))
    log_res = residual(y, log_out, rest, rows)
    bad = np.flatnonzero(outside_mass(log_out, rest, log_res) < floor * (1.0 - 1e-6))
    if bad.size:  # keep only rows where a flat tail (lam = 0) would fit; the rest are hopeless
        y_0, log_out_0, rest_0 = shape(bad, np.zeros(bad.size))
        m_0 = outside_mass(log_out_0, rest_0, residual(y_0, log_out_0, rest_0, bad))
        bad = bad[m_0 >= floor * (1.0 - 1e-6)]
    if bad.size:
        lo, hi = np.zeros(bad.size), np.ones(bad.size)
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            y_b, log_out_b, rest_b = shape(bad, mid)
            m_b = outside_mass(log_out_b, rest_b, residual(y_b, log_out_b, rest_b, bad))
            fits = m_b >= floor * (1.0 - 1e-6)
            lo = np.where(fits, mid, lo)  # invariant: lo fits, hi does not
            hi = np.where(fits, hi, mid)
        y_b, log_out_b, rest_b = shape(bad, lo)  # lo: (nearly) the largest factor that fits
        y[bad], log_out[bad], rest[bad] = y_b, log_out_b, rest_b
        log_res[bad] = residual(y_b, log_out_b, rest_b, bad)
    shift = log_res - rest
    y = y + shift[:, None]
    log_out = log_out + shift

    logits = np.concatenate([np.zeros((s, 1)), y[:, : k - 1]], axis=1)
    first_out = y[:, k - 1]
    if cfg.bf16_logits:
        # Absolute logits of a typical magnitude, rounded to bf16 (monotone, so the order is
        # kept; ties appear). The first outside token stays at or below the last top-k one.
        offset = rng.uniform(15.0, 35.0, s)[:, None]
        logits = _round_bf16(logits + offset) - offset
        first_out = np.minimum(first_out, logits[:, -1])
        log_out = first_out + log_tail_sum
    z = np.logaddexp(_logsumexp(logits), log_out)
    lp = logits - z[:, None]
    return lp, first_out - z, tail_a, beta_out


def _round_bf16(x: F64) -> F64:
    """Round to the nearest bfloat16 value (ties to even), returned as float64."""
    bits = x.astype(np.float32).view(np.uint32)
    bits = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(
        0xFFFF0000
    )
    return bits.view(np.float32).astype(np.float64)


def _sample_label_ranks(
    rng: np.random.Generator,
    cfg: _Config,
    lp: F64,
    first_out_lp: F64,
    tail_a: F64,
    beta_out: F64,
) -> tuple[I64, F64]:
    """Draw each row's label rank from the row distribution (tempered), with its log-prob."""
    k = cfg.top_k
    n_out = cfg.vocab_size - k
    tau = cfg.label_temperature
    w_in = lp / tau
    beta_tau = beta_out / tau
    w_out = first_out_lp / tau + np.log(_tail_sum(tail_a, beta_tau, n_out))
    norm = np.logaddexp(_logsumexp(w_in), w_out)
    cum = np.cumsum(np.exp(w_in - norm[:, None]), axis=1)
    u = rng.random(lp.shape[0])
    rank = (cum < u[:, None]).sum(axis=1).astype(np.int64)
    label_lp = np.take_along_axis(lp, np.minimum(rank, k - 1)[:, None], axis=1)[:, 0]
    outside = rank >= k
    if np.any(outside):
        # Mass beyond the top-k, in units of the first outside token's (tempered) mass.
        q = (u[outside] - cum[outside, -1]) * np.exp(norm[outside] - first_out_lp[outside] / tau)
        i = _tail_index(q, tail_a[outside], beta_tau[outside], n_out)
        rank[outside] = k + i
        label_lp[outside] = first_out_lp[outside] - beta_out[outside] * np.log1p(
            i / tail_a[outside]
        )
    return rank, label_lp


def _row_ids(
    rng: np.random.Generator,
    cfg: _Config,
    vocab: _Vocab,
    ids: I64,
    pos: I64,
    labels: I64,
    label_rank: I64,
    high: BoolArray,
    topic_ids: I64,
    topic_cdf: F64,
) -> I64:
    """Top-k token ids of every row: the label at its rank, the rest from candidate pools."""
    k = cfg.top_k
    s = pos.shape[0]
    width = k + k // 2 + 16

    # Candidate pool per row, in priority order. Head slots (the first 2, or 6 in high-entropy
    # rows: about 1 + the plausible alternatives) favour topic words and nearby text; tail slots
    # favour the generic set and the content Zipf.
    n_head = np.where(high, 6, 2)
    is_head = np.arange(width)[None, :] < n_head[:, None]
    head_cum = np.cumsum(_HEAD_SOURCES)
    tail_cum = np.cumsum(_TAIL_SOURCES)
    u = rng.random((s, width))
    source = np.zeros((s, width), dtype=np.int8)
    for bound_h, bound_t in zip(head_cum[:-1], tail_cum[:-1], strict=True):
        source += u >= np.where(is_head, bound_h, bound_t)
    pool = np.empty((s, width), dtype=np.int64)
    for src in range(4):
        mask = source == src
        n = int(mask.sum())
        if n == 0:
            continue
        if src == 0:
            pool[mask] = _draw_topic(rng, topic_ids, topic_cdf, n)
        elif src == 1:
            pool[mask] = vocab.zipf_content(rng, n)
        elif src == 2:
            pool[mask] = vocab.generic(rng, n)
        else:
            row_pos = np.broadcast_to(pos[:, None], (s, width))[mask]
            offset = rng.integers(-_NEARBY_WINDOW, _NEARBY_WINDOW + 1, n)
            pool[mask] = ids[np.clip(row_pos + offset, 0, ids.shape[0] - 1)]

    # Rows that share with the previous row: its final ids (slightly reordered, a few dropped)
    # go first in the pool. Chains are resolved in waves: wave w = w-th row of a sharing run.
    share = rng.random(s) < cfg.share_fraction
    share[0] = False
    run = np.zeros(s, dtype=np.int64)
    for r in np.flatnonzero(share).tolist():
        run[r] = run[r - 1] + 1
    out = np.empty((s, k), dtype=np.int64)
    base = run == 0
    out[base] = _assemble(rng, pool[base], labels[base], label_rank[base], k, vocab)
    for wave in range(1, int(run.max()) + 1):
        rows = np.flatnonzero(run == wave)
        prev = out[rows - 1]
        jitter = np.arange(k)[None, :] + rng.normal(0.0, _SHARE_JITTER, prev.shape)
        prev = np.take_along_axis(prev, np.argsort(jitter, axis=1), axis=1)
        prev[rng.random(prev.shape) < _SHARE_DROP] = -1
        shared_pool = np.concatenate([prev, pool[rows]], axis=1)
        out[rows] = _assemble(rng, shared_pool, labels[rows], label_rank[rows], k, vocab)
    return out


def _assemble(
    rng: np.random.Generator,
    pool: I64,
    labels: I64,
    label_rank: I64,
    k: int,
    vocab: _Vocab,
    refills: int = 2,
) -> I64:
    """Pick each row's top-k ids: the first distinct non-label pool entries, with the label
    inserted at its rank when that rank is < k. Entries < 0 in ``pool`` are ignored."""
    r_count, width = pool.shape
    pool = np.where(pool == labels[:, None], -1, pool)
    order = np.argsort(pool, axis=1, kind="stable")
    sorted_pool = np.take_along_axis(pool, order, axis=1)
    dup_sorted = np.zeros((r_count, width), dtype=np.bool_)
    dup_sorted[:, 1:] = sorted_pool[:, 1:] == sorted_pool[:, :-1]
    dup = np.empty_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    valid = ~dup & (pool >= 0)

    in_topk = label_rank < k
    need = k - in_topk.astype(np.int64)
    slot = np.cumsum(valid, axis=1) - 1
    take = valid & (slot < need[:, None])
    rr, cc = np.nonzero(take)
    col = slot[rr, cc]
    col = col + (in_topk[rr] & (col >= label_rank[rr]))
    out = np.full((r_count, k), -1, dtype=np.int64)
    out[rr, col] = pool[rr, cc]
    rows = np.flatnonzero(in_topk)
    out[rows, label_rank[rows]] = labels[rows]

    # Rows short of distinct candidates: extend their pools with global Zipf draws (twice at
    # most), then fill what is still missing (tiny vocabularies) with random unused ids.
    short = np.flatnonzero((out < 0).any(axis=1))
    if short.size and refills > 0:
        extra = vocab.zipf(rng, short.size * (2 * k + 16)).reshape(short.size, -1)
        out[short] = _assemble(
            rng,
            np.concatenate([pool[short], extra], axis=1),
            labels[short],
            label_rank[short],
            k,
            vocab,
            refills - 1,
        )
        return out
    for r in short.tolist():
        used = np.append(out[r][out[r] >= 0], labels[r])
        free = np.setdiff1d(np.arange(vocab.size), used)
        holes = np.flatnonzero(out[r] < 0)
        out[r, holes] = rng.choice(free, holes.size, replace=False)
    return out
