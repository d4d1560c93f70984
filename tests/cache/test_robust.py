"""A damaged or contested cache never yields wrong data (issue 17, part "robust"): sizes read from
a shard are validated before anything is allocated, writers of one directory exclude each other
(real processes, kill -9 included), and bad arguments get errors naming the argument."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from build_helpers import reseal_shard
from conftest import make_record
from target_sft import (
    CacheCorruptionError,
    CacheInputError,
    CacheKeyError,
    CacheLockedError,
    CacheWriter,
    TeacherCache,
)

ROOT = Path(__file__).resolve().parents[2]
FIELDS = ("input_ids", "labels", "topk_ids", "topk_logprobs", "label_logprobs", "label_ranks")


def _records(n: int, seed: int = 7, start: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [make_record(start + i, rng, t=20 + i % 7) for i in range(n)]


def _write(path: Path, recs: list[dict], **kw) -> None:
    kw.setdefault("top_k", 8)
    kw.setdefault("vocab_size", 1000)
    with CacheWriter(path, **kw) as w:
        for r in recs:
            w.add(**r)


def _index_field_offset(shard: Path, record: int, column: int) -> int:
    """File offset of ``record_index[record, column]`` (safetensors layout: u64 header length,
    JSON header, data; FORMAT.md §Shard)."""
    raw = shard.read_bytes()
    hlen = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + hlen])
    start = header["record_index"]["data_offsets"][0]
    return 8 + hlen + start + (record * 5 + column) * 8


def _patch_u64(path: Path, offset: int, value: int, reseal: bool = False) -> int:
    """Overwrite a u64 of a shard; with ``reseal``, recompute the shard's region checksums over
    the damage (as a writer that wrote it would have), so that the checks behind them are met."""
    b = bytearray(path.read_bytes())
    old = int.from_bytes(b[offset : offset + 8], "little")
    b[offset : offset + 8] = value.to_bytes(8, "little")
    if reseal:
        reseal_shard(b)
    path.write_bytes(bytes(b))
    return old


# ---- 1. validate before allocating ------------------------------------------------------------

_BOUNDED_CHILD = textwrap.dedent(
    """
    import resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    from target_sft import CacheCorruptionError, TargetSFTCollator, TeacherCache, build_batch
    from target_sft.cache import CacheSample
    cache = TeacherCache(sys.argv[1])
    t0 = time.perf_counter()
    for what, call in [
        ("collator", lambda: TargetSFTCollator(cache, pad_token_id=0, return_tensors="np")(
            [CacheSample(cache, i) for i in range(8)])),
        ("build_batch", lambda: build_batch([CacheSample(cache, i) for i in range(8)], threads=2)),
        ("record_at", lambda: cache.record_at(2)),
        ("get", lambda: cache.get(cache.key_at(2))),
    ]:
        try:
            call()
        except CacheCorruptionError as e:
            print(what, "CORRUPT", e)
        else:
            print(what, "NO ERROR")
    print("SECONDS", time.perf_counter() - t0)
    """
)


@pytest.mark.parametrize("reseal", [False, True], ids=["as-damaged", "checksums-recomputed"])
@pytest.mark.parametrize("codec", ["exact", "compact"])
@pytest.mark.parametrize(
    ("column", "field", "value"),
    [(2, "n_tokens", 1 << 28), (2, "n_tokens", 1 << 62), (3, "n_supervised", 1 << 40)],
)
def test_damaged_index_field_is_corruption_before_any_allocation(
    tmp_path, codec, column, field, value, reseal
):
    """One flipped token count in the record index used to make every DataLoader worker allocate
    outputs sized by it (8 GiB per teacher array for 8 samples). Under a 2 GiB address-space
    limit every read path must now raise CacheCorruptionError naming the shard and the region
    (the record_index checksum, docs/FORMAT.md §7), and, with checksums recomputed over the
    damage (a writer's bug), the record and the field (§8)."""
    path = tmp_path / "c"
    _write(path, _records(10), codec=codec)
    shard = next(path.glob("*.safetensors"))
    _patch_u64(shard, _index_field_offset(shard, 2, column), value, reseal=reseal)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    out = subprocess.run(
        [sys.executable, "-c", _BOUNDED_CHILD, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    for what in ("collator", "build_batch", "record_at", "get"):
        (line,) = [x for x in lines if x.startswith(what + " ")]
        assert " CORRUPT " in line, line
        if reseal:
            assert shard.name in line and "record 2" in line and field in line, line
        else:
            assert shard.name in line and "region record_index" in line, line
    assert float(lines[-1].split()[1]) < 10


def test_undamaged_records_of_a_damaged_shard_still_read(tmp_path):
    path = tmp_path / "c"
    recs = _records(6)
    _write(path, recs, codec="exact")
    shard = next(path.glob("*.safetensors"))
    _patch_u64(shard, _index_field_offset(shard, 4, 2), 10**12)
    with pytest.raises(CacheCorruptionError, match="region record_index fails its checksum"):
        TeacherCache(path).record_at(3)  # a damaged index: the shard is refused as a whole
    _patch_u64(shard, _index_field_offset(shard, 4, 2), 10**12, reseal=True)  # a writer's bug
    c = TeacherCache(path)
    got = c.record_at(3)
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(got, f), recs[3][f])
    with pytest.raises(CacheCorruptionError, match=r"record 4.*n_tokens"):
        c.record_at(4)


# ---- 2. writers exclude each other (real processes) -------------------------------------------

_WRITER_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[4])
    import numpy as np
    from conftest import make_record
    from target_sft import CacheWriter
    path, first, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    flag = Path(path + ".ready")
    rng = np.random.default_rng(first)
    w = CacheWriter(path, top_k=8, vocab_size=1000, mode="append", shard_size=sys.argv[5],
                    codec="exact", threads=1)
    for i in range(n):
        w.add(**make_record(first + i, rng, t=20 + i % 7))
        if i == n // 2:
            flag.write_text("ready")
            while Path(path + ".go").exists() is False and Path(path + ".hang").exists() is False:
                time.sleep(0.02)
            while Path(path + ".hang").exists():
                time.sleep(0.02)
    w.close()
    print("CLOSED", flush=True)
    """
)


def _start_writer(path: Path, first: int, n: int, shard_size: str = "600") -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    args = [str(path), str(first), str(n), str(ROOT / "tests"), shard_size]
    p = subprocess.Popen(
        [sys.executable, "-c", _WRITER_CHILD, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not Path(str(path) + ".ready").exists():
        assert p.poll() is None, p.stderr.read() if p.stderr else ""
        assert time.monotonic() < deadline, "the writer did not start"
        time.sleep(0.05)
    return p


def _expected(first: int, n: int) -> dict:
    rng = np.random.default_rng(first)
    return {first + i: make_record(first + i, rng, t=20 + i % 7) for i in range(n)}


def _assert_cache_holds(path: Path, expected: dict) -> None:
    c = TeacherCache(path)
    assert c.verify() == len(expected)
    assert sorted(c.keys()) == sorted(expected)
    for k, r in expected.items():
        got = c[k]
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(got, f), r[f])


def test_second_writer_is_refused_while_the_first_writes(tmp_path):
    path = tmp_path / "c"
    a = _start_writer(path, 0, 40)
    try:
        # the same prefix (append), and a writer of manifest.json with another prefix: refused
        for kw in ({"mode": "append"}, {"mode": "append", "shard_prefix": "other"}):
            with pytest.raises(CacheLockedError, match=rf"pid {a.pid}@") as e:
                CacheWriter(path, top_k=8, vocab_size=1000, codec="exact", **kw)
            assert "wait=True" in str(e.value) and "since 20" in str(e.value)
        # and a build rank beside it (shared directory lock vs the writer's exclusive one)
        with pytest.raises(CacheLockedError):
            CacheWriter(
                path,
                top_k=8,
                vocab_size=1000,
                codec="exact",
                mode="append",
                shard_prefix="rank00000-of-00001",
                manifest_name="manifest.rank00000-of-00001.json",
            )
        # waiting: a bounded wait that expires names how long it waited
        t0 = time.monotonic()
        with pytest.raises(CacheLockedError, match="waited"):
            CacheWriter(path, top_k=8, vocab_size=1000, codec="exact", mode="append", wait=0.3)
        assert time.monotonic() - t0 >= 0.3
        (tmp_path / "c.go").write_text("go")
        # a waiting writer proceeds once the holder is done
        with CacheWriter(
            path, top_k=8, vocab_size=1000, codec="exact", mode="append", wait=60
        ) as b:
            assert a.wait(timeout=60) == 0, a.stderr.read() if a.stderr else ""
            rng = np.random.default_rng(1000)
            for i in range(10):
                b.add(**make_record(1000 + i, rng, t=20 + i % 7))
    finally:
        a.kill()
        a.wait()
    _assert_cache_holds(path, {**_expected(0, 40), **_expected(1000, 10)})


def test_kill_9_of_the_holder_frees_the_lock_and_the_resume_is_exact(tmp_path):
    path = tmp_path / "c"
    (tmp_path / "c.hang").write_text("hang")
    a = _start_writer(path, 0, 40)
    with pytest.raises(CacheLockedError, match=rf"pid {a.pid}@"):
        CacheWriter(path, top_k=8, vocab_size=1000, codec="exact", mode="append")
    os.kill(a.pid, signal.SIGKILL)
    a.wait()
    assert (path / ".lock-shard").exists()  # left behind, and no obstacle
    committed = TeacherCache(path)
    kept = sorted(committed.keys())
    assert kept == list(range(len(kept))) and len(kept) <= 21
    expected = _expected(0, 40)
    with CacheWriter(path, top_k=8, vocab_size=1000, codec="exact", mode="append") as w:
        for k in range(40):
            if k not in w:
                w.add(**expected[k])
    _assert_cache_holds(path, expected)


def test_a_build_beside_a_live_writer_is_refused_at_start_then_waits(tmp_path):
    """A CacheWriter of manifest.json and a build of the same directory never both proceed: the
    build's rank is refused when it starts (naming the writer's pid), or waits when asked."""
    import torch

    from target_sft import build_teacher_cache

    path = tmp_path / "c"
    emb = torch.randn(1000, 1000, generator=torch.Generator().manual_seed(3))

    def bigram(input_ids, attention_mask=None):
        return emb[input_ids]

    rng = np.random.default_rng(0)
    data = [{"id": 5000 + i, "input_ids": rng.integers(0, 1000, 12).tolist()} for i in range(6)]
    kw = dict(top_k=8, codec="exact", progress=False)
    a = _start_writer(path, 0, 10, shard_size="1MiB")  # nothing committed yet
    try:
        with pytest.raises(CacheLockedError, match=rf"pid {a.pid}@"):
            build_teacher_cache(bigram, data, path, **kw)
        with pytest.raises(CacheLockedError, match="waited"):
            build_teacher_cache(bigram, data, path, wait=0.2, **kw)
    finally:
        (tmp_path / "c.go").write_text("go")
        assert a.wait(timeout=60) == 0
    # the writer finished undisturbed: its records are all there
    _assert_cache_holds(path, _expected(0, 10))


# ---- 3. bad arguments name the argument ----------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"shard_size": "12 parsecs"}, r"shard_size = '12 parsecs' is not a size"),
        ({"shard_size": -5}, r"shard_size = -5 must be in \[1, "),
        ({"shard_size": 0}, r"shard_size = 0 must be in \[1, "),
        ({"shard_size": "-1MiB"}, r"shard_size = '-1MiB' is not a size"),
        ({"shard_size": 2.5}, r"shard_size must be an int"),
        ({"threads": -1}, r"threads = -1 must be in \[0, 4096\]"),
        ({"threads": "4"}, r"threads must be an int"),
        ({"top_k": True}, r"top_k must be an int"),
        ({"vocab_size": 0}, r"vocab_size = 0 must be in"),
        ({"zstd_level": 99}, r"zstd_level = 99 must be in \[-7, 22\]"),
        ({"prior_records": 0}, r"prior_records = 0 must be >= 1"),
        ({"shard_prefix": 3}, r"shard_prefix must be a str"),
        ({"wait": -1}, r"wait must be False"),
        ({"wait": "yes"}, r"wait must be False"),
    ],
)
def test_writer_arguments_are_named(tmp_path, kw, message):
    kw = {"top_k": 8, "vocab_size": 1000, **kw}
    with pytest.raises(CacheInputError, match=message):
        CacheWriter(tmp_path / "c", **kw)


def test_sizes_parse():
    from target_sft.checks import parse_size

    assert parse_size("256MiB") == 256 << 20
    assert parse_size("1.5 GB") == 1_500_000_000
    assert parse_size(" 4096 ") == 4096
    assert parse_size("2kib") == 2048


def test_reader_positions_are_checked_and_named(tmp_path):
    path = tmp_path / "c"
    _write(path, _records(5))
    c = TeacherCache(path)
    with pytest.raises(CacheKeyError, match=r"position = -1 is out of range.*5 records"):
        c.record_at(-1)
    with pytest.raises(CacheKeyError, match=r"position = 5 is out of range"):
        c.record_at(5)
    with pytest.raises(CacheInputError, match=r"position must be an int, got '1'"):
        c.record_at("1")
    with pytest.raises(CacheKeyError, match=r"position = -2 is out of range"):
        c.key_at(-2)
    with pytest.raises(CacheKeyError, match=r"positions\[2\] = 9 is out of range"):
        c.records_at([0, 1, 9])
    with pytest.raises(CacheInputError, match=r"positions\[1\] must be an int"):
        c.records_at([0, 1.0])
    with pytest.raises(CacheInputError, match=r"threads = -1 must be in"):
        c.records_at([0], threads=-1)
    with pytest.raises(CacheInputError, match=r"chunk = 0 must be >= 1"):
        list(c.keys(chunk=0))
    assert [r.key for r in c.records_at(np.array([4, 0]))] == [4, 0]


def test_collator_and_stream_arguments_are_named(tmp_path):
    from target_sft import StreamingTeacherDataset, TargetSFTCollator, build_batch
    from target_sft.cache import CacheSample

    path = tmp_path / "c"
    _write(path, _records(5))
    c = TeacherCache(path)
    for kw, message in [
        ({"threads": "2"}, r"threads must be an int"),
        ({"threads": -3}, r"threads = -3 must be in"),
        ({"max_length": "64"}, r"max_length must be an int"),
        ({"max_length": 0}, r"max_length = 0 must be >= 1"),
        ({"pad_to_multiple_of": 0}, r"pad_to_multiple_of = 0 must be >= 1"),
        ({"shared_memory_slots": -1}, r"shared_memory_slots = -1 must be >= 0"),
    ]:
        with pytest.raises(CacheInputError, match=message):
            TargetSFTCollator(c, pad_token_id=0, **kw)
    with pytest.raises(CacheInputError, match=r"threads = -1 must be in"):
        build_batch([CacheSample(c, 0)], threads=-1)
    with pytest.raises(CacheInputError, match=r"batch_size = 0 must be >= 1"):
        StreamingTeacherDataset(path, batch_size=0)
    with pytest.raises(CacheInputError, match=r"cache_limit = '5 bananas' is not a size"):
        StreamingTeacherDataset("s3://bucket/x", cache_limit="5 bananas")
