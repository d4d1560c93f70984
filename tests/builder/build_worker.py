"""A torchrun worker for tests/builder/test_build.py: builds a cache with build_teacher_cache on
every rank. ``--fail-rank R`` makes rank R raise after its second batch (to test failures)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from target_sft.build import build_teacher_cache


def fail_after(n: int):
    """An ``on_batch`` callback raising after the rank's ``n``-th batch (records of earlier
    batches are committed when the writer closes on the error)."""

    def on_batch(stats) -> None:
        if stats.batches >= n:
            raise RuntimeError(f"injected failure after batch {n}")

    return on_batch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--batch-tokens", type=int, default=256)
    p.add_argument("--fail-rank", type=int, default=-1)
    p.add_argument("--rebuild-changed", action="store_true")
    p.add_argument("--drop-last-on-rank", type=int, default=-1, help="that rank reads less data")
    args = p.parse_args()
    torch.set_num_threads(1)
    data = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    rank = int(os.environ.get("RANK", "0"))
    if rank == args.drop_last_on_rank:
        data = data[:-1]
    res = build_teacher_cache(
        args.model,
        data,
        args.out,
        top_k=8,
        codec="exact",
        window=args.window,
        batch_tokens=args.batch_tokens,
        progress=False,
        on_batch=fail_after(2) if rank == args.fail_rank else None,
        rebuild_changed=args.rebuild_changed,
    )
    print(
        f"RANK {res.stats.rank} ADDED {res.stats.records_added} TOTAL {res.info.records}",
        flush=True,
    )


if __name__ == "__main__":
    main()
