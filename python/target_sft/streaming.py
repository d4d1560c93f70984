"""Stream a teacher cache to every rank and DataLoader worker of a (multi-node) training job.

:class:`StreamingTeacherDataset` is a ``torch.utils.data.IterableDataset`` that yields
:class:`~target_sft.cache.CacheSample` references (a cache and a record position); the collator
decodes a batch of them in one native call. ``docs/STREAMING.md`` describes the design; in short:

* **Order.** The sample order of an epoch is a pure function of (manifest, ``seed``, epoch,
  ``shuffle``, ``shuffle_block_size``): shards are permuted, the concatenated records are cut into
  blocks of ``shuffle_block_size`` records and each block is permuted on its own (the shards in
  use at once are those of one block). Shards are ordered by a splitmix64 hash and blocks
  permuted by a keyed Feistel network, so no array of the block's size is ever built, any
  position is computed in O(1), and nothing depends on numpy's generator algorithms.
* **Partitioning.** Position ``k`` of the epoch order goes to rank ``k % world_size`` (ranks
  consume the order in lockstep, so the samples consumed by all ranks are always a *prefix* of
  it); inside a rank, batch ``j`` goes to DataLoader worker ``j % num_workers`` (the DataLoader's
  round robin then returns the rank's stream in order). Every rank gets the same number of
  samples and batches: the remainder is padded by repeating the first samples of the epoch
  (``drop_last=False``) or dropped (``drop_last=True``).
* **Resume.** The state is (epoch, samples consumed by all ranks): the same on every rank, and
  valid for any other world size, worker count or batch size. Inside DataLoader workers
  (torchdata's ``StatefulDataLoader``) each worker saves its own exact position instead.
* **Remote shards** (``s3://``, ``gs://``, ``http(s)://``, any fsspec URL) are downloaded ahead
  on background threads into a node-local directory shared by every process of the node (file
  locks: one download per shard per node), verified against the manifest's size and XXH3-128
  checksum, committed by an atomic rename and evicted least-recently-used under a size limit;
  shards in use are pinned. Local caches are memory-mapped in place.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from torch.utils.data import IterableDataset, get_worker_info

from target_sft import _core
from target_sft.cache import CacheInfo, CacheSample, TeacherCache
from target_sft.checks import check_int, parse_size
from target_sft.errors import (
    CacheCorruptionError,
    CacheFormatError,
    CacheInputError,
    CacheIOError,
    CacheMismatchError,
    CacheVersionError,
)

__all__ = ["StreamingTeacherDataset"]

log = logging.getLogger(__name__)

STATE_FORMAT = "target-sft-streaming-state"
STATE_VERSION = 1
_MANIFEST = "manifest.json"
_CACHE_FORMAT = "target-sft-cache"
_FORMAT_VERSION = _core.FORMAT_VERSION
_STEP = 1024  # samples a worker resolves (and, remotely, pins shards for) at a time
_MAX_AHEAD = 16  # steps a remote worker plans ahead to find shards to prefetch
_U64 = np.uint64


# --------------------------------------------------------------------------------------------
# Deterministic permutations (splitmix64; independent of numpy's generator algorithms)
# --------------------------------------------------------------------------------------------


def _mix64(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """splitmix64's finaliser, a bijection of uint64 (vectorised, wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _U64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        return z ^ (z >> _U64(31))


def _key(*parts: int) -> np.uint64:
    """A 64-bit hash of a tuple of non-negative integers."""
    h = np.zeros(1, dtype=np.uint64)
    for p in parts:
        h = _mix64(h ^ _mix64(np.array([p & 0xFFFF_FFFF_FFFF_FFFF], dtype=np.uint64)))
    return h[0]


def _permutation(n: int, key: np.uint64) -> npt.NDArray[np.int64]:
    """A pseudo-random permutation of ``range(n)``: argsort of distinct 64-bit hashes."""
    keys = _mix64(np.arange(n, dtype=np.uint64) ^ key)  # distinct: _mix64 is a bijection
    return np.argsort(keys, kind="stable").astype(np.int64)


_ROUNDS = 4  # Feistel rounds (4 rounds of a good round function: a strong pseudo-random perm)


def _feistel(x: npt.NDArray[np.uint64], n: int, keys: list[npt.NDArray[np.uint64]]) -> Any:
    """A keyed bijection of ``[0, n)`` applied to ``x`` (per-element round keys): a balanced
    Feistel network on the smallest even number of bits covering ``n``, cycle-walked back into
    ``[0, n)`` (the domain is < 4n, so under 4 walks are expected)."""
    bits = max(2, (n - 1).bit_length())
    half = (bits + 1) // 2
    mask, sh = _U64((1 << half) - 1), _U64(half)
    x = x.copy()
    todo = np.arange(x.shape[0])
    while todo.size:
        lo, hi = x[todo] & mask, x[todo] >> sh
        ks = [k[todo] for k in keys]
        for k in ks:
            lo, hi = hi ^ (_mix64(lo ^ k) & mask), lo
        y = (hi << sh) | lo
        x[todo] = y
        todo = todo[y >= _U64(n)]
    return x


