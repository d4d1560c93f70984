"""Who iterates which samples: the rank × DataLoader-worker partition of the epoch order, and
the (rank, world size) a process iterates as.

Position ``k`` of the epoch order goes to rank ``k % world_size`` (ranks consume the order in
lockstep, so what all ranks consumed is a *prefix* of it); inside a rank, batch ``j`` goes to
worker ``j % num_workers`` (the DataLoader's round robin restores the rank's order). Every rank
gets the same number of samples (docs/STREAMING.md §Partitioning).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["Layout", "rank_length", "resolve_rank_world", "worker_length", "worker_rank_index"]


@dataclass(frozen=True)
class Layout:
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


def rank_length(remaining: int, world: int, batch: int, drop_last: bool) -> int:
    """Samples every rank yields from ``remaining`` samples of the epoch order."""
    if remaining <= 0:
        return 0
    if drop_last:
        return (remaining // (world * batch)) * batch
    return -(-remaining // world)


def worker_length(rank_len: int, lay: Layout) -> int:
    """Samples worker ``lay.worker_id`` yields from a rank stream of ``rank_len`` samples."""
    b, w, nw = lay.batch_size, lay.worker_id, lay.num_workers
    chunks = -(-rank_len // b)
    mine = max(0, -(-(chunks - w) // nw))
    if mine and (chunks - 1) % nw == w:  # this worker holds the last (maybe partial) chunk
        return mine * b - (chunks * b - rank_len)
    return mine * b


def worker_rank_index(t: npt.NDArray[np.int64], lay: Layout) -> npt.NDArray[np.int64]:
    """Index in the rank stream of the worker's ``t``-th sample (batch ``j`` -> worker
    ``j % num_workers``, so the DataLoader's round robin restores the rank stream's order)."""
    b = lay.batch_size
    return (lay.worker_id + (t // b) * lay.num_workers) * b + t % b


def resolve_rank_world(
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
