"""Recycled shared memory for batches built in DataLoader workers (used by TargetSFTCollator).

torch hands a tensor from a worker to the main process as a handle on shared memory. A collator
that writes every batch into new shared memory pays for faulting in fresh pages each time: on
the benchmark VM 16 ms for a 17 MB batch, more than building it (benches/RESULTS.md). A worker
therefore keeps a few *slots* of shared memory and writes a batch into a slot only once every
tensor of the previous batch in that slot is gone, in whatever process held it:

1. the worker marks the slot busy (counter -1) before filling it;
2. when the batch is pickled (by the queue's feeder thread, possibly after the worker moved on),
   the counter is set to the number of distinct storages the batch's tensors use;
3. unpickling in the receiving process attaches a finalizer to each of those storages: torch
   keeps one Python object per storage for as long as any tensor or view uses it, so the
   finalizer runs when the last one is gone; each finalizer decrements the counter;
4. the worker reuses a slot whose counter is 0. When no slot is free (the consumer keeps old
   batches) the batch goes to ordinary memory, which torch copies into new shared memory when
   sending it: the worker never waits and never overwrites.

A batch is released when the process that unpickled it drops it; a consumer that forwards the
tensors to yet another process must copy them first (DataLoader pinning and ``.to(device)`` do).
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

import torch

__all__ = ["PooledBatch", "SlotPool", "worker_pool"]

_BUSY = -1
_HEADROOM = 1.25  # storages grow to 1.25x the request, so batches of varying length fit
_decrement_lock = threading.Lock()


def _storages(obj: Any, out: dict[int, Any]) -> None:
    """Distinct non-empty storages of the tensors in ``obj`` (dicts, lists, tuples), by id."""
    if isinstance(obj, torch.Tensor):
        s = obj.untyped_storage()
        if s.nbytes() > 0:
            out.setdefault(id(s), s)
    elif isinstance(obj, dict):
        for v in obj.values():
            _storages(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _storages(v, out)


def _preserves_storage_objects() -> bool:
    t = torch.empty(1)
    return t.untyped_storage() is t.untyped_storage()


def _release(counter: Any, slot: int) -> None:
    with _decrement_lock:
        counter[slot] -= 1


def _rebuild(data: dict[str, Any], counter: torch.Tensor, slot: int) -> dict[str, Any]:
    """Unpickling side: a plain dict of the batch, with the slot released when it is gone."""
    counts = counter.numpy()
    found: dict[int, Any] = {}
    _storages(data, found)
    for s in found.values():
        weakref.finalize(s, _release, counts, slot)
    return data


class PooledBatch(dict):  # type: ignore[type-arg]
    """A batch written into a slot of a worker's :class:`SlotPool` (a dict of tensors). It
    pickles as a plain dict whose unpickling arranges the slot's release."""

    def __init__(self, data: dict[str, Any], pool: SlotPool, slot: int) -> None:
        super().__init__(data)
        self._pool = pool
        self._slot = slot
        self._sent = False

    def __reduce__(self) -> Any:
        if self._sent:
            # pickled again (not what a DataLoader does): send copies, the slot is counted once
            copies = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self.items()}
            return (dict, (copies,))
        self._sent = True
        found: dict[int, Any] = {}
        _storages(dict(self), found)
        self._pool.counts[self._slot] = len(found)
        return (_rebuild, (dict(self), self._pool.counter, self._slot))


class SlotPool:
    """Per-process slots of shared memory, each one storage holding a whole batch."""

    def __init__(self, max_slots: int) -> None:
        self.max_slots = max_slots
        self.counter = torch.zeros(max(1, max_slots), dtype=torch.int32).share_memory_()
        self.counts = self.counter.numpy()
        self.slots: list[dict[str, Any]] = []
        self.allocations = 0  # shared-memory storages created, for tests
        self.enabled = (
            max_slots > 0
            and hasattr(torch.UntypedStorage, "_new_shared")
            and _preserves_storage_objects()
        )

    def acquire(self) -> int | None:
        """A free slot, marked busy, or ``None`` when every slot is in use."""
        if not self.enabled:
            return None
        for i in range(len(self.slots)):
            if self.counts[i] == 0:
                self.counts[i] = _BUSY
                return i
        if len(self.slots) < self.max_slots:
            self.slots.append({})
            self.counts[len(self.slots) - 1] = _BUSY
            return len(self.slots) - 1
        return None

    def abandon(self, slot: int) -> None:
        """Give a slot back that will not be sent (the batch failed to build)."""
        self.counts[slot] = 0

    def reserve(self, slot: int, nbytes: int) -> Any:
        """The slot's storage, grown to at least ``nbytes`` (all outputs of a batch live in one
        storage, so the batch crosses to the main process as one handle)."""
        storage = self.slots[slot].get("storage")
        if storage is None or storage.nbytes() < nbytes:
            self.allocations += 1
            storage = torch.UntypedStorage._new_shared(int(nbytes * _HEADROOM) + 4096)
            self.slots[slot]["storage"] = storage
        return storage


def view(storage: Any, offset: int, shape: tuple[int, ...], dtype: Any) -> Any:
    """A contiguous tensor of ``shape`` at byte ``offset`` of ``storage``."""
    assert offset % dtype.itemsize == 0
    return torch.empty(0, dtype=dtype).set_(storage, offset // dtype.itemsize, shape)


_POOL: tuple[int, SlotPool] | None = None


def worker_pool(max_slots: int) -> SlotPool:
    """This process's pool (a forked worker gets its own, not the parent's)."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid() or _POOL[1].max_slots != max_slots:
        _POOL = (os.getpid(), SlotPool(max_slots))
    return _POOL[1]
