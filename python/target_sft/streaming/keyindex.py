"""Matching a teacher cache's records to another cache's (a reference cache built separately,
whose shards need not line up with the teacher's) by key: for every teacher record the
dataset streams, the position of the record with the same key there.

Two local caches are matched by the native bulk lookup (:func:`target_sft.cache.
reference_positions`, exact: it compares the keys). A remote cache is matched by its records'
key hashes, read without its shards' payload: this module fetches, with ranged reads through
fsspec, the byte ranges the native :class:`~target_sft._core.ShardKeyTables` asks for (the
header, then the ``key_hash`` table; the key tables to name a key), and the native code parses
and verifies them (region checksums, docs/FORMAT.md §7) exactly as it reads a local shard. A
key the other cache lacks is a :class:`CacheKeyError` naming it.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from target_sft import _core
from target_sft.cache import TeacherCache, reference_positions
from target_sft.errors import CacheCorruptionError, CacheIOError, CacheKeyError

__all__ = ["RemoteKeys", "match_by_key"]


log = logging.getLogger(__name__)
_WHOLE_FILES: set[str] = set()  # caches already warned about (a server ignoring ranges)


def _read(fs: Any, path: str, start: int, end: int, size: int, shown: str) -> bytes:
    """Bytes ``[start, end)`` of a file of ``size`` bytes (a ranged read; a server that ignores
    the range and sends the whole file is accepted too)."""
    try:
        data = bytes(fs.cat_file(path, start=start, end=end))
    except FileNotFoundError as e:
        raise CacheIOError(errno.ENOENT, f"{shown} does not exist (listed in the manifest)") from e
    except Exception as e:
        raise CacheIOError(
            errno.EIO, f"cannot read {shown} [{start}, {end}): {type(e).__name__}: {e}"
        ) from e
    if len(data) == end - start:
        return data
    if len(data) == size:  # the server ignored the Range header
        cache = shown.rsplit("/", 1)[0]
        if cache not in _WHOLE_FILES:
            _WHOLE_FILES.add(cache)
            log.warning(
                "%s: the server ignores range requests, so reading the shards' key tables "
                "downloads whole shards (once per table read)",
                cache,
            )
        return data[start:end]
    raise CacheCorruptionError(
        f"{shown}: reading bytes [{start}, {end}) gave {len(data)} bytes (the file is "
        f"truncated or is not this cache's; the manifest lists {size} bytes)"
    )


@dataclass
class _RemoteShard:
    """One remote shard's parsed header and the byte ranges read of it so far."""

    path: str
    shown: str
    size: int
    tables: _core.ShardKeyTables
    pieces: list[tuple[int, bytes]] = field(default_factory=list)

    def fetch(self, fs: Any, keys: bool) -> list[tuple[int, bytes]]:
        """The pieces holding the ranges the native tables need (read once each)."""
        for start, end in self.tables.ranges(keys):
            if not any(a <= start and end <= a + len(b) for a, b in self.pieces):
                self.pieces.append((start, _read(fs, self.path, start, end, self.size, self.shown)))
        return self.pieces


@dataclass
class RemoteKeys:
    """The key index of a remote cache: ``fs`` (fsspec), ``root`` (its directory as ``fs``
    names it), ``shown`` (as messages name it) and ``shards`` (its manifest's shard entries)."""

    fs: Any
    root: str
    shown: str
    shards: list[dict[str, Any]]
    _open: list[_RemoteShard] = field(default_factory=list, repr=False)

    def _shards(self) -> list[_RemoteShard]:
        if not self._open:
            for e in self.shards:
                path, shown = f"{self.root}/{e['file']}", f"{self.shown}/{e['file']}"
                size = int(e["bytes"])
                end = _core.ShardKeyTables.header_end(
                    _read(self.fs, path, 0, min(8, size), size, shown), size, shown
                )
                head = _read(self.fs, path, 0, end, size, shown)
                tables = _core.ShardKeyTables(head, size, int(e["records"]), shown)
                self._open.append(_RemoteShard(path, shown, size, tables))
        return self._open

    def key_hashes(self) -> npt.NDArray[np.uint64]:
        """The verified key hash of every record, in the cache's order."""
        return np.concatenate(
            [s.tables.key_hashes(s.fetch(self.fs, False)) for s in self._shards()]
            + [np.empty(0, np.uint64)]
        )

    def key_at(self, position: int) -> int | str:
        """The key of the record at global ``position``."""
        starts = np.cumsum([0] + [int(e["records"]) for e in self.shards])
        i = int(np.searchsorted(starts, position, side="right") - 1)
        s = self._shards()[i]
        return s.tables.keys(s.fetch(self.fs, True), [position - int(starts[i])])[0]


def _hashes(side: TeacherCache | RemoteKeys) -> npt.NDArray[np.uint64]:
    return side.key_hashes() if isinstance(side, RemoteKeys) else side._c.key_hashes(0, len(side))


def _shown(side: TeacherCache | RemoteKeys) -> str:
    return side.shown if isinstance(side, RemoteKeys) else str(side.path)


def match_by_key(
    teacher: TeacherCache | RemoteKeys,
    other: TeacherCache | RemoteKeys,
    positions: npt.NDArray[np.int64] | None,
) -> npt.NDArray[np.int64]:
    """For every global position of the teacher cache (or of ``positions`` only: the others get
    ``-1``), the global position of the record with the same key in the other cache.

    Two local caches are matched by key (the native lookup). With a remote one, records are
    matched by their 64-bit key hash (a local cache's from the native reader); the match is
    exact unless two keys share a hash, which the reader of the records detects (it compares
    the keys themselves); two keys of the other cache sharing a hash that a teacher key needs
    is refused here (:class:`CacheKeyError`, about one chance in 10**6 at ten million records).

    Raises:
        CacheKeyError: a teacher key the other cache does not hold (the first one, named).
    """
    n = (
        len(teacher)
        if isinstance(teacher, TeacherCache)
        else sum(int(e["records"]) for e in teacher.shards)
    )
    want = np.arange(n, dtype=np.int64) if positions is None else positions
    out = np.full(n, -1, dtype=np.int64)
    if isinstance(teacher, TeacherCache) and isinstance(other, TeacherCache):
        out[want] = reference_positions(teacher, other, want.tolist())
        return out
    t_hash, o_hash = _hashes(teacher), _hashes(other)
    order = np.argsort(o_hash, kind="stable")
    sorted_hash = o_hash[order]
    h = t_hash[want]
    lo = np.searchsorted(sorted_hash, h, side="left")
    hi = np.searchsorted(sorted_hash, h, side="right")
    found = hi > lo
    if not found.all():
        p = int(want[np.flatnonzero(~found)[0]])
        raise CacheKeyError(
            f"key {teacher.key_at(p)!r} of the teacher cache at {_shown(teacher)} (record {p}) "
            f"is not in the reference cache at {_shown(other)} ({int((~found).sum())} of the "
            f"{len(want)} records lack a reference record); build the reference cache from "
            "the same rows (same keys)"
        )
    if ((hi - lo) > 1).any():
        p = int(want[np.flatnonzero((hi - lo) > 1)[0]])
        raise CacheKeyError(
            f"the key {teacher.key_at(p)!r} of the teacher cache {_shown(teacher)} hashes "
            f"(XXH3-64) like several keys of the reference cache {_shown(other)}: matching by "
            "key hash cannot tell them apart; rename one of the colliding keys"
        )
    out[want] = order[lo]
    return out
