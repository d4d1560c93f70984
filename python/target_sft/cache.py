"""The teacher cache: :class:`CacheWriter` writes one, :class:`TeacherCache` reads one.

A cache is a directory holding ``manifest.json`` and shard files (valid safetensors files whose
tensors hold an index and one zstd frame per record); ``docs/FORMAT.md`` specifies every byte.
All encoding, decoding, hashing and I/O run in Rust (``target_sft._core``) with the GIL released.

Example::

    with CacheWriter("cache/", top_k=64, vocab_size=151_936) as w:
        w.add(key, input_ids, labels, topk_ids, topk_logprobs, label_logprobs, label_ranks)
    cache = TeacherCache("cache/")
    rec = cache[key]            # CacheRecord of numpy arrays
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from target_sft import _core
from target_sft.errors import CacheInputError

IGNORE_INDEX = -100
Key = int | str

__all__ = [
    "IGNORE_INDEX",
    "CacheInfo",
    "CacheRecord",
    "CacheSample",
    "CacheWriter",
    "FidelityStats",
    "TeacherCache",
    "merge_manifests",
]


@dataclass(frozen=True, slots=True)
class CacheRecord:
    """One cached sample. Field names are the argument names of :meth:`CacheWriter.add`.

    Row ``r`` of the ``topk_*``/``label_*`` arrays belongs to the ``r``-th position ``t >= 1``
    with ``labels[t] != -100`` (:attr:`supervised_positions`): the teacher's distribution for
    predicting ``labels[t]`` from ``input_ids[:t]``.
    """

    key: Key
    input_ids: npt.NDArray[np.int32]  # [T]
    labels: npt.NDArray[np.int32]  # [T], -100 where unsupervised
    topk_ids: npt.NDArray[np.int32]  # [S, k], -1 padding
    topk_logprobs: npt.NDArray[np.float32]  # [S, k], -inf padding
    label_logprobs: npt.NDArray[np.float32]  # [S]
    label_ranks: npt.NDArray[np.int32]  # [S], 0 = teacher's argmax

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_supervised(self) -> int:
        return int(self.label_logprobs.shape[0])

    @property
    def supervised_positions(self) -> npt.NDArray[np.int64]:
        """Positions ``t`` (into ``input_ids``/``labels``) of the rows, increasing."""
        return np.flatnonzero(self.labels[1:] != IGNORE_INDEX) + 1


KEPT_MASS_BINS = 100  # the kept-mass histogram's bins (resolution 0.01; docs/FORMAT.md)


@dataclass(frozen=True)
class FidelityStats:
    """What a cache's top-k kept and what its codec cost, over the supervised rows its
    statistics cover (manifest ``stats``; docs/FORMAT.md §Statistics). Informational only.

    A row's *kept mass* is the teacher probability its top-k entries hold (their log-probs are
    over the full vocabulary); *label in top-k* means the label's id is one of them; the
    *entropy* is the teacher's full-vocabulary entropy (nats), recorded by the builder; the
    *codec KL* (``compact`` only) is ``KL(exact ‖ decoded)`` of a row's top-k, both renormalised
    over the row, measured at encode time.
    """

    rows: int  # supervised rows covered (shards older than the statistics have none)
    kept_mass_mean: float
    kept_mass_min: float
    #: the 10th percentile (nearest rank) lies in ``[kept_mass_p10, kept_mass_p10 + 0.01)``
    kept_mass_p10: float
    label_in_topk_rate: float
    entropy_rows: int
    entropy_mean: float | None  # None when no entropy was given (caches not built by the builder)
    codec_kl_rows: int
    codec_kl_mean: float | None  # None for the exact codec (lossless)
    codec_kl_max: float | None
    kept_mass_hist: tuple[int, ...] = field(repr=False)

    @classmethod
    def from_manifest(cls, s: dict[str, Any] | None) -> FidelityStats | None:
        """From a manifest's (or a shard entry's) ``stats``; ``None`` when absent or empty."""
        if not s or not s.get("rows"):
            return None
        rows = int(s["rows"])
        hist = [0] * KEPT_MASS_BINS
        for b, count in s.get("kept_mass_hist", {}).items():
            hist[int(b)] = int(count)
        rank = math.ceil(0.1 * rows)  # nearest-rank 10th percentile
        cum, p10_bin = 0, KEPT_MASS_BINS - 1
        for b, count in enumerate(hist):
            cum += count
            if cum >= rank:
                p10_bin = b
                break
        er, kr = int(s.get("entropy_rows", 0)), int(s.get("codec_kl_rows", 0))
        return cls(
            rows=rows,
            kept_mass_mean=s["kept_mass_sum"] / rows,
            kept_mass_min=float(s["kept_mass_min"]),
            kept_mass_p10=p10_bin / KEPT_MASS_BINS,
            label_in_topk_rate=s["label_in_topk"] / rows,
            entropy_rows=er,
            entropy_mean=s["entropy_sum"] / er if er else None,
            codec_kl_rows=kr,
            codec_kl_mean=s["codec_kl_sum"] / kr if kr else None,
            codec_kl_max=float(s["codec_kl_max"]) if kr else None,
            kept_mass_hist=tuple(hist),
        )


@dataclass(frozen=True)
class CacheInfo:
    """What a cache holds, from its manifest (no shard is read)."""

    path: str
    format_version: int
    codec: str
    codec_params: dict[str, Any]
    top_k: int
    vocab_size: int
    temperature: float
    tokenizer: dict[str, Any]
    teacher: dict[str, Any]
    complete: bool
    records: int
    tokens: int
    supervised_tokens: int
    bytes: int
    shards: list[dict[str, Any]] = field(repr=False)
    created_by: str = ""
    #: fidelity over the shards that carry statistics (None for caches written before them)
    stats: FidelityStats | None = None

    @property
    def bytes_per_token(self) -> float:
        """Shard bytes per supervised token (everything included: tokens, index, keys)."""
        return self.bytes / self.supervised_tokens if self.supervised_tokens else 0.0

    @classmethod
    def from_manifest(cls, path: str | os.PathLike[str], m: dict[str, Any]) -> CacheInfo:
        return cls(
            path=str(path),
            format_version=m["format_version"],
            codec=m["codec"],
            codec_params=m["codec_params"],
            top_k=m["top_k"],
            vocab_size=m["vocab_size"],
            temperature=m["temperature"],
            tokenizer=m["tokenizer"],
            teacher=m["teacher"],
            complete=m["complete"],
            records=m["num_records"],
            tokens=m["num_tokens"],
            supervised_tokens=m["num_supervised"],
            bytes=sum(s["bytes"] for s in m["shards"]),
            shards=m["shards"],
            created_by=m.get("created_by", ""),
            stats=FidelityStats.from_manifest(m.get("stats")),
        )


def _to_numpy(name: str, x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        x = x.numpy()
    try:
        return np.asarray(x)
    except Exception as e:  # pragma: no cover - exotic inputs
        raise CacheInputError(f"{name} cannot be converted to an array: {e}") from e


def _as_int32(name: str, x: Any) -> npt.NDArray[np.int32]:
    a = _to_numpy(name, x)
    if a.dtype == np.int32:
        return np.ascontiguousarray(a)
    if a.dtype.kind not in "iu":
        raise CacheInputError(f"{name} must hold integers, got dtype {a.dtype}")
    if a.size and (a.min() < -(2**31) or a.max() >= 2**31):
        i = int(np.argmax((a < -(2**31)) | (a >= 2**31)))
        idx = np.unravel_index(i, a.shape)
        raise CacheInputError(
            f"{name}[{', '.join(map(str, idx))}] = {a[idx]} does not fit in int32"
        )
    return np.ascontiguousarray(a, dtype=np.int32)


def _as_float32(name: str, x: Any) -> npt.NDArray[np.float32]:
    a = _to_numpy(name, x)
    if a.dtype.kind != "f":
        raise CacheInputError(f"{name} must hold floating-point log-probs, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.float32)


def _as_float64(name: str, x: Any) -> npt.NDArray[np.float64]:
    a = _to_numpy(name, x)
    if a.dtype.kind not in "fiu":
        raise CacheInputError(f"{name} must hold numbers, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.float64)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper().replace(" ", "")
    for suffix, mult in (
        ("KIB", 1 << 10),
        ("MIB", 1 << 20),
        ("GIB", 1 << 30),
        ("KB", 1000),
        ("MB", 10**6),
        ("GB", 10**9),
        ("B", 1),
    ):
        if s.endswith(suffix):
            return int(float(s[: -len(suffix)]) * mult)
    return int(s)


class CacheWriter:
    """Write a teacher cache (a context manager).

    Args:
        path: cache directory (created if missing).
        top_k: entries per supervised position (1..256; 64 by default).
        vocab_size: the teacher's vocabulary size; ids must lie in ``[0, vocab_size)``.
        codec: ``"compact"`` (default: ids lossless, log-probs quantised with the error bound of
            docs/FORMAT.md §Codebook) or ``"exact"`` (bit-for-bit).
        temperature: the temperature the log-probs were computed at (recorded in the manifest).
        tokenizer: a fingerprint string or a dict describing the tokenizer (``fingerprint`` key).
        teacher: a dict describing the teacher: ``name``, ``revision``, ``config_hash``, ``dtype``
            (with a ``weights_hash``, ``name`` and ``revision`` are informational: an append
            compares the other fields; docs/FORMAT.md §1).
        mode: ``"create"`` (the directory must not hold a cache) or ``"append"`` (add to one;
            every recorded setting must match, shards committed after the last manifest are
            adopted, stale temp files of dead writers removed).
        shard_size: commit a shard when its payload reaches this size (bytes, or "256MiB").
        threads: encoder threads (0 = one per core).
        zstd_level: zstd compression level.
        shard_prefix: shard files are ``{prefix}-{n:06}.safetensors`` (one prefix per rank).
        manifest_name: the manifest file this writer keeps. Several writers filling one directory
            (one per rank) each keep their own (``manifest.rank00003.json``) and
            :func:`merge_manifests` joins them into ``manifest.json``; in append mode a writer
            adopts only orphan shards carrying its own prefix.
        prior_records: (compact) records buffered to learn the id-frequency table.
        compact_sqrt_step, compact_tail_step, compact_floor: (compact) the codebook's steps.

    ``add`` validates on the calling thread and raises :class:`CacheInputError` at once; encoding
    and writing happen on background threads. Leaving the ``with`` block normally closes the cache
    (manifest marked complete); leaving it through an exception still commits every record added,
    with the manifest marked incomplete, and re-raises.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        top_k: int = 64,
        vocab_size: int,
        codec: Literal["compact", "exact"] = "compact",
        temperature: float = 1.0,
        tokenizer: str | dict[str, Any] | None = None,
        teacher: dict[str, Any] | None = None,
        mode: Literal["create", "append"] = "create",
        shard_size: int | str = "256MiB",
        threads: int = 0,
        zstd_level: int = 3,
        shard_prefix: str = "shard",
        manifest_name: str = "manifest.json",
        prior_records: int = 64,
        compact_sqrt_step: float = 2.5e-3,
        compact_tail_step: float = 2.5,
        compact_floor: float = -48.0,
    ) -> None:
        if mode not in ("create", "append"):
            raise CacheInputError(f'mode must be "create" or "append", got {mode!r}')
        if isinstance(tokenizer, str):
            tokenizer = {"fingerprint": tokenizer}
        self.path = Path(path)
        self.top_k = int(top_k)
        self._w: _core.CacheWriter | None = _core.CacheWriter(
            str(self.path),
            top_k=self.top_k,
            vocab_size=int(vocab_size),
            codec=codec,
            zstd_level=int(zstd_level),
            shard_bytes=_parse_size(shard_size),
            threads=int(threads),
            temperature=float(temperature),
            tokenizer_json=json.dumps(tokenizer or {}, sort_keys=True),
            teacher_json=json.dumps(teacher or {}, sort_keys=True),
            shard_prefix=shard_prefix,
            manifest_name=manifest_name,
            prior_records=int(prior_records),
            append=mode == "append",
            sqrt_step=float(compact_sqrt_step),
            tail_step=float(compact_tail_step),
            floor=float(compact_floor),
        )
        self.info: CacheInfo | None = None

    def _writer(self) -> _core.CacheWriter:
        if self._w is None:
            raise CacheInputError("this CacheWriter is closed")
        return self._w

    def add(
        self,
        key: Key,
        input_ids: Any,
        labels: Any,
        topk_ids: Any,
        topk_logprobs: Any,
        label_logprobs: Any,
        label_ranks: Any,
        entropy: Any = None,
    ) -> None:
        """Add one record (numpy arrays, torch tensors or sequences).

        Shapes: ``input_ids``/``labels`` ``[T]``; ``topk_ids``/``topk_logprobs`` ``[S, top_k]``,
        ``label_logprobs``/``label_ranks`` ``[S]``, where ``S`` counts positions ``t >= 1`` with
        ``labels[t] != -100`` (row ``r`` = the ``r``-th such position). Top-k rows may end with
        padding (id ``-1``, log-prob ``-inf``).

        ``entropy`` (optional, ``[S]``): the teacher's full-vocabulary entropy of each row in
        nats. It only feeds the manifest's statistics (:class:`FidelityStats`); it is not stored
        in the record.
        """
        if isinstance(key, (bool, float)) or not isinstance(key, (int, str, np.integer)):
            raise CacheInputError(f"key must be an int or a str, not {type(key).__name__}")
        self._writer().add(
            int(key) if isinstance(key, np.integer) else key,
            _as_int32("input_ids", input_ids),
            _as_int32("labels", labels),
            _as_int32("topk_ids", topk_ids),
            _as_float32("topk_logprobs", topk_logprobs),
            _as_float32("label_logprobs", label_logprobs),
            _as_int32("label_ranks", label_ranks),
            None if entropy is None else _as_float64("entropy", entropy),
        )

    def __contains__(self, key: object) -> bool:
        return self._w is not None and key in self._w

    def drop(self, keys: Iterable[Key]) -> int:
        """Remove the records of ``keys`` from the shards already committed (append mode, before
        the first :meth:`add`); returns how many were removed. Each shard holding one is
        rewritten by copying its other records' encoded frames, crash-safely (docs/FORMAT.md §6).
        """
        return int(self._writer().drop_keys(list(keys)))

    @property
    def num_records(self) -> int:
        """Records in the cache (those of earlier writers in append mode included)."""
        return (
            self._w.num_records if self._w is not None else (self.info.records if self.info else 0)
        )

    @property
    def closed(self) -> bool:
        return self._w is None

    def close(self, complete: bool = True) -> CacheInfo:
        """Commit the remaining records and write the final manifest."""
        m = json.loads(self._writer().close(complete))
        self._w = None
        self.info = CacheInfo.from_manifest(self.path, m)
        return self.info

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._w is None:
            return
        if exc_type is None:
            self.close()
        else:
            try:
                self.close(complete=False)
            except Exception:
                self._w = None  # the original exception is the one to report


