"""Every preset against independent float64 closed forms (Tables 4 and 5 of the paper).

For each row: the loss value equals the published objective (Table 4) written densely here, the
logit gradient equals autograd of that dense objective *and* the analytic ``s (p − Q)`` with
``Q = γ δ_y + (1 − γ) π̃`` from Table 5, all to 1e-10 in float64; the induced target
``p − ∂L/∂z`` sums to one and, with the scale divided out, is Table 5's ``Q``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from target_sft import losses as L

TOL = 1e-10
N, V, K = 24, 40, 6
KR = 8  # the reference model's top-k
SEQ = 4  # sequences (for iw-SFT): rows are split 6/6/6/6


@dataclass
class Data:
    z: Tensor  # [N, V] float64
    y: Tensor  # [N] with -100
    ids: Tensor  # [N, K] int32, -1 padding
    lp: Tensor  # [N, K] float64 teacher log-probs (full-vocab log-softmax), -inf padding
    token_weights: Tensor
    reference_label_logprobs: Tensor
    old_logprobs: Tensor
    sequence_ids: Tensor
    rids: Tensor  # [N, KR] int32 reference-model top-k (SFT+KL's / ASFT's anchor), -1 padding
    rlp: Tensor  # [N, KR] float64 its log-probs, -inf padding
    mask: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.mask = self.y != -100

    def inputs(self) -> dict[str, Tensor]:
        return {
            "teacher_ids": self.ids,
            "teacher_logprobs": self.lp,
            "token_weights": self.token_weights,
            "reference_ids": self.rids,
            "reference_logprobs": self.rlp,
            "reference_label_logprobs": self.reference_label_logprobs,
            "old_logprobs": self.old_logprobs,
            "sequence_ids": self.sequence_ids,
        }


def make_data(seed: int = 0) -> Data:
    g = torch.Generator().manual_seed(seed)
    z = 2.5 * torch.randn(N, V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (N,), generator=g)
    # a few confident rows, a few ignored rows
    z[1, y[1]] += 12.0
    z[7, y[7]] += 8.0
    y[[3, 10, 17]] = -100
    teacher = torch.log_softmax(3.0 * torch.randn(N, V, generator=g, dtype=torch.float64), -1)
    teacher[5, y[5]] += 6.0  # teacher likes the label on some rows
    teacher = torch.log_softmax(teacher, -1)
    lp, ids = teacher.topk(K, dim=-1)
    ids = ids.to(torch.int32)
    # padding at the end of some supports (fewer than K teacher tokens)
    ids[2, -2:] = -1
    lp[2, -2:] = float("-inf")
    ids[9, -1] = -1
    lp[9, -1] = float("-inf")
    # make sure the label is in the support on some rows and not on others
    assert any(int(y[i]) in ids[i].tolist() for i in range(N) if y[i] >= 0)
    assert any(int(y[i]) not in ids[i].tolist() for i in range(N) if y[i] >= 0)
    logp = torch.log_softmax(z, -1)
    logp_y = logp.gather(1, y.clamp_min(0)[:, None]).squeeze(1)
    token_weights = torch.rand(N, generator=g, dtype=torch.float64)
    ref = logp_y - 0.3 * torch.rand(N, generator=g, dtype=torch.float64) + 0.1
    old = logp_y + (torch.rand(N, generator=g, dtype=torch.float64) - 0.5)
    seq = torch.arange(N) // (N // SEQ)
    # the reference model: its own distribution and a support of another size than the teacher's
    reference = torch.log_softmax(2.0 * torch.randn(N, V, generator=g, dtype=torch.float64), -1)
    rlp, rids = reference.topk(KR, dim=-1)
    rids = rids.to(torch.int32)
    rids[4, -3:] = -1
    rlp[4, -3:] = float("-inf")
    return Data(z, y, ids, lp, token_weights, ref, old, seq, rids, rlp)


# ------------------------------------------------------------------ dense float64 helpers
def onehot(d: Data) -> Tensor:
    return F.one_hot(d.y.clamp_min(0), V).to(torch.float64)


def probs(d: Data) -> Tensor:
    return torch.softmax(d.z, -1)


def p_label(d: Data) -> Tensor:
    return probs(d).gather(1, d.y.clamp_min(0)[:, None]).squeeze(1)


def sparse_dense(ids: Tensor, lp: Tensor, *, renormalize: bool) -> Tensor:
    """A cached top-k as a dense [N, V] tensor (renormalised or the raw truncated values)."""
    r = torch.where(ids >= 0, lp.exp(), torch.zeros_like(lp))
    dense = torch.zeros(N, V, dtype=torch.float64)
    dense.scatter_add_(1, ids.long().clamp_min(0), r)
    if renormalize:
        dense = dense / dense.sum(-1, keepdim=True)
    return dense


def teacher_dense(d: Data, *, renormalize: bool) -> Tensor:
    """π_T on the teacher support, dense."""
    return sparse_dense(d.ids, d.lp, renormalize=renormalize)


def reference_dense(d: Data, *, renormalize: bool) -> Tensor:
    """π_ref on the reference support, dense (SFT+KL's and ASFT's anchor)."""
    return sparse_dense(d.rids, d.rlp, renormalize=renormalize)


def guided_dense(d: Data, eta: float) -> Tensor:
    """π̃ ∝ π_θ^{1−η} π_T^η on the support (dense; zero elsewhere)."""
    pt = teacher_dense(d, renormalize=False)
    w = probs(d) ** (1.0 - eta) * pt**eta
    w = torch.where(pt > 0, w, torch.zeros_like(w))
    return w / w.sum(-1, keepdim=True)


def topk_entropy_weight(d: Data, k: int) -> Tensor:
    top = d.z.topk(k, -1).values
    q = torch.softmax(top, -1)
    return -(q * q.log()).sum(-1) / math.log(k)


def iw_weights(d: Data) -> Tensor:
    logp_y = torch.log(p_label(d))
    diff = torch.where(d.mask, logp_y - d.reference_label_logprobs, torch.zeros_like(logp_y))
    per_seq = torch.stack([diff[d.sequence_ids == s].sum() for s in range(SEQ)])
    return per_seq.exp()[d.sequence_ids]


# ------------------------------------------------------------------ the table
@dataclass
class Row:
    name: str
    make: Callable[[], L.QTargetLoss]
    # published objective (Table 4), dense float64, autograd-able in z: (z, data) -> [N]
    objective: Callable[[Tensor, Data], Tensor]
    # Table 5: (gamma [N], pi_tilde [N, V] (signed for GEM), scale [N])
    table5: Callable[[Data], tuple[Tensor, Tensor, Tensor]]


def _lp(z: Tensor, d: Data) -> tuple[Tensor, Tensor]:
    logp = torch.log_softmax(z, -1)
    return logp, logp.gather(1, d.y.clamp_min(0)[:, None]).squeeze(1)


def _kl(pi: Tensor, logp: Tensor) -> Tensor:
    return (torch.special.xlogy(pi, pi) - pi * logp).sum(-1)


def _ones(d: Data) -> Tensor:
    return torch.ones(N, dtype=torch.float64)


TAU, ALPHA, EAFT_K, EPS_LS, LAM_KL, LAM_ASFT, EPS_PSFT, BETA, LAM_HKD = (
    0.05,
    0.5,
    5,
    0.1,
    0.3,
    0.2,
    0.2,
    0.7,
    0.6,
)


def _self_q(gamma: Tensor, d: Data) -> tuple[Tensor, Tensor, Tensor]:
    return gamma, probs(d), _ones(d)


def _objective_psft(z: Tensor, d: Data) -> Tensor:
    _, lpy = _lp(z, d)
    r = torch.exp(lpy - d.old_logprobs)
    return -torch.minimum(r, r.clamp(1 - EPS_PSFT, 1 + EPS_PSFT))


def _table5_psft(d: Data) -> tuple[Tensor, Tensor, Tensor]:
    r = p_label(d) / d.old_logprobs.exp()
    return _self_q(torch.where(r <= 1 + EPS_PSFT, r, torch.zeros_like(r)), d)


def _table5_gem(d: Data) -> tuple[Tensor, Tensor, Tensor]:
    # Q = δ_y + λ(p − q_β): write it as γ = 1 and a signed "residual" (1 − γ)π̃ ≡ p − q_β
    q = torch.softmax(d.z / BETA, -1)
    return torch.ones(N, dtype=torch.float64), probs(d) - q, _ones(d)


def _objective_target(eta: float) -> Callable[[Tensor, Data], Tensor]:
    def f(z: Tensor, d: Data) -> Tensor:
        logp, _ = _lp(z, d)
        p = p_label(d)
        q = p[:, None] * onehot(d) + (1 - p)[:, None] * (
            probs(d) if eta == 0 else guided_dense(d, eta)
        )
        return -(q.detach() * logp).sum(-1)

    return f


ROWS: list[Row] = [
    Row(
        "sft",
        L.SFT,
        lambda z, d: -_lp(z, d)[1],
        lambda d: _self_q(torch.ones(N, dtype=torch.float64), d),
    ),
    Row(
        "dft",
        L.DFT,
        lambda z, d: -p_label(d) * _lp(z, d)[1],
        lambda d: _self_q(p_label(d), d),
    ),
    Row(
        "beyond_log",
        lambda: L.BeyondLog(alpha=ALPHA),
        lambda z, d: (1 - _lp(z, d)[1].exp() ** ALPHA) / ALPHA,
        lambda d: _self_q(p_label(d) ** ALPHA, d),
    ),
    Row(
        "p_loss",
        lambda: L.BeyondLog(alpha=1.0),
        lambda z, d: 1 - _lp(z, d)[1].exp(),
        lambda d: _self_q(p_label(d), d),
    ),
    Row(
        "profit",
        lambda: L.ProFiT(tau=TAU),
        lambda z, d: -(p_label(d) > TAU).double() * _lp(z, d)[1],
        lambda d: _self_q((p_label(d) > TAU).double(), d),
    ),
    Row(
        "eaft",
        lambda: L.EAFT(k=EAFT_K),
        lambda z, d: -topk_entropy_weight(d, EAFT_K) * _lp(z, d)[1],
        lambda d: _self_q(topk_entropy_weight(d, EAFT_K), d),
    ),
    Row(
        "iw_sft",
        L.IwSFT,
        lambda z, d: -iw_weights(d) * _lp(z, d)[1],
        lambda d: _self_q(iw_weights(d), d),
    ),
    Row(
        "cft",
        L.CFT,
        lambda z, d: -d.token_weights * _lp(z, d)[1],
        lambda d: _self_q(d.token_weights, d),
    ),
    Row(
        "label_smoothing",
        lambda: L.LabelSmoothing(epsilon=EPS_LS),
        lambda z, d: -((1 - EPS_LS) * _lp(z, d)[1] + EPS_LS / V * _lp(z, d)[0].sum(-1)),
        lambda d: (
            torch.full((N,), 1 - EPS_LS, dtype=torch.float64),
            torch.full((N, V), 1.0 / V, dtype=torch.float64),
            _ones(d),
        ),
    ),
    Row(
        "sft_kl",
        lambda: L.SFTKL(lam=LAM_KL),
        lambda z, d: (
            -_lp(z, d)[1] + LAM_KL * _kl(reference_dense(d, renormalize=True), _lp(z, d)[0])
        ),
        lambda d: (
            torch.full((N,), 1 / (1 + LAM_KL), dtype=torch.float64),
            reference_dense(d, renormalize=True),
            torch.full((N,), 1 + LAM_KL, dtype=torch.float64),
        ),
    ),
    Row(
        "sft_kl_raw",
        lambda: L.SFTKL(lam=LAM_KL, renormalize=False),
        lambda z, d: (
            -_lp(z, d)[1] + LAM_KL * _kl(reference_dense(d, renormalize=False), _lp(z, d)[0])
        ),
        lambda d: (
            torch.full((N,), 1 / (1 + LAM_KL), dtype=torch.float64),
            reference_dense(d, renormalize=False)
            + (1 - reference_dense(d, renormalize=False).sum(-1, keepdim=True)) * probs(d),
            torch.full((N,), 1 + LAM_KL, dtype=torch.float64),
        ),
    ),
    Row(
        "sft_kl_teacher_anchor",
        lambda: L.SFTKL(lam=LAM_KL, anchor="teacher"),
        lambda z, d: -_lp(z, d)[1] + LAM_KL * _kl(teacher_dense(d, renormalize=True), _lp(z, d)[0]),
        lambda d: (
            torch.full((N,), 1 / (1 + LAM_KL), dtype=torch.float64),
            teacher_dense(d, renormalize=True),
            torch.full((N,), 1 + LAM_KL, dtype=torch.float64),
        ),
    ),
    Row(
        "asft",
        lambda: L.ASFT(lam=LAM_ASFT),
        lambda z, d: (
            -p_label(d) * _lp(z, d)[1]
            + LAM_ASFT * _kl(reference_dense(d, renormalize=True), _lp(z, d)[0])
        ),
        lambda d: (
            p_label(d) / (p_label(d) + LAM_ASFT),
            reference_dense(d, renormalize=True),
            p_label(d) + LAM_ASFT,
        ),
    ),
    Row(
        "asft_teacher_anchor",
        lambda: L.ASFT(lam=LAM_ASFT, anchor="teacher"),
        lambda z, d: (
            -p_label(d) * _lp(z, d)[1]
            + LAM_ASFT * _kl(teacher_dense(d, renormalize=True), _lp(z, d)[0])
        ),
        lambda d: (
            p_label(d) / (p_label(d) + LAM_ASFT),
            teacher_dense(d, renormalize=True),
            p_label(d) + LAM_ASFT,
        ),
    ),
    Row(
        "proximal_sft",
        lambda: L.ProximalSFT(epsilon=EPS_PSFT),
        _objective_psft,
        _table5_psft,
    ),
    Row(
        "gem",
        lambda: L.GEM(beta=BETA),
        lambda z, d: -_lp(z, d)[1] + (torch.softmax(d.z / BETA, -1) * _lp(z, d)[0]).sum(-1),
        _table5_gem,
    ),
    Row(
        "kd",
        L.KD,
        lambda z, d: -(teacher_dense(d, renormalize=True) * _lp(z, d)[0]).sum(-1),
        lambda d: (
            torch.zeros(N, dtype=torch.float64),
            teacher_dense(d, renormalize=True),
            _ones(d),
        ),
    ),
    Row(
        "kd_raw",
        lambda: L.KD(renormalize=False),
        lambda z, d: -(teacher_dense(d, renormalize=False) * _lp(z, d)[0]).sum(-1),
        lambda d: (
            torch.zeros(N, dtype=torch.float64),
            teacher_dense(d, renormalize=False)
            + (1 - teacher_dense(d, renormalize=False).sum(-1, keepdim=True)) * probs(d),
            _ones(d),
        ),
    ),
    Row(
        "hybrid_kd",
        lambda: L.HybridKD(lam=LAM_HKD),
        lambda z, d: (
            -(1 - LAM_HKD) * _lp(z, d)[1]
            + LAM_HKD * _kl(teacher_dense(d, renormalize=True), _lp(z, d)[0])
        ),
        lambda d: (
            torch.full((N,), 1 - LAM_HKD, dtype=torch.float64),
            teacher_dense(d, renormalize=True),
            _ones(d),
        ),
    ),
    Row(
        "hybrid_kd_raw",
        lambda: L.HybridKD(lam=LAM_HKD, renormalize=False),
        lambda z, d: (
            -(1 - LAM_HKD) * _lp(z, d)[1]
            + LAM_HKD * _kl(teacher_dense(d, renormalize=False), _lp(z, d)[0])
        ),
        lambda d: (
            torch.full((N,), 1 - LAM_HKD, dtype=torch.float64),
            teacher_dense(d, renormalize=False)
            + (1 - teacher_dense(d, renormalize=False).sum(-1, keepdim=True)) * probs(d),
            _ones(d),
        ),
    ),
    *[
        Row(
            f"target_sft_eta{eta:g}",
            (lambda eta=eta: L.TargetSFT(eta=eta)),
            _objective_target(eta),
            (
                lambda d, eta=eta: (
                    p_label(d),
                    probs(d) if eta == 0 else guided_dense(d, eta),
                    _ones(d),
                )
            ),
        )
        for eta in (0.0, 0.2, 0.5, 1.0)
    ],
]

IDS = [r.name for r in ROWS]


def table5_q(row: Row, d: Data) -> tuple[Tensor, Tensor]:
    gamma, pi, scale = row.table5(d)
    q = gamma[:, None] * onehot(d) + (1 - gamma)[:, None] * pi
    if row.name == "gem":  # signed residual: Q = δ_y + (p − q_β), not scaled by 1 − γ
        q = onehot(d) + pi
    return q, scale


@pytest.fixture(scope="module")
def data() -> Data:
    return make_data()


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_value_matches_published_objective(row: Row, data: Data) -> None:
    loss = row.make()
    z = data.z.clone()
    got = loss(z, data.y, reduction="none", **data.inputs())
    want = torch.where(data.mask, row.objective(z, data), torch.zeros(N, dtype=torch.float64))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
    # sum and mean reductions
    torch.testing.assert_close(
        loss(z, data.y, reduction="sum", **data.inputs()), want.sum(), atol=TOL, rtol=TOL
    )
    n = int(data.mask.sum())
    torch.testing.assert_close(loss(z, data.y, **data.inputs()), want.sum() / n, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_gradient_matches_autograd_of_objective_and_table5(row: Row, data: Data) -> None:
    loss = row.make()
    z = data.z.clone().requires_grad_(True)
    loss(z, data.y, **data.inputs()).backward()
    assert z.grad is not None and z.grad.dtype == torch.float64

    zr = data.z.clone().requires_grad_(True)
    obj = torch.where(data.mask, row.objective(zr, data), torch.zeros(N, dtype=torch.float64))
    (obj.sum() / data.mask.sum()).backward()
    assert zr.grad is not None
    torch.testing.assert_close(z.grad, zr.grad, atol=TOL, rtol=TOL)

    # analytic: s (p − Q_table5) / n on supervised rows, 0 elsewhere
    q, scale = table5_q(row, data)
    analytic = scale[:, None] * (probs(data) - q) / data.mask.sum()
    analytic = torch.where(data.mask[:, None], analytic, torch.zeros_like(analytic))
    torch.testing.assert_close(z.grad, analytic, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_induced_target_is_table5(row: Row, data: Data) -> None:
    q_induced = L.induced_target(row.make(), data.z, data.y, **data.inputs())
    sup = data.mask
    torch.testing.assert_close(
        q_induced[sup].sum(-1), torch.ones(int(sup.sum()), dtype=torch.float64), atol=TOL, rtol=TOL
    )
    q5, scale = table5_q(row, data)
    p = probs(data)
    # Eq. 6 with a scale s: Q_induced = p − s (p − Q5); with s = 1 it is Q5 itself.
    torch.testing.assert_close(
        q_induced[sup], (p - scale[:, None] * (p - q5))[sup], atol=TOL, rtol=TOL
    )
    torch.testing.assert_close(
        q5[sup].sum(-1), torch.ones(int(sup.sum()), dtype=torch.float64), atol=TOL, rtol=TOL
    )
    # unsupervised rows: no gradient, Q = p
    torch.testing.assert_close(q_induced[~sup], p[~sup], atol=TOL, rtol=TOL)
    # the decomposition the loss reports is Table 5's Q (scale divided out)
    decomposition = row.make().target(data.z, data.y, **data.inputs())
    torch.testing.assert_close(decomposition.dense()[sup], q5[sup], atol=TOL, rtol=TOL)
    torch.testing.assert_close(decomposition.scale[sup], scale[sup], atol=TOL, rtol=TOL)


@pytest.mark.parametrize("name", ["sft_kl", "asft"])
def test_normalize_gives_table5_induced_target_exactly(name: str, data: Data) -> None:
    row = next(r for r in ROWS if r.name == name)
    loss = (
        L.SFTKL(lam=LAM_KL, normalize=True)
        if name == "sft_kl"
        else L.ASFT(lam=LAM_ASFT, normalize=True)
    )
    q_induced = L.induced_target(loss, data.z, data.y, **data.inputs())
    q5, scale = table5_q(row, data)
    sup = data.mask
    torch.testing.assert_close(q_induced[sup], q5[sup], atol=TOL, rtol=TOL)
    # and the value is the published objective divided by the scale
    got = loss(data.z, data.y, reduction="none", **data.inputs())
    want = row.objective(data.z, data) / scale
    torch.testing.assert_close(got[sup], want[sup], atol=TOL, rtol=TOL)


def test_p_loss_closed_form_appendix_d(data: Data) -> None:
    """Eq. 16: the p-loss / DFT target is Q_y = 2p − p², Q_k = (1 − p) p_k."""
    sup = data.mask
    p = probs(data)
    py = p_label(data)
    expected = (1 - py)[:, None] * p
    expected.scatter_(1, data.y.clamp_min(0)[:, None], (2 * py - py**2)[:, None])
    for loss in (L.DFT(), L.BeyondLog(alpha=1.0)):
        q = L.induced_target(loss, data.z, data.y)
        torch.testing.assert_close(q[sup], expected[sup], atol=TOL, rtol=TOL)


def test_label_smoothing_equals_torch(data: Data) -> None:
    z1 = data.z.clone().requires_grad_(True)
    z2 = data.z.clone().requires_grad_(True)
    a = L.LabelSmoothing(epsilon=EPS_LS)(z1, data.y)
    b = F.cross_entropy(z2, data.y, label_smoothing=EPS_LS)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)
    torch.testing.assert_close(z1.grad, z2.grad, atol=TOL, rtol=TOL)


def test_iw_sft_author_variant(data: Data) -> None:
    """Length-normalised, clipped weights (the authors' code) as an option."""
    loss = L.IwSFT(length_normalize=True, clip=(0.0, 1.05))
    logp_y = torch.log(p_label(data))
    diff = torch.where(data.mask, logp_y - data.reference_label_logprobs, torch.zeros_like(logp_y))
    w = []
    for s in range(SEQ):
        sel = data.sequence_ids == s
        w.append((diff[sel].sum() / data.mask[sel].sum()).exp().clamp(0.0, 1.05))
    weights = torch.stack(w)[data.sequence_ids]
    assert bool((weights == 1.05).any()) and bool((weights < 1.05).any())
    got = loss(data.z, data.y, reduction="none", **data.inputs())
    want = torch.where(
        data.mask, -weights * torch.log(p_label(data)), torch.zeros(N, dtype=torch.float64)
    )
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)


