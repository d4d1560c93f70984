"""The key index of a cache's shards, read without their payload: each record's XXH3-64 key hash
(the ``key_hash`` table, docs/FORMAT.md §2-§3), and the keys of a few records (``key_offsets`` /
``key_bytes``). It reads the shard's header and tables only (a few bytes per record; for a remote
cache, ranged reads through fsspec), verified by the shard's region checksums (format version 2,
docs/FORMAT.md §7) before use.

:func:`match_by_key` uses it to find, for every record of a teacher cache, the position of the
record with the same key in another cache (a reference cache built separately, whose shards need
not line up with the teacher's): the whole key set is checked once, and a key the other cache
lacks is a :class:`CacheKeyError` naming it.
"""

from __future__ import annotations

import errno
import json
import logging
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from target_sft.errors import CacheCorruptionError, CacheFormatError, CacheIOError, CacheKeyError

__all__ = ["KeyTables", "LocalFiles", "match_by_key", "read_key_tables"]


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
        if shown.rsplit("/", 1)[0] not in _WHOLE_FILES:
            _WHOLE_FILES.add(shown.rsplit("/", 1)[0])
            log.warning(
                "%s: the server ignores range requests, so reading the shards' key tables "
                "downloads whole shards (once per table read)",
                shown.rsplit("/", 1)[0],
            )
        return data[start:end]
    raise CacheCorruptionError(
        f"{shown}: reading bytes [{start}, {end}) gave {len(data)} bytes (the file is "
        f"truncated or is not this cache's; the manifest lists {size} bytes)"
    )


@dataclass
class KeyTables:
    """What the key index needs of one shard: its header and the byte ranges of its tables."""

    fs: Any
    path: str
    shown: str
    size: int
    data_start: int  # offset of the data buffer in the file (8 + header length)
    header: dict[str, Any]
    checksums: dict[str, int]  # table name -> XXH3-64 (empty for a version-1 shard)
    key_hash: npt.NDArray[np.uint64]

    def _tables(self, *names: str) -> list[bytes]:
        """The verified bytes of adjacent tables ``names``, read in one ranged request."""
        spans = [self.header[n]["data_offsets"] for n in names]
        lo, hi = min(b for b, _ in spans), max(e for _, e in spans)
        raw = _read(
            self.fs, self.path, self.data_start + lo, self.data_start + hi, self.size, self.shown
        )
        out = [raw[b - lo : e - lo] for b, e in spans]
        for n, r in zip(names, out, strict=True):
            if n != "checksums":
                self._verify(n, r)
        return out

    def _table(self, name: str) -> bytes:
        return self._tables(name)[0]

    def _verify(self, name: str, raw: bytes) -> None:
        if not self.checksums:  # a version-1 shard: no region checksums
            return
        want = self.checksums.get(name)
        if want is None:
            raise CacheCorruptionError(f"{self.shown}: the checksums table does not list {name}")
        import xxhash

        got = xxhash.xxh3_64_intdigest(raw)
        if got != want:
            raise CacheCorruptionError(
                f"{self.shown}: region {name} is corrupted (XXH3-64 {got:016x}, the shard's "
                f"checksums table lists {want:016x})"
            )

    def keys(self, local: list[int]) -> list[int | str]:
        """The keys of records ``local`` (indices in this shard)."""
        offsets = np.frombuffer(self._table("key_offsets"), dtype="<u8")
        blob = self._table("key_bytes")
        out: list[int | str] = []
        for i in local:
            raw = blob[int(offsets[i]) : int(offsets[i + 1])]
            if raw[:1] == b"i" and len(raw) == 9:
                out.append(int.from_bytes(raw[1:], "little", signed=True))
            elif raw[:1] == b"s":
                out.append(raw[1:].decode("utf-8"))
            else:
                raise CacheCorruptionError(f"{self.shown}: key {i} is not a valid key encoding")
        return out


