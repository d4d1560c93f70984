"""The teacher's missing tail: ``tail="model"`` of TARGET-SFT's guided residual, KD and HybridKD.

1. Exactness: the value and the logit gradient of each ``tail="model"`` loss against a dense
   float64 reference of its own formula (the teacher completed off the support S by
   ``π_T(v) = m p_v / max(1 − π_θ(S), floor)``, ``m = 1 − π_T(S)``), to 1e-10, on rows with padding,
   ignored rows, the label in and out of S, and a confident row whose model tail is below the floor.
2. Accuracy: on teachers whose top-64 holds 70%, 90%, 98.5% and 99.9% of their mass, the relative
   L2 error of the logit gradient against the paper's full-vocabulary formula (the true teacher on
   all of V), for ``tail="renormalize"`` and ``tail="model"`` — the table in docs/LOSSES.md
   ("The teacher's missing tail") is printed by ``python tests/losses/test_losses_tail.py``.
3. The Triton row and fused-linear kernels compute it unchanged (TRITON_INTERPRET, tiny shapes).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from target_sft import losses as L
from target_sft.losses import FusedLinearBlocks, fused_linear_qtarget_loss
from target_sft.losses.residual import TAIL_FLOOR, GuidedResidual

TOL = 1e-10
N, V, K = 16, 40, 6


def make_data(seed: int = 0, *, confident: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Float64 logits [N, V], labels (some -100), teacher top-K ids / full-softmax log-probs."""
    g = torch.Generator().manual_seed(seed)
    z = 2.5 * torch.randn(N, V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (N,), generator=g)
    y[[3, 10]] = -100
    teacher = torch.log_softmax(2.0 * torch.randn(N, V, generator=g, dtype=torch.float64), -1)
    teacher[5, y[5]] += 6.0
    teacher = torch.log_softmax(teacher, -1)
    lp, ids = teacher.topk(K, dim=-1)
    ids = ids.to(torch.int32)
    ids[2, -2:] = -1
    lp[2, -2:] = float("-inf")
    ids[9, -1] = -1
    lp[9, -1] = float("-inf")
    if confident:
        z[7, ids[7, 0].long()] += 22.0  # the model's tail 1 − π_θ(S) < 1e-6: below TAIL_FLOOR
    return z, y, ids, lp


def dense_teacher_with_tail(z: Tensor, ids: Tensor, lp: Tensor) -> Tensor:
    """π_T on S and ``m p_v / max(1 − π_θ(S), floor)`` off S, dense [N, V] (not normalised when
    the floor is active)."""
    p = torch.softmax(z, -1)
    on_s = torch.zeros_like(p).scatter_add_(
        1, ids.long().clamp_min(0), torch.where(ids >= 0, lp.exp(), torch.zeros_like(lp))
    )
    in_s = torch.zeros_like(p, dtype=torch.bool).scatter_(1, ids.long().clamp_min(0), ids >= 0)
    m = (1.0 - on_s.sum(-1)).clamp_min(0.0)
    tau = torch.where(in_s, torch.zeros_like(p), p).sum(-1)
    off = (m / tau.clamp_min(TAIL_FLOOR))[:, None] * p
    return torch.where(in_s, on_s, off)


def guided(z: Tensor, teacher: Tensor, eta: float) -> Tensor:
    """π̃ ∝ p^{1−η} π_T^η over the whole vocabulary (0^0 = 1)."""
    p = torch.softmax(z, -1)
    w = p ** (1.0 - eta) * (teacher**eta if eta > 0 else torch.ones_like(teacher))
    return w / w.sum(-1, keepdim=True)


def objective(name: str, z: Tensor, y: Tensor, pi: Tensor, eta: float, lam: float) -> Tensor:
    """The published objective with the detached target π̃ (sum over supervised rows)."""
    logp = torch.log_softmax(z, -1)
    mask = y != -100
    nll = -logp.gather(1, y.clamp_min(0)[:, None]).squeeze(1)
    ce = -(pi * logp).sum(-1)
    if name == "target_sft":
        p_y = torch.exp(-nll).detach()
        per = p_y * nll + (1.0 - p_y) * ce
    elif name == "kd":
        per = ce
    else:
        kl = torch.special.xlogy(pi, pi).sum(-1) + ce
        per = (1.0 - lam) * nll + lam * kl
    return torch.where(mask, per, torch.zeros_like(per)).sum()


