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
from torch.utils.data import DataLoader

from streaming_helpers import keys_of, make_cache
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
