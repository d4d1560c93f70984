"""The reference cache of a :class:`~target_sft.StreamingTeacherDataset`: a second cache (local
directory or remote URL, read with the same manifest and shard-store machinery as the teacher's)
holding the same samples by key, built separately (its shards need not line up with the
teacher's). The dataset's order, partition, epochs and state are the teacher's; every yielded
teacher sample gets ``.reference``, the record of the same key here (docs/STREAMING.md
§Reference cache).

Checked once, when the dataset is built: the cache's ``role`` (manifest field; absent means
``"teacher"``) against the slot it is passed to, its tokenizer and vocabulary against the
teacher's, and that it holds every teacher key the dataset streams (``keyindex.match_by_key``:
the native lookup, or the native key tables of a remote cache's shards).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from target_sft.cache import CacheInfo, TeacherCache, reference_temperature_problem
from target_sft.errors import CacheInputError, CacheMismatchError
from target_sft.streaming.keyindex import RemoteKeys, match_by_key
from target_sft.streaming.manifest import MANIFEST_NAME, fetch_manifest
from target_sft.streaming.store import ShardStore, is_url

__all__ = ["ReferenceSource", "cache_role", "check_role", "check_same_vocab"]

ROLES = ("teacher", "reference")


def cache_role(
    info: CacheInfo, manifest: dict[str, Any] | None = None, cache: TeacherCache | None = None
) -> str:
    """A cache's ``role``: the manifest field (``"teacher"`` when absent: caches written before
    roles). ``manifest``: a remote cache's fetched manifest; a local one's is read from disk."""
    # TeacherCache.role / CacheInfo.role, where the native manifest carries the field
    role = getattr(cache, "role", None) or getattr(info, "role", None)
    if role is None:
        if manifest is None:
            with open(Path(info.path) / MANIFEST_NAME, "rb") as f:
                manifest = json.load(f)
        role = manifest.get("role")
    return "teacher" if role is None else str(role)


def check_role(info: CacheInfo, role: str, slot: str, allow_mismatch: bool) -> None:
    """Raise :class:`CacheMismatchError` if a cache whose role is ``role`` is passed as ``slot``,
    or a reference cache was built at a temperature other than 1
    (:func:`~target_sft.cache.reference_temperature_problem`); with ``allow_mismatch`` a role
    mismatch passes and a temperature is a warning."""
    if role != slot:
        if allow_mismatch:
            return
        raise CacheMismatchError(
            f"StreamingTeacherDataset: the cache {info.path} holds role {role!r} (its manifest's "
            f"'role'; a cache without one is a teacher) but is passed as the {slot}; pass a "
            f"{slot} cache there (a reference cache is built with role='reference'), or "
            "allow_role_mismatch=True if this is deliberate"
        )
    msg = reference_temperature_problem(
        slot, info.temperature, info.path, "StreamingTeacherDataset"
    )
    if msg is None:
        return
    if not allow_mismatch:
        raise CacheMismatchError(msg)
    warnings.warn(msg, stacklevel=3)


def _same_tokenizer(t: dict[str, Any], r: dict[str, Any]) -> bool | None:
    """Whether two manifest tokenizer entries name one tokenizer (docs/FORMAT.md §1: with a
    fingerprint, every field but the informational ``name`` and ``class``; without, the whole
    entry); ``None`` when they cannot be compared (fingerprints of different versions)."""
    if "fingerprint" in t and "fingerprint" in r:
        if t.get("fingerprint_version", 1) != r.get("fingerprint_version", 1):
            return None if t.get("size") == r.get("size") else False
        info = ("name", "class")
        return {k: v for k, v in t.items() if k not in info} == {
            k: v for k, v in r.items() if k not in info
        }
    return t == r


def check_same_vocab(teacher: CacheInfo, reference: CacheInfo) -> None:
    """Raise :class:`CacheMismatchError` unless both caches were built with the same tokenizer
    and vocabulary (a cache recording no tokenizer, or fingerprints of different versions, are
    not compared: the collator checks each cache against its tokenizer)."""
    if teacher.vocab_size != reference.vocab_size:
        raise CacheMismatchError(
            f"StreamingTeacherDataset: the reference cache {reference.path} has vocab_size "
            f"{reference.vocab_size}, the teacher cache {teacher.path} has {teacher.vocab_size}: "
            "their token ids are not the same vocabulary; build both with one tokenizer"
        )
    t, r = dict(teacher.tokenizer or {}), dict(reference.tokenizer or {})
    if t and r and _same_tokenizer(t, r) is False:
        raise CacheMismatchError(
            f"StreamingTeacherDataset: tokenizer mismatch: the teacher cache {teacher.path} was "
            f"built with {t}, the reference cache {reference.path} with {r}; build both with "
            "one tokenizer"
        )


class ReferenceSource:
    """The reference cache of a streaming dataset: opened (local) or its manifest fetched
    (remote, with its own node-local shard store), checked, and its position of every teacher
    record the dataset streams (:attr:`position_of`, ``-1`` for records it does not stream).

    Args:
        reference: a cache directory, a :class:`TeacherCache` or a URL.
        teacher: the teacher's :class:`CacheInfo`; ``teacher_keys``: the teacher cache (local)
            or its :class:`RemoteKeys` (remote), to match keys in.
        positions: the teacher's global positions the dataset streams (``None``: all).
        storage_options, local_dir, cache_limit, retries: as the dataset's, for this cache.
        allow_role_mismatch: accept a cache whose manifest role is not ``"reference"``.
    """

    def __init__(
        self,
        reference: str | os.PathLike[str] | TeacherCache,
        *,
        teacher: CacheInfo,
        teacher_keys: TeacherCache | RemoteKeys,
        positions: npt.NDArray[np.int64] | None,
        storage_options: dict[str, Any],
        local_dir: Path | None,
        cache_limit: int | None,
        retries: int,
        allow_role_mismatch: bool,
    ) -> None:
        src = os.fspath(reference.path if isinstance(reference, TeacherCache) else reference)
        self.remote = is_url(src)
        self.source = src.rstrip("/") if self.remote else src.removeprefix("file://")
        self.storage_options = storage_options
        self.cache_limit = cache_limit
        self.retries = retries
        self.cache: TeacherCache | None = None
        self.manifest: dict[str, Any] | None = None
        self.local_dir: Path | None = None
        if self.remote:
            self.manifest = fetch_manifest(self.source, storage_options)
            self.info = CacheInfo.from_manifest(self.source, self.manifest)
            if local_dir is None:
                raise CacheInputError("a remote reference cache needs a local directory")
            self.local_dir = local_dir
            import fsspec

            fs, root = fsspec.core.url_to_fs(self.source, **storage_options)
            keys: TeacherCache | RemoteKeys = RemoteKeys(
                fs, root.rstrip("/"), self.source, self.info.shards
            )
        else:
            if isinstance(reference, TeacherCache):
                self.cache = reference
            else:
                if not Path(self.source).is_dir():
                    raise CacheInputError(
                        f"reference={src!r} is neither a cache directory nor a URL"
                    )
                self.cache = TeacherCache(self.source)
            self.info = self.cache.info
            keys = self.cache
        role = cache_role(self.info, self.manifest, self.cache)
        check_role(self.info, role, "reference", allow_role_mismatch)
        check_same_vocab(teacher, self.info)
        self.position_of = match_by_key(teacher_keys, keys, positions)
        self.starts = np.concatenate(
            [[0], np.cumsum([s["records"] for s in self.info.shards])]
        ).astype(np.int64)
        self._store: ShardStore | None = None
        self._store_pid = -1

    def store(self) -> ShardStore:
        """This process's shard store of the (remote) reference cache."""
        if self._store is None or self._store_pid != os.getpid():
            assert self.manifest is not None and self.local_dir is not None
            self._store = ShardStore(
                self.source,
                self.storage_options,
                self.manifest,
                self.local_dir,
                self.cache_limit,
                self.retries,
            )
            self._store_pid = os.getpid()
        return self._store

    def __getstate__(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["_store"], d["_store_pid"] = None, -1
        return d

    def __repr__(self) -> str:
        return repr(self.source)