def read_key_tables(fs: Any, root: str, shown_root: str, entry: dict[str, Any]) -> KeyTables:
    """Read and verify a shard's header and ``key_hash`` table (``entry``: its manifest entry;
    ``root``: the cache directory as ``fs`` names it; ``shown_root``: as messages name it)."""
    path, shown = f"{root}/{entry['file']}", f"{shown_root}/{entry['file']}"
    size = int(entry["bytes"])
    if size < 8:
        raise CacheCorruptionError(f"{shown}: {size} bytes is too short for a shard")
    (n,) = struct.unpack("<Q", _read(fs, path, 0, 8, size, shown))
    if n > size - 8:
        raise CacheCorruptionError(f"{shown}: header length {n} exceeds the file ({size} bytes)")
    head = _read(fs, path, 8, 8 + n, size, shown)
    try:
        header = json.loads(head)
    except ValueError as e:
        raise CacheCorruptionError(f"{shown}: the shard header is not JSON ({e})") from e
    meta = header.get("__metadata__", {})
    if meta.get("format") != "target-sft-shard" or "key_hash" not in header:
        raise CacheFormatError(f"{shown} is not a target-sft shard")
    records = int(entry["records"])
    if header["key_hash"]["shape"] != [records]:
        raise CacheCorruptionError(
            f"{shown}: key_hash has shape {header['key_hash']['shape']}, the manifest lists "
            f"{records} records"
        )
    t = KeyTables(fs, path, shown, size, 8 + n, header, {}, np.empty(0, np.uint64))
    if "checksums" in header:  # version 2: verify the header and every table used (§7)
        # key_hash and checksums are near each other (key_offsets between): one request
        key_hash, raw = t._tables("key_hash", "checksums")  # verified below, once named
        names = str(meta.get("checksums", "")).split(",")
        values = np.frombuffer(raw, dtype="<u8")
        if len(names) != len(values) or names[:1] != ["header"]:
            raise CacheCorruptionError(f"{shown}: the checksums table does not name its regions")
        t.checksums = {k: int(v) for k, v in zip(names, values, strict=True)}
        t._verify("header", struct.pack("<Q", n) + head)
        t._verify("key_hash", key_hash)
    elif str(meta.get("format_version", "1")) != "1":
        raise CacheCorruptionError(f"{shown}: a version-2 shard without a checksums table")
    else:
        key_hash = t._table("key_hash")
    t.key_hash = np.frombuffer(key_hash, dtype="<u8").astype(np.uint64)
    return t


class LocalFiles:
    """The one fsspec call this module makes (``cat_file``), for a local cache without fsspec."""

    @staticmethod
    def cat_file(path: str, start: int, end: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(end - start)


def _all_tables(fs: Any, root: str, shown: str, shards: list[dict[str, Any]]) -> list[KeyTables]:
    return [read_key_tables(fs, root, shown, e) for e in shards]


def match_by_key(
    teacher: tuple[Any, str, str, list[dict[str, Any]]],
    other: tuple[Any, str, str, list[dict[str, Any]]],
    positions: npt.NDArray[np.int64] | None,
) -> npt.NDArray[np.int64]:
    """For every global position of the teacher cache (or of ``positions`` only: the others get
    ``-1``), the global position of the record with the same key in the other cache.

    Each cache is ``(fs, root, shown, shards)`` (``shards``: its manifest's shard entries; ``fs``
    an fsspec filesystem or :class:`LocalFiles`). Records are matched by their 64-bit key hash;
    the match is exact unless two keys share a hash, which the reader of the records detects
    (it compares the keys themselves); two keys of the other cache sharing a hash that a
    teacher key needs is refused here (:class:`CacheKeyError`, about one chance in 10**6 at
    ten million records).

    Raises:
        CacheKeyError: a teacher key the other cache does not hold (the first one, named).
    """
    t_tables = _all_tables(*teacher)
    o_tables = _all_tables(*other)
    t_hash = np.concatenate([t.key_hash for t in t_tables] + [np.empty(0, np.uint64)])
    o_hash = np.concatenate([t.key_hash for t in o_tables] + [np.empty(0, np.uint64)])
    order = np.argsort(o_hash, kind="stable")
    sorted_hash = o_hash[order]
    out = np.full(t_hash.shape[0], -1, dtype=np.int64)
    want = np.arange(t_hash.shape[0]) if positions is None else positions
    h = t_hash[want]
    lo = np.searchsorted(sorted_hash, h, side="left")
    hi = np.searchsorted(sorted_hash, h, side="right")
    found = hi > lo
    t_starts = np.concatenate([[0], np.cumsum([len(t.key_hash) for t in t_tables])])

    def key_of(p: int) -> int | str:
        s = int(np.searchsorted(t_starts, p, side="right") - 1)
        return t_tables[s].keys([p - int(t_starts[s])])[0]

    if not found.all():
        p = int(want[np.flatnonzero(~found)[0]])
        raise CacheKeyError(
            f"the key {key_of(p)!r} of the teacher cache {teacher[2]} (record {p}) is not in "
            f"the reference cache {other[2]} ({len(o_hash)} records; "
            f"{int((~found).sum())} of the {len(want)} teacher records streamed have no "
            "reference record): build the reference cache over the same samples"
        )
    if ((hi - lo) > 1).any():
        p = int(want[np.flatnonzero((hi - lo) > 1)[0]])
        raise CacheKeyError(
            f"the key {key_of(p)!r} of the teacher cache {teacher[2]} hashes (XXH3-64) like "
            f"several keys of the reference cache {other[2]}: matching by key hash cannot "
            "tell them apart; rename one of the colliding keys"
        )
    out[want] = order[lo]
    return out