class _EpochOrder:
    """The sample order of one epoch: order index ``k`` in ``[0, N)`` -> global record position.

    Shards are permuted (an argsort, O(shards)); the concatenated records are cut into blocks
    of ``block_size`` and block ``b`` is permuted by a keyed bijection (Feistel network), so a
    position is computed in O(1) for any ``k`` and nothing of size ``block_size`` is stored.
    """

    def __init__(
        self,
        shard_records: npt.NDArray[np.int64],
        *,
        seed: int,
        epoch: int,
        shuffle: bool,
        block_size: int,
    ) -> None:
        self.shuffle = shuffle
        self.block_size = block_size
        self.seed, self.epoch = seed, epoch
        self.starts = np.concatenate([[0], np.cumsum(shard_records)]).astype(np.int64)
        self.n = int(self.starts[-1])
        if shuffle:
            self.shard_perm = _permutation(len(shard_records), _key(seed, epoch, 0))
            self.perm_starts = np.concatenate(
                [[0], np.cumsum(shard_records[self.shard_perm])]
            ).astype(np.int64)
            self._round_keys = [_key(seed, epoch, 1, r) for r in range(_ROUNDS)]

    def _within_blocks(self, k: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Shuffle ``k`` within its block: block ``b``'s indices map to a permutation of them."""
        b = self.block_size
        blocks = k // b
        out = np.empty_like(k)
        last = (self.n - 1) // b if self.n else 0
        for sel, size in ((blocks < last, b), (blocks == last, self.n - last * b)):
            if not sel.any():
                continue
            blk = blocks[sel].astype(np.uint64)
            keys = [_mix64(blk ^ rk) for rk in self._round_keys]  # per-block round keys
            within = _feistel((k[sel] - blocks[sel] * b).astype(np.uint64), size, keys)
            out[sel] = blocks[sel] * b + within.astype(np.int64)
        return out

    def positions(self, k: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Global record positions of order indices ``k`` (1-d, values in ``[0, N)``)."""
        if not self.shuffle:
            return k.astype(np.int64, copy=True)
        u = self._within_blocks(k)  # index in the concatenation of the permuted shards
        s = np.searchsorted(self.perm_starts, u, side="right") - 1
        shard = self.shard_perm[s]
        return self.starts[shard] + (u - self.perm_starts[s])


# --------------------------------------------------------------------------------------------
# Partitioning
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Where this iterator runs: (rank, world) of the job and (worker, workers) of the rank."""

    rank: int
    world_size: int
    worker_id: int
    num_workers: int
    batch_size: int
    drop_last: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "worker_id": self.worker_id,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
        }


def _rank_length(remaining: int, world: int, batch: int, drop_last: bool) -> int:
    """Samples every rank yields from ``remaining`` samples of the epoch order."""
    if remaining <= 0:
        return 0
    if drop_last:
        return (remaining // (world * batch)) * batch
    return -(-remaining // world)


def _worker_length(rank_len: int, lay: _Layout) -> int:
    """Samples worker ``lay.worker_id`` yields from a rank stream of ``rank_len`` samples."""
    b, w, nw = lay.batch_size, lay.worker_id, lay.num_workers
    chunks = -(-rank_len // b)
    mine = max(0, -(-(chunks - w) // nw))
    if mine and (chunks - 1) % nw == w:  # this worker holds the last (maybe partial) chunk
        return mine * b - (chunks * b - rank_len)
    return mine * b


def _worker_rank_index(t: npt.NDArray[np.int64], lay: _Layout) -> npt.NDArray[np.int64]:
    """Index in the rank stream of the worker's ``t``-th sample (batch ``j`` -> worker
    ``j % num_workers``, so the DataLoader's round robin restores the rank stream's order)."""
    b = lay.batch_size
    return (lay.worker_id + (t // b) * lay.num_workers) * b + t % b


# --------------------------------------------------------------------------------------------
# The node-local shard store (remote caches)
# --------------------------------------------------------------------------------------------

_HEX = re.compile(r"^[0-9a-f]{32}$")
_TMP = re.compile(r"^\.tmp-([0-9a-f]{32})-(\d+)-")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _checksum_hex(entry: dict[str, Any], where: str) -> str:
    c = str(entry.get("checksum", ""))
    if not c.startswith("xxh3-128:") or not _HEX.match(c[9:]):
        raise CacheFormatError(
            f"{where}: shard {entry.get('file')!r} has checksum {c!r}, expected 'xxh3-128:' "
            "followed by 32 lowercase hex digits"
        )
    return c[9:]


class _NoRoom(Exception):
    """A prefetch found no room under the size limit (pinned shards fill it): retried later,
    and forced once the consumer needs the shard."""


@dataclass
class _Held:
    fd: int
    cache: TeacherCache
    refs: int


class _ShardStore:
    """Shards of one remote cache in a node-local directory shared by every process of a node.

    Layout of ``local_dir``: ``<xxh3-128 hex>/`` per committed shard, holding the shard file and
    a single-shard ``manifest.json`` (a valid cache that :class:`TeacherCache` opens);
    ``.tmp-<hex>-<bytes>-<pid>-<rand>/`` while a download is in flight (its size counts against
    the limit); ``.locks/`` with one ``flock`` file per shard for downloading (``.dl``, exclusive)
    and pinning (``.pin``: shared while a process uses the shard, exclusive to evict it) and
    ``space`` (exclusive while reserving room). The kernel drops ``flock`` locks when a process
    dies, so a ``kill -9`` leaves no stale lock; its temp directory is removed by the next
    process that takes the shard's download lock or reserves room.
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any],
        manifest: dict[str, Any],
        local_dir: Path,
        limit: int | None,
        retries: int,
    ) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/")
        self.http = any(p in ("http", "https") for p in _protocols(self.fs))
        self.manifest = manifest
        self.dir = local_dir
        self.limit = limit
        self.retries = retries
        self.locks = local_dir / ".locks"
        self.locks.mkdir(parents=True, exist_ok=True)
        self._mutex = threading.Lock()
        self._held: dict[str, _Held] = {}
        self.downloads = 0  # shards this process downloaded (for tests and logs)

    # -- locks --------------------------------------------------------------------------------

    def _lock_fd(self, name: str) -> int:
        return os.open(self.locks / name, os.O_RDWR | os.O_CREAT, 0o666)

    @staticmethod
    def _flock(fd: int, op: int, stop: threading.Event | None) -> None:
        """Blocking ``flock`` that gives up (``InterruptedError``) once ``stop`` is set."""
        if stop is None:
            fcntl.flock(fd, op)
            return
        while True:
            try:
                fcntl.flock(fd, op | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if stop.is_set():
                    raise InterruptedError("shard store is shutting down") from None
                time.sleep(0.005)

    @contextlib.contextmanager
    def _space(self, stop: threading.Event | None) -> Iterator[None]:
        """Hold the node's ``space`` lock (only when there is a size limit to account for)."""
        if self.limit is None:
            yield
            return
        fd = self._lock_fd("space")
        try:
            self._flock(fd, fcntl.LOCK_EX, stop)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    @staticmethod
    def _try_lock(fd: int, op: int) -> bool:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise

    # -- public -------------------------------------------------------------------------------

    def acquire(
        self, shard: int, demanded: Callable[[], bool], stop: threading.Event | None
    ) -> TeacherCache:
        """Pin shard ``shard`` (downloading it first if the node does not have it) and return it
        as a single-shard cache. ``demanded()`` says whether the consumer waits for it now: then
        it is fetched even when pinned shards leave no room under the limit."""
        entry = self.manifest["shards"][shard]
        h = _checksum_hex(entry, self.url)
        with self._mutex:
            held = self._held.get(h)
            if held is not None:
                held.refs += 1
                return held.cache
        pin = self._lock_fd(f"{h}.pin")
        try:
            self._flock(pin, fcntl.LOCK_SH, stop)
            d = self.dir / h
            if d.is_dir():
                with contextlib.suppress(OSError):
                    os.utime(d)  # LRU
            else:
                self._download(entry, h, demanded, stop)
            cache = TeacherCache(d)
            if entry["records"]:
                # Map the shard now: samples already yielded may be collated after the shard is
                # released and evicted, and a mapping outlives the file's deletion.
                cache.key_at(0)
        except BaseException:
            os.close(pin)
            raise
        with self._mutex:
            held = self._held.get(h)
            if held is not None:  # another thread of this process pinned it meanwhile
                held.refs += 1
                os.close(pin)
                return held.cache
            self._held[h] = _Held(pin, cache, 1)
        return cache

    def release(self, shard: int) -> None:
        h = self.manifest["shards"][shard]["checksum"][9:]
        with self._mutex:
            held = self._held[h]
            held.refs -= 1
            if held.refs == 0:
                del self._held[h]
                os.close(held.fd)  # drops the shared flock: the shard may now be evicted

    def usage(self) -> int:
        """Bytes of committed shards and in-flight downloads in the local directory."""
        with self._space(None):
            entries, reserved = self._scan(clean=False)
        return reserved + sum(size for _, size, _ in entries)

    # -- download -----------------------------------------------------------------------------

    def _remote(self, name: str) -> tuple[str, str]:
        return f"{self.root}/{name}", f"{self.url}/{name}"

    def _download(
        self,
        entry: dict[str, Any],
        h: str,
        demanded: Callable[[], bool],
        stop: threading.Event | None,
    ) -> None:
        one = dict(self.manifest)  # the committed directory is a valid single-shard cache
        one.update(
            shards=[entry],
            num_records=entry["records"],
            num_tokens=entry["tokens"],
            num_supervised=entry["supervised"],
            complete=True,
        )
        one.pop("manifest_checksum", None)
        one_json = _core.seal_manifest(json.dumps(one))  # a valid, sealed manifest (FORMAT.md §1)
        size = int(entry["bytes"]) + len(one_json)  # what the directory will hold
        dl = self._lock_fd(f"{h}.dl")
        tmp: Path | None = None
        try:
            # The download lock is held only to reserve room (never waiting for it) and to
            # download, so whoever waits for it waits for a finite download: no deadlock.
            self._flock(dl, fcntl.LOCK_EX, stop)
            if (self.dir / h).is_dir():  # another process of the node committed it meanwhile
                return
            for p in self.dir.glob(f".tmp-{h}-*"):  # we hold its lock: a dead process's
                shutil.rmtree(p, ignore_errors=True)
            tmp = self._reserve(h, size, demanded(), stop)
            if tmp is None:
                raise _NoRoom(h)
            self._fetch_verified(entry, h, tmp, stop)
            with open(tmp / _MANIFEST, "wb") as f:
                f.write(one_json)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            with self._space(stop):  # a scan of the directory never sees a rename half done
                os.rename(tmp, self.dir / h)  # atomic commit of the shard and its manifest
            tmp = None
            _fsync_dir(self.dir)
            self.downloads += 1
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            os.close(dl)

    def _fetch_verified(
        self, entry: dict[str, Any], h: str, tmp: Path, stop: threading.Event | None
    ) -> None:
        import xxhash

        rpath, shown = self._remote(entry["file"])
        size = int(entry["bytes"])
        out = tmp / entry["file"]
        last: BaseException | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(0.2 * 2**attempt, 5.0))
            try:
                digest = xxhash.xxh3_128()
                got = 0
                opts: dict[str, Any] = {"block_size": 0, "size": size} if self.http else {}
                with self.fs.open(rpath, "rb", **opts) as src, open(out, "wb") as dst:
                    while True:
                        if stop is not None and stop.is_set():
                            raise InterruptedError("shard store is shutting down")
                        chunk = src.read(8 << 20)
                        if not chunk:
                            break
                        got += len(chunk)
                        if got > size:
                            break
                        digest.update(chunk)
                        dst.write(chunk)
                    dst.flush()
                    os.fsync(dst.fileno())
                if got != size:
                    what = f"more than {size}" if got > size else str(got)
                    raise CacheCorruptionError(
                        f"remote shard {shown} has the wrong size: downloaded {what} bytes, the "
                        f"manifest lists {size} bytes (the file is truncated or is not this "
                        "cache's); it was discarded"
                    )
                actual = digest.hexdigest()
                if actual != h:
                    raise CacheCorruptionError(
                        f"remote shard {shown} is corrupted: its XXH3-128 checksum is "
                        f"xxh3-128:{actual}, the manifest lists xxh3-128:{h} ({size} bytes, "
                        "size matches); it was discarded"
                    )
                return
            except InterruptedError:
                raise
            except (CacheCorruptionError, FileNotFoundError) as e:
                last = e
                if isinstance(e, FileNotFoundError):
                    last = CacheIOError(
                        errno.ENOENT,
                        f"remote shard {shown} does not exist (listed in the manifest)",
                    )
            except Exception as e:  # network errors of any fsspec backend
                last = CacheIOError(
                    errno.EIO, f"cannot download remote shard {shown}: {type(e).__name__}: {e}"
                )
            if attempt < self.retries:
                log.warning("%s; retrying (attempt %d of %d)", last, attempt + 2, self.retries + 1)
        assert last is not None
        raise last

    # -- space --------------------------------------------------------------------------------

    def _scan(self, clean: bool) -> tuple[list[tuple[str, int, float]], int]:
        """Committed shards ``(hex, bytes, mtime)`` and bytes reserved by live downloads.
        With ``clean``, remove temp directories of dead processes (the caller holds ``space``)."""
        entries: list[tuple[str, int, float]] = []
        reserved = 0
        try:
            it = list(os.scandir(self.dir))
        except FileNotFoundError:
            return entries, 0
        for de in it:
            if _HEX.match(de.name):
                try:
                    size = sum(f.stat().st_size for f in os.scandir(de.path))
                    entries.append((de.name, size, de.stat().st_mtime))
                except FileNotFoundError:  # evicted meanwhile
                    continue
            elif m := _TMP.match(de.name):
                if clean:
                    fd = self._lock_fd(f"{m.group(1)}.dl")
                    try:
                        if self._try_lock(fd, fcntl.LOCK_EX):  # nobody downloads it: stale
                            shutil.rmtree(de.path, ignore_errors=True)
                            continue
                    finally:
                        os.close(fd)
                reserved += int(m.group(2))
            elif clean and de.name.startswith(".evict-"):
                shutil.rmtree(de.path, ignore_errors=True)
        return entries, reserved

    def _reserve(self, h: str, size: int, force: bool, stop: threading.Event | None) -> Path | None:
        """Make room for ``size`` bytes (evicting unpinned shards, least recently used first) and
        create the download's temp directory, which reserves the room for other processes.
        Returns None if pinned shards leave no room, unless ``force`` (a shard needed now)."""
        tmp = self.dir / f".tmp-{h}-{size}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if self.limit is None:
            tmp.mkdir()
            return tmp
        with self._space(stop):
            entries, reserved = self._scan(clean=True)
            used = reserved + sum(s for _, s, _ in entries)
            for name, s, _ in sorted(entries, key=lambda e: e[2]):
                if used + size <= self.limit:
                    break
                if name != h and self._evict(name):
                    used -= s
            if used + size <= self.limit or force:
                tmp.mkdir()
                return tmp
            return None

    def _evict(self, name: str) -> bool:
        fd = self._lock_fd(f"{name}.pin")
        try:
            if not self._try_lock(fd, fcntl.LOCK_EX):
                return False  # pinned by a process of this node
            gone = self.dir / f".evict-{name}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(self.dir / name, gone)
            except FileNotFoundError:
                return True
            shutil.rmtree(gone, ignore_errors=True)
            log.debug("evicted shard %s from %s", name, self.dir)
            return True
        finally:
            os.close(fd)


def _protocols(fs: Any) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def _is_url(s: str) -> bool:
    return "://" in s and not s.startswith("file://")


def _default_local_dir() -> Path:
    env = os.environ.get("TARGET_SFT_STREAMING_DIR")
    if env:
        return Path(env)
    import tempfile

    return Path(tempfile.gettempdir()) / "target-sft-streaming"


def _fetch_manifest(url: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    try:
        import fsspec
        import xxhash  # noqa: F401  (verifies downloads)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise CacheInputError(
            f"reading {url} needs fsspec and xxhash: pip install 'target-sft[remote]' ({e})"
        ) from e
    shown = f"{url.rstrip('/')}/{_MANIFEST}"
    try:
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
        raw = fs.cat_file(f"{root.rstrip('/')}/{_MANIFEST}")
    except FileNotFoundError as e:
        raise CacheFormatError(f"{shown} does not exist: {url} is not a target-sft cache") from e
    except Exception as e:
        raise CacheIOError(errno.EIO, f"cannot fetch {shown}: {type(e).__name__}: {e}") from e
    try:
        m = json.loads(raw)
    except ValueError as e:
        raise CacheCorruptionError(f"{shown} is not valid JSON ({e})") from e
    if not isinstance(m, dict) or m.get("format") != _CACHE_FORMAT:
        raise CacheFormatError(f"{shown} is not a target-sft cache manifest")
    v = m.get("format_version")
    if not isinstance(v, int) or v < 1:
        raise CacheFormatError(f"{shown} has no valid format_version")
    if v > _FORMAT_VERSION:
        raise CacheVersionError(
            f"{shown} was written with cache format version {v}, newer than the version "
            f"{_FORMAT_VERSION} this target-sft reads; upgrade target-sft"
        )
    top = (
        *("codec", "codec_params", "top_k", "vocab_size", "temperature", "tokenizer", "teacher"),
        *("complete", "num_records", "num_tokens", "num_supervised"),
    )
    missing = [k for k in (*top, "shards") if k not in m]
    if missing or not isinstance(m["shards"], list):
        raise CacheFormatError(f"{shown} lacks the manifest fields {missing or ['shards']}")
    for s in m["shards"]:
        f = str(s.get("file", "")) if isinstance(s, dict) else ""
        if not f or "/" in f or "\\" in f or f.startswith("."):
            raise CacheFormatError(f"{shown}: shard file name {f!r} is not a plain file name")
        for k in ("records", "bytes", "tokens", "supervised"):
            if not isinstance(s.get(k), int) or s[k] < 0:
                raise CacheFormatError(f"{shown}: shard {f!r} has no valid {k!r}")
        _checksum_hex(s, shown)
    _core.check_manifest(raw, shown)  # its manifest_checksum and the rest, as a local open
    return m


def _resolve_rank_world(
    explicit: tuple[int | None, int | None], captured: tuple[int, int] | None
) -> tuple[int, int]:
    rank, world = explicit
    if rank is not None and world is not None:
        return rank, world
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # pragma: no cover - torch built without distributed
        pass
    if captured is not None:
        return captured
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------


class StreamingTeacherDataset(IterableDataset):  # type: ignore[type-arg]
    """Iterate a teacher cache on every rank and DataLoader worker: deterministic, resumable.

    Yields :class:`~target_sft.cache.CacheSample` (collate them in the worker, e.g. with the
    target-sft collator; a plain ``list`` works too).

    Args:
        path_or_url: a cache directory (memory-mapped in place) or a URL any fsspec filesystem
            reads (``s3://bucket/cache``, ``gs://...``, ``https://host/cache``): its
            ``manifest.json`` is fetched now, shards on demand.
        shuffle: shuffle every epoch (shards, then records within blocks).
        seed: seed of the shuffle (the same on every rank).
        batch_size: the DataLoader's ``batch_size`` (``1`` when it has ``batch_size=None``).
            Batches are assigned to workers whole, so it must match for the DataLoader to return
            each rank's samples in order (and for ``drop_last``).
        drop_last: ``False``: pad the epoch by repeating its first samples until every rank has
            ``ceil(remaining / world_size)`` samples (the last batch of every rank may be
            partial, but every rank has the same number of batches). ``True``: drop the
            remainder so every rank gets the same number of *full* batches.
        shuffle_block_size: records shuffled together; bounds the shards in use at once (those
            the block spans). Memory does not grow with it.
        epoch: the first epoch (see :meth:`set_epoch`).
        local_dir: remote caches only: the node-local directory shards are downloaded to (shared
            by every process of the node; default ``$TARGET_SFT_STREAMING_DIR`` or
            ``<tmp>/target-sft-streaming``).
        cache_limit: remote only: bytes (or ``"20GiB"``) the local directory may hold; least
            recently used shards no process pins are evicted. Prefetching never exceeds it; the
            shards a worker needs *now* are fetched even when pinned shards fill it. ``None``:
            no limit.
        prefetch_shards: remote only: shards each worker downloads ahead of the one it reads.
        download_threads: remote only: parallel downloads per worker.
        download_retries: remote only: retries of a failed download (network error, wrong size
            or checksum) before the error is raised.
        storage_options: passed to fsspec (credentials, endpoint, ...).
        rank, world_size: override the job's rank and size (default: ``torch.distributed`` if
            initialised, else the ``RANK``/``WORLD_SIZE`` environment variables, else 0 and 1).

    Use ``set_epoch(epoch)`` before each epoch (like ``DistributedSampler``). Save progress with
    :meth:`state_dict` (see there for ``num_workers > 0``) or through torchdata's
    ``StatefulDataLoader``, and restore it with :meth:`load_state_dict`.
    """

    def __init__(
        self,
        path_or_url: str | os.PathLike[str],
        *,
        shuffle: bool = True,
        seed: int = 0,
        batch_size: int = 1,
        drop_last: bool = False,
        shuffle_block_size: int = 1 << 18,
        epoch: int = 0,
        local_dir: str | os.PathLike[str] | None = None,
        cache_limit: int | str | None = None,
        prefetch_shards: int = 4,
        download_threads: int = 2,
        download_retries: int = 2,
        storage_options: dict[str, Any] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(shuffle, (bool, np.bool_)):
            raise CacheInputError(f"shuffle must be a bool, got {shuffle!r}")
        if not isinstance(drop_last, (bool, np.bool_)):
            raise CacheInputError(f"drop_last must be a bool, got {drop_last!r}")
        self.shuffle = bool(shuffle)
        self.seed = check_int("seed", seed, 0)
        if self.seed >= 2**64:
            raise CacheInputError(f"seed must be < 2**64, got {seed}")
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.drop_last = bool(drop_last)
        self.shuffle_block_size = check_int("shuffle_block_size", shuffle_block_size, 1)
        self.prefetch_shards = check_int("prefetch_shards", prefetch_shards, 0)
        self.download_threads = check_int("download_threads", download_threads, 1)
        self.download_retries = check_int("download_retries", download_retries, 0)
        if (rank is None) != (world_size is None):
            raise CacheInputError("pass both rank and world_size, or neither")
        if world_size is not None:
            check_int("world_size", world_size, 1)
            if not 0 <= check_int("rank", rank, 0) < world_size:
                raise CacheInputError(f"rank must be in [0, {world_size}), got {rank}")
        self._explicit = (rank, world_size)
        self._captured: tuple[int, int] | None = None
        self.cache_limit = None if cache_limit is None else parse_size(cache_limit, "cache_limit")
        self.storage_options = dict(storage_options or {})

        src = os.fspath(path_or_url)
        self.remote = _is_url(src)
        self.source = src.removeprefix("file://") if not self.remote else src.rstrip("/")
        self._cache: TeacherCache | None = None  # local: the one cache every sample references
        self._manifest: dict[str, Any] | None = None  # remote: the manifest, fetched once
        self.local_dir: Path | None = None
        if self.remote:
            self._manifest = _fetch_manifest(self.source, self.storage_options)
            self.info = CacheInfo.from_manifest(self.source, self._manifest)
            self.local_dir = Path(local_dir) if local_dir is not None else _default_local_dir()
        else:
            if local_dir is not None or cache_limit is not None:
                raise CacheInputError(
                    "local_dir and cache_limit apply to remote caches; "
                    f"{src} is local and is memory-mapped in place"
                )
            self._cache = TeacherCache(self.source)
            self.info = self._cache.info
        shards = self.info.shards
        self._shard_records = np.array([s["records"] for s in shards], dtype=np.int64)
        self.num_records = int(self._shard_records.sum())
        ident = [(s["file"], s["records"], s.get("checksum", "")) for s in shards]
        self.fingerprint = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:32]

        # position: epoch, start of the epoch's remaining segment, per-worker resume
        self._epoch = check_int("epoch", epoch, 0)
        self._start = 0
        self._worker_resume: dict[str, Any] | None = None
        # progress of the iteration running in this process (None: none started)
        self._progress: dict[str, Any] | None = None
        self._iterations = 0  # iterations started by this object in process _iter_pid
        self._iter_pid = os.getpid()
        self._store: _ShardStore | None = None
        self._store_pid = -1

    # ---- epoch / length ---------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Iterate ``epoch`` next. Call it before every epoch on every rank (the order of an
        epoch is a function of the seed and the epoch). A resumed position is kept when
        ``epoch`` is the resumed epoch, and dropped otherwise."""
        epoch = check_int("epoch", epoch, 0)
        if epoch != self._epoch:
            self._epoch, self._start, self._worker_resume = epoch, 0, None
        self._progress = None
        self._iterations = 0

    def rank_world(self) -> tuple[int, int]:
        """(rank, world_size) this process iterates as."""
        r, w = _resolve_rank_world(self._explicit, self._captured)
        if not 0 <= r < w:
            raise CacheInputError(f"invalid rank {r} for world size {w}")
        return r, w

    def samples_per_rank(self) -> int:
        """Samples every rank yields in the next iteration (the full epoch, or its remainder
        after a resume)."""
        _, world = self.rank_world()
        return _rank_length(self.num_records - self._start, world, self.batch_size, self.drop_last)

    def batches_per_rank(self) -> int:
        """Batches of ``batch_size`` every rank yields in the next iteration."""
        return -(-self.samples_per_rank() // self.batch_size)

    def __len__(self) -> int:
        return self.samples_per_rank()

    # ---- state ------------------------------------------------------------------------------

    def _state_base(self, consumed: int) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "samples_consumed": consumed,
            "num_records": self.num_records,
            "fingerprint": self.fingerprint,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "shuffle_block_size": self.shuffle_block_size,
        }

    def state_dict(
        self, batches_consumed: int | None = None, *, samples_consumed: int | None = None
    ) -> dict[str, Any]:
        """The position to resume from: a small JSON-serialisable dict.

        In the main process the state is *global*: the epoch and the number of samples of the
        epoch order consumed by all ranks together. It is the same on every rank (saving rank
        0's is enough) and resumes on any world size, worker count or batch size. Progress is
        known when this object was iterated in this process (``num_workers=0``); with a
        ``DataLoader(num_workers>0)`` the iteration runs in the workers, so pass the number of
        batches (of ``batch_size``) this rank's loader has returned since the epoch (or the
        resume) started as ``batches_consumed`` (or ``samples_consumed``).

        Called inside a DataLoader worker (torchdata's ``StatefulDataLoader`` does, after every
        batch) it returns that worker's exact position, which :meth:`load_state_dict` restores
        in the same worker of the same layout; to change the layout, pass the whole
        ``StatefulDataLoader.state_dict()`` to :meth:`load_state_dict` of the dataset instead.
        """
        info = get_worker_info()
        if info is not None and batches_consumed is None and samples_consumed is None:
            lay = self._layout(info)
            state = self._state_base(self._start)
            p = self._progress
            if p is not None and p["layout"] == lay:
                yielded = p["yielded"]
            elif self._worker_resume is not None:
                yielded = self._worker_resume["yielded"]
            else:
                yielded = 0
            state["worker"] = {**lay.as_dict(), "segment_start": self._start, "yielded": yielded}
            return state
        _, world = self.rank_world()
        rank_len = _rank_length(
            self.num_records - self._start, world, self.batch_size, self.drop_last
        )
        if batches_consumed is not None or samples_consumed is not None:
            if batches_consumed is not None and samples_consumed is not None:
                raise CacheInputError("pass batches_consumed or samples_consumed, not both")
            k = (
                check_int("batches_consumed", batches_consumed, 0) * self.batch_size
                if batches_consumed is not None
                else check_int("samples_consumed", samples_consumed, 0)
            )
        elif self._progress is not None and self._progress["layout"].num_workers == 1:
            k = self._progress["yielded"]
        else:
            k = 0
        consumed = self.num_records if k >= rank_len else self._start + k * world
        return self._state_base(consumed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`'s output, or from a whole
        ``StatefulDataLoader.state_dict()`` (its workers' positions are merged into the global
        position, which then resumes on any layout: use it with a fresh loader).

        The next iteration continues the saved epoch where it stopped; with a different world
        size every remaining sample of the epoch is still yielded exactly once (plus padding).
        """
        if not isinstance(state, dict):
            raise CacheInputError(f"state must be a dict, got {type(state).__name__}")
        if state.get("format") != STATE_FORMAT:
            merged = self._merge_loader_state(state)
            if merged is None:
                raise CacheInputError(
                    "not a StreamingTeacherDataset state (nor a StatefulDataLoader state holding "
                    "one)"
                )
            state = merged
        self._check_state(state)
        worker = state.get("worker")
        info = get_worker_info()
        self._epoch = int(state["epoch"])
        self._progress = None
        self._iterations = 0
        if worker is None:
            self._start = int(state["samples_consumed"])
            self._worker_resume = None
            return
        if info is None:
            raise CacheInputError(
                "this is one DataLoader worker's state (saved inside a worker); load it through "
                "the StatefulDataLoader, or pass the whole StatefulDataLoader.state_dict() here"
            )
        lay = self._layout(info)
        saved = {k: worker[k] for k in lay.as_dict()}
        if saved != lay.as_dict():
            raise CacheInputError(
                f"this StatefulDataLoader state was saved with {saved}, but this worker runs with "
                f"{lay.as_dict()}; to resume with another world size, worker count or batch size "
                "call dataset.load_state_dict(loader.state_dict()) and iterate a fresh "
                "StatefulDataLoader"
            )
        self._start = int(worker["segment_start"])
        self._worker_resume = {"layout": lay, "yielded": int(worker["yielded"])}

    def _check_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise CacheInputError(f"unsupported streaming state version {state.get('version')!r}")
        if state.get("fingerprint") != self.fingerprint:
            raise CacheMismatchError(
                "the state was saved for another cache (its shard list differs from "
                f"{self.source}'s): resuming would not continue the same order"
            )
        for k in ("shuffle", "seed", "shuffle_block_size"):
            if state.get(k) != getattr(self, k):
                raise CacheMismatchError(
                    f"the state was saved with {k}={state.get(k)!r}, this dataset has "
                    f"{k}={getattr(self, k)!r}: the epoch order would differ"
                )
        c = state.get("samples_consumed")
        if not isinstance(c, int) or not 0 <= c <= self.num_records:
            raise CacheInputError(f"invalid samples_consumed {c!r} in the state")

    def _merge_loader_state(self, sd: dict[str, Any]) -> dict[str, Any] | None:
        """Global state from a ``StatefulDataLoader.state_dict()``, or None if it is not one."""
        if "dataset_state" in sd and "_num_yielded" in sd:  # num_workers=0
            inner = sd["dataset_state"]
            return (
                inner if isinstance(inner, dict) and inner.get("format") == STATE_FORMAT else None
            )
        snap = sd.get("_snapshot")
        if not isinstance(snap, dict) or "_worker_snapshots" not in snap:
            return None
        states = [
            w.get("dataset_state")
            for w in snap["_worker_snapshots"].values()
            if isinstance(w, dict) and isinstance(w.get("dataset_state"), dict)
        ]
        states = [s for s in states if s.get("format") == STATE_FORMAT and "worker" in s]
        if not states:
            return None
        first = states[0]
        lay = first["worker"]
        if any(
            s["epoch"] != first["epoch"] or s["worker"]["segment_start"] != lay["segment_start"]
            for s in states
        ):
            raise CacheInputError("the StatefulDataLoader's workers disagree on epoch or start")
        # Batches are dealt to workers round robin and consumed in order, so the rank has
        # consumed exactly what its workers' last consumed batches add up to, plus the batches
        # the loader replays after its last snapshot.
        k = sum(int(s["worker"]["yielded"]) for s in states)
        k += int(sd.get("_steps_since_snapshot", 0)) * int(lay["batch_size"])
        n = int(first["num_records"])
        start = int(lay["segment_start"])
        world = int(lay["world_size"])
        rank_len = _rank_length(n - start, world, int(lay["batch_size"]), bool(lay["drop_last"]))
        out = dict(first)
        del out["worker"]
        out["samples_consumed"] = n if k >= rank_len else start + k * world
        return out

    # ---- pickling (spawn / forkserver workers) ----------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["_store"], d["_store_pid"] = None, -1
        d["_progress"] = None
        # A spawned worker has no process group: keep the parent's rank and world size.
        with contextlib.suppress(Exception):
            d["_captured"] = _resolve_rank_world(self._explicit, self._captured)
        return d

    # ---- iteration --------------------------------------------------------------------------

    def _layout(self, info: Any) -> _Layout:
        rank, world = self.rank_world()
        return _Layout(
            rank=rank,
            world_size=world,
            worker_id=0 if info is None else info.id,
            num_workers=1 if info is None else info.num_workers,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
        )

    def _get_store(self) -> _ShardStore:
        if self._store is None or self._store_pid != os.getpid():
            assert self.local_dir is not None
            assert self._manifest is not None
            self._store = _ShardStore(
                self.source,
                self.storage_options,
                self._manifest,
                self.local_dir,
                self.cache_limit,
                self.download_retries,
            )
            self._store_pid = os.getpid()
        return self._store

    def __iter__(self) -> Iterator[CacheSample]:
        info = get_worker_info()
        if self._iter_pid != os.getpid():  # a forked worker inherits the parent's counter
            self._iter_pid, self._iterations = os.getpid(), 0
        if info is not None and self._iterations > 0:
            # A persistent worker iterates again: set_epoch() in the main process cannot reach
            # it, so it moves to the next epoch (what the usual set_epoch(epoch) loop does).
            self._epoch, self._start, self._worker_resume = self._epoch + 1, 0, None
        self._iterations += 1
        lay = self._layout(info)
        skip = 0
        if self._worker_resume is not None:
            if self._worker_resume["layout"] != lay:
                raise CacheInputError(
                    "a per-worker position was loaded for another layout "
                    f"({self._worker_resume['layout']}), this iterator runs as {lay}"
                )
            skip = self._worker_resume["yielded"]
        remaining = self.num_records - self._start
        rank_len = _rank_length(remaining, lay.world_size, lay.batch_size, lay.drop_last)
        total = _worker_length(rank_len, lay)
        progress = {"layout": lay, "yielded": min(skip, total)}
        self._progress = progress
        order = _EpochOrder(
            self._shard_records,
            seed=self.seed,
            epoch=self._epoch,
            shuffle=self.shuffle,
            block_size=self.shuffle_block_size,
        )
        steps = self._steps(order, lay, self._start, skip, total)
        if self.remote:
            return self._iter_remote(steps, progress)
        return self._iter_local(steps, progress)

    def _steps(
        self, order: _EpochOrder, lay: _Layout, start: int, skip: int, total: int
    ) -> Iterator[npt.NDArray[np.int64]]:
        """Global record positions of this worker's samples, at most ``_STEP`` at a time."""
        for t0 in range(skip, total, _STEP):
            t = np.arange(t0, min(total, t0 + _STEP), dtype=np.int64)
            k = start + _worker_rank_index(t, lay) * lay.world_size + lay.rank  # order index
            # padding past the end repeats the epoch's first samples (as an uninterrupted run)
            k = np.where(k < order.n, k, (k - order.n) % max(order.n, 1))
            # one step per shuffle block: a remote worker pins the shards of one block at a time
            blocks = k // order.block_size
            yield from (
                order.positions(x) for x in np.split(k, np.flatnonzero(np.diff(blocks)) + 1)
            )

    def _iter_local(
        self, steps: Iterator[npt.NDArray[np.int64]], progress: dict[str, Any]
    ) -> Iterator[CacheSample]:
        cache = self._cache
        if cache is None:  # pragma: no cover - set in __init__ and by unpickling
            cache = self._cache = TeacherCache(self.source)
        for pos in steps:
            for p in pos.tolist():
                progress["yielded"] += 1
                yield CacheSample(cache, p)

    def _iter_remote(
        self, steps: Iterator[npt.NDArray[np.int64]], progress: dict[str, Any]
    ) -> Iterator[CacheSample]:
        store = self._get_store()
        starts = np.concatenate([[0], np.cumsum(self._shard_records)]).astype(np.int64)
        pool = ThreadPoolExecutor(self.download_threads, thread_name_prefix="target-sft-fetch")
        stop = threading.Event()
        demanded: set[int] = set()
        scheduled: dict[int, Future[TeacherCache]] = {}
        ahead: deque[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], list[int]]] = deque()

        def plan(pos: npt.NDArray[np.int64]) -> tuple[Any, Any, list[int]]:
            shard = np.searchsorted(starts, pos, side="right") - 1
            _, first = np.unique(shard, return_index=True)
            return pos, shard, shard[np.sort(first)].tolist()  # shards in first-use order

        def schedule(s: int) -> None:
            f = scheduled.get(s)
            if f is None or (f.done() and isinstance(f.exception(), _NoRoom)):
                scheduled[s] = pool.submit(store.acquire, s, lambda: s in demanded, stop)

        def get(s: int) -> TeacherCache:
            try:
                return scheduled[s].result()
            except _NoRoom:  # prefetched while there was no room: fetch it now, forced
                schedule(s)
                return scheduled[s].result()

        def fill_ahead() -> None:
            # Plan the next steps until they use prefetch_shards shards beyond the current
            # step's (at most _MAX_AHEAD steps), and schedule those downloads.
            current = set(ahead[0][2])
            future: list[int] = []
            seen = set(current)
            for _, _, ss in list(ahead)[1:]:
                for s in ss:
                    if s not in seen:
                        seen.add(s)
                        future.append(s)
            while len(future) < self.prefetch_shards and len(ahead) < _MAX_AHEAD:
                nxt = next(steps, None)
                if nxt is None:
                    break
                ahead.append(plan(nxt))
                for s in ahead[-1][2]:
                    if s not in seen:
                        seen.add(s)
                        future.append(s)
            for s in future[: self.prefetch_shards]:
                schedule(s)

        try:
            nxt0 = next(steps, None)
            if nxt0 is not None:
                ahead.append(plan(nxt0))
            while ahead:
                pos, shard, needed = ahead[0]
                for s in needed:
                    demanded.add(s)
                    schedule(s)
                fill_ahead()
                caches = {s: get(s) for s in needed}
                local = pos - starts[shard]
                for s, p in zip(shard.tolist(), local.tolist(), strict=True):
                    progress["yielded"] += 1
                    yield CacheSample(caches[s], p)
                ahead.popleft()
                if not ahead:
                    nxt = next(steps, None)
                    if nxt is not None:
                        ahead.append(plan(nxt))
                keep = {s for _, _, ss in ahead for s in ss}
                for s in needed:
                    if s not in keep:
                        demanded.discard(s)
                        store.release(s)
                        del scheduled[s]
        finally:
            stop.set()
            for s, f in list(scheduled.items()):
                if f.cancel():
                    continue
                try:
                    f.result()
                except BaseException:
                    continue
                store.release(s)
            pool.shutdown(wait=True)

    def __repr__(self) -> str:
        return (
            f"StreamingTeacherDataset({self.source!r}, records={self.num_records}, "
            f"shards={len(self._shard_records)}, shuffle={self.shuffle}, seed={self.seed}, "
            f"batch_size={self.batch_size}, drop_last={self.drop_last}, epoch={self._epoch})"
        )
