"""The teacher cache: :class:`CacheWriter` writes one, :class:`TeacherCache` reads one.

A cache is a directory holding ``manifest.json`` and shard files (valid safetensors files whose
tensors hold an index and one zstd frame per record); ``docs/FORMAT.md`` specifies every byte.
All encoding, decoding, hashing and I/O run in Rust (``target_sft._core``) with the GIL released.

Example::

    with CacheWriter("cache/", top_k=64, vocab_size=151_936) as w:
        w.add(key, input_ids, labels, topk_ids, topk_logprobs, label_logprobs, label_ranks)
    cache = TeacherCache("cache/")
    rec = cache[key]            # CacheRecord of numpy arrays

:class:`CacheSample` references one record (what the datasets yield and the collator batches);
:class:`TeacherCacheDataset` is the map-style dataset of every record of a cache.
"""

from __future__ import annotations

import json
import math
import os
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from target_sft import _core
from target_sft.checks import (
    as_float32,
    as_float64,
    as_int32,
    check_int,
    check_role,
    check_wait,
    parse_size,
)
from target_sft.errors import CacheInputError, CacheKeyError, CacheMismatchError

#: The compact codec's default fidelity budget: mean codec KL per row, nats (docs/FORMAT.md §5.1).
DEFAULT_MAX_MEAN_KL = 1e-4

IGNORE_INDEX = -100
Key = int | str

__all__ = [
    "IGNORE_INDEX",
    "CacheInfo",
    "CacheRecord",
    "CacheSample",
    "CacheWriter",
    "FidelityStats",
    "KeySplit",
    "TeacherCache",
    "TeacherCacheDataset",
    "merge_manifests",
    "reference_positions",
    "split_by_key",
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
    #: what the cached model is to a training run: ``"teacher"`` or ``"reference"`` (the
    #: manifest's ``role``, checked by the native reader; ``"teacher"`` for older caches)
    role: str = "teacher"

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
            role=m.get("role", "teacher"),
        )


def reference_temperature_problem(
    slot: str, temperature: float, path: Any, where: str
) -> str | None:
    """What is wrong with a cache cached at ``temperature`` filling ``slot``, or ``None``. The
    reference-model terms (importance weights, KL anchors: docs/LOSSES.md) read the reference
    cache as ``π_ref`` itself, the model's softmax at temperature 1; a cache built at another
    temperature holds ``softmax(z / T)``, a different distribution, and would shift every weight
    without any error. A teacher may be cached at any temperature (e.g. T = 2 for
    distillation)."""
    if slot != "reference" or temperature == 1.0:
        return None
    return (
        f"{where}: the reference cache at {path} was built at temperature {temperature:g}, but "
        "the reference-model terms read it as π_ref, the reference model's softmax at "
        "temperature 1; rebuild it with temperature=1 (target-sft cache build --temperature 1), "
        "or pass allow_role_mismatch=True if a tempered reference is what you mean"
    )


