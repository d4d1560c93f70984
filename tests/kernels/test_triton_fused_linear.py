"""The fused-linear Triton kernel against the float64 PyTorch reference on materialised logits.

CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, conftest.py), tiny tiles so that
``V = 100`` spans four 32-wide vocabulary tiles (the last one partial), two vocabulary splits in
the LSE forward and several row blocks. The reference is the PyTorch loss of
``softcap·tanh((E Wᵀ + b)/softcap)`` computed in float64 from the same (rounded) inputs.

Tolerances: the loss to ``1e-5`` relative (float32 statistics, fp32 dot accumulation). Gradients,
elementwise, with ``G = ∂L/∂z`` the float64 logit gradient:

* fp32 inputs: ``|dE − dE64| ≤ 1e-5·(|G| |W|) + 1e-7`` (fp32 accumulation, exact fp32 dots);
* bf16 inputs: the logit gradient is rounded to bf16 once before the tensor-core dots (as every
  bf16 matmul backward) and the result once more, so
  ``|dE − dE64| ≤ 2^-8 (|G| |W|) + 2^-8 |dE64| + 1e-6`` (same for ``dW`` with ``|G|ᵀ |E|``).
"""

from __future__ import annotations

import pytest
import torch
from triton_helpers import as64, make_batch, require_interpreter

from target_sft import losses as L
from target_sft.losses import (
    FusedLinearBlocks,
    fused_linear_qtarget_loss,
    fused_linear_target_sft_loss,
)

require_interpreter()

N, V, H, K = 16, 100, 24, 5
BLOCKS = FusedLinearBlocks(16, 32, 16, 16, 32, num_warps=4, splits=2)


def make(dtype: torch.dtype, seed: int = 0, bias: bool = True):
    _z, y, kw = make_batch(N, V, K, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    e = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype)
    w = (0.4 * torch.randn(V, H, generator=g, dtype=torch.float64)).to(dtype)
    w[y[1].clamp_min(0)] += 0.5 * e[1]  # a confident row
    b = (0.5 * torch.randn(V, generator=g, dtype=torch.float64)).to(dtype) if bias else None
    return e, w, b, y, kw


def grads(fn, e, w, b, **kw):
    leaves = [t.clone().requires_grad_(True) for t in (e, w)] + (
        [] if b is None else [b.clone().requires_grad_(True)]
    )
    out = fn(*leaves, **kw)
    out.sum().backward()
    return out.detach(), [t.grad for t in leaves]


def reference(loss, e, w, b, y, kw, softcap, **call):
    """Float64 loss, input gradients and the logit gradient ``G`` (for the tolerances)."""
    e64, w64 = e.double().requires_grad_(True), w.double().requires_grad_(True)
    b64 = None if b is None else b.double().requires_grad_(True)
    z = torch.nn.functional.linear(e64, w64, b64)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z.retain_grad()
    out = loss(z, y, **as64(kw), **call)
    out.sum().backward()
    g = [e64.grad, w64.grad] + ([] if b64 is None else [b64.grad])
    return out.detach(), g, z.grad


def check(out, got, ref, want, G, e, w, dtype) -> None:
    assert torch.isfinite(out).all()
    assert (out.double() - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))
    absG = G.abs()
    scale = [absG @ w.double().abs(), absG.T @ e.double().abs(), absG.sum(0)]
    for name, a, r, s in zip(("hidden", "weight", "bias"), got, want, scale, strict=False):
        assert a.dtype == dtype and a.shape == r.shape, name
        s = s.reshape(r.shape)
        err = (a.double() - r).abs()
        if dtype == torch.float32:
            tol = 1e-5 * s + 1e-7
        else:
            tol = 2.0**-8 * s + 2.0**-8 * r.abs() + 1e-6
        assert (err <= tol).all(), (name, float((err - tol).max()))