CASES = [
    ("target_sft", {"eta": 0.5}, 0.5),
    ("target_sft", {"eta": 0.2}, 0.2),
    ("target_sft", {"eta": 1.0}, 1.0),
    ("kd", {}, 1.0),
    ("hybrid_kd", {"lam": 0.7}, 1.0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_tail_model_matches_dense_float64_formula(case) -> None:
    name, params, eta = case
    z, y, ids, lp = make_data()
    zz = z.clone().requires_grad_(True)
    loss = L.get_preset(name, tail="model", reduction="sum", **params)
    got = loss(zz, y, ids, lp)
    (grad,) = torch.autograd.grad(got, zz)

    pi = guided(z, dense_teacher_with_tail(z, ids, lp), eta).detach()
    zr = z.clone().requires_grad_(True)
    want = objective(name, zr, y, pi, eta, params.get("lam", 0.0))
    (want_grad,) = torch.autograd.grad(want, zr)
    assert abs(got.item() - want.item()) <= TOL * max(1.0, abs(want.item()))
    assert (grad - want_grad).abs().max() <= TOL
    # the induced target is a distribution that puts mass off the support
    q = loss.target(z, y, teacher_ids=ids, teacher_logprobs=lp).dense()
    mask = y != -100
    assert torch.allclose(q[mask].sum(-1), torch.ones(int(mask.sum()), dtype=torch.float64))
    in_s = torch.zeros_like(q, dtype=torch.bool).scatter_(1, ids.long().clamp_min(0), ids >= 0)
    in_s.scatter_(1, y.clamp_min(0)[:, None], True)
    assert float(torch.where(in_s, 0.0, q)[mask].sum()) > 0.01


def test_tail_model_below_floor_and_limits() -> None:
    z, y, ids, lp = make_data()
    # row 7's model tail is below the floor: finite, and between the two choices
    for eta in (0.5, 1.0):
        loss = L.TargetSFT(eta, tail="model", reduction="none")
        assert torch.isfinite(loss(z, y, ids, lp)).all()
    # η = 0: sg[π_θ] over V for either tail (DFT's gradient)
    za, zb = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(L.TargetSFT(0.0, tail="model", reduction="sum")(za, y), za)
    (gb,) = torch.autograd.grad(L.DFT(reduction="sum")(zb, y), zb)
    assert (ga - gb).abs().max() < 1e-12
    # a full-vocabulary support has no tail: "model" equals "renormalize"
    full_lp, full_ids = torch.log_softmax(z.flip(-1), -1).sort(-1, descending=True)
    for eta in (0.3, 1.0):
        a = L.TargetSFT(eta, tail="model", reduction="sum")
        b = L.TargetSFT(eta, reduction="sum")
        za, zb = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
        va, vb = a(za, y, full_ids.int(), full_lp), b(zb, y, full_ids.int(), full_lp)
        (ga,) = torch.autograd.grad(va, za)
        (gb,) = torch.autograd.grad(vb, zb)
        assert abs((va - vb).item()) < 1e-9 and (ga - gb).abs().max() < 1e-12
    # the default is today's behaviour
    assert repr(L.TargetSFT(0.5).residual) == repr(GuidedResidual(0.5))
    assert L.KD().residual.tail == "renormalize" and L.HybridKD().residual.tail == "renormalize"


def test_tail_errors() -> None:
    with pytest.raises(ValueError, match=r"tail = 'tails' is not one of \('renormalize', 'model'"):
        L.TargetSFT(tail="tails")
    with pytest.raises(ValueError, match="renormalize=False keeps the truncated teacher"):
        L.KD(renormalize=False, tail="model")
    with pytest.raises(TypeError, match="unexpected keyword argument 'tail'"):
        L.SFT(tail="model")
    z, y, ids, lp = make_data()
    lp = lp.clone()
    lp[4] = torch.log_softmax(lp[4], -1) + 0.2  # not full-softmax log-probs: Σ exp > 1
    with pytest.raises(ValueError, match=r"teacher_logprobs\[4, :\] hold probability 1\.2"):
        L.KD(tail="model")(z, y, ids, lp)


# ---------------------------------------------------------------- the Triton kernels
TRITON_CASES = [
    ("target_sft", {"eta": 0.5}),
    ("target_sft", {"eta": 1.0}),
    ("kd", {}),
    ("hybrid_kd", {}),
]


def _interpreting() -> bool:
    import triton.knobs

    return bool(triton.knobs.runtime.interpret)


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_triton_row_and_fused_linear_kernels_compute_the_tail(case) -> None:
    """The kernels need nothing new: the tail is mass on sg[p] plus (signed) support mass. Both
    kernels in float32 against the PyTorch reference in float64 (same formula, one floor). The
    tolerance is float32 rounding times ``c ≤ m / TAIL_FLOOR`` (~1e3 on row 7)."""
    assert _interpreting(), "TRITON_INTERPRET=1 must be set before triton is imported"
    name, params = case
    z64, y, ids, lp = make_data(1)  # row 7 is below the floor
    blocks = FusedLinearBlocks(16, 32, 16, 16, 32, num_warps=4, splits=2)
    g = torch.Generator().manual_seed(5)
    e64 = torch.randn(N, 12, generator=g, dtype=torch.float64)
    w64 = 0.6 * torch.randn(V, 12, generator=g, dtype=torch.float64)
    kw = {"teacher_ids": ids, "teacher_logprobs": lp}

    def ref_grad(x64: Tensor) -> tuple[Tensor, Tensor]:
        xx = x64.clone().requires_grad_(True)
        loss = L.get_preset(name, tail="model", reduction="sum", impl="torch", **params)
        out = loss(xx, y, **kw)
        return out.detach(), torch.autograd.grad(out, xx)[0]

    # the row kernels on float32 logits
    zz = z64.float().requires_grad_(True)
    loss = L.get_preset(name, tail="model", reduction="sum", impl="triton", **params)
    out = loss(zz, y, **{**kw, "teacher_logprobs": lp.float()})
    (grad,) = torch.autograd.grad(out, zz)
    want, want_grad = ref_grad(zz.detach().double())
    assert abs(out.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))
    assert (grad.double() - want_grad).abs().max() <= 1e-4

    # the fused-linear kernels (hidden × LM head) on float32 inputs
    e, w = e64.float().requires_grad_(True), w64.float().requires_grad_(True)
    out = fused_linear_qtarget_loss(
        L.get_preset(name, tail="model", reduction="sum", **params),
        e,
        w,
        y,
        impl="triton",
        blocks=blocks,
        teacher_ids=ids,
        teacher_logprobs=lp.float(),
    )
    de, dw = torch.autograd.grad(out, (e, w))
    want, G = ref_grad(e.detach().double() @ w.detach().double().T)
    assert abs(out.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))
    assert (de.double() - G @ w.detach().double()).abs().max() <= 1e-4
    assert (dw.double() - G.T @ e.detach().double()).abs().max() <= 1e-4


