"""Shared fixtures: small deterministic teacher records for cache tests."""

from __future__ import annotations

import os

# The Triton kernel tests (tests/kernels/test_triton_*.py) run on CPU tensors under the Triton interpreter.
# The knob must be set before `triton` is first imported; nothing else in the suite imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest


def make_record(key, rng: np.random.Generator, *, vocab: int = 1000, k: int = 8, t: int = 24):
    """A valid record: prompt prefix unsupervised, top-k rows sorted, label inside the top-k for
    most rows (its log-prob then equals its entry) and outside for some (rank >= k)."""
    ids = rng.integers(0, vocab, t).astype(np.int32)
    labels = ids.copy()
    labels[: max(1, t // 3)] = -100
    rows = np.flatnonzero(labels[1:] != -100) + 1
    s = rows.size
    topk = np.empty((s, k), np.int32)
    lps = np.empty((s, k), np.float32)
    label_lp = np.empty(s, np.float32)
    ranks = np.empty(s, np.int32)
    for r, pos in enumerate(rows):
        lab = labels[pos]
        cand = rng.choice(vocab, k + 1, replace=False)
        cand = cand[cand != lab][:k]
        inside = rng.random() < 0.8
        if inside:
            cand[rng.integers(0, min(3, k))] = lab
        logits = np.sort(rng.normal(0, 3, k))[::-1]
        row_lp = (logits - np.logaddexp.reduce(logits) - 0.01).astype(np.float32)
        topk[r], lps[r] = cand, row_lp
        if inside:
            j = int(np.flatnonzero(cand == lab)[0])
            label_lp[r], ranks[r] = row_lp[j], j
        else:
            label_lp[r], ranks[r] = row_lp[-1] - 1.0, k + int(rng.integers(0, 100))
    return dict(
        key=key,
        input_ids=ids,
        labels=labels,
        topk_ids=topk,
        topk_logprobs=lps,
        label_logprobs=label_lp,
        label_ranks=ranks,
    )


@pytest.fixture
def records():
    rng = np.random.default_rng(1234)
    return [make_record(i if i % 4 else f"doc-{i}", rng) for i in range(12)]


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for the module (tiny matrices: fastest, and steady on a shared machine).
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