def _warn_if_fixed_codebook(manifest: Path, max_mean_kl: float) -> None:
    """An append to a compact cache of format version 1-2 keeps its one fixed codebook
    (docs/FORMAT.md §5.1): say that the budget asked for is not applied."""
    try:
        params = json.loads(manifest.read_text(encoding="utf-8")).get("codec_params", {})
    except (OSError, ValueError, AttributeError):
        return  # no (readable) manifest: the native writer reports what is wrong
    if isinstance(params, dict) and "sqrt_step" in params and "sqrt_steps" not in params:
        warnings.warn(
            f"{manifest.parent}: this compact cache was written with one fixed codebook (format "
            f"version 1-2); appending keeps it, so max_mean_kl={max_mean_kl:g} is not applied to "
            "the records added (their KL is the fixed codebook's). Build the cache again to have "
            "the budget.",
            UserWarning,
            stacklevel=3,
        )


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
        wait: what to do when another live writer holds this writer's files (the same shard
            prefix in the same directory, or any writer of ``manifest.json`` there, e.g. a
            build; docs/FORMAT.md §6): ``False`` raises :class:`CacheLockedError` at once naming
            it (pid@host, since when), ``True`` waits until it finishes, a number waits at most
            that many seconds.
        shard_prefix: shard files are ``{prefix}-{n:06}.safetensors`` (one prefix per rank).
        manifest_name: the manifest file this writer keeps. Several writers filling one directory
            (one per rank) each keep their own (``manifest.rank00003.json``) and
            :func:`merge_manifests` joins them into ``manifest.json``; in append mode a writer
            adopts only orphan shards carrying its own prefix.
        prior_records: (compact) records buffered to learn the id-frequency table.
        max_mean_kl: (compact) the fidelity budget: the mean codec KL per row (nats,
            ``KL(exact ‖ decoded)`` of the renormalised top-k) that every record stays within.
            The writer measures each record at encode time and encodes it with the coarsest
            codebook of a fixed ladder that meets the budget (docs/FORMAT.md §5.1); the manifest
            records the budget and each shard's statistics the KL achieved. Default 1e-4.
            ``None`` with ``compact_sqrt_step``/``compact_tail_step``: one fixed codebook.
        compact_sqrt_step, compact_tail_step: (compact) fixed codebook steps instead of a budget
            (give ``max_mean_kl=None``; defaults 2.5e-3 and 2.5).
        compact_floor: (compact) the lowest codebook level (nats); lower values are stored
            exactly.
        role: what the cached model is to a training run, recorded in the manifest
            (docs/FORMAT.md §1): ``"teacher"`` (default) or ``"reference"`` (a frozen reference
            model's rows, for ``TargetSFTCollator(reference=...)``). An append must keep it.

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
        max_mean_kl: float | None = DEFAULT_MAX_MEAN_KL,
        compact_sqrt_step: float | None = None,
        compact_tail_step: float | None = None,
        compact_floor: float = -48.0,
        wait: bool | float = False,
        role: Literal["teacher", "reference"] = "teacher",
    ) -> None:
        if mode not in ("create", "append"):
            raise CacheInputError(f'mode must be "create" or "append", got {mode!r}')
        for name, s in (("shard_prefix", shard_prefix), ("manifest_name", manifest_name)):
            if not isinstance(s, str):
                raise CacheInputError(f"{name} must be a str, got {s!r}")
        if isinstance(tokenizer, str):
            tokenizer = {"fingerprint": tokenizer}
        fixed = compact_sqrt_step is not None or compact_tail_step is not None
        if fixed and max_mean_kl is not None:
            raise CacheInputError(
                "give either a fidelity budget (max_mean_kl) or fixed codebook steps "
                "(compact_sqrt_step / compact_tail_step with max_mean_kl=None), not both"
            )
        if not fixed and max_mean_kl is None:
            raise CacheInputError(
                "max_mean_kl=None needs fixed codebook steps (compact_sqrt_step / "
                f"compact_tail_step); or keep the default budget {DEFAULT_MAX_MEAN_KL}"
            )
        self.path = Path(path)
        self.top_k = check_int("top_k", top_k, 1, 256)
        if mode == "append" and codec == "compact" and max_mean_kl is not None:
            _warn_if_fixed_codebook(self.path / manifest_name, max_mean_kl)
        self._w: _core.CacheWriter | None = _core.CacheWriter(
            str(self.path),
            top_k=self.top_k,
            vocab_size=check_int("vocab_size", vocab_size, 1, 2**31),
            codec=codec,
            zstd_level=check_int("zstd_level", zstd_level, -7, 22),
            shard_bytes=parse_size(shard_size, "shard_size", lo=1),
            threads=check_int("threads", threads, 0, 4096),
            temperature=float(temperature),
            tokenizer_json=json.dumps(tokenizer or {}, sort_keys=True),
            teacher_json=json.dumps(teacher or {}, sort_keys=True),
            shard_prefix=shard_prefix,
            manifest_name=manifest_name,
            prior_records=check_int("prior_records", prior_records, 1),
            append=mode == "append",
            sqrt_step=None if compact_sqrt_step is None else float(compact_sqrt_step),
            tail_step=None if compact_tail_step is None else float(compact_tail_step),
            floor=float(compact_floor),
            max_mean_kl=None if max_mean_kl is None else float(max_mean_kl),
            wait_s=check_wait(wait),
            role=check_role("role", role),
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
            as_int32("input_ids", input_ids),
            as_int32("labels", labels),
            as_int32("topk_ids", topk_ids),
            as_float32("topk_logprobs", topk_logprobs),
            as_float32("label_logprobs", label_logprobs),
            as_int32("label_ranks", label_ranks),
            None if entropy is None else as_float64("entropy", entropy),
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
    path: str | os.PathLike[str],
    parts: Sequence[str],
    complete: bool = True,
    wait: bool | float = False,
) -> CacheInfo:
    """Join the per-writer manifests ``parts`` of the cache directory ``path`` (in that order)
    into its ``manifest.json``. Every part must have the same settings (codec, top_k, vocab,
    temperature, tokenizer, teacher), else :class:`CacheMismatchError` names the field. Holds
    the directory's manifest lock while merging (``wait`` as for :class:`CacheWriter`)."""
    m = json.loads(_core.merge_manifests(str(path), list(parts), bool(complete), check_wait(wait)))
    return CacheInfo.from_manifest(path, m)


