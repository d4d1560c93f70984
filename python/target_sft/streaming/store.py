"""The node-local shard store of a remote cache: shards downloaded once per node, verified
against the manifest's size and XXH3-128 checksum, committed by an atomic rename and evicted
least-recently-used under a size limit; ``flock`` files coordinate every process of the node
(docs/STREAMING.md §Remote shards)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from target_sft import _core
from target_sft.cache import TeacherCache
from target_sft.errors import CacheCorruptionError, CacheIOError
from target_sft.streaming.manifest import MANIFEST_NAME

__all__ = ["NoRoom", "ShardStore", "default_local_dir", "is_url", "shard_hex"]

log = logging.getLogger(__name__)

_HEX = re.compile(r"^[0-9a-f]{32}$")
_TMP = re.compile(r"^\.tmp-([0-9a-f]{32})-(\d+)-")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shard_hex(entry: dict[str, Any]) -> str:
    """The 32 hex digits of a shard entry's ``checksum`` (``"xxh3-128:<hex>"``, checked when the
    manifest was parsed): the shard's name in the store."""
    return str(entry["checksum"]).removeprefix("xxh3-128:")


class NoRoom(Exception):
    """A prefetch found no room under the size limit (pinned shards fill it): retried later,
    and forced once the consumer needs the shard."""


@dataclass
class _Held:
    fd: int
    cache: TeacherCache
    refs: int


class ShardStore:
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
        h = shard_hex(entry)
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
        h = shard_hex(self.manifest["shards"][shard])
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
                raise NoRoom(h)
            self._fetch_verified(entry, h, tmp, stop)
            with open(tmp / MANIFEST_NAME, "wb") as f:
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


def is_url(s: str) -> bool:
    return "://" in s and not s.startswith("file://")


def default_local_dir() -> Path:
    env = os.environ.get("TARGET_SFT_STREAMING_DIR")
    if env:
        return Path(env)
    import tempfile

    return Path(tempfile.gettempdir()) / "target-sft-streaming"
