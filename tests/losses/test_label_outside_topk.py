"""The label outside the teacher's top-k (issue 14): with the default support (the collator's
``label_in_support=True``) TARGET-SFT's logit gradient at the label follows the paper's
full-vocabulary formula; with the bare top-k (``label_in_support=False``) it is zero.

The paper's target, over the full vocabulary ``V``:
``Q = p_y δ_y + (1 − p_y) π̃``, ``π̃(a) = w(a) / Σ_{b∈V} w(b)``, ``w(a) = p_a^{1−η} π_T(a)^η``,
so the logit gradient of ``CE(Q, π_θ)`` (Q held fixed) at the label is
``g_full(y) = p_y − Q(y) = −(1 − p_y) π̃(y)``, negative whenever ``π_T(y) > 0``.

What the cache can give: the teacher's top-k ``S`` and the label's exact log-prob, so the loss
normalises ``π̃`` over ``U = S ∪ {y}``. The test compares, in float64, the gradient of the real
pipeline (``CacheWriter(codec="exact")`` → ``TargetSFTCollator`` → ``target_sft_loss`` /
``TargetSFT``) with the same formula restricted to ``U``:
``g(y) = −(1 − p_y) w(y) / Σ_{b∈U} w(b) = g_full(y) / π̃(U)``, i.e. the label's gradient is the
full-vocabulary one up to the one renormalisation over ``U`` (the factor ``1/π̃(U) ≥ 1``, the same
for every token of ``U``: the label's weight relative to each top-k token is exactly the full
formula's). The whole gradient row is checked, not only the label. With ``label_in_support=False``
the label's gradient is 0 on the rows where it is outside the top-k while ``g_full(y) < 0`` there.

The dense teacher is a float32 log-prob vector (what the exact codec stores bit for bit), read as
float64; ``π̃`` does not depend on its normalisation, so the comparison is exact to rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from target_sft import CacheWriter, TargetSFTCollator, TeacherCache, target_sft_loss
from target_sft import losses as L

V, K, N = 16, 4, 6


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A cache of ``N`` records whose top-k comes from a dense teacher over ``V`` tokens; the
    labels alternate between inside the top-k and ranks ``K .. K + 2`` (outside). Returns the
    cache and ``{(record, position): dense teacher log-probs (float64, [V])}``."""
    rng = np.random.default_rng(14)
    path = tmp_path_factory.mktemp("label") / "cache"
    dense: dict[tuple[int, int], np.ndarray] = {}
    with CacheWriter(path, top_k=K, vocab_size=V, codec="exact") as w:
        for i in range(N):
            t = int(rng.integers(6, 11))
            ids = rng.integers(0, V, t).astype(np.int32)
            labels = ids.copy()
            labels[:2] = -100
            rows = np.flatnonzero(labels[1:] != -100) + 1
            topk = np.empty((rows.size, K), np.int32)
            lps = np.empty((rows.size, K), np.float32)
            label_lp = np.empty(rows.size, np.float32)
            ranks = np.empty(rows.size, np.int32)
            for r, pos in enumerate(rows):
                z = rng.normal(0.0, 1.5, V)
                lt = (z - np.logaddexp.reduce(z)).astype(np.float32)
                order = np.argsort(-lt, kind="stable")
                rank = int(rng.integers(0, K)) if (i + r) % 2 else int(rng.integers(K, K + 3))
                y = int(order[rank])
                ids[pos] = labels[pos] = y
                topk[r], lps[r] = order[:K], lt[order[:K]]
                label_lp[r], ranks[r] = lt[y], rank
                dense[(i, int(pos))] = lt.astype(np.float64)
            w.add(i, ids, labels, topk, lps, label_lp, ranks)
    return TeacherCache(path), dense


def _grad(batch, z0, eta, how):
    z = z0.clone().requires_grad_(True)
    args = (z, batch["labels"], batch["teacher_ids"], batch["teacher_logprobs"])
    if how == "function":
        loss = target_sft_loss(*args, eta=eta, reduction="sum")
    else:
        loss = L.TargetSFT(eta, reduction="sum")(*args)
    (g,) = torch.autograd.grad(loss, z)
    return g


def _expected(z, y, lt, support, eta):
    """``(p − Q_U, g_full(y))`` in float64: ``Q_U`` the paper's target with ``π̃`` normalised
    over ``support`` (ids), ``g_full(y)`` the label's gradient with ``π̃`` over the vocabulary."""
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    logw = (1 - eta) * logp + eta * torch.from_numpy(lt)
    on = torch.tensor(sorted(support))
    q = torch.zeros(V, dtype=torch.float64)
    q[on] = (1 - p[y]) * torch.softmax(logw[on], -1)
    q[y] += p[y]
    g_full_y = -(1 - p[y]) * torch.softmax(logw, -1)[y]
    return p - q, g_full_y


@pytest.mark.parametrize("how", ["function", "module"])
@pytest.mark.parametrize("eta", [0.3, 0.5, 1.0])
def test_label_gradient_follows_the_full_vocabulary_formula(teacher, eta, how):
    cache, dense = teacher
    default = TargetSFTCollator(cache, pad_token_id=0)
    assert default.label_in_support is True
    bare = TargetSFTCollator(cache, pad_token_id=0, label_in_support=False)
    batch, old = default(list(range(N))), bare(list(range(N)))
    assert batch["teacher_ids"].shape[-1] == K + 1 and old["teacher_ids"].shape[-1] == K
    g = torch.Generator().manual_seed(int(eta * 10))
    z0 = 2.0 * torch.randn(*batch["labels"].shape, V, generator=g, dtype=torch.float64)
    got, got_old = _grad(batch, z0, eta, how), _grad(old, z0, eta, how)
    outside = 0
    for (i, t), lt in dense.items():
        y = int(batch["labels"][i, t])
        top = set(old["teacher_ids"][i, t].tolist())
        assert len(top) == K and -1 not in top
        row = z0[i, t - 1]  # the logits that predict position t
        want, g_full_y = _expected(row, y, lt, top | {y}, eta)
        torch.testing.assert_close(got[i, t - 1], want, atol=1e-13, rtol=1e-12)
        # on the label: the full-vocabulary gradient renormalised over U = S ∪ {y}
        p_u = torch.softmax((1 - eta) * torch.log_softmax(row, -1) + eta * torch.from_numpy(lt), -1)
        in_u = p_u[torch.tensor(sorted(top | {y}))].sum()
        torch.testing.assert_close(got[i, t - 1, y], g_full_y / in_u, atol=1e-13, rtol=1e-12)
        if y not in top:
            outside += 1
            assert g_full_y < -1e-4  # the paper's formula pushes the label up ...
            assert abs(float(got_old[i, t - 1, y])) < 1e-15  # ... the bare top-k does not
            want_old, _ = _expected(row, y, lt, top, eta)
            torch.testing.assert_close(got_old[i, t - 1], want_old, atol=1e-13, rtol=1e-12)
        else:  # inside the top-k both supports are the same
            torch.testing.assert_close(got_old[i, t - 1], got[i, t - 1], atol=1e-15, rtol=0)
    assert outside >= 5
