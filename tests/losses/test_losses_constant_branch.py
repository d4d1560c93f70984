"""Table 6's ablation "constant branch c, instead of residual 1 − γ_t" (``target_sft_constant``).

``Q = (1 − c) δ_y + c π̃`` with TARGET-SFT's guided residual π̃ ∝ π_θ^{1−η} π_T^η on the teacher
support; value ``CE(Q, π_θ)``, gradient ``p − Q``. Checked in float64 against a dense PyTorch
reference written from that formula (value, autograd gradient, analytic ``p − Q``, the induced
target), and its limits: c = 0 is SFT, c = 1 is the guided residual alone (η = 1: KD), η = 1 is
Hybrid KD with λ = c (same gradient), η = 0 is token-weighted SFT with w = 1 − c.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from target_sft import losses as L

TOL = 1e-10
N, V, K = 20, 30, 5


def make_data(seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(N, V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (N,), generator=g)
    z[1, y[1]] += 10.0  # a confident row
    y[[4, 11]] = -100  # ignored rows
    teacher = torch.log_softmax(2.5 * torch.randn(N, V, generator=g, dtype=torch.float64), -1)
    lp, ids = teacher.topk(K, dim=-1)
    ids = ids.to(torch.int32)
    ids[2, -2:] = -1  # a short support
    lp[2, -2:] = float("-inf")
    sup = [int(y[i]) in ids[i].tolist() for i in range(N) if y[i] >= 0]
    assert not all(sup)  # the label lies outside the support on some rows
    ids[6, 0] = int(y[6])  # ... and inside on this one
    lp[6, 0] = teacher[6, y[6]]
    return {"z": z, "y": y, "ids": ids, "lp": lp}


@pytest.fixture(scope="module")
def data() -> dict[str, Tensor]:
    return make_data()


def guided_dense(d: dict[str, Tensor], eta: float) -> Tensor:
    """π̃ ∝ π_θ^{1−η} π_T^η on the support, dense [N, V] (η = 0: sg[π_θ] on the vocabulary)."""
    p = torch.softmax(d["z"], -1)
    if eta == 0.0:
        return p
    pt = torch.zeros(N, V, dtype=torch.float64)
    valid = d["ids"] >= 0
    pt.scatter_add_(
        1,
        d["ids"].long().clamp_min(0),
        torch.where(valid, d["lp"].exp(), torch.zeros_like(d["lp"])),
    )
    w = torch.where(pt > 0, p ** (1.0 - eta) * pt**eta, torch.zeros_like(pt))
    return w / w.sum(-1, keepdim=True)


def reference_q(d: dict[str, Tensor], c: float, eta: float) -> Tensor:
    onehot = F.one_hot(d["y"].clamp_min(0), V).to(torch.float64)
    return (1.0 - c) * onehot + c * guided_dense(d, eta)


def reference_value(z: Tensor, d: dict[str, Tensor], c: float, eta: float) -> Tensor:
    """Per-row CE(Q, π_θ) with Q held fixed, 0 on ignored rows (autograd-able in z)."""
    q = reference_q(d, c, eta).detach()
    per_row = -(q * torch.log_softmax(z, -1)).sum(-1)
    return torch.where(d["y"] != -100, per_row, torch.zeros_like(per_row))


def call(loss: L.QTargetLoss, z: Tensor, d: dict[str, Tensor], **kw) -> Tensor:
    return loss(z, d["y"], d["ids"], d["lp"], **kw)


CASES = [(c, eta) for c in (0.2, 0.5, 1.0) for eta in (0.2, 0.5, 1.0)] + [(0.5, 0.0), (0.0, 0.5)]


@pytest.mark.parametrize(("c", "eta"), CASES, ids=[f"c{c:g}-eta{e:g}" for c, e in CASES])
def test_value_and_gradient_against_the_formula(c: float, eta: float, data) -> None:
    mask = data["y"] != -100
    n = int(mask.sum())
    loss = L.get_preset("target_sft_constant", c=c, eta=eta)
    assert isinstance(loss, L.TargetSFTConstant)

    got = call(loss, data["z"], data, reduction="none")
    want = reference_value(data["z"], data, c, eta)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)

    z = data["z"].clone().requires_grad_(True)
    call(loss, z, data).backward()
    zr = data["z"].clone().requires_grad_(True)
    (reference_value(zr, data, c, eta).sum() / n).backward()
    torch.testing.assert_close(z.grad, zr.grad, atol=TOL, rtol=TOL)

    # analytic: (p − Q) / n on supervised rows, 0 elsewhere
    p = torch.softmax(data["z"], -1)
    analytic = torch.where(mask[:, None], (p - reference_q(data, c, eta)) / n, torch.zeros_like(p))
    torch.testing.assert_close(z.grad, analytic, atol=TOL, rtol=TOL)

    # the induced target (Eq. 6) and the reported decomposition are Q itself
    q = L.induced_target(loss, data["z"], data["y"], data["ids"], data["lp"])
    torch.testing.assert_close(q[mask], reference_q(data, c, eta)[mask], atol=TOL, rtol=TOL)
    t = loss.target(data["z"], data["y"], teacher_ids=data["ids"], teacher_logprobs=data["lp"])
    torch.testing.assert_close(t.gamma[mask], torch.full((n,), 1.0 - c, dtype=torch.float64))
    torch.testing.assert_close(t.dense()[mask], reference_q(data, c, eta)[mask], atol=TOL, rtol=TOL)


def _grad(loss: L.QTargetLoss, d: dict[str, Tensor], **kw) -> tuple[Tensor, Tensor]:
    z = d["z"].clone().requires_grad_(True)
    value = loss(z, d["y"], **kw, reduction="none")
    value.sum().backward()
    assert z.grad is not None
    return value.detach(), z.grad


def test_c_zero_is_sft(data) -> None:
    v, g = _grad(
        L.TargetSFTConstant(c=0.0), data, teacher_ids=data["ids"], teacher_logprobs=data["lp"]
    )
    v0, g0 = _grad(L.SFT(), data)
    torch.testing.assert_close(v, v0, atol=TOL, rtol=TOL)
    torch.testing.assert_close(g, g0, atol=TOL, rtol=TOL)


def test_c_one_eta_one_is_kd(data) -> None:
    teacher = {"teacher_ids": data["ids"], "teacher_logprobs": data["lp"]}
    v, g = _grad(L.TargetSFTConstant(c=1.0, eta=1.0), data, **teacher)
    v0, g0 = _grad(L.KD(), data, **teacher)
    torch.testing.assert_close(v, v0, atol=TOL, rtol=TOL)
    torch.testing.assert_close(g, g0, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("c", [0.2, 0.5, 0.8])
def test_eta_one_is_hybrid_kd_gradient(c: float, data) -> None:
    """Table 6's two ablations meet at η = 1: Distill(c) and constant branch c (same gradient;
    the value differs by c·H(π_T) on the support)."""
    teacher = {"teacher_ids": data["ids"], "teacher_logprobs": data["lp"]}
    v, g = _grad(L.TargetSFTConstant(c=c, eta=1.0), data, **teacher)
    v0, g0 = _grad(L.HybridKD(lam=c), data, **teacher)
    torch.testing.assert_close(g, g0, atol=TOL, rtol=TOL)
    pt = guided_dense(data, 1.0)
    entropy = -torch.special.xlogy(pt, pt).sum(-1)
    mask = data["y"] != -100
    torch.testing.assert_close(v[mask], (v0 + c * entropy)[mask], atol=TOL, rtol=TOL)


def test_eta_zero_is_token_weighted_sft(data) -> None:
    """η = 0: π̃ = sg[π_θ], so the gradient is (1 − c)(p − δ_y), CFT with weight 1 − c; no
    teacher is needed."""
    c = 0.3
    _, g = _grad(L.TargetSFTConstant(c=c, eta=0.0), data)
    _, g0 = _grad(L.CFT(), data, token_weights=torch.full((N,), 1.0 - c, dtype=torch.float64))
    torch.testing.assert_close(g, g0, atol=TOL, rtol=TOL)


def test_c_near_its_limits_is_continuous(data) -> None:
    teacher = {"teacher_ids": data["ids"], "teacher_logprobs": data["lp"]}
    for c, c0 in ((1e-9, 0.0), (1.0 - 1e-9, 1.0)):
        _, g = _grad(L.TargetSFTConstant(c=c), data, **teacher)
        _, g0 = _grad(L.TargetSFTConstant(c=c0), data, **teacher)
        torch.testing.assert_close(g, g0, atol=1e-8, rtol=0)


def test_bad_c_and_missing_teacher(data) -> None:
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"^c = .* is outside \[0.0, 1.0\]"):
            L.TargetSFTConstant(c=bad)
    with pytest.raises(ValueError, match="needs teacher_ids and teacher_logprobs"):
        L.TargetSFTConstant()(data["z"], data["y"])
    assert L.TargetSFTConstant.parameter_names()[:2] == ("c", "eta")
    assert L.TargetSFTConstant(c=0.2).describe().startswith("γ = 0.8, π̃ = ∝ π_θ^0.5 π_T^0.5")


def test_config_field_reaches_the_preset(tmp_path) -> None:
    from target_sft.config import TargetSFTConfig, resolve_loss

    args = TargetSFTConfig(output_dir=str(tmp_path), loss="target_sft_constant", c=0.2, eta=1.0)
    name, kwargs = resolve_loss(args)
    assert name == "target_sft_constant" and kwargs["c"] == 0.2 and kwargs["eta"] == 1.0
    loss = L.get_preset(name, **kwargs)
    assert isinstance(loss, L.TargetSFTConstant) and (loss.c, loss.eta) == (0.2, 1.0)
