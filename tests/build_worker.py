"""A torchrun worker for tests/test_build.py: builds a cache with build_teacher_cache on every
rank. ``--fail-rank R`` makes rank R's dataset raise after a few items (to test failures)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from target_sft.build import build_teacher_cache


class Failing:
    """A dataset whose item ``at`` raises when the build reads it (only on the rank that should
    fail): on its second read, the first being the input check before the teacher loads."""

    def __init__(self, data: list[dict], at: int) -> None:
        self.data, self.at, self.reads = data, at, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        if i == self.at:
            self.reads += 1
            if self.reads > 1:
                raise RuntimeError(f"injected failure at item {i}")
        return self.data[i]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--batch-tokens", type=int, default=256)
    p.add_argument("--fail-rank", type=int, default=-1)
    args = p.parse_args()
    torch.set_num_threads(1)
    data = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # The failing rank fails in its second window, after committing work of its first.
    at = (rank + world) * args.window
    dataset = Failing(data, at) if rank == args.fail_rank else data
    res = build_teacher_cache(
        args.model,
        dataset,
        args.out,
        top_k=8,
        codec="exact",
        window=args.window,
        batch_tokens=args.batch_tokens,
        progress=False,
    )
    print(
        f"RANK {res.stats.rank} ADDED {res.stats.records_added} TOTAL {res.info.records}",
        flush=True,
    )


if __name__ == "__main__":
    main()
