"""The ranks of a build: who this process is (``torch.distributed``, ``torchrun``'s environment,
or explicit ``rank``/``world_size``) and the small control messages between ranks, on a gloo
group whatever the training backend."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from target_sft.errors import BuildError, CacheInputError

__all__ = ["Dist", "dist_context", "sync_errors"]


@dataclass
class Dist:
    """This process's place among the ranks of a build, and the collectives the build uses
    (no-ops on one rank)."""

    rank: int
    world: int
    local_rank: int
    group: Any = None  # a gloo process group (None when world == 1)
    owns_default: bool = False

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def close(self) -> None:
        if self.owns_default:
            import torch.distributed as dist

            dist.destroy_process_group()


def dist_context(rank: int | None, world_size: int | None, timeout: timedelta) -> Dist:
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    env_rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        import torch.distributed as dist

        initialised = dist.is_available() and dist.is_initialized()
    except ImportError:  # pragma: no cover - torch without distributed
        initialised = False
    if initialised:
        r, w = dist.get_rank(), dist.get_world_size()
        if (rank is not None and rank != r) or (world_size is not None and world_size != w):
            raise CacheInputError(
                f"rank={rank}, world_size={world_size} were given but torch.distributed says "
                f"rank {r} of {w}; leave them unset under torchrun"
            )
        if w == 1:
            return Dist(0, 1, local_rank)
        # A gloo group for the small control messages, whatever the main backend (NCCL).
        group = dist.new_group(backend="gloo", timeout=timeout)
        return Dist(r, w, local_rank, group)
    r = env_rank if rank is None else rank
    w = env_world if world_size is None else world_size
    if not (0 <= r < w):
        raise CacheInputError(f"rank {r} is not in [0, world_size = {w})")
    if w == 1:
        return Dist(0, 1, local_rank)
    if "MASTER_ADDR" not in os.environ:
        raise CacheInputError(
            f"world_size = {w} but torch.distributed is not initialised and MASTER_ADDR is not "
            "set; launch with torchrun (it sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)"
        )
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=r, world_size=w, timeout=timeout)
    return Dist(r, w, local_rank, dist.group.WORLD, owns_default=True)


def sync_errors(dist: Dist, error: BaseException | None, out: Path) -> BaseException | None:
    """Tell every rank whether this one failed (all ranks call it at the same points). Returns
    this rank's error, or a :class:`BuildError` naming the failed ranks when another failed."""
    if dist.world == 1:
        return error
    reports = dist.all_gather(
        None if error is None else f"{type(error).__name__}: {error}".splitlines()[0]
    )
    failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
    if error is not None or not failed:
        return error
    return BuildError(
        "the build failed on "
        + "; ".join(f"rank {r}: {msg}" for r, msg in failed)
        + f". Committed shards are kept in {out}; run the same command again to resume."
    )