def test_profit_inclusive_threshold(data: Data) -> None:
    """1[p ≥ τ] differs from 1[p > τ] exactly at p = τ."""
    d = make_data(1)
    # p_y exactly as the loss computes it (one chunk: logsumexp over the whole [N, V] block)
    py = torch.exp(d.z.gather(1, d.y.clamp_min(0)[:, None]).squeeze(1) - torch.logsumexp(d.z, -1))
    row = int(torch.nonzero(d.mask)[0])
    tau = float(py[row])
    strict = L.ProFiT(tau=tau)(d.z, d.y, reduction="none")
    inclusive = L.ProFiT(tau=tau, inclusive=True)(d.z, d.y, reduction="none")
    assert float(strict[row]) == 0.0
    torch.testing.assert_close(inclusive[row], -torch.log(py[row]), atol=TOL, rtol=TOL)


def test_gem_gradient_is_q_minus_onehot(data: Data) -> None:
    """Table 4's GEM gradient is q_β − δ_y (λ = 1)."""
    z = data.z.clone().requires_grad_(True)
    L.GEM(beta=BETA)(z, data.y, reduction="sum").backward()
    q = torch.softmax(data.z / BETA, -1) - onehot(data)
    want = torch.where(data.mask[:, None], q, torch.zeros_like(q))
    torch.testing.assert_close(z.grad, want, atol=TOL, rtol=TOL)


def test_beyond_log_alpha_zero_is_sft(data: Data) -> None:
    a = L.BeyondLog(alpha=0.0)(data.z, data.y, reduction="none")
    b = L.SFT()(data.z, data.y, reduction="none")
    torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)


def test_registry_covers_table5_rows() -> None:
    expected = {
        "sft", "dft", "beyond_log", "profit", "eaft", "iw_sft", "cft", "label_smoothing",
        "sft_kl", "asft", "proximal_sft", "gem", "kd", "hybrid_kd", "target_sft",
        "target_sft_constant",  # Table 6's ablation of TARGET-SFT (test_losses_constant_branch.py)
    }  # fmt: skip
    assert set(L.PRESETS) == expected
    for name, cls in L.PRESETS.items():
        doc = cls.__doc__ or ""
        assert "Table 5 row" in doc and "γ" in doc, name
        assert isinstance(L.get_preset(name.replace("_", "-")), cls)
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        L.get_preset("nope")
