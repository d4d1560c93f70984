"""StreamingTeacherDataset(..., reference=...): every yielded teacher sample carries the record of
the same key in a reference cache built separately (other shard sizes, other record order), read
locally or over real HTTP (127.0.0.1), on 2 ranks x 2 DataLoader workers; the teacher's order and
resume are unchanged; a missing key, a contradicting role and another tokenizer or vocabulary
are clear errors."""

from __future__ import annotations

import json
import pickle
import shutil
import threading
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from streaming_helpers import make_cache, make_reference_cache, reference_view, set_role
from torch.utils.data import DataLoader

from target_sft import (
    CacheCorruptionError,
    CacheKeyError,
    CacheMismatchError,
    KeySplit,
    StreamingTeacherDataset,
    TeacherCache,
)

N = 61
KW = dict(seed=7, shuffle_block_size=16, batch_size=3)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    teacher = make_cache(root / "teacher", N)  # 2 KiB shards, keys in order
    keys = np.random.default_rng(1).permutation(N)  # another order, 3 KiB shards
    reference = make_reference_cache(root / "reference", keys)
    return root, teacher, reference


class RangeHandler(SimpleHTTPRequestHandler):
    """Serves a directory, honouring single ``Range: bytes=a-b`` requests when the server's
    ``ranges`` is set (else the whole file, as SimpleHTTPRequestHandler does); counts GETs."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        with self.server.lock:
            self.server.gets[self.path] += 1
        rng = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not (self.server.ranges and rng and rng.startswith("bytes=") and path.is_file()):
            return super().do_GET()
        a, b = rng[6:].split("-")
        data = path.read_bytes()
        start, end = int(a), min(int(b) + 1 if b else len(data), len(data))
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        self.wfile.write(data[start:end])


@pytest.fixture(scope="module", params=[True, False], ids=["ranges", "no-ranges"])
def server(caches, request):
    root = caches[0]
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(root)))
    httpd.lock, httpd.gets, httpd.ranges = threading.Lock(), Counter(), request.param
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def check_views(views, reference):
    """Every sample's reference has its key and the reference cache's record of that key."""
    ref = TeacherCache(reference)
    for key, rkey, ids, topk in views:
        assert rkey == key
        want = ref[key]
        assert ids == want.input_ids.tolist() and topk == want.topk_ids.tolist()


def loader_views(d, workers=2):
    dl = DataLoader(
        d,
        batch_size=KW["batch_size"],
        num_workers=workers,
        collate_fn=reference_view,
        multiprocessing_context="fork" if workers else None,
    )
    return [v for b in dl for v in b]


def run_ranks(teacher, reference, **kw):
    """Both ranks' samples, each through a DataLoader with 2 workers."""
    out = []
    for rank in range(2):
        d = StreamingTeacherDataset(teacher, reference=reference, rank=rank, world_size=2, **kw)
        out.append(loader_views(d))
    return out


def teacher_keys(teacher, rank, **kw):
    d = StreamingTeacherDataset(teacher, rank=rank, world_size=2, **KW, **kw)
    return [s.key for s in d]


def test_local_reference_two_ranks_two_workers(caches):
    _, teacher, reference = caches
    ref = TeacherCache(reference)
    assert len(ref.info.shards) != len(TeacherCache(teacher).info.shards)
    assert [ref.key_at(i) for i in range(3)] != [0, 1, 2]  # another record order
    views = run_ranks(teacher, reference, **KW)
    for rank, v in enumerate(views):
        assert [k for k, *_ in v] == teacher_keys(teacher, rank)  # the teacher's order
        check_views(v, reference)
    assert {k for v in views for k, *_ in v} == set(range(N))


def test_resume_mid_epoch_yields_the_same_samples_with_references(caches):
    _, teacher, reference = caches
    kw = dict(KW, epoch=1, rank=1, world_size=2)
    full = [
        (s.key, s.reference.key, s.reference.position)
        for s in StreamingTeacherDataset(teacher, reference=reference, **kw)
    ]
    d = StreamingTeacherDataset(teacher, reference=reference, **kw)
    it = iter(d)
    head = [next(it) for _ in range(7)]
    state = d.state_dict()
    d2 = StreamingTeacherDataset(teacher, reference=reference, **kw)
    d2.load_state_dict(state)
    tail = list(d2)
    got = [(s.key, s.reference.key, s.reference.position) for s in head + tail]
    # the state is the global prefix: rank 1 resumes at its 8th sample
    assert got == full
    assert state == StreamingTeacherDataset(teacher, **kw).state_dict(samples_consumed=7)
    # a sample pickles with its reference (spawned workers, the collator's batches)
    s = pickle.loads(pickle.dumps(head[0]))
    assert s.reference.key == head[0].key and s.reference.position == head[0].reference.position