#: Cache directories already warned about (one warning per directory per process).
_WARNED_V1: set[str] = set()


def _warn_if_unchecksummed(path: Path, format_version: int) -> None:
    """Warn once per process and directory about a format-version-1 cache, whose tables and
    manifest carry no checksums (docs/FORMAT.md §7)."""
    if format_version >= 2:
        return
    key = os.path.realpath(path)
    if key in _WARNED_V1:
        return
    _WARNED_V1.add(key)
    warnings.warn(
        f"{path} is a format-version-{format_version} cache: its manifest and its shards' tables "
        "carry no checksums, so a damaged byte there can go unnoticed by a plain read (record "
        "payloads are still checked); run `target-sft cache verify` on it once, or rebuild it "
        "to get format version 2 (docs/FORMAT.md §7)",
        UserWarning,
        stacklevel=3,
    )


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
        _warn_if_unchecksummed(self.path, self._info.format_version)

    @property
    def info(self) -> CacheInfo:
        return self._info

    @property
    def top_k(self) -> int:
        return self._info.top_k

    @property
    def role(self) -> str:
        """``"teacher"`` or ``"reference"``: the manifest's ``role`` (docs/FORMAT.md §1)."""
        return self._info.role

    def check_role(self, slot: str, where: str, *, allow_mismatch: bool = False) -> None:
        """Check that this cache may fill the slot ``slot`` (``"teacher"`` or ``"reference"``)
        of ``where`` (e.g. ``"TargetSFTCollator(reference=...)"``): its manifest's role must be
        ``slot``; otherwise :class:`CacheMismatchError` naming both (with ``allow_mismatch``, a
        warning: e.g. a teacher cache deliberately used as the reference)."""
        check_role("slot", slot)
        if self.role != slot:
            msg = (
                f"{where}: the cache at {self.path} holds a {self.role} (its manifest's role) but "
                f"is passed as the {slot}; pass it in its own slot, build it with role={slot!r} "
                "(target-sft cache build --role), or pass allow_role_mismatch=True if this is "
                "deliberate"
            )
        else:
            msg = reference_temperature_problem(slot, self._info.temperature, self.path, where)
        if msg is None:
            return
        if not allow_mismatch:
            raise CacheMismatchError(msg)
        warnings.warn(msg, stacklevel=3)

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
        ids = None if input_ids is None else as_int32("input_ids", input_ids)
        return CacheRecord(*self._c.get(key, ids))

    def _position(self, position: Any, name: str = "position") -> int:
        """A global position checked against ``[0, len(cache))`` (no negative indexing: a
        position is an address in the cache, not a Python index)."""
        p = check_int(name, position)
        if not 0 <= p < len(self):
            raise CacheKeyError(
                f"{name} = {p} is out of range: the cache at {self.path} has {len(self)} "
                f"records (positions 0..{len(self) - 1})"
            )
        return p

    def record_at(self, position: int) -> CacheRecord:
        """The record at a global position in ``[0, len(cache))`` (shard order)."""
        return CacheRecord(*self._c.get_at(self._position(position)))

    def records_at(self, positions: Sequence[int], threads: int = 0) -> list[CacheRecord]:
        """Decode several records in parallel (``threads=0``: all cores)."""
        if isinstance(positions, (str, bytes)) or not hasattr(positions, "__iter__"):
            raise CacheInputError(f"positions must be a sequence of ints, got {positions!r}")
        pos = [self._position(p, f"positions[{i}]") for i, p in enumerate(positions)]
        threads = check_int("threads", threads, 0, 4096)
        return [CacheRecord(*r) for r in self._c.get_many_at(pos, threads)]

    def position(self, key: Key) -> int:
        return self._c.position(key)

    def key_at(self, position: int) -> Key:
        return self._c.key_at(self._position(position))

    def keys(self, chunk: int = 65_536) -> Iterator[Key]:
        chunk = check_int("chunk", chunk, 1)
        n = len(self)
        for start in range(0, n, chunk):
            yield from self._c.keys_range(start, min(n, start + chunk))

    def __iter__(self) -> Iterator[Key]:
        return self.keys()

    def to_hf_dataset(self, *, chunk: int = 1024, threads: int = 0) -> Any:
        """Every record as a row of a ``datasets.Dataset`` with the columns ``key``,
        ``input_ids`` and ``labels`` (int32 lists; ``-100`` = not supervised), in cache order.

        For trainers that want a ``datasets.Dataset`` of tokenised rows, such as TRL's
        ``SFTTrainer`` with ``SFTConfig(dataset_kwargs={"skip_prepare_dataset": True})``
        (:class:`target_sft.trl.TargetSFTSFTTrainer`, docs/HF.md): the rows carry exactly the
        cached tokens and labels, and :class:`~target_sft.TargetSFTCollator` pulls each row's
        teacher record by ``key`` and checks both. The table is held in memory (8 bytes per
        token); ``chunk`` records are decoded at a time on ``threads`` threads (0: all cores).

        Raises:
            CacheInputError: the cache mixes int and str keys (an Arrow column has one type).
        """
        import pyarrow as pa
        from datasets import Dataset

        chunk = check_int("chunk", chunk, 1)
        n = len(self)
        if n == 0:
            raise CacheInputError(f"the cache at {self.path} holds no records")
        keys: list[Key] = []
        ids: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        for start in range(0, n, chunk):
            for r in self.records_at(range(start, min(n, start + chunk)), threads=threads):
                keys.append(r.key)
                ids.append(r.input_ids)
                labels.append(r.labels)
        kinds = {type(k) for k in keys}
        if len(kinds) > 1:
            i = next(j for j, k in enumerate(keys) if type(k) is not type(keys[0]))
            raise CacheInputError(
                f"the cache at {self.path} mixes int and str keys (record 0: {keys[0]!r}, record "
                f"{i}: {keys[i]!r}); a datasets column holds one type, so to_hf_dataset cannot "
                "export it"
            )
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum([a.size for a in ids], out=offsets[1:])
        large = offsets[-1] >= 2**31  # beyond int32 list offsets

        def column(parts: list[np.ndarray]) -> pa.Array:
            flat = pa.array(np.concatenate(parts), pa.int32())
            if large:
                return pa.LargeListArray.from_arrays(pa.array(offsets), flat)
            return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), flat)

        key_type = pa.string() if kinds == {str} else pa.int64()
        table = pa.table(
            {
                "key": pa.array(keys, key_type),
                "input_ids": column(ids),
                "labels": column(labels),
            }
        )
        return Dataset(table)

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
    native call, in parallel. It pickles as (cache path, position[, reference]).

    ``reference``: the same sample's record in a reference cache (same key; its tokens and
    labels are checked against this record's when the batch is built), attached by a dataset
    given ``reference=``; the collator places it in the ``reference_*`` tensors (docs/DATA.md
    §Several caches).
    """

    cache: TeacherCache
    position: int
    reference: CacheSample | None = None

    @property
    def key(self) -> Key:
        return self.cache.key_at(self.position)

    def record(self) -> CacheRecord:
        """Decode the record (one native call)."""
        return self.cache.record_at(self.position)


class TeacherCacheDataset:
    """A map-style dataset over every record of a cache: item ``i`` is ``CacheSample(cache, i)``
    (or, with ``key_split``, over the records of one side of a split: item ``i`` is the
    ``i``-th of them in cache order; see :func:`split_by_key`).

    The cache holds the token ids, so no second dataset is needed; pair it with
    :class:`TargetSFTCollator`. The dataset holds no per-sample Python objects, so forked
    DataLoader workers do not copy-on-write a large list; it pickles as the cache path (and the
    split's positions, 8 bytes a record).

    With ``reference`` (a cache of a reference model built from the same rows, role
    ``"reference"``), every item carries the same sample's reference record as
    ``CacheSample.reference``: found by key, once, when the dataset is made (one native bulk
    lookup; 8 bytes a record). A key missing from the reference cache raises
    :class:`CacheKeyError` naming the key and both caches. The teacher cache's role must be
    ``"teacher"`` and the reference's ``"reference"`` (:class:`CacheMismatchError` otherwise;
    ``allow_role_mismatch=True`` warns instead).
    """

    def __init__(
        self,
        cache: TeacherCache | str | os.PathLike[str],
        *,
        key_split: KeySplit | None = None,
        reference: TeacherCache | str | os.PathLike[str] | None = None,
        allow_role_mismatch: bool = False,
    ) -> None:
        self.cache = cache if isinstance(cache, TeacherCache) else TeacherCache(cache)
        if key_split is not None and not isinstance(key_split, KeySplit):
            raise CacheInputError(f"key_split must be a KeySplit, got {key_split!r}")
        self.key_split = key_split
        self._positions = None if key_split is None else key_split.positions(self.cache)
        self._len = len(self.cache) if self._positions is None else len(self._positions)
        self.reference: TeacherCache | None = None
        self._ref_positions: npt.NDArray[np.int64] | None = None
        if reference is not None:
            ref = reference if isinstance(reference, TeacherCache) else TeacherCache(reference)
            where = "TeacherCacheDataset"
            self.cache.check_role("teacher", where, allow_mismatch=allow_role_mismatch)
            ref.check_role("reference", where, allow_mismatch=allow_role_mismatch)
            self.reference = ref
            self._ref_positions = reference_positions(self.cache, ref, self._positions)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> CacheSample:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        i = int(index)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"index {int(index)} is out of range for {self._len} records")
        position = i if self._positions is None else int(self._positions[i])
        if self.reference is None or self._ref_positions is None:
            return CacheSample(self.cache, position)
        return CacheSample(
            self.cache, position, CacheSample(self.reference, int(self._ref_positions[i]))
        )

    def __getitems__(self, indices: Sequence[int]) -> list[CacheSample]:
        """Batched fetch (used by ``DataLoader`` when present)."""
        return [self[i] for i in indices]

    def split_by_key(
        self, eval_fraction: float = 0.05, seed: int = 0
    ) -> tuple[TeacherCacheDataset, TeacherCacheDataset]:
        """``(train, eval)`` datasets over this dataset's cache: see :func:`split_by_key`."""
        if self.key_split is not None:
            raise CacheInputError(
                f"this dataset is already one side of a split ({self.key_split}); split the "
                "cache itself: split_by_key(cache, eval_fraction=..., seed=...)"
            )
        train, held = KeySplit.pair(eval_fraction, seed)
        # the roles were checked (or allowed) when this dataset was made
        return (
            TeacherCacheDataset(
                self.cache, key_split=train, reference=self.reference, allow_role_mismatch=True
            ),
            TeacherCacheDataset(
                self.cache, key_split=held, reference=self.reference, allow_role_mismatch=True
            ),
        )

    def __repr__(self) -> str:
        split = "" if self.key_split is None else f", key_split={self.key_split}"
        ref = "" if self.reference is None else f", reference={self.reference!r}"
        return f"TeacherCacheDataset({self.cache!r}{split}{ref})"


