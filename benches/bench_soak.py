"""Soak: a DataLoader with several workers over TargetSFTCollator for many batches, realistic shapes.

Prints the RSS (VmRSS) of the main process and of every worker after a warm-up and at the end, their
growth, and the batches/s; the figure goes to benches/RESULTS.md. The test suite runs a small form
of the same check (tests/cache/test_soak.py); this one uses Qwen-shaped top-64 records of ~1k tokens.

    python benches/bench_soak.py --workers 4 --batches 3000
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader, RandomSampler

from target_sft import CacheWriter, TargetSFTCollator, TeacherCache
from target_sft.collate import TeacherCacheDataset
from target_sft.testing import synthetic


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=512, help="records in the cache")
    ap.add_argument("--length", type=int, default=1024, help="mean tokens per record")
    ap.add_argument("--batch", type=int, default=8, help="records per batch")
    ap.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    ap.add_argument("--batches", type=int, default=3000, help="batches in all")
    ap.add_argument("--warmup", type=int, default=300, help="batches before the first RSS reading")
    ap.add_argument("--context", default="fork", help="multiprocessing context of the workers")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="tsft-soak-"))
    try:
        records = synthetic.generate_list(
            args.records, mean_length=args.length, length_sigma=0.3, prompt_fraction=0.4, seed=0
        )
        with CacheWriter(
            tmp / "cache", top_k=64, vocab_size=synthetic.QWEN_VOCAB_SIZE, shard_size="16MiB"
        ) as w:
            for r in records:
                w.add(**r.as_kwargs())
        cache = TeacherCache(tmp / "cache")
        ds = TeacherCacheDataset(cache)
        dl = DataLoader(
            ds,
            batch_size=args.batch,
            sampler=RandomSampler(ds, replacement=True, num_samples=args.batch * args.batches),
            num_workers=args.workers,
            collate_fn=TargetSFTCollator(cache, pad_token_id=0),
            multiprocessing_context=args.context,
            timeout=120,
        )
        it = iter(dl)
        pids = [os.getpid(), *(w.pid for w in it._workers)]
        names = ["main", *(f"worker {i}" for i in range(args.workers))]
        before: list[int] = []
        after: list[int] = []
        seen = sup = 0
        t0 = t1 = time.perf_counter()
        for b in it:
            seen += 1
            sup += int((b["labels"] != -100).sum())
            if seen == args.warmup:
                before = [rss_kib(p) for p in pids]
                t1 = time.perf_counter()
            if seen == args.batches:
                after = [rss_kib(p) for p in pids]
        t2 = time.perf_counter()
        print(
            f"{seen} batches of {args.batch} (~{args.length} tokens per record, top-64, compact), "
            f"{args.workers} workers ({args.context}); {seen / (t2 - t0):.1f} batches/s, "
            f"{sup / (t2 - t0):,.0f} supervised tok/s"
        )
        print(f"RSS after {args.warmup} batches -> after {args.batches} batches ({t2 - t1:.0f} s):")
        worst = 0.0
        for name, a, z in zip(names, before, after, strict=True):
            g = (z - a) / a
            worst = max(worst, g)
            print(f"  {name:9s} {a / 1024:8.1f} MiB -> {z / 1024:8.1f} MiB  ({100 * g:+.2f}%)")
        print(f"largest growth: {100 * worst:+.2f}% (bar: < 5%)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