def test_key_split_and_pickled_dataset_keep_references(caches):
    _, teacher, reference = caches
    d = StreamingTeacherDataset(teacher, reference=reference, shuffle=False)
    train, held = d.split_by_key(0.3, seed=2)
    for side, part in ((KeySplit("train", 0.3, 2), train), (KeySplit("eval", 0.3, 2), held)):
        got = [(s.key, s.reference.key) for s in pickle.loads(pickle.dumps(part))]
        assert got and all(k == r and side.holds(k) for k, r in got)
    ks = KeySplit("eval", 0.3, 2)
    direct = StreamingTeacherDataset(teacher, reference=reference, key_split=ks, shuffle=False)
    assert [s.reference.key for s in direct] == [s.key for s in held]


@pytest.mark.timeout(120)
def test_remote_reference_two_ranks_two_workers(caches, server, tmp_path):
    _, teacher, reference = caches
    kw = dict(KW, local_dir=tmp_path / "node")
    views = run_ranks(f"{server}/teacher", f"{server}/reference", **kw)
    for rank, v in enumerate(views):
        assert [k for k, *_ in v] == teacher_keys(teacher, rank)
        check_views(v, reference)
    # the reference's shards went to its own directory, each once
    n_ref = len(TeacherCache(reference).info.shards)
    assert (
        len([p for p in (tmp_path / "node" / "reference").iterdir() if p.name[0] != "."]) == n_ref
    )


@pytest.mark.timeout(120)
def test_local_teacher_remote_reference_under_a_size_limit_and_resume(caches, server, tmp_path):
    _, teacher, reference = caches
    shard = max(s["bytes"] for s in TeacherCache(reference).info.shards)
    kw = dict(
        KW,
        rank=0,
        world_size=2,
        local_dir=tmp_path / "node",
        cache_limit=4 * shard + 4096,  # a few shards: the rest is evicted on the way
        prefetch_shards=1,
    )
    d = StreamingTeacherDataset(teacher, reference=f"{server}/reference", **kw)
    full = [(s.key, s.reference.key) for s in d]
    assert [k for k, _ in full] == teacher_keys(teacher, 0) and all(k == r for k, r in full)
    kept = [p for p in (tmp_path / "node" / "reference").iterdir() if p.name[0] != "."]
    # evicted on the way (a step may need more reference shards than the limit holds: its
    # records' keys are spread over the reference's shards; those are fetched anyway)
    assert 0 < len(kept) < len(TeacherCache(reference).info.shards)
    d = StreamingTeacherDataset(teacher, reference=f"{server}/reference", **kw)
    it = iter(d)
    head = [next(it) for _ in range(11)]
    check_views(reference_view(head), reference)
    state = d.state_dict()
    del it
    d2 = StreamingTeacherDataset(teacher, reference=f"{server}/reference", **kw)
    d2.load_state_dict(state)
    assert [(s.key, s.reference.key) for s in head] + [(s.key, s.reference.key) for s in d2] == full


def test_missing_key_is_named(caches, tmp_path):
    _, teacher, _ = caches
    partial_ref = make_reference_cache(tmp_path / "partial", [k for k in range(N) if k != 17])
    with pytest.raises(CacheKeyError) as ei:
        StreamingTeacherDataset(teacher, reference=partial_ref)
    msg = str(ei.value)
    assert "key 17 " in msg and str(partial_ref) in msg and "1 of the 61" in msg
    # only the keys streamed need a reference record: the side without key 17 is fine
    side = next(KeySplit(s, 0.5, 0) for s in ("train", "eval") if not KeySplit(s, 0.5, 0).holds(17))
    d = StreamingTeacherDataset(teacher, reference=partial_ref, key_split=side)
    assert all(s.reference.key == s.key for s in d)


def test_role_is_checked(caches, tmp_path):
    _, teacher, reference = caches
    no_role = str(tmp_path / "no_role")
    shutil.copytree(reference, no_role)
    set_role(no_role, None)  # an older cache: a teacher
    with pytest.raises(CacheMismatchError, match=r"role 'teacher'.*passed as the reference"):
        StreamingTeacherDataset(teacher, reference=no_role)
    d = StreamingTeacherDataset(teacher, reference=no_role, allow_role_mismatch=True)
    assert next(iter(d)).reference is not None
    # a reference cache passed as the teacher
    with pytest.raises(CacheMismatchError, match=r"role 'reference'.*passed as the teacher"):
        StreamingTeacherDataset(reference)


def test_a_reference_cached_at_another_temperature_is_refused(caches, tmp_path):
    _, teacher, _ = caches
    hot = make_reference_cache(tmp_path / "hot", range(N), temperature=2.0)
    with pytest.raises(
        CacheMismatchError,
        match=r"StreamingTeacherDataset: the reference cache at .*hot was built at temperature 2",
    ):
        StreamingTeacherDataset(teacher, reference=hot)
    with pytest.warns(UserWarning, match="built at temperature 2"):
        d = StreamingTeacherDataset(teacher, reference=hot, allow_role_mismatch=True)
    assert next(iter(d)).reference is not None


