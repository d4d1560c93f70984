"""The composable framework: every (trust, residual) pair is exactly CE(Q, π_θ) with gradient p − Q.

Closed forms are dense float64 and written here, independently of the implementation.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from target_sft import losses as L
from target_sft import target_sft_loss

TOL = 1e-10
N, V, K, S = 20, 30, 5, 4


def batch(seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(N, V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (N,), generator=g)
    y[[0, 11]] = -100
    z[4, y[4]] += 9.0
    teacher = torch.log_softmax(2.5 * torch.randn(N, V, generator=g, dtype=torch.float64), -1)
    lp, ids = teacher.topk(K, -1)
    ids = ids.to(torch.int32)
    ids[6, 3:] = -1
    lp[6, 3:] = float("-inf")
    # put the label inside the support of a few rows
    for r in (1, 2, 3):
        if int(y[r]) not in ids[r].tolist():
            ids[r, K - 1] = int(y[r])
            lp[r, K - 1] = teacher[r, y[r]]
    logp_y = torch.log_softmax(z, -1).gather(1, y.clamp_min(0)[:, None]).squeeze(1)
    return {
        "z": z,
        "y": y,
        "teacher_ids": ids,
        "teacher_logprobs": lp,
        "token_weights": torch.rand(N, generator=g, dtype=torch.float64),
        "sequence_weights": 0.2 + torch.rand(S, generator=g, dtype=torch.float64),
        "sequence_ids": torch.arange(N) // (N // S),
        "reference_label_logprobs": logp_y - 0.2 * torch.rand(N, generator=g, dtype=torch.float64),
        "old_logprobs": logp_y + (torch.rand(N, generator=g, dtype=torch.float64) - 0.5),
    }


def loss_inputs(b: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in b.items() if k not in ("z", "y")}


def dense_pi_T(b: dict[str, Tensor], renormalize: bool) -> Tensor:
    ids, lp = b["teacher_ids"].long(), b["teacher_logprobs"]
    r = torch.where(ids >= 0, lp.exp(), torch.zeros_like(lp))
    out = torch.zeros(N, V, dtype=torch.float64).scatter_add_(1, ids.clamp_min(0), r)
    if renormalize:
        return out / out.sum(-1, keepdim=True)
    return out + (1 - out.sum(-1, keepdim=True)) * torch.softmax(b["z"], -1)


def dense_guided(b: dict[str, Tensor], eta: float) -> Tensor:
    p = torch.softmax(b["z"], -1)
    pt = dense_pi_T(b, renormalize=True)  # the normaliser cancels
    w = torch.where(pt > 0, p ** (1 - eta) * pt**eta, torch.zeros_like(p))
    return w / w.sum(-1, keepdim=True)


def gamma_closed(name: str, b: dict[str, Tensor]) -> Tensor:
    z, y = b["z"], b["y"]
    logp = torch.log_softmax(z, -1)
    lpy = logp.gather(1, y.clamp_min(0)[:, None]).squeeze(1)
    py = lpy.exp()
    if name == "const":
        return torch.full((N,), 0.3, dtype=torch.float64)
    if name == "prob":
        return py**0.5
    if name == "threshold":
        return (py >= 0.04).double()
    if name == "topk":
        q = torch.softmax(z.topk(5, -1).values, -1)
        return (-(q * q.log()).sum(-1) / math.log(5)) ** 2
    if name == "token":
        return b["token_weights"]
    if name == "sequence":
        return b["sequence_weights"][b["sequence_ids"]]
    if name == "iw":
        mask = y != -100
        d = torch.where(mask, lpy - b["reference_label_logprobs"], torch.zeros_like(lpy))
        per = torch.stack([d[b["sequence_ids"] == s].sum() for s in range(S)])
        return (0.5 * per).exp()[b["sequence_ids"]]
    if name == "ratio":
        r = (lpy - b["old_logprobs"]).exp()
        return torch.where(r <= 1.1, r, torch.zeros_like(r))
    raise AssertionError(name)


TRUSTS = {
    "const": lambda: 0.3,
    "prob": lambda: L.ModelProbTrust(alpha=0.5),
    "threshold": lambda: L.ThresholdTrust(0.04, inclusive=True),
    "topk": lambda: L.TopKEntropyTrust(5, alpha=2.0),
    "token": L.TokenWeightTrust,
    "sequence": L.SequenceWeightTrust,
    "iw": lambda: L.ImportanceWeightTrust(temperature=0.5),
    "ratio": lambda: L.ClippedRatioTrust(0.1),
}

RESIDUALS = {
    "self": lambda: L.SelfResidual(),
    "self_str": lambda: "self",
    "uniform": lambda: L.UniformResidual(),
    "teacher": lambda: L.SparseResidual(),
    "teacher_raw": lambda: "teacher_raw",
    "guided0.3": lambda: L.GuidedResidual(0.3),
    "guided1": lambda: L.GuidedResidual(1.0),
    "gem": lambda: L.GEMResidual(0.5, repulsion=0.4),
}


def residual_closed(name: str, b: dict[str, Tensor], gamma: Tensor) -> Tensor:
    """(1 − γ) π̃ (plus GEM's signed part), dense."""
    p = torch.softmax(b["z"], -1)
    one = (1 - gamma)[:, None]
    if name.startswith("self"):
        return one * p
    if name == "uniform":
        return one * torch.full_like(p, 1.0 / V)
    if name == "teacher":
        return one * dense_pi_T(b, True)
    if name == "teacher_raw":
        return one * dense_pi_T(b, False)
    if name == "guided0.3":
        return one * dense_guided(b, 0.3)
    if name == "guided1":
        return one * dense_guided(b, 1.0)
    if name == "gem":
        return one * p + 0.4 * (p - torch.softmax(b["z"] / 0.5, -1))
    raise AssertionError(name)


@pytest.mark.parametrize("rname", list(RESIDUALS))
@pytest.mark.parametrize("tname", list(TRUSTS))
def test_ce_of_q_and_gradient_p_minus_q(tname: str, rname: str) -> None:
    b = batch()
    loss = L.QTargetLoss(gamma=TRUSTS[tname](), residual=RESIDUALS[rname]())
    z = b["z"].clone().requires_grad_(True)
    per = loss(z, b["y"], reduction="none", **loss_inputs(b))
    per.sum().backward()

    mask = b["y"] != -100
    gamma = gamma_closed(tname, b)
    q = gamma[:, None] * F.one_hot(b["y"].clamp_min(0), V).double() + residual_closed(
        rname, b, gamma
    )
    q = torch.where(mask[:, None], q, torch.zeros_like(q))
    logp = torch.log_softmax(b["z"], -1)
    ce = -(torch.where(q != 0, q * logp, torch.zeros_like(q))).sum(-1)
    torch.testing.assert_close(per, ce, atol=TOL, rtol=TOL)
    grad = torch.where(mask[:, None], torch.softmax(b["z"], -1) - q, torch.zeros_like(q))
    torch.testing.assert_close(z.grad, grad, atol=TOL, rtol=TOL)
    torch.testing.assert_close(
        q[mask].sum(-1), torch.ones(int(mask.sum()), dtype=torch.float64), atol=TOL, rtol=TOL
    )


def test_target_sft_loss_formula_and_functional_equals_preset() -> None:
    """ℓ = lse − p z_y − (1 − p) Σ_S π̃ z_a, the DESIGN.md form, for η ∈ {0.2, 0.5, 1}."""
    b = batch(3)
    z, y = b["z"], b["y"]
    mask = y != -100
    lse = torch.logsumexp(z, -1)
    zy = z.gather(1, y.clamp_min(0)[:, None]).squeeze(1)
    py = (zy - lse).exp()
    for eta in (0.2, 0.5, 1.0):
        pi = dense_guided(b, eta)
        want = lse - py * zy - (1 - py) * (pi * z).sum(-1)
        want = torch.where(mask, want, torch.zeros_like(want))
        got = target_sft_loss(
            z, y, b["teacher_ids"], b["teacher_logprobs"], eta=eta, reduction="none"
        )
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
        preset = L.TargetSFT(eta=eta)(
            z, y, teacher_ids=b["teacher_ids"], teacher_logprobs=b["teacher_logprobs"]
        )
        torch.testing.assert_close(
            target_sft_loss(z, y, b["teacher_ids"], b["teacher_logprobs"], eta=eta),
            preset,
            atol=0,
            rtol=0,
        )


def test_eta_zero_has_dft_gradient_even_with_truncated_support() -> None:
    b = batch(4)
    z1 = b["z"].clone().requires_grad_(True)
    z2 = b["z"].clone().requires_grad_(True)
    target_sft_loss(z1, b["y"], b["teacher_ids"], b["teacher_logprobs"], eta=0.0).backward()
    L.DFT()(z2, b["y"]).backward()
    torch.testing.assert_close(z1.grad, z2.grad, atol=TOL, rtol=TOL)
    # ... while a small positive η restricted to the support is a different target
    z3 = b["z"].clone().requires_grad_(True)
    target_sft_loss(z3, b["y"], b["teacher_ids"], b["teacher_logprobs"], eta=1e-9).backward()
    assert not torch.allclose(z3.grad, z2.grad, atol=1e-6)


def test_eta_one_is_renormalised_teacher_and_label_in_support() -> None:
    b = batch(5)
    z, y = b["z"].clone().requires_grad_(True), b["y"]
    target_sft_loss(
        z, y, b["teacher_ids"], b["teacher_logprobs"], eta=1.0, reduction="sum"
    ).backward()
    p = torch.softmax(b["z"], -1)
    py = p.gather(1, y.clamp_min(0)[:, None])
    q = py * F.one_hot(y.clamp_min(0), V).double() + (1 - py) * dense_pi_T(b, True)
    mask = (y != -100)[:, None]
    torch.testing.assert_close(
        z.grad, torch.where(mask, p - q, torch.zeros_like(p)), atol=TOL, rtol=TOL
    )
    # rows 1-3 have the label in the support: Q_y = p_y + (1 − p_y) π̃(y) there
    for r in (1, 2, 3):
        yr = int(y[r])
        assert float(q[r, yr]) > float(py[r, 0])


def test_target_decomposition_and_describe() -> None:
    b = batch(6)
    loss = L.QTargetLoss(gamma=L.ModelProbTrust(), residual=L.GuidedResidual(0.5))
    t = loss.target(
        b["z"], b["y"], teacher_ids=b["teacher_ids"], teacher_logprobs=b["teacher_logprobs"]
    )
    mask = b["y"] != -100
    torch.testing.assert_close(
        t.dense()[mask].sum(-1),
        torch.ones(int(mask.sum()), dtype=torch.float64),
        atol=TOL,
        rtol=TOL,
    )
    assert t.gamma.shape == (N,) and bool((t.gamma[~mask] == 0).all())
    assert "p_y" in loss.describe() and "π_T" in loss.describe()
    assert "GuidedResidual(eta=0.5)" in repr(loss)
    for cls in L.PRESETS.values():
        assert cls().describe().startswith("γ = ")


def test_constant_float_gamma_and_reduction_default() -> None:
    b = batch(7)
    a = L.QTargetLoss(gamma=0.25, residual="uniform", reduction="sum")(b["z"], b["y"])
    c = L.QTargetLoss(gamma=L.ConstantTrust(0.25), residual=L.UniformResidual())(
        b["z"], b["y"], reduction="sum"
    )
    torch.testing.assert_close(a, c, atol=0, rtol=0)
    with pytest.raises(ValueError, match="residual = 'bogus' is not one of"):
        L.QTargetLoss(residual="bogus")