def reference_positions(
    cache: TeacherCache, reference: TeacherCache, positions: Sequence[int] | None = None
) -> npt.NDArray[np.int64]:
    """The positions in ``reference`` of the records of ``cache`` at ``positions`` (all of
    them by default), found by key in one native bulk lookup.

    Raises:
        CacheKeyError: a key of ``cache`` that ``reference`` lacks (the first one, naming it
            and both caches).
    """
    pos = list(range(len(cache))) if positions is None else [int(p) for p in positions]
    found = reference._c.positions_matching(cache._c, pos)
    missing = np.flatnonzero(found < 0)
    if missing.size:
        key = cache.key_at(pos[int(missing[0])])
        raise CacheKeyError(
            f"key {key!r} of the teacher cache at {cache.path} is not in the reference cache at "
            f"{reference.path} ({missing.size} of the {len(pos)} records lack a reference record); "
            "build the reference cache from the same rows (same keys)"
        )
    return found


@dataclass(frozen=True, slots=True)
class KeySplit:
    """One side of a deterministic train/eval split of a cache's records by key.

    A key is on the eval side when the first 64 bits of ``XXH3-128(seed as 8 little-endian
    bytes + the key's bytes)`` (the key encoded as in docs/FORMAT.md §3: ``b"i"`` + int64 LE, or
    ``b"s"`` + UTF-8), read as a big-endian integer, are below ``eval_fraction · 2**64``. So the
    side of a key depends on the key, ``seed`` and ``eval_fraction`` only: the same on every
    rank, worker and machine, whatever the shard layout or record order, and never changed by
    appending records to the cache (a larger ``eval_fraction`` only moves keys to eval).
    :func:`split_by_key` builds the two sides; datasets take one as ``key_split=``.
    """

    side: Literal["train", "eval"]
    eval_fraction: float
    seed: int = 0

    def __post_init__(self) -> None:
        if self.side not in ("train", "eval"):
            raise CacheInputError(f'side must be "train" or "eval", got {self.side!r}')
        f = self.eval_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f < 1.0:
            raise CacheInputError(f"eval_fraction must be a number in (0, 1), got {f!r}")
        check_int("seed", self.seed, 0, 2**64 - 1)

    @classmethod
    def pair(cls, eval_fraction: float = 0.05, seed: int = 0) -> tuple[KeySplit, KeySplit]:
        """The train and eval sides of one split."""
        return cls("train", eval_fraction, seed), cls("eval", eval_fraction, seed)

    @staticmethod
    def key_hash(key: Key, seed: int = 0) -> int:
        """The split's 64-bit hash of a key (class docstring)."""
        if isinstance(key, str):
            enc = b"s" + key.encode("utf-8")
        elif isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            if not -(2**63) <= int(key) < 2**63:
                raise CacheInputError(f"an int key is an int64, got {key!r}")
            enc = b"i" + int(key).to_bytes(8, "little", signed=True)
        else:
            raise CacheInputError(f"a key is an int or a str, got {key!r}")
        data = int(seed).to_bytes(8, "little") + enc
        return int(_core.xxh3_128(np.frombuffer(data, dtype=np.uint8))[:16], 16)

    def holds(self, key: Key) -> bool:
        """Whether ``key`` is on this side."""
        in_eval = self.key_hash(key, self.seed) < int(self.eval_fraction * 2.0**64)
        return in_eval == (self.side == "eval")

    def positions(self, cache: TeacherCache) -> npt.NDArray[np.int64]:
        """The positions of ``cache``'s records on this side, ascending (reads every key: a few
        seconds per million records)."""
        per_seed = _SPLIT_HASHES.setdefault(cache, {})
        h = per_seed.get(self.seed)
        if h is None:  # read once per opened cache and seed: both sides of a split share it
            n = len(cache)
            h = np.fromiter((self.key_hash(k, self.seed) for k in cache.keys()), np.uint64, n)
            per_seed[self.seed] = h
        in_eval = h < np.uint64(int(self.eval_fraction * 2.0**64))
        return np.flatnonzero(in_eval if self.side == "eval" else ~in_eval).astype(np.int64)

    def __str__(self) -> str:
        return f"KeySplit({self.side!r}, eval_fraction={self.eval_fraction}, seed={self.seed})"