def test_role_of_a_remote_reference_is_checked(caches, server, tmp_path):
    root, teacher, reference = caches
    no_role = root / "no_role_remote"
    if not no_role.exists():
        shutil.copytree(reference, no_role)
        set_role(no_role, "teacher")
    with pytest.raises(CacheMismatchError, match="passed as the reference"):
        StreamingTeacherDataset(
            teacher, reference=f"{server}/no_role_remote", local_dir=tmp_path / "n"
        )


def test_temperature_of_a_remote_reference_is_checked(caches, server, tmp_path):
    root, teacher, _ = caches
    hot = root / "hot_remote"
    if not hot.exists():
        make_reference_cache(hot, range(N), temperature=2.0)
    with pytest.raises(CacheMismatchError, match="hot_remote was built at temperature 2"):
        StreamingTeacherDataset(teacher, reference=f"{server}/hot_remote", local_dir=tmp_path / "n")


def test_tokenizer_and_vocab_mismatch(tmp_path):
    t = make_cache(tmp_path / "t", 12, tokenizer="fp-a")
    r = make_reference_cache(tmp_path / "r", range(12), tokenizer="fp-b")
    with pytest.raises(CacheMismatchError, match="tokenizer mismatch") as ei:
        StreamingTeacherDataset(t, reference=r)
    assert str(t) in str(ei.value) and str(r) in str(ei.value)
    assert "fp-a" in str(ei.value) and "fp-b" in str(ei.value)
    same = make_reference_cache(tmp_path / "same", range(12), tokenizer="fp-a")
    assert len(list(StreamingTeacherDataset(t, reference=same))) == 12
    v = make_reference_cache(tmp_path / "v", range(12), tokenizer="fp-a", vocab_size=2000)
    with pytest.raises(CacheMismatchError, match=r"vocab_size 2000.*has 1000") as ei:
        StreamingTeacherDataset(t, reference=v)
    assert str(t) in str(ei.value) and str(v) in str(ei.value)


def test_damaged_key_table_or_wrong_match_is_an_error(caches, tmp_path, monkeypatch):
    _, teacher, reference = caches
    bad = tmp_path / "bad"
    shutil.copytree(reference, bad)
    entry = TeacherCache(bad).info.shards[1]
    f = bad / entry["file"]
    raw = bytearray(f.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    begin = header["key_hash"]["data_offsets"][0]
    raw[8 + n + begin] ^= 0x01  # one bit of the first key hash
    f.write_bytes(bytes(raw))
    with pytest.raises(CacheCorruptionError, match=f"{entry['file']}: region key_hash"):
        StreamingTeacherDataset(teacher, reference=bad)
    # a wrong match (as a key hash collision would give) is caught when the sample is read
    d = StreamingTeacherDataset(teacher, reference=reference, shuffle=False)
    d.reference.position_of = np.roll(d.reference.position_of, 1)
    with pytest.raises(CacheMismatchError, match=r"teacher key 0 .*was matched to the record"):
        next(iter(d))


def test_remote_damaged_key_table_and_missing_key_are_named(caches, server, tmp_path):
    """A remote cache's key tables are parsed and verified natively from ranged reads: a
    damaged ``key_hash`` is a corruption naming the shard's URL and the region; a teacher key
    the remote reference lacks is named (its key decoded from the remote key tables)."""
    root, teacher, reference = caches
    bad = root / "bad_remote"
    if not bad.exists():
        shutil.copytree(reference, bad)
        f = bad / TeacherCache(bad).info.shards[1]["file"]
        raw = bytearray(f.read_bytes())
        n = int.from_bytes(raw[:8], "little")
        raw[8 + n + json.loads(raw[8 : 8 + n])["key_hash"]["data_offsets"][0]] ^= 0x01
        f.write_bytes(bytes(raw))
    name = TeacherCache(reference).info.shards[1]["file"]
    with pytest.raises(CacheCorruptionError, match=f"bad_remote/{name}: region key_hash"):
        StreamingTeacherDataset(teacher, reference=f"{server}/bad_remote", local_dir=tmp_path)
    partial_ref = root / "partial_remote"
    if not partial_ref.exists():
        make_reference_cache(partial_ref, [k for k in range(N) if k != 17])
    with pytest.raises(CacheKeyError) as ei:
        StreamingTeacherDataset(
            f"{server}/teacher", reference=str(partial_ref), local_dir=tmp_path / "n"
        )
    msg = str(ei.value)
    assert "key 17 " in msg and str(partial_ref) in msg and "1 of the 61" in msg
