"""A writer killed with SIGKILL mid-build loses nothing it committed, leaves nothing a reader would
accept half-written, and append mode finishes the cache with the same content as one clean run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np

from target_sft import CacheWriter, TeacherCache

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/: conftest's helpers

CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import numpy as np
    from conftest import make_record
    from target_sft import CacheWriter
    rng = np.random.default_rng(7)
    recs = [make_record(i, rng, t=200) for i in range(400)]
    with CacheWriter({path!r}, top_k=8, vocab_size=1000, shard_size=4096, threads=1) as w:
        for i, r in enumerate(recs):
            w.add(**r)
            if i % 10 == 0:
                time.sleep(0.01)
    """
)


def all_records():
    sys.path.insert(0, TESTS)
    from conftest import make_record

    rng = np.random.default_rng(7)
    return [make_record(i, rng, t=200) for i in range(400)]


def test_sigkill_mid_build_then_append_completes(tmp_path):
    path = tmp_path / "cache"
    code = CHILD.format(tests=TESTS, path=str(path))
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 60
    while time.time() < deadline:
        m = path / "manifest.json"
        if m.exists() and len(json.loads(m.read_text())["shards"]) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    # What the reader sees after the crash: committed shards only, all intact.
    c = TeacherCache(path)
    assert not c.info.complete
    n_committed = len(c)
    assert 0 < n_committed < 400
    assert c.verify() == n_committed
    for name in os.listdir(path):
        assert (
            name.endswith(".safetensors")
            or name == "manifest.json"
            or name.startswith((".tmp-", ".lock"))
        )

    # Resume: skip what is there, add the rest.
    recs = all_records()
    with CacheWriter(path, top_k=8, vocab_size=1000, shard_size=4096, mode="append") as w:
        assert w.num_records >= n_committed  # orphan shards committed after the manifest count too
        for r in recs:
            if r["key"] not in w:
                w.add(**r)
    assert not any(n.startswith(".tmp-") for n in os.listdir(path))
    c = TeacherCache(path)
    assert c.info.complete and len(c) == 400 and c.verify() == 400

    # Same content as an uninterrupted build: every field equal, top-k rows equal as id -> value
    # maps (compact rows are ordered by each writer session's id table).
    with CacheWriter(tmp_path / "clean", top_k=8, vocab_size=1000, shard_size=4096) as w:
        for r in recs:
            w.add(**r)
    clean = TeacherCache(tmp_path / "clean")
    for r in recs:
        a, b = c[r["key"]], clean[r["key"]]
        for f in ("input_ids", "labels", "label_logprobs", "label_ranks"):
            assert np.array_equal(getattr(a, f), getattr(b, f)), (r["key"], f)
        oa, ob = np.argsort(a.topk_ids, axis=1), np.argsort(b.topk_ids, axis=1)
        assert np.array_equal(
            np.take_along_axis(a.topk_ids, oa, 1), np.take_along_axis(b.topk_ids, ob, 1)
        )
        assert np.array_equal(
            np.take_along_axis(a.topk_logprobs, oa, 1), np.take_along_axis(b.topk_logprobs, ob, 1)
        )
        assert np.array_equal(np.sort(a.topk_ids, 1), np.sort(r["topk_ids"], 1))