#: the split hashes of an opened cache's keys, per seed (an opened cache never changes: an append
#: is seen by a new TeacherCache); freed with the cache
_SPLIT_HASHES: weakref.WeakKeyDictionary[TeacherCache, dict[int, npt.NDArray[np.uint64]]] = (
    weakref.WeakKeyDictionary()
)


def split_by_key(data: Any, eval_fraction: float = 0.05, seed: int = 0) -> tuple[Any, Any]:
    """Split a cache's records into ``(train, eval)`` datasets by a hash of their keys.

    Args:
        data: a :class:`TeacherCache`, a cache directory or a :class:`TeacherCacheDataset` (gives
            two ``TeacherCacheDataset``), a ``StreamingTeacherDataset`` (gives two streaming
            datasets with the same settings, each streaming only its side on every rank and
            worker, resumable as before), or a ``datasets.Dataset`` with a ``key`` column (rows
            keyed for the collator, e.g. ``cache.to_hf_dataset()``; gives its two filtered
            halves, each row on the side of its key).
        eval_fraction: the expected share of records held out, in ``(0, 1)``.
        seed: another seed, another split.

    A record's side is a function of its key, ``seed`` and ``eval_fraction`` only
    (:class:`KeySplit`): the same on every rank and machine, independent of the shard layout,
    and stable when the cache is appended to (new records fall on either side; old ones stay).
    The share is ``eval_fraction`` in expectation (binomial), not exactly.
    """
    if isinstance(data, (TeacherCache, str, os.PathLike)):
        data = TeacherCacheDataset(data)
    if "key" in (getattr(data, "column_names", None) or ()) and hasattr(data, "filter"):
        sides = KeySplit.pair(eval_fraction, seed)
        return tuple(data.filter(side.holds, input_columns="key") for side in sides)  # type: ignore[return-value]
    split = getattr(data, "split_by_key", None)
    if not callable(split):
        raise CacheInputError(
            "split_by_key takes a TeacherCache, a cache path, a TeacherCacheDataset, a "
            "StreamingTeacherDataset or a datasets.Dataset with a 'key' column, got "
            f"{type(data).__name__}"
        )
    result: tuple[Any, Any] = split(eval_fraction, seed)
    return result