# ---------------------------------------------------------------- accuracy vs the full vocabulary
ACC_V, ACC_K, ACC_N = 4000, 64, 64
MASSES = (0.70, 0.90, 0.985, 0.999)


def teacher_with_mass(base: Tensor, mass: float, k: int) -> Tensor:
    """``log_softmax(s · base)`` per row, ``s`` bisected so that the top-k holds ``mass``."""
    lo = torch.zeros(base.shape[0], dtype=base.dtype)
    hi = torch.full_like(lo, 50.0)
    for _ in range(100):
        mid = (lo + hi) / 2
        top = torch.log_softmax(mid[:, None] * base, -1).topk(k, -1).values.exp().sum(-1)
        lo, hi = torch.where(top < mass, mid, lo), torch.where(top < mass, hi, mid)
    return torch.log_softmax(hi[:, None] * base, -1)


def gradient_errors(
    mass: float, student: str = "similar", *, seed: int = 0
) -> dict[tuple[str, str], float]:
    """Relative L2 error of the logit gradient vs the full-vocabulary formula, per (loss, tail).

    ``student="similar"``: the student's logits are ``0.7 log π_T + 0.8 ε`` (a student being
    distilled from this teacher); ``"unrelated"``: ``2 ε`` (ε standard normal)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(ACC_N, ACC_V, generator=g, dtype=torch.float64)
    log_t = teacher_with_mass(base, mass, ACC_K)
    noise = torch.randn(ACC_N, ACC_V, generator=g, dtype=torch.float64)
    z = 0.7 * log_t + 0.8 * noise if student == "similar" else 2.0 * noise
    y = torch.multinomial(log_t.exp(), 1, generator=g).squeeze(1)
    lp, ids = log_t.topk(ACC_K, -1)
    full_lp, full_ids = log_t.sort(-1, descending=True)
    out: dict[tuple[str, str], float] = {}
    for name, params in (("target_sft", {"eta": 0.5}), ("kd", {})):
        grads = {}
        for tail, (sup_ids, sup_lp) in (
            ("full", (full_ids, full_lp)),
            ("renormalize", (ids, lp)),
            ("model", (ids, lp)),
        ):
            zz = z.clone().requires_grad_(True)
            t = "renormalize" if tail == "full" else tail
            loss = L.get_preset(name, tail=t, reduction="sum", **params)
            (grads[tail],) = torch.autograd.grad(loss(zz, y, sup_ids.int(), sup_lp), zz)
        ref = grads["full"]
        for tail in ("renormalize", "model"):
            out[(name, tail)] = float((grads[tail] - ref).norm() / ref.norm())
    return out


def test_full_vocabulary_reference_is_the_papers_formula() -> None:
    """With the full vocabulary as support, TARGET-SFT is the paper's π̃ ∝ p^{1−η} π_T^η, dense."""
    z, y, _, _ = make_data()
    t = torch.log_softmax(torch.randn(N, V, dtype=torch.float64), -1)
    lp, ids = t.sort(-1, descending=True)
    zz = z.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(L.TargetSFT(0.5, reduction="sum")(zz, y, ids.int(), lp), zz)
    p = torch.softmax(z, -1)
    pi = guided(z, t.exp(), 0.5)
    p_y = p.gather(1, y.clamp_min(0)[:, None])
    q = p_y * F.one_hot(y.clamp_min(0), V) + (1 - p_y) * pi
    want = torch.where((y != -100)[:, None], p - q, torch.zeros_like(p))
    assert (grad - want).abs().max() < 1e-12