FUSED = [
    ("sft", {}),
    ("dft", {}),
    ("profit", {}),
    ("label_smoothing", {}),
    ("sft_kl", {}),
    ("asft", {}),
    ("asft", {"anchor": "teacher"}),
    ("kd", {}),
    ("hybrid_kd", {}),
    ("target_sft", {"eta": 0.0}),
    ("target_sft", {"eta": 0.5}),
    ("target_sft", {"eta": 1.0}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "preset", FUSED, ids=lambda p: p[0] + "".join(f"-{k}={v}" for k, v in p[1].items())
)
def test_preset_matches_float64_reference(preset, dtype: torch.dtype) -> None:
    name, params = preset
    e, w, b, y, kw = make(dtype)
    keys = ("teacher_ids", "teacher_logprobs", "reference_ids", "reference_logprobs")
    kw = {k: kw[k] for k in keys}

    def fused(e_, w_, b_):
        return fused_linear_qtarget_loss(
            L.get_preset(name, **params), e_, w_, y, bias=b_, impl="triton", blocks=BLOCKS, **kw
        )

    out, got = grads(fused, e, w, b)
    ref, want, G = reference(L.get_preset(name, impl="torch", **params), e, w, b, y, kw, None)
    check(out, got, ref, want, G, e, w, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_target_sft_softcap_3d_num_items_no_bias(dtype: torch.dtype) -> None:
    e, w, _, y, kw = make(dtype, seed=1, bias=False)
    b_, length = 2, N // 2
    e3 = e.reshape(b_, length, H)
    y3 = y.reshape(b_, length)
    ids = kw["teacher_ids"].reshape(b_, length, K)
    lp = kw["teacher_logprobs"].reshape(b_, length, K)
    num = torch.tensor(9)

    def fused(e_, w_):
        return fused_linear_target_sft_loss(
            e_,
            w_,
            y3,
            ids,
            lp,
            eta=0.2,
            softcap=3.0,
            num_items_in_batch=num,
            impl="triton",
            blocks=BLOCKS,
        )

    out, got = grads(fused, e3, w, None)
    ref, want, G = reference(
        L.TargetSFT(eta=0.2, impl="torch"),
        e3,
        w,
        None,
        y3,
        {"teacher_ids": ids, "teacher_logprobs": lp},
        3.0,
        num_items_in_batch=num,
    )
    check(out, got, ref, want, G.reshape(-1, V), e, w, dtype)


@pytest.mark.parametrize("name", ["sft_kl", "asft"])
def test_reference_anchor_3d_hidden(name: str) -> None:
    """The fused-linear kernel sweeps the reference support ([B, L, Kr], shifted like labels)."""
    e, w, b, y, kw = make(torch.float32, seed=3)
    b_, length = 2, N // 2
    e3 = e.reshape(b_, length, H)
    y3 = y.reshape(b_, length)
    kw3 = {k: kw[k].reshape(b_, length, -1) for k in ("reference_ids", "reference_logprobs")}

    def fused(e_, w_, b2):
        return fused_linear_qtarget_loss(
            L.get_preset(name), e_, w_, y3, bias=b2, impl="triton", blocks=BLOCKS, **kw3
        )

    out, got = grads(fused, e3, w, b)
    ref, want, G = reference(L.get_preset(name, impl="torch"), e3, w, b, y3, kw3, None)
    check(out, got, ref, want, G.reshape(-1, V), e, w, torch.float32)


def test_all_rows_ignored_gives_zero_and_zero_grads() -> None:
    e, w, b, y, kw = make(torch.bfloat16, seed=2)
    y = torch.full_like(y, -100)

    def fused(e_, w_, b_):
        return fused_linear_target_sft_loss(
            e_,
            w_,
            y,
            kw["teacher_ids"],
            kw["teacher_logprobs"],
            bias=b_,
            impl="triton",
            blocks=BLOCKS,
        )

    out, got = grads(fused, e, w, b)
    assert float(out) == 0.0
    for g in got:
        assert torch.isfinite(g).all() and not g.any()


def test_dispatch_rules() -> None:
    e, w, b, y, kw = make(torch.float32, seed=3)
    # auto on CPU: the PyTorch reference on materialised logits (same value).
    a = fused_linear_target_sft_loss(e, w, y, kw["teacher_ids"], kw["teacher_logprobs"], bias=b)
    t = fused_linear_target_sft_loss(
        e, w, y, kw["teacher_ids"], kw["teacher_logprobs"], bias=b, impl="triton", blocks=BLOCKS
    )
    assert torch.allclose(a, t, rtol=1e-5)
    with pytest.raises(ValueError, match="top-k entropy"):
        fused_linear_qtarget_loss(L.EAFT(), e, w, y, impl="triton")
    with pytest.raises(ValueError, match="dense target term"):
        fused_linear_qtarget_loss(L.GEM(), e, w, y, impl="triton")
    with pytest.raises(ValueError, match="lm_head_weight"):
        fused_linear_qtarget_loss(L.SFT(), e, w[:, :-1], y, impl="triton")
    # EAFT / GEM under auto: the reference (documented fallback).
    assert torch.isfinite(fused_linear_qtarget_loss(L.EAFT(k=5), e, w, y))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy NaN arithmetic in the interpreter
def test_non_finite_hidden_or_weight_is_a_clear_error() -> None:
    """The fused path checks the rows like the logits path (it never returns a NaN loss silently)."""
    e, w, b, y, _ = make(torch.float32, seed=4)
    sup = int(torch.nonzero(y != -100)[0, 0])
    e[sup, 3] = float("nan")
    with pytest.raises(ValueError, match=rf"hidden\[{sup}, 3\] = nan is not finite"):
        fused_linear_qtarget_loss(L.SFT(), e, w, y, bias=b, impl="triton", blocks=BLOCKS)
    e, w, b, y, _ = make(torch.float32, seed=4)
    w[7, 2] = float("inf")
    with pytest.raises(ValueError, match=r"lm_head_weight\[7, 2\] = inf is not finite"):
        fused_linear_qtarget_loss(L.SFT(), e, w, y, bias=b, impl="triton", blocks=BLOCKS)
