"""``split_by_key``: a deterministic train/eval split of a cache by key hash, for the map-style
``TeacherCacheDataset`` and the ``StreamingTeacherDataset`` (every rank and worker streams only
its side, resume stays exact): the same split whatever the shard layout or record order, stable
when the cache is appended to, and the errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from conftest import make_record
from target_sft import (
    CacheInputError,
    CacheMismatchError,
    CacheWriter,
    KeySplit,
    StreamingTeacherDataset,
    TeacherCache,
    TeacherCacheDataset,
    split_by_key,
)

N = 120


def write(path, keys, *, mode="create", shard_size="2KiB"):
    rng = np.random.default_rng(5)
    with CacheWriter(
        path, top_k=8, vocab_size=1000, shard_size=shard_size, threads=1, mode=mode
    ) as w:
        for k in keys:
            w.add(**make_record(k, rng, t=12))
    return str(path)


def all_keys():
    return [i if i % 3 else f"doc-{i}" for i in range(N)]  # int and str keys


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write(tmp_path_factory.mktemp("split") / "c", all_keys())


def keys_of(ds):
    return [s.key for s in (ds[i] for i in range(len(ds)))]


def test_map_style_split_partitions_the_keys(cache):
    train, held = split_by_key(cache, eval_fraction=0.25, seed=0)
    assert isinstance(train, TeacherCacheDataset) and isinstance(held, TeacherCacheDataset)
    tk, ek = keys_of(train), keys_of(held)
    assert sorted(map(str, tk + ek)) == sorted(map(str, all_keys()))  # a partition
    assert not set(map(str, tk)) & set(map(str, ek))
    assert 0.1 * N < len(ek) < 0.4 * N  # binomial around 0.25
    # the split is KeySplit's rule, key by key; items are in cache order
    ks = KeySplit("eval", 0.25, 0)
    assert ek == [k for k in TeacherCache(cache).keys() if ks.holds(k)]
    assert all(KeySplit("train", 0.25, 0).holds(k) for k in tk)
    # items decode the right records
    assert held[0].record().input_ids.tolist() == TeacherCache(cache)[ek[0]].input_ids.tolist()
    # the same from a TeacherCache, a dataset, and after pickling (spawned workers)
    for src in (TeacherCache(cache), TeacherCacheDataset(cache)):
        t2, e2 = split_by_key(src, eval_fraction=0.25, seed=0)
        assert keys_of(t2) == tk and keys_of(e2) == ek
    assert keys_of(pickle.loads(pickle.dumps(held))) == ek
    # another seed, another split; a larger fraction only moves keys to eval
    assert keys_of(split_by_key(cache, 0.25, seed=1)[1]) != ek
    assert set(map(str, ek)) <= set(map(str, keys_of(split_by_key(cache, 0.5, seed=0)[1])))


def test_split_ignores_layout_and_survives_appending(cache, tmp_path):
    ek = set(map(str, keys_of(split_by_key(cache, 0.25)[1])))
    # another shard layout and the records in reverse order: the same keys on each side
    other = write(tmp_path / "other", all_keys()[::-1], shard_size="64KiB")
    assert set(map(str, keys_of(split_by_key(other, 0.25)[1]))) == ek
    # appending: old keys keep their side, new keys land on both sides
    grown = write(tmp_path / "grown", all_keys())
    write(grown, [f"new-{i}" for i in range(200)], mode="append")
    after = set(map(str, keys_of(split_by_key(grown, 0.25)[1])))
    assert after & set(map(str, all_keys())) == ek
    new_eval = {k for k in after if k.startswith("new-")}
    assert 0 < len(new_eval) < 200


def test_split_of_keyed_rows_agrees_with_the_cache(cache):
    """A datasets.Dataset with a key column (TRL's side) splits the same way."""
    datasets = pytest.importorskip("datasets")
    held_cache = keys_of(split_by_key(cache, 0.25)[1])
    for kind in (str, int):  # an Arrow column holds one type: the cache's str keys, its ints
        keys = [k for k in all_keys() if isinstance(k, kind)]
        rows = datasets.Dataset.from_dict({"key": keys, "n": list(range(len(keys)))})
        train, held = split_by_key(rows, eval_fraction=0.25, seed=0)
        assert list(held["key"]) == [k for k in held_cache if isinstance(k, kind)]
        assert sorted(map(str, [*train["key"], *held["key"]])) == sorted(map(str, keys))


def stream(cache, **kw):
    kw.setdefault("seed", 3)
    kw.setdefault("shuffle_block_size", 16)
    return StreamingTeacherDataset(cache, **kw)


def test_streaming_split_every_rank_streams_its_side_once(cache):
    want_train, want_eval = (set(map(str, keys_of(d))) for d in split_by_key(cache, 0.25))
    for world in (1, 3):
        seen = {"train": [], "eval": []}
        for rank in range(world):
            train, held = split_by_key(stream(cache, rank=rank, world_size=world), 0.25)
            assert train.key_split == KeySplit("train", 0.25, 0)
            for name, ds in (("train", train), ("eval", held)):
                got = [s.key for s in ds]
                assert len(got) == len(ds)  # every rank the same count (padding included)
                seen[name] += got
        for name, want in (("train", want_train), ("eval", want_eval)):
            got = list(map(str, seen[name]))
            assert set(got) == want  # only its side, all of it
            # each key once, but for the padding that evens out the ranks (< world)
            assert len(got) - len(want) < world
    # DataLoader workers (forked) stream the same side in the same order
    from torch.utils.data import DataLoader

    train = split_by_key(stream(cache, batch_size=4), 0.25)[0]
    loader = DataLoader(
        train, batch_size=4, num_workers=2, collate_fn=list, multiprocessing_context="fork"
    )
    assert [s.key for b in loader for s in b] == [s.key for s in train]
    # a shuffled order over the side, new every epoch
    train = split_by_key(stream(cache), 0.25)[0]
    e0 = [s.key for s in train]
    train.set_epoch(1)
    assert [s.key for s in train] != e0


def test_streaming_split_resumes_exactly(cache):
    def make():
        return stream(cache, key_split=KeySplit("train", 0.25, 0), batch_size=4)

    full = [s.key for s in make()]
    ds = make()
    it = iter(ds)
    first = [next(it).key for _ in range(37)]
    state = ds.state_dict()
    assert state["key_split"] == "KeySplit('train', eval_fraction=0.25, seed=0)"
    resumed = make()
    resumed.load_state_dict(state)
    assert first + [s.key for s in resumed] == full
    # a state of another split (or none) is refused
    for other in (stream(cache), stream(cache, key_split=KeySplit("eval", 0.25, 0))):
        with pytest.raises(CacheMismatchError, match="key_split"):
            other.load_state_dict(state)
    with pytest.raises(CacheMismatchError, match="key_split"):
        make().load_state_dict(stream(cache).state_dict())


def test_split_errors(cache):
    for bad in (0, 1, 1.5, -0.1, "0.1", True):
        with pytest.raises(CacheInputError, match="eval_fraction"):
            split_by_key(cache, eval_fraction=bad)
    with pytest.raises(CacheInputError, match="side"):
        KeySplit("test", 0.1)
    with pytest.raises(CacheInputError, match="already one side"):
        split_by_key(split_by_key(cache, 0.2)[0], 0.2)
    with pytest.raises(CacheInputError, match="already one side"):
        split_by_key(stream(cache, key_split=KeySplit("eval", 0.2)), 0.2)
    with pytest.raises(CacheInputError, match="got list"):
        split_by_key([1, 2, 3])
    # rows without keys cannot be placed on a side: an error, never a split by position
    datasets = pytest.importorskip("datasets")
    unkeyed = datasets.Dataset.from_dict({"input_ids": [[1, 2], [3]]})
    with pytest.raises(CacheInputError, match="with a 'key' column, got Dataset"):
        split_by_key(unkeyed, eval_fraction=0.5)
    with pytest.raises(CacheInputError, match="must be a KeySplit"):
        TeacherCacheDataset(cache, key_split="eval")
    for key in (2**63, 1.5, None, b"k"):
        with pytest.raises(CacheInputError, match="key"):
            KeySplit("eval", 0.1).holds(key)
    with pytest.raises(CacheInputError, match="no record"):
        stream(cache, key_split=KeySplit("eval", 1e-9))
