"""Remote shards over real HTTP (a ThreadingHTTPServer on 127.0.0.1): a good read equals the
local stream; a truncated, corrupted, missing or cut-off shard is a clear error and nothing of it
is used or kept; the node-local directory stays under its size limit with the shards in use
pinned; processes sharing one local directory download every shard once."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from streaming_helpers import keys_of, make_cache
from torch.utils.data import DataLoader

from target_sft import (
    CacheCorruptionError,
    CacheError,
    CacheFormatError,
    CacheIOError,
    StreamingTeacherDataset,
)

N = 120


class Handler(SimpleHTTPRequestHandler):
    """Serves a directory; counts GETs per path; for /cutoff/<one shard> it announces the whole
    file but closes the connection half way."""

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        with self.server.lock:
            self.server.gets[self.path] += 1
        if self.path == f"/cutoff/{self.server.cutoff_file}":
            data = Path(self.translate_path(self.path)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    good = make_cache(root / "good", N)
    for name in ("trunc", "corrupt", "missing", "cutoff"):
        shutil.copytree(good, root / name)
    shards = json.loads((root / "good" / "manifest.json").read_text())["shards"]
    victim = shards[3]["file"]  # an early shard of the unshuffled order
    p = root / "trunc" / victim
    p.write_bytes(p.read_bytes()[:-100])
    p = root / "corrupt" / victim
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x40
    p.write_bytes(bytes(b))
    (root / "missing" / victim).unlink()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    httpd.lock, httpd.gets, httpd.cutoff_file = threading.Lock(), Counter(), victim
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield types_ns(url=url, root=root, httpd=httpd, shards=shards, victim=shards[3])
    httpd.shutdown()
    httpd.server_close()


def types_ns(**kw):
    import types

    return types.SimpleNamespace(**kw)


def entries(local: Path) -> list[str]:
    return sorted(p.name for p in local.iterdir() if not p.name.startswith("."))


def temp_files(local: Path) -> list[str]:
    return sorted(p.name for p in local.iterdir() if p.name.startswith((".tmp-", ".evict-")))


def used_bytes(local: Path) -> int:
    """Bytes of every file under ``local`` but the lock files, measured under the node's
    ``space`` lock (commits and evictions take it, so no rename is seen half done)."""
    (local / ".locks").mkdir(parents=True, exist_ok=True)
    fd = os.open(local / ".locks" / "space", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        total = 0
        for top, dirs, files in os.walk(local):
            dirs[:] = [d for d in dirs if d != ".locks"]
            total += sum(os.stat(os.path.join(top, f)).st_size for f in files)
        return total
    finally:
        os.close(fd)


@pytest.mark.timeout(120)
def test_remote_stream_equals_local_stream(server, tmp_path):
    make_kw = dict(seed=5, shuffle_block_size=25, batch_size=4)
    want = [s.key for s in StreamingTeacherDataset(server.root / "good", **make_kw)]
    d = StreamingTeacherDataset(f"{server.url}/good", local_dir=tmp_path / "l", **make_kw)
    samples = list(d)
    assert [s.key for s in samples] == want
    ref = StreamingTeacherDataset(server.root / "good", shuffle=False)
    by_key = {s.key: s for s in ref}
    for s in samples[:: N // 10]:  # decoded records are the same
        a, b = s.record(), by_key[s.key].record()
        assert np.array_equal(a.topk_ids, b.topk_ids) and np.array_equal(a.labels, b.labels)
    # every shard was committed once, as a valid single-shard cache named by its checksum
    hexes = sorted(s["checksum"][9:] for s in server.shards)
    assert entries(tmp_path / "l") == hexes and temp_files(tmp_path / "l") == []
    for s in server.shards:
        one = json.loads((tmp_path / "l" / s["checksum"][9:] / "manifest.json").read_text())
        assert one["shards"] == [s] and one["num_records"] == s["records"]
    # a second pass (and DataLoader workers) read the node-local copies: no new download
    before = sum(v for k, v in server.httpd.gets.items() if k.startswith("/good/shard"))
    d.set_epoch(1)
    dl = DataLoader(
        d, batch_size=4, num_workers=2, collate_fn=keys_of, multiprocessing_context="fork"
    )
    got = [k for b in dl for k in b]
    assert got == [s.key for s in StreamingTeacherDataset(server.root / "good", epoch=1, **make_kw)]
    after = sum(v for k, v in server.httpd.gets.items() if k.startswith("/good/shard"))
    assert after == before == len(server.shards)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("name", "error", "patterns"),
    [
        (
            "trunc",
            CacheCorruptionError,
            ["wrong size", "downloaded {got} bytes", "lists {bytes} bytes"],
        ),
        (
            "corrupt",
            CacheCorruptionError,
            ["corrupted", "lists {checksum}", "checksum is xxh3-128:"],
        ),
        ("missing", CacheIOError, ["does not exist"]),
        ("cutoff", CacheError, []),
    ],
)
def test_bad_remote_shard_is_a_clear_error_and_is_not_kept(server, tmp_path, name, error, patterns):
    v = server.victim
    local = tmp_path / "l"
    d = StreamingTeacherDataset(
        f"{server.url}/{name}",
        shuffle=False,
        shuffle_block_size=5,  # shards are pinned one block of 5 records at a time
        local_dir=local,
        download_retries=1,
    )
    first = sum(s["records"] for s in server.shards[:3])
    seen = []
    with pytest.raises(error) as ei:
        for s in d:
            seen.append(s.key)
    msg = str(ei.value)
    assert f"{server.url}/{name}/{v['file']}" in msg  # names the URL
    fmt = {"bytes": v["bytes"], "got": v["bytes"] - 100, "checksum": v["checksum"]}
    for p in patterns:
        assert p.format(**fmt) in msg, msg
    # the good shards before it were read; nothing of the bad one was yielded
    assert seen == list(range(len(seen))) and first - 5 < len(seen) <= first
    assert v["checksum"][9:] not in entries(local)  # nor kept
    assert temp_files(local) == []
    assert server.httpd.gets[f"/{name}/{v['file']}"] == 2  # one retry


def test_missing_or_bad_manifest(server, tmp_path):
    with pytest.raises(CacheFormatError, match=r"nothere/manifest\.json does not exist"):
        StreamingTeacherDataset(f"{server.url}/nothere", local_dir=tmp_path)
    bad = server.root / "badver"
    bad.mkdir(exist_ok=True)
    m = json.loads((server.root / "good" / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(CacheError, match="newer"):
        StreamingTeacherDataset(f"{server.url}/badver", local_dir=tmp_path)
    # one flipped byte in a field readers use: refused by the manifest's seal (FORMAT.md §1)
    flipped = server.root / "flipped"
    flipped.mkdir(exist_ok=True)
    raw = (server.root / "good" / "manifest.json").read_bytes()
    at = raw.index(b'"num_tokens": ') + len(b'"num_tokens": ')
    (flipped / "manifest.json").write_bytes(raw[:at] + bytes([raw[at] ^ 0x01]) + raw[at + 1 :])
    with pytest.raises(CacheCorruptionError, match=r"flipped/manifest\.json: region manifest body"):
        StreamingTeacherDataset(f"{server.url}/flipped", local_dir=tmp_path)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("limit_shards", [6, 0])
def test_size_limit_holds_with_pinned_shards(server, tmp_path, monkeypatch, limit_shards):
    local = tmp_path / "l"
    sizes = [s["bytes"] for s in server.shards]
    per_entry = max(sizes) + 4096  # shard + its small manifest
    limit = limit_shards * per_entry
    d = StreamingTeacherDataset(
        f"{server.url}/good",
        seed=1,
        shuffle_block_size=8,  # a block spans 2-3 shards
        local_dir=local,
        cache_limit=limit,
        prefetch_shards=2,
    )
    store_box = {}
    real = d._get_store

    def spy():
        store_box["s"] = real()
        return store_box["s"]

    monkeypatch.setattr(d, "_get_store", spy)
    peak = {"used": 0}
    done = threading.Event()

    def watch():  # sample the directory from another thread too
        while not done.is_set():
            if local.exists():
                peak["used"] = max(peak["used"], used_bytes(local))
            time.sleep(0.001)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    keys = []
    try:
        for s in d:
            keys.append(s.key)
            store = store_box["s"]
            used = used_bytes(local)
            pinned = len(store._held) * per_entry
            # the limit holds; beyond it only what is pinned and the one demanded download
            assert used <= max(limit, pinned + per_entry), (used, limit, pinned)
    finally:
        done.set()
        t.join()
    assert sorted(keys) == list(range(N))
    if limit:
        assert peak["used"] <= limit
        assert used_bytes(local) <= limit and len(entries(local)) < len(server.shards)  # evicted
    assert store_box["s"].downloads >= len(server.shards)
    assert temp_files(local) == []


def test_stale_temp_of_a_killed_process_is_removed(server, tmp_path):
    local = tmp_path / "l"
    (local / ".locks").mkdir(parents=True)
    h = server.shards[0]["checksum"][9:]
    stale = local / f".tmp-{h}-999999999-12345-deadbeef"
    stale.mkdir()
    (stale / "x").write_bytes(b"partial")
    d = StreamingTeacherDataset(
        f"{server.url}/good", shuffle=False, local_dir=local, cache_limit="1MiB"
    )
    assert sorted(s.key for s in d) == list(range(N))  # its 1 GB reservation did not count
    assert not stale.exists() and temp_files(local) == []


CHILD = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    from streaming_helpers import keys_of
    from torch.utils.data import DataLoader
    from target_sft import StreamingTeacherDataset
    d = StreamingTeacherDataset({url!r}, seed=2, shuffle_block_size=16, batch_size=4,
                                local_dir={local!r}, cache_limit={limit!r}, prefetch_shards=3,
                                download_threads=1)
    dl = DataLoader(d, batch_size=4, num_workers=2, collate_fn=keys_of,
                    multiprocessing_context={method!r})
    json.dump([k for b in dl for k in b], open({out!r}, "w"))
    """
)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("limited", [False, True])
def test_processes_sharing_a_local_dir(server, tmp_path, limited):
    """Two training processes of a node (2 DataLoader workers each, one forked, one spawned)
    share one local directory: without a limit every shard is downloaded once; with a limit
    that holds only a few shards (all pinned by someone most of the time) nobody deadlocks."""
    server.httpd.gets.clear()
    local = tmp_path / "shared"
    limit = 8 * (max(s["bytes"] for s in server.shards) + 4096) if limited else None
    procs = []
    for i, method in enumerate(["fork", "spawn"]):
        code = CHILD.format(
            tests=os.path.dirname(__file__),
            url=f"{server.url}/good",
            local=str(local),
            limit=limit,
            method=method,
            out=str(tmp_path / f"{i}.json"),
        )
        procs.append(subprocess.Popen([sys.executable, "-c", code]))
    for p in procs:
        assert p.wait(timeout=150) == 0
    want = [
        s.key for s in StreamingTeacherDataset(server.root / "good", seed=2, shuffle_block_size=16)
    ]
    for i in range(2):
        assert json.loads((tmp_path / f"{i}.json").read_text()) == want
    shard_gets = {k: v for k, v in server.httpd.gets.items() if k.startswith("/good/shard")}
    assert len(shard_gets) == len(server.shards)
    assert temp_files(local) == []
    if limited:
        assert used_bytes(local) <= limit
    else:
        assert set(shard_gets.values()) == {1}  # each shard downloaded once for the node
        assert len(entries(local)) == len(server.shards)


