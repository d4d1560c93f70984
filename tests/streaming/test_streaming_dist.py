"""Real multi-process runs under torchrun (gloo): 2 ranks, then 4 ranks resuming the 2-rank run
mid-epoch. Per epoch, the union of the samples of all ranks is the dataset, each sample once, and
every rank has the same number of batches (a collective per batch would hang otherwise)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter

import pytest
from streaming_helpers import make_cache

N = 200  # divisible by 2 x 4 ranks: no padding, so "once" is exact
CHILD = os.path.join(os.path.dirname(__file__), "streaming_dist_child.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, cache: str, out: str, phase: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        CHILD,
        cache,
        out,
        phase,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]


def flat(batches):
    return [k for b in batches for k in b]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torchrun_2_then_4_ranks_cover_every_epoch_once(tmp_path):
    cache = make_cache(tmp_path / "c", N)
    out = str(tmp_path)
    torchrun(2, cache, out, "a")
    a = [json.loads((tmp_path / f"a-{r}.json").read_text()) for r in range(2)]
    assert [x["world"] for x in a] == [2, 2]

    # epoch 0 on 2 ranks: the dataset once, same batch count on both ranks
    e0 = [x["epochs"]["0"] for x in a]
    assert len(e0[0]) == len(e0[1]) == N // 2 // 4
    assert sorted(flat(e0[0]) + flat(e0[1])) == list(range(N))

    torchrun(4, cache, out, "b")
    b = [json.loads((tmp_path / f"b-{r}.json").read_text()) for r in range(4)]
    assert [x["world"] for x in b] == [4] * 4

    # epoch 1: 5 batches per rank on 2 ranks, then the rest on 4 ranks: the dataset once
    first = [k for x in a for k in flat(x["epochs"]["1"])]
    assert len(first) == 2 * 5 * 4
    rest_counts = {len(x["epochs"]["1"]) for x in b}
    assert rest_counts == {(N - 40) // 4 // 4}
    rest = [k for x in b for k in flat(x["epochs"]["1"])]
    c = Counter(first + rest)
    assert set(c) == set(range(N)) and set(c.values()) == {1}

    # epoch 2 on 4 ranks: once; 50 samples a rank = 12 full batches + 1 of 2 on every rank
    e2 = [x["epochs"]["2"] for x in b]
    assert {len(x) for x in e2} == {13} and {len(x[-1]) for x in e2} == {2}
    assert sorted(k for x in e2 for k in flat(x)) == list(range(N))
    # epochs differ in order (the shuffle depends on the epoch)
    assert flat(e0[0]) != flat(b[0]["epochs"]["2"])[: len(flat(e0[0]))]
