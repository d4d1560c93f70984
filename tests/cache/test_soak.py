"""Soak: a DataLoader with 2 workers over TargetSFTCollator for 1,100 batches keeps the RSS of the
workers and of the main process flat (growth < 5% after warm-up) and never hangs."""

from __future__ import annotations

import os

import numpy as np
import pytest
from torch.utils.data import DataLoader, RandomSampler

from conftest import make_record
from target_sft import CacheWriter, TargetSFTCollator, TeacherCache
from target_sft.collate import TeacherCacheDataset


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
@pytest.mark.timeout(300)
def test_dataloader_soak_rss_is_flat(tmp_path):
    rng = np.random.default_rng(3)
    with CacheWriter(tmp_path / "c", top_k=8, vocab_size=1000, shard_size="4KiB") as w:
        for i in range(300):
            w.add(**make_record(i, rng, t=16 + i % 40))
    cache = TeacherCache(tmp_path / "c")
    ds = TeacherCacheDataset(cache)
    batches, warm = 1100, 200
    dl = DataLoader(
        ds,
        batch_size=2,
        sampler=RandomSampler(ds, replacement=True, num_samples=2 * batches),
        num_workers=2,
        collate_fn=TargetSFTCollator(cache, pad_token_id=0, packing=True, max_length=96),
        multiprocessing_context="fork",
        timeout=60,  # a hung worker fails the test instead of blocking it
    )
    it = iter(dl)
    pids = [w.pid for w in it._workers]  # torch's worker processes
    assert len(pids) == 2
    seen = tokens = 0
    before: dict[int, int] = {}
    after: dict[int, int] = {}
    for b in it:
        seen += 1
        tokens += int((b["labels"] != -100).sum())
        if seen == warm:
            before = {p: _rss_kib(p) for p in [os.getpid(), *pids]}
        if seen == batches:  # measured before the workers exit
            after = {p: _rss_kib(p) for p in [os.getpid(), *pids]}
    assert seen == batches and tokens > 0
    for p, rss in before.items():
        growth = (after[p] - rss) / rss
        assert growth < 0.05, f"pid {p}: RSS {rss} KiB -> {after[p]} KiB after {batches} batches"
