"""The streaming dataset: :class:`StreamingTeacherDataset` streams a teacher cache to every rank
and DataLoader worker of a (multi-node) training job.

It is a ``torch.utils.data.IterableDataset`` that yields :class:`~target_sft.cache.CacheSample`
references (a cache and a record position); the collator decodes a batch of them in one native
call. It puts together the epoch order (``order.py``), the rank × worker partition
(``partition.py``) and, for a remote cache, the fetched manifest (``manifest.py``) and the
node-local shard store (``store.py``); ``docs/STREAMING.md`` describes the design.

**Resume.** The state is (epoch, samples consumed by all ranks): the same on every rank, and valid
for any other world size, worker count or batch size. Inside DataLoader workers (torchdata's
``StatefulDataLoader``) each worker saves its own exact position instead.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from torch.utils.data import IterableDataset, get_worker_info

from target_sft.cache import CacheInfo, CacheSample, KeySplit, TeacherCache
from target_sft.checks import check_int, parse_size
from target_sft.errors import CacheInputError, CacheMismatchError
from target_sft.streaming.keyindex import RemoteKeys
from target_sft.streaming.manifest import fetch_manifest
from target_sft.streaming.order import EpochOrder
from target_sft.streaming.partition import (
    Layout,
    rank_length,
    resolve_rank_world,
    worker_length,
    worker_rank_index,
)
from target_sft.streaming.reference import ReferenceSource, cache_role, check_role
from target_sft.streaming.store import NoRoom, ShardStore, default_local_dir, is_url

__all__ = ["STATE_FORMAT", "STATE_VERSION", "StreamingTeacherDataset"]

STATE_FORMAT = "target-sft-streaming-state"
STATE_VERSION = 1
_STEP = 1024  # samples a worker resolves (and, remotely, pins shards for) at a time
_MAX_AHEAD = 16  # steps a remote worker plans ahead to find shards to prefetch


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
        key_split: stream only one side of a split by key (:class:`~target_sft.KeySplit`; see
            :meth:`split_by_key`): the epoch order, the rank and worker shares and the resume
            state are then those of that side's records. Local caches only (the keys are read
            once, at construction).
        reference: a reference cache (directory, :class:`~target_sft.TeacherCache` or URL,
            read like the teacher's) holding the same samples by key, built separately (its
            shards need not line up with the teacher's). Every yielded sample then carries
            ``.reference``: the record of the same key there. Order, partition, epochs,
            ``key_split`` and the state are the teacher's. Checked when the dataset is built:
            its manifest ``role`` is ``"reference"``, its tokenizer and vocabulary are the
            teacher's, and it holds every key streamed (else :class:`CacheKeyError` naming the
            key). Remote: its shards are fetched, prefetched and evicted with the teacher's.
        reference_local_dir: remote reference only: its node-local directory (default
            ``<local_dir>/reference``; kept under ``cache_limit`` on its own).
        reference_storage_options: fsspec options of a remote reference (default:
            ``storage_options``).
        allow_role_mismatch: accept a teacher or reference cache whose manifest ``role``
            contradicts its slot (a cache without ``role`` is a teacher).

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
        key_split: KeySplit | None = None,
        reference: str | os.PathLike[str] | TeacherCache | None = None,
        reference_local_dir: str | os.PathLike[str] | None = None,
        reference_storage_options: dict[str, Any] | None = None,
        allow_role_mismatch: bool = False,
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
        ref_src = None
        if reference is not None:
            ref_src = os.fspath(
                reference.path if isinstance(reference, TeacherCache) else reference
            )
        ref_remote = ref_src is not None and is_url(ref_src)
        self.remote = is_url(src)
        self.source = src.removeprefix("file://") if not self.remote else src.rstrip("/")
        self._cache: TeacherCache | None = None  # local: the one cache every sample references
        self._manifest: dict[str, Any] | None = None  # remote: the manifest, fetched once
        self.local_dir: Path | None = None
        if self.remote or ref_remote:
            self.local_dir = Path(local_dir) if local_dir is not None else default_local_dir()
        elif local_dir is not None or cache_limit is not None or reference_local_dir is not None:
            raise CacheInputError(
                "local_dir, cache_limit and reference_local_dir apply to remote caches; "
                f"{src} is local and is memory-mapped in place"
            )
        if self.remote:
            self._manifest = fetch_manifest(self.source, self.storage_options)
            self.info = CacheInfo.from_manifest(self.source, self._manifest)
        else:
            self._cache = TeacherCache(self.source)
            self.info = self._cache.info
        if not isinstance(allow_role_mismatch, (bool, np.bool_)):
            raise CacheInputError(
                f"allow_role_mismatch must be a bool, got {allow_role_mismatch!r}"
            )
        role = cache_role(self.info, self._manifest, self._cache)
        check_role(self.info, role, "teacher", bool(allow_role_mismatch))
        shards = self.info.shards
        self._shard_records = np.array([s["records"] for s in shards], dtype=np.int64)
        ident: list[Any] = [(s["file"], s["records"], s.get("checksum", "")) for s in shards]
        self._apply_key_split(key_split, ident)
        self.reference: ReferenceSource | None = None
        if reference is not None:
            if reference_local_dir is not None and not ref_remote:
                raise CacheInputError(
                    f"reference_local_dir applies to a remote reference; {ref_src} is local"
                )
            ref_dir = None
            if ref_remote:
                assert self.local_dir is not None
                ref_dir = (
                    Path(reference_local_dir)
                    if reference_local_dir is not None
                    else self.local_dir / "reference"
                )
            self.reference = ReferenceSource(
                reference,
                teacher=self.info,
                teacher_keys=self._teacher_keys(),
                positions=self._select,
                storage_options=(
                    self.storage_options
                    if reference_storage_options is None
                    else dict(reference_storage_options)
                ),
                local_dir=ref_dir,
                cache_limit=self.cache_limit,
                retries=self.download_retries,
                allow_role_mismatch=bool(allow_role_mismatch),
            )

        # position: epoch, start of the epoch's remaining segment, per-worker resume
        self._epoch = check_int("epoch", epoch, 0)
        self._start = 0
        self._worker_resume: dict[str, Any] | None = None
        # progress of the iteration running in this process (None: none started)
        self._progress: dict[str, Any] | None = None
        self._iterations = 0  # iterations started by this object in process _iter_pid
        self._iter_pid = os.getpid()
        self._store: ShardStore | None = None
        self._store_pid = -1

    def _teacher_keys(self) -> TeacherCache | RemoteKeys:
        """The teacher cache (local) or its shards' key tables (remote), to match keys in."""
        if self._cache is not None:
            return self._cache
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.source, **self.storage_options)
        return RemoteKeys(fs, root.rstrip("/"), self.source, self.info.shards)

    def _apply_key_split(self, key_split: KeySplit | None, ident: list[Any]) -> None:
        """The records the epochs order: every record, or those of ``key_split``'s side (then
        ``_select`` maps an index among them to its global position, ``_order_records`` counts
        them per shard, and the fingerprint names the split, so no state crosses splits)."""
        if key_split is not None and not isinstance(key_split, KeySplit):
            raise CacheInputError(f"key_split must be a KeySplit, got {key_split!r}")
        self.key_split = key_split
        self._select: npt.NDArray[np.int64] | None = None
        self._order_records = self._shard_records
        if key_split is not None:
            if self._cache is None:
                raise CacheInputError(
                    f"key_split needs a local cache ({self.source} is remote: its keys are in "
                    "its shards); split a local copy, or build the train and eval caches apart"
                )
            self._select = key_split.positions(self._cache)
            if self._select.size == 0:
                raise CacheInputError(
                    f"no record of {self.source} ({len(self._cache)} records) is on the "
                    f"{key_split.side} side of {key_split}"
                )
            starts = np.cumsum(self._shard_records)
            shard = np.searchsorted(starts, self._select, side="right")
            self._order_records = np.bincount(shard, minlength=len(starts)).astype(np.int64)
            ident = [*ident, str(key_split)]
        self.num_records = int(self._order_records.sum())
        self.fingerprint = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:32]

    def split_by_key(
        self, eval_fraction: float = 0.05, seed: int = 0
    ) -> tuple[StreamingTeacherDataset, StreamingTeacherDataset]:
        """``(train, eval)``: two datasets with this one's settings, each streaming one side of
        a split of the cache by key (:func:`target_sft.split_by_key`), at the start of this
        dataset's epoch. Local caches only."""
        if self.key_split is not None:
            raise CacheInputError(
                f"this dataset is already one side of a split ({self.key_split}); split the "
                "cache itself"
            )
        shards = self.info.shards
        ident = [(s["file"], s["records"], s.get("checksum", "")) for s in shards]
        out = []
        for side in KeySplit.pair(eval_fraction, seed):
            ds = copy.copy(self)
            ds._start, ds._worker_resume, ds._progress, ds._iterations = 0, None, None, 0
            ds._apply_key_split(side, list(ident))
            out.append(ds)
        return out[0], out[1]

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
        r, w = resolve_rank_world(self._explicit, self._captured)
        if not 0 <= r < w:
            raise CacheInputError(f"invalid rank {r} for world size {w}")
        return r, w

    def samples_per_rank(self) -> int:
        """Samples every rank yields in the next iteration (the full epoch, or its remainder
        after a resume)."""
        _, world = self.rank_world()
        return rank_length(self.num_records - self._start, world, self.batch_size, self.drop_last)

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
            "key_split": None if self.key_split is None else str(self.key_split),
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
        rank_len = rank_length(
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
        mine = None if self.key_split is None else str(self.key_split)
        if state.get("key_split") != mine:
            raise CacheMismatchError(
                f"the state was saved streaming key_split={state.get('key_split')}, this "
                f"dataset streams key_split={mine}: another set of records"
            )
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
        rank_len = rank_length(n - start, world, int(lay["batch_size"]), bool(lay["drop_last"]))
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
            d["_captured"] = resolve_rank_world(self._explicit, self._captured)
        return d

    # ---- iteration --------------------------------------------------------------------------

    def _layout(self, info: Any) -> Layout:
        rank, world = self.rank_world()
        return Layout(
            rank=rank,
            world_size=world,
            worker_id=0 if info is None else info.id,
            num_workers=1 if info is None else info.num_workers,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
        )

    def _get_store(self) -> ShardStore:
        if self._store is None or self._store_pid != os.getpid():
            assert self.local_dir is not None
            assert self._manifest is not None
            self._store = ShardStore(
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
        rank_len = rank_length(remaining, lay.world_size, lay.batch_size, lay.drop_last)
        total = worker_length(rank_len, lay)
        progress = {"layout": lay, "yielded": min(skip, total)}
        self._progress = progress
        order = EpochOrder(
            self._order_records,
            seed=self.seed,
            epoch=self._epoch,
            shuffle=self.shuffle,
            block_size=self.shuffle_block_size,
        )
        steps = self._steps(order, lay, self._start, skip, total)
        if self.remote or (self.reference is not None and self.reference.remote):
            return self._iter_remote(steps, progress)
        return self._iter_local(steps, progress)

    def _steps(
        self, order: EpochOrder, lay: Layout, start: int, skip: int, total: int
    ) -> Iterator[npt.NDArray[np.int64]]:
        """Global record positions of this worker's samples, at most ``_STEP`` at a time."""
        for t0 in range(skip, total, _STEP):
            t = np.arange(t0, min(total, t0 + _STEP), dtype=np.int64)
            k = start + worker_rank_index(t, lay) * lay.world_size + lay.rank  # order index
            # padding past the end repeats the epoch's first samples (as an uninterrupted run)
            k = np.where(k < order.n, k, (k - order.n) % max(order.n, 1))
            # one step per shuffle block: a remote worker pins the shards of one block at a time
            blocks = k // order.block_size
            for x in np.split(k, np.flatnonzero(np.diff(blocks)) + 1):
                p = order.positions(x)
                yield p if self._select is None else self._select[p]

    def _with_reference(
        self, cache: TeacherCache, p: int, rcache: TeacherCache, rp: int
    ) -> CacheSample:
        """The teacher sample ``(cache, p)`` with its reference record ``(rcache, rp)``, whose
        key is checked (records are matched by key hash: this catches a hash collision)."""
        key, rkey = cache.key_at(p), rcache.key_at(rp)
        if key != rkey:
            raise CacheMismatchError(
                f"StreamingTeacherDataset: the teacher key {key!r} (record {p} of {cache.path}) "
                f"was matched to the record {rp} of the reference cache {self.reference}, whose "
                f"key is {rkey!r} (their key hashes collide, or {key!r} is not in the "
                "reference cache)"
            )
        return CacheSample(cache, p, CacheSample(rcache, rp))

    def _iter_local(
        self, steps: Iterator[npt.NDArray[np.int64]], progress: dict[str, Any]
    ) -> Iterator[CacheSample]:
        cache = self._cache
        if cache is None:  # pragma: no cover - set in __init__ and by unpickling
            cache = self._cache = TeacherCache(self.source)
        ref = self.reference
        for pos in steps:
            if ref is None:
                for p in pos.tolist():
                    progress["yielded"] += 1
                    yield CacheSample(cache, p)
                continue
            assert ref.cache is not None
            for p, rp in zip(pos.tolist(), ref.position_of[pos].tolist(), strict=True):
                sample = self._with_reference(cache, p, ref.cache, rp)
                progress["yielded"] += 1
                yield sample

    def _iter_remote(
        self, steps: Iterator[npt.NDArray[np.int64]], progress: dict[str, Any]
    ) -> Iterator[CacheSample]:
        """Iterate with remote shards: the teacher's (source 0) and/or the reference's (source
        1), planned, prefetched, pinned and released together, shard by shard."""
        ref = self.reference
        stores: dict[int, ShardStore] = {}
        starts: dict[int, npt.NDArray[np.int64]] = {}
        if self.remote:
            stores[0] = self._get_store()
            starts[0] = np.concatenate([[0], np.cumsum(self._shard_records)]).astype(np.int64)
        if ref is not None and ref.remote:
            stores[1], starts[1] = ref.store(), ref.starts
        pool = ThreadPoolExecutor(self.download_threads, thread_name_prefix="target-sft-fetch")
        stop = threading.Event()
        Shard = tuple[int, int]  # (source, shard)
        demanded: set[Shard] = set()
        scheduled: dict[Shard, Future[TeacherCache]] = {}
        # per step: positions per source (global), shard per position per source, shards needed
        Plan = tuple[dict[int, Any], dict[int, Any], list[Shard]]
        ahead: deque[Plan] = deque()

        def plan(pos: npt.NDArray[np.int64]) -> Plan:
            at = {0: pos} if ref is None else {0: pos, 1: ref.position_of[pos]}
            shards: dict[int, Any] = {}
            needed: list[Shard] = []
            for src in stores:
                shard = np.searchsorted(starts[src], at[src], side="right") - 1
                _, first = np.unique(shard, return_index=True)
                shards[src] = shard
                needed += [(src, s) for s in shard[np.sort(first)].tolist()]  # first-use order
            return at, shards, needed

        def schedule(k: Shard) -> None:
            f = scheduled.get(k)
            if f is None or (f.done() and isinstance(f.exception(), NoRoom)):
                scheduled[k] = pool.submit(stores[k[0]].acquire, k[1], lambda: k in demanded, stop)

        def get(k: Shard) -> TeacherCache:
            try:
                return scheduled[k].result()
            except NoRoom:  # prefetched while there was no room: fetch it now, forced
                schedule(k)
                return scheduled[k].result()

        def fill_ahead() -> None:
            # Plan the next steps until they use prefetch_shards shards beyond the current
            # step's (at most _MAX_AHEAD steps), and schedule those downloads.
            current = set(ahead[0][2])
            future: list[Shard] = []
            seen = set(current)
            for _, _, ss in list(ahead)[1:]:
                for k in ss:
                    if k not in seen:
                        seen.add(k)
                        future.append(k)
            while len(future) < self.prefetch_shards and len(ahead) < _MAX_AHEAD:
                nxt = next(steps, None)
                if nxt is None:
                    break
                ahead.append(plan(nxt))
                for k in ahead[-1][2]:
                    if k not in seen:
                        seen.add(k)
                        future.append(k)
            for k in future[: self.prefetch_shards]:
                schedule(k)

        def samples(src: int, at: dict[int, Any], shards: dict[int, Any], caches: Any) -> Any:
            """(cache, local position) of each sample of a step in source ``src``."""
            if src not in stores:  # a local cache: global positions
                cache = self._cache if src == 0 else ref.cache  # type: ignore[union-attr]
                return [(cache, p) for p in at[src].tolist()]
            local = (at[src] - starts[src][shards[src]]).tolist()
            return [(caches[(src, s)], p) for s, p in zip(shards[src].tolist(), local, strict=True)]

        try:
            nxt0 = next(steps, None)
            if nxt0 is not None:
                ahead.append(plan(nxt0))
            while ahead:
                at, shards, needed = ahead[0]
                for k in needed:
                    demanded.add(k)
                    schedule(k)
                fill_ahead()
                caches = {k: get(k) for k in needed}
                teacher = samples(0, at, shards, caches)
                if ref is None:
                    for c, p in teacher:
                        progress["yielded"] += 1
                        yield CacheSample(c, p)
                else:
                    refs = samples(1, at, shards, caches)
                    for (c, p), (rc, rp) in zip(teacher, refs, strict=True):
                        sample = self._with_reference(c, p, rc, rp)
                        progress["yielded"] += 1
                        yield sample
                ahead.popleft()
                if not ahead:
                    nxt = next(steps, None)
                    if nxt is not None:
                        ahead.append(plan(nxt))
                keep = {k for _, _, ss in ahead for k in ss}
                for k in needed:
                    if k not in keep:
                        demanded.discard(k)
                        stores[k[0]].release(k[1])
                        del scheduled[k]
        finally:
            stop.set()
            for k, f in list(scheduled.items()):
                if f.cancel():
                    continue
                try:
                    f.result()
                except BaseException:
                    continue
                stores[k[0]].release(k[1])
            pool.shutdown(wait=True)

    def __repr__(self) -> str:
        return (
            f"StreamingTeacherDataset({self.source!r}, records={self.num_records}, "
            f"shards={len(self._shard_records)}, shuffle={self.shuffle}, seed={self.seed}, "
            f"batch_size={self.batch_size}, drop_last={self.drop_last}, epoch={self._epoch}"
            + ("" if self.key_split is None else f", key_split={self.key_split}")
            + ("" if self.reference is None else f", reference={self.reference}")
            + ")"
        )
