"""Parallel decoding keeps working in DataLoader workers under fork, spawn and forkserver, also
after the parent used the decode pool before forking (rayon's global pool would hang there)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from target_sft import CacheWriter, TeacherCache


class Pairs(Dataset):
    """Item i = records (2i, 2i+1) decoded in parallel; the cache opens lazily per process, and a
    cache object inherited through fork is used as is."""

    def __init__(self, path: str, cache: TeacherCache | None = None) -> None:
        self.path, self.cache = path, cache

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.cache is None:
            self.cache = TeacherCache(self.path)
        recs = self.cache.records_at(
            [2 * i, 2 * i + 1],
        )
        return torch.tensor([int(r.topk_ids.sum()) + int(r.label_ranks.sum()) for r in recs])


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory, request):
    from conftest import make_record

    rng = np.random.default_rng(5)
    path = tmp_path_factory.mktemp("fork") / "c"
    with CacheWriter(path, top_k=8, vocab_size=1000) as w:
        for i in range(12):
            w.add(**make_record(i, rng, t=64))
    return str(path)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_dataloader_workers_decode_in_parallel(cache_path, method):
    parent = TeacherCache(cache_path)
    want = [
        int(r.topk_ids.sum()) + int(r.label_ranks.sum())
        for r in parent.records_at(
            range(12),
        )
    ]
    ds = Pairs(cache_path, parent if method == "fork" else None)
    dl = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context=method)
    got = [int(x) for item in dl for x in item]
    assert got == want


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_cache_object_pickles_into_spawned_workers(cache_path, method):
    import pickle

    parent = TeacherCache(cache_path)
    clone = pickle.loads(pickle.dumps(parent))
    assert clone.path == parent.path and len(clone) == len(parent)
    want = [int(r.topk_ids.sum()) + int(r.label_ranks.sum()) for r in parent.records_at(range(12))]
    dl = DataLoader(
        Pairs(cache_path, parent), batch_size=None, num_workers=2, multiprocessing_context=method
    )
    assert [int(x) for item in dl for x in item] == want
