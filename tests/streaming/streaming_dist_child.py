"""One rank of the torchrun tests of tests/streaming/test_streaming_dist.py (not a test module).

Usage: torchrun ... streaming_dist_child.py CACHE OUT PHASE

Every rank iterates its DataLoader (2 workers) and all-reduces once per batch, as DDP does, so
unequal batch counts would hang (the test has a timeout). It writes the keys it saw per epoch.

* phase ``a``: epoch 0 in full, then 5 batches of epoch 1; rank 0 saves the dataset state.
* phase ``b`` (another world size): restore that state, finish epoch 1, run epoch 2 in full, with
  torchdata's StatefulDataLoader.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from streaming_helpers import keys_of
from torch.utils.data import DataLoader

from target_sft import StreamingTeacherDataset

BATCH = 4


def run_epoch(loader, limit=None):
    got, n = [], 0
    for batch in loader:
        t = torch.ones(1)
        dist.all_reduce(t)  # a collective per step: a rank with fewer batches would hang
        assert int(t.item()) == dist.get_world_size()
        got.append(batch)
        n += 1
        if limit is not None and n == limit:
            break
    return got


def main() -> None:
    cache, out, phase = sys.argv[1], sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ds = StreamingTeacherDataset(cache, seed=7, shuffle_block_size=30, batch_size=BATCH)
    assert ds.rank_world() == (rank, world)
    log: dict[str, list] = {}
    if phase == "a":
        dl = DataLoader(
            ds, batch_size=BATCH, num_workers=2, collate_fn=keys_of, multiprocessing_context="fork"
        )
        ds.set_epoch(0)
        log["0"] = run_epoch(dl)
        ds.set_epoch(1)
        log["1"] = run_epoch(dl, limit=5)
        state = ds.state_dict(batches_consumed=5)
        if rank == 0:
            with open(os.path.join(out, "state.json"), "w") as f:
                json.dump(state, f)
    else:
        from torchdata.stateful_dataloader import StatefulDataLoader

        with open(os.path.join(out, "state.json")) as f:
            ds.load_state_dict(json.load(f))
        dl = StatefulDataLoader(
            ds, batch_size=BATCH, num_workers=2, collate_fn=keys_of, multiprocessing_context="fork"
        )
        ds.set_epoch(1)  # the resumed epoch: keeps the position
        log["1"] = run_epoch(dl)
        ds.set_epoch(2)
        log["2"] = run_epoch(dl)
    with open(os.path.join(out, f"{phase}-{rank}.json"), "w") as f:
        json.dump({"world": world, "epochs": log}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
