"""Batch planning: samples grouped into batches by length within windows (:func:`plan_batches`),
and the batches dealt to the ranks (:func:`plan_ranks`). Pure functions of the samples' lengths:
the same dataset gives the same batches whatever the world size."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["plan_batches", "plan_ranks"]


def plan_batches(lengths: Sequence[int], batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Group sample indices into batches: sorted by length (ties by index), filled greedily while
    ``batch size × longest length <= batch_tokens`` and ``batch size <= max_batch_size``. A sample
    longer than ``batch_tokens`` gets a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and ((len(cur) + 1) * lengths[i] > batch_tokens or len(cur) >= max_batch_size):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def plan_ranks(
    lengths: np.ndarray, window: int, batch_tokens: int, max_batch_size: int, world: int
) -> list[list[list[int]]]:
    """Each rank's batches (global sample indices), in the order it runs them.

    Batches are planned per window of ``window`` consecutive samples (:func:`plan_batches`),
    independently of the world size. They are then dealt to ranks window by window, largest
    (padded tokens) first, each to the rank with the fewest padded tokens so far (ties: the lower
    rank), so every rank gets work as soon as there are at least ``world_size`` batches.
    Exception for tiny datasets: when the whole plan has fewer batches than ranks but at least as
    many samples, the batches with the most samples are halved until every rank can get one (the
    batch composition, hence the float noise of the records, then depends on the world size)."""
    n = len(lengths)
    windows: list[list[list[int]]] = []
    for lo in range(0, n, window):
        part = lengths[lo : lo + window].tolist()
        windows.append(
            [[lo + i for i in b] for b in plan_batches(part, batch_tokens, max_batch_size)]
        )
    total = sum(len(w) for w in windows)
    while world > total and n >= world:
        w, b = max(
            ((w, b) for w in range(len(windows)) for b in range(len(windows[w]))),
            key=lambda wb: (len(windows[wb[0]][wb[1]]), -wb[0], -wb[1]),
        )
        big = windows[w][b]
        windows[w][b : b + 1] = [big[: len(big) // 2], big[len(big) // 2 :]]
        total += 1
    load = [0] * world
    out: list[list[list[int]]] = [[] for _ in range(world)]
    for batches in windows:
        padded = [len(b) * int(max(lengths[i] for i in b)) for b in batches]
        owner = [0] * len(batches)
        for j in sorted(range(len(batches)), key=lambda j: (-padded[j], j)):
            r = min(range(world), key=lambda r: (load[r], r))
            owner[j] = r
            load[r] += padded[j]
        for j, batch in enumerate(batches):  # each rank runs its batches in plan order
            out[owner[j]].append(batch)
    return out
