"""Kill + resume: a training process killed with SIGKILL mid-epoch resumes, in a new process, from
its last checkpoint, and the concatenated sample stream equals the uninterrupted one: through
torchdata's StatefulDataLoader protocol, and through the dataset's own global state with a plain
DataLoader and another worker count."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from streaming_helpers import keys_of, make_cache
from torch.utils.data import DataLoader

from target_sft import StreamingTeacherDataset

KW = dict(seed=9, shuffle_block_size=32, batch_size=4)

TRAIN = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {tests!r})
    import torch
    from streaming_helpers import keys_of
    from torchdata.stateful_dataloader import StatefulDataLoader
    from target_sft import StreamingTeacherDataset
    ds = StreamingTeacherDataset({cache!r}, **{kw!r})
    ds.set_epoch(1)
    dl = StatefulDataLoader(ds, batch_size=4, num_workers=2, collate_fn=keys_of,
                            multiprocessing_context="fork")
    got = []
    for batch in dl:
        got.append(batch)
        ckpt = {{"batches": got, "loader": dl.state_dict(),
                 "dataset": ds.state_dict(batches_consumed=len(got))}}
        torch.save(ckpt, {ckpt!r} + ".tmp")
        os.replace({ckpt!r} + ".tmp", {ckpt!r})  # atomic: a kill never leaves half a checkpoint
        time.sleep(0.05)
    """
)

RESUME = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import torch
    from streaming_helpers import keys_of
    from torch.utils.data import DataLoader
    from torchdata.stateful_dataloader import StatefulDataLoader
    from target_sft import StreamingTeacherDataset
    ckpt = torch.load({ckpt!r}, weights_only=False)
    ds = StreamingTeacherDataset({cache!r}, **{kw!r})
    ds.set_epoch(1)
    if {mode!r} == "loader":
        dl = StatefulDataLoader(ds, batch_size=4, num_workers=2, collate_fn=keys_of,
                                multiprocessing_context="fork")
        dl.load_state_dict(ckpt["loader"])
    else:
        ds.load_state_dict(ckpt["dataset"])
        dl = DataLoader(ds, batch_size=4, num_workers=3, collate_fn=keys_of,
                        multiprocessing_context="fork")
    torch.save(list(dl), {out!r})
    """
)


@pytest.mark.timeout(240)
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    cache = make_cache(tmp_path / "c", 203)
    ckpt = str(tmp_path / "ckpt.pt")
    tests = os.path.dirname(__file__)
    fmt = dict(tests=tests, cache=cache, kw=KW, ckpt=ckpt)
    proc = subprocess.Popen([sys.executable, "-c", TRAIN.format(**fmt)])
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if os.path.exists(ckpt) and len(torch.load(ckpt, weights_only=False)["batches"]) >= 9:
                break
            assert proc.poll() is None, "the training process ended early"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:  # pragma: no cover - only when an assertion fired above
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    saved = torch.load(ckpt, weights_only=False)
    head = saved["batches"]
    d = StreamingTeacherDataset(cache, **KW)
    d.set_epoch(1)
    want = list(DataLoader(d, batch_size=4, collate_fn=keys_of))
    assert 9 <= len(head) < len(want)
    assert head == want[: len(head)]
    for mode in ("loader", "dataset"):
        out = str(tmp_path / f"rest-{mode}.pt")
        code = RESUME.format(**fmt, mode=mode, out=out)
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
        rest = torch.load(out, weights_only=False)
        assert head + rest == want, mode


# ---- repeated kills: 2 ranks x 2 workers, killed and resumed many times --------------------------

LOCKSTEP = textwrap.dedent(
    """
    import itertools, os, sys, time
    sys.path.insert(0, {tests!r})
    import torch
    from streaming_helpers import keys_of
    from torch.utils.data import DataLoader
    from target_sft import StreamingTeacherDataset
    ckpt = {ckpt!r}
    saved = torch.load(ckpt, weights_only=False) if os.path.exists(ckpt) else None
    loaders = []
    for rank in range(2):
        ds = StreamingTeacherDataset({cache!r}, rank=rank, world_size=2, **{kw!r})
        ds.set_epoch(1)
        if saved is not None:
            ds.load_state_dict(saved["state"])
        loaders.append((ds, DataLoader(ds, batch_size=3, num_workers=2, collate_fn=keys_of,
                                       multiprocessing_context="fork")))
    steps = [] if saved is None else saved["steps"]
    for n, step in enumerate(itertools.zip_longest(*(dl for _, dl in loaders)), start=1):
        steps.append(step)
        # ranks move in lockstep (as under DDP); rank 0's global state resumes both
        state = loaders[0][0].state_dict(batches_consumed=n)
        torch.save({{"steps": steps, "state": state}}, ckpt + ".tmp")
        os.replace(ckpt + ".tmp", ckpt)
        print("STEP", len(steps), flush=True)
        time.sleep(0.03)
    print("DONE", flush=True)
    """
)


@pytest.mark.timeout(900)
def test_two_ranks_two_workers_killed_and_resumed_repeatedly(tmp_path):
    """A training run of 2 ranks x 2 DataLoader workers killed with SIGKILL K times at random steps
    and resumed each time from its last checkpoint yields, per rank, exactly the uninterrupted
    stream. K = 5 here; TSFT_KILLS=20 runs the long form."""
    import random

    kills = int(os.environ.get("TSFT_KILLS", "5"))
    kw = dict(seed=3, shuffle_block_size=16, batch_size=3)
    cache = make_cache(tmp_path / "c", 20 * kills + 40)
    ckpt = str(tmp_path / "ckpt.pt")
    code = LOCKSTEP.format(tests=os.path.dirname(__file__), cache=cache, kw=kw, ckpt=ckpt)
    rng = random.Random(5)
    done = 0
    for attempt in range(kills + 1):
        proc = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, bufsize=1
        )
        try:
            target = rng.randint(1, 3) if attempt < kills else None
            new = 0
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("STEP"):
                    new += 1
                    if target is not None and new >= target:
                        proc.send_signal(signal.SIGKILL)
                        break
                if line.startswith("DONE"):
                    break
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:  # pragma: no cover - only when an assertion fired above
                proc.kill()
        if target is not None:
            assert proc.returncode == -signal.SIGKILL, f"attempt {attempt} ended before its kill"
            done += 1
        else:
            assert proc.returncode == 0
    assert done == kills
    steps = torch.load(ckpt, weights_only=False)["steps"]
    for rank in range(2):
        d = StreamingTeacherDataset(cache, rank=rank, world_size=2, **kw)
        d.set_epoch(1)
        want = list(DataLoader(d, batch_size=3, collate_fn=keys_of))
        got = [s[rank] for s in steps if s[rank] is not None]
        assert got == want, rank