@pytest.mark.parametrize("mass", MASSES)
def test_tail_model_is_closer_to_the_full_vocabulary_gradient(mass: float) -> None:
    err = gradient_errors(mass)
    for name in ("target_sft", "kd"):
        assert err[(name, "model")] < err[(name, "renormalize")], err
    assert err[("target_sft", "renormalize")] > 1e-4


@pytest.mark.parametrize("name", ["target_sft", "kd"])
def test_float32_computes_the_same_formula(name: str) -> None:
    """float32 logits against float64, one formula (one floor): a confident student whose model
    tail sits around the floor (median 1 − π_θ(S) ≈ 9e-4) and a 10% missing teacher tail, where c
    is largest. Measured: ≤ 1e-5 relative L2 (renormalize: ≤ 5e-7)."""
    g = torch.Generator().manual_seed(0)
    log_t = teacher_with_mass(
        torch.randn(ACC_N, ACC_V, generator=g, dtype=torch.float64), 0.9, ACC_K
    )
    z = 3.0 * (0.7 * log_t + 0.8 * torch.randn(ACC_N, ACC_V, generator=g, dtype=torch.float64))
    y = torch.multinomial(log_t.exp(), 1, generator=g).squeeze(1)
    lp, ids = log_t.topk(ACC_K, -1)
    out = []
    for dtype in (torch.float64, torch.float32):
        zz = z.to(dtype).requires_grad_(True)
        loss = L.get_preset(name, tail="model", reduction="sum")
        value = loss(zz, y, ids.int(), lp.to(dtype))
        out.append((value.item(), torch.autograd.grad(value, zz)[0].double()))
    (v64, g64), (v32, g32) = out
    assert abs(v32 - v64) <= 2e-5 * abs(v64)
    assert float((g32 - g64).norm() / g64.norm()) <= 5e-5


def main() -> None:  # pragma: no cover - prints the table of docs/LOSSES.md
    print(f"V = {ACC_V}, top-k = {ACC_K}, {ACC_N} rows, float64; relative L2 of the logit gradient")
    print(
        "| student | top-k mass | TARGET-SFT η=0.5: renormalize | model | KD: renormalize | model |"
    )
    print("|---|---|---|---|---|---|")
    for student in ("similar", "unrelated"):
        for mass in MASSES:
            e = gradient_errors(mass, student)
            cells = [e[(n, t)] for n in ("target_sft", "kd") for t in ("renormalize", "model")]
            row = " | ".join(f"{c:.2%}" for c in cells)
            print(f"| {student} | {100 * mass:g}% | {row} |")


if __name__ == "__main__":  # pragma: no cover
    main()