def decode_keys(batch):
    return [s.record().key for s in batch]  # decodes: the shard must still be readable


def test_samples_stay_readable_after_their_shard_is_evicted(server, tmp_path):
    """A batch collects samples across steps; by the time it is collated their shard may have
    been released and evicted (limit 0 evicts every unpinned shard at the next download)."""
    d = StreamingTeacherDataset(
        f"{server.url}/good",
        shuffle=False,
        shuffle_block_size=3,  # a step (and its pins) per 3 records
        batch_size=8,
        local_dir=tmp_path / "l",
        cache_limit=0,
        prefetch_shards=0,
    )
    got = [k for b in DataLoader(d, batch_size=8, collate_fn=decode_keys) for k in b]
    assert got == list(range(N))
    assert len(entries(tmp_path / "l")) <= 2  # evicted as it went


def test_a_remote_manifest_is_validated_by_the_native_core(server, tmp_path):
    """The fetched manifest goes through the same validator as a local open (one home, in
    Rust): each check names the file and what is wrong, with the local open's error class."""
    good = json.loads((server.root / "good" / "manifest.json").read_text())
    good.pop("manifest_checksum")
    good["format_version"] = 1  # unsealed (version 1), so the edits reach the field checks

    def entry(**kw):
        return [{**good["shards"][0], **kw}, *good["shards"][1:]]

    cases = {
        "nofields": (
            {"top_k": None, "teacher": None},
            CacheFormatError,
            r"lacks the manifest fields \[",
        ),
        "notplain": ({"shards": entry(file="../x")}, CacheFormatError, "is not a plain file name"),
        "negative": ({"shards": entry(bytes=-1)}, CacheFormatError, 'has no valid "bytes"'),
        "badsum": ({"shards": entry(checksum="md5:00")}, CacheFormatError, 'expected "xxh3-128:"'),
        "notjson": (None, CacheCorruptionError, "is not valid JSON"),
    }
    for name, (edit, error, msg) in cases.items():
        d = server.root / f"m-{name}"
        d.mkdir(exist_ok=True)
        if edit is None:
            (d / "manifest.json").write_text("{not json")
        else:
            m = {k: v for k, v in {**good, **edit}.items() if v is not None}
            (d / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(error, match=msg) as ei:
            StreamingTeacherDataset(f"{server.url}/m-{name}", local_dir=tmp_path)
        assert f"m-{name}/manifest.json" in str(ei.value)