def merge_manifests(
    path: str | os.PathLike[str], parts: Sequence[str], complete: bool = True
) -> CacheInfo:
    """Join the per-writer manifests ``parts`` of the cache directory ``path`` (in that order)
    into its ``manifest.json``. Every part must have the same settings (codec, top_k, vocab,
    temperature, tokenizer, teacher), else :class:`CacheMismatchError` names the field."""
    m = json.loads(_core.merge_manifests(str(path), list(parts), bool(complete)))
    return CacheInfo.from_manifest(path, m)


class TeacherCache:
    """Read a teacher cache.

    ``len(cache)``, ``key in cache``, ``cache[key]`` (a :class:`CacheRecord`), iteration over
    keys, :meth:`get` with a token check, positional access with :meth:`record_at` /
    :meth:`records_at` (parallel decode), :attr:`info` and :meth:`verify`. Shards are
    memory-mapped read-only on first use; decoding runs in Rust with the GIL released.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._c = _core.TeacherCache(str(self.path))
        self._info = CacheInfo.from_manifest(self.path, json.loads(self._c.manifest_json()))

    @property
    def info(self) -> CacheInfo:
        return self._info

    @property
    def top_k(self) -> int:
        return self._info.top_k

    @property
    def vocab_size(self) -> int:
        return self._info.vocab_size

    def __len__(self) -> int:
        return len(self._c)

    def __contains__(self, key: object) -> bool:
        return key in self._c

    def __getitem__(self, key: Key) -> CacheRecord:
        return self.get(key)

    def get(self, key: Key, input_ids: Any | None = None) -> CacheRecord:
        """The record of ``key``. With ``input_ids``, first check that they are the tokens the
        record was built from (:class:`CacheMismatchError` otherwise)."""
        ids = None if input_ids is None else _as_int32("input_ids", input_ids)
        return CacheRecord(*self._c.get(key, ids))

    def record_at(self, position: int) -> CacheRecord:
        """The record at a global position in ``[0, len(cache))`` (shard order)."""
        return CacheRecord(*self._c.get_at(position))

    def records_at(self, positions: Sequence[int], threads: int = 0) -> list[CacheRecord]:
        """Decode several records in parallel (``threads=0``: all cores)."""
        return [CacheRecord(*r) for r in self._c.get_many_at(list(positions), threads)]

    def position(self, key: Key) -> int:
        return self._c.position(key)

    def key_at(self, position: int) -> Key:
        return self._c.key_at(position)

    def keys(self, chunk: int = 65_536) -> Iterator[Key]:
        n = len(self)
        for start in range(0, n, chunk):
            yield from self._c.keys_range(start, min(n, start + chunk))

    def __iter__(self) -> Iterator[Key]:
        return self.keys()

    def verify(self, progress: Any = None) -> int:
        """Check every shard's size and checksum and decode every record; raise the first
        :class:`CacheError` found. Returns the number of records checked."""
        return self._c.verify(progress)

    def __reduce__(self) -> tuple[type[TeacherCache], tuple[str]]:
        # Pickles as its path: a DataLoader worker started by spawn/forkserver reopens the cache
        # (memory maps are per process; the page cache is shared).
        return (TeacherCache, (str(self.path),))

    def __repr__(self) -> str:
        i = self._info
        return (
            f"TeacherCache({str(self.path)!r}, records={i.records}, top_k={i.top_k}, "
            f"codec={i.codec!r}, bytes_per_token={i.bytes_per_token:.1f})"
        )


@dataclass(frozen=True, slots=True)
class CacheSample:
    """A reference to one record of a cache: what the datasets yield and the collator batches.

    Holding a reference instead of decoded arrays lets the collator decode a whole batch in one
    native call, in parallel. It pickles as (cache path, position).
    """

    cache: TeacherCache
    position: int

    @property
    def key(self) -> Key:
        return self.cache.key_at(self.position)

    def record(self) -> CacheRecord:
        """Decode the record (one native call)."""
        return self.cache.record_at(self.position)
