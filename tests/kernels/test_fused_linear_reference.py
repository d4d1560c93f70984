"""The chunked PyTorch fused-linear backend (``fused_linear_qtarget_loss(impl="torch")``).

It must give exactly the loss and gradients of the same loss on the materialised logits
``softcap·tanh((E Wᵀ + b)/softcap)`` — for every preset (GEM's dense term and EAFT's top-k
included), with bias and softcap, in several chunks — and agree with the fused-linear Triton
kernels (under the Triton interpreter, small shapes). Tolerances:

* float64: ``rtol = 1e-12`` (the same arithmetic, in another order);
* float32: ``rtol = 1e-5`` against the float32 materialised path (matmuls of other shapes);
* bf16: the fused path forms the logits in float32 from the bf16 inputs (never rounded to bf16,
  like the Triton kernel); it is compared with the float64 loss of the same rounded inputs:
  the loss to ``1e-5``, the gradients to one bf16 rounding of their final value (``2^-8``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from triton_helpers import SUPPORTED, as64, make_batch, preset_id, require_interpreter

from target_sft import losses as L
from target_sft.kernels import DEFAULT_FUSED_CHUNK_ELEMENTS, default_chunk_elements
from target_sft.kernels.reference import fused_row_stats
from target_sft.losses import FusedLinearBlocks, fused_linear_qtarget_loss
from target_sft.losses.backend import FusedLinearBackend

N, V, H, K = 16, 100, 24, 5
#: 3 rows per chunk: several chunks, the last one partial
CHUNK = 3 * V
ALL = [*SUPPORTED, ("gem", {"beta": 0.7})]


def make(dtype: torch.dtype, seed: int = 0):
    _z, y, kw = make_batch(N, V, K, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    e = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = 0.4 * torch.randn(V, H, generator=g, dtype=torch.float64)
    w[y[1].clamp_min(0)] += 0.5 * e[1]  # a confident row
    b = 0.5 * torch.randn(V, generator=g, dtype=torch.float64)
    return e.to(dtype), w.to(dtype), b.to(dtype), y, kw


def run(fn, e, w, b):
    """Loss and the gradients of ``(e, w, b)`` of ``fn(e, w, b)``."""
    leaves = [t.clone().requires_grad_(True) for t in (e, w, b)]
    out = fn(*leaves)
    out.sum().backward()
    return out.detach(), [t.grad for t in leaves]


def materialised(loss: L.QTargetLoss, y, kw, softcap: float | None, **call):
    def fn(e_, w_, b_):
        z = F.linear(e_, w_, b_)
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        return loss(z, y, **kw, **call)

    return fn


def fused(loss: L.QTargetLoss, y, kw, softcap: float | None, impl: str = "torch", **call):
    def fn(e_, w_, b_):
        return fused_linear_qtarget_loss(
            loss, e_, w_, y, bias=b_, softcap=softcap, impl=impl, **kw, **call
        )

    return fn


@pytest.mark.parametrize("softcap", [None, 4.0], ids=["nocap", "softcap"])
@pytest.mark.parametrize("preset", ALL, ids=preset_id)
def test_every_preset_equals_materialised_logits_float64(preset, softcap) -> None:
    name, params = preset
    e, w, b, y, kw = make(torch.float64)
    kw = as64(kw)
    loss = L.get_preset(name, impl="torch", chunk_elements=CHUNK, **params)
    ref, gref = run(materialised(loss, y, kw, softcap), e, w, b)
    out, got = run(fused(loss, y, kw, softcap), e, w, b)
    assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, r in zip(got, gref, strict=True):
        assert_close(a, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "preset", [("target_sft", {"eta": 0.5}), ("eaft", {"k": 5})], ids=preset_id
)
def test_float32_equals_materialised_logits(preset) -> None:
    name, params = preset
    e, w, b, y, kw = make(torch.float32, seed=1)
    loss = L.get_preset(name, impl="torch", chunk_elements=CHUNK, **params)
    ref, gref = run(materialised(loss, y, kw, 3.0), e, w, b)
    out, got = run(fused(loss, y, kw, 3.0), e, w, b)
    assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, r in zip(got, gref, strict=True):
        assert a.dtype == torch.float32
        assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_bf16_is_float32_logits_of_the_rounded_inputs() -> None:
    e, w, b, y, kw = make(torch.bfloat16, seed=2)
    loss = L.TargetSFT(eta=0.5, impl="torch", chunk_elements=CHUNK)
    kw2 = {k: kw[k] for k in ("teacher_ids", "teacher_logprobs")}
    out, got = run(fused(loss, y, kw2, 3.0), e, w, b)
    ref, gref = run(materialised(loss, y, as64(kw2), 3.0), e.double(), w.double(), b.double())
    assert out.dtype == torch.float32
    assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    for a, r in zip(got, gref, strict=True):
        assert a.dtype == torch.bfloat16
        assert_close(a.double(), r, rtol=2.0**-8, atol=1e-5)


def test_3d_hidden_num_items_and_none_reduction() -> None:
    e, w, b, y, kw = make(torch.float64, seed=3)
    e3, y3 = e.reshape(2, N // 2, H), y.reshape(2, N // 2)
    kw3 = {k: kw[k].reshape(2, N // 2, K).double() for k in ("teacher_ids", "teacher_logprobs")}
    kw3["teacher_ids"] = kw3["teacher_ids"].to(torch.int32)
    loss = L.TargetSFT(eta=0.2, impl="torch", chunk_elements=CHUNK)
    for call in ({"num_items_in_batch": torch.tensor(9)}, {"reduction": "none"}):
        ref, gref = run(materialised(loss, y3, kw3, None, **call), e3, w, b)
        out, got = run(fused(loss, y3, kw3, None, **call), e3, w, b)
        assert out.shape == ref.shape
        assert_close(out, ref, rtol=1e-12, atol=1e-12)
        for a, r in zip(got, gref, strict=True):
            assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_only_supervised_rows_are_computed_and_frozen_head_gets_no_grad() -> None:
    e, w, b, y, _ = make(torch.float64, seed=4)
    y = torch.full_like(y, -100)
    y[5] = 3
    rows = y != -100
    st = fused_row_stats(e, w, b, y.clamp_min(0), None, rows, L.SFT().stat_request())
    assert (st.lse[~rows] == 0).all() and st.lse[5] == torch.logsumexp(F.linear(e[5], w, b), 0)
    ee = e.clone().requires_grad_(True)
    out = fused_linear_qtarget_loss(L.SFT(), ee, w, y, bias=b, impl="torch")
    out.backward()
    assert ee.grad is not None and not ee.grad[~rows].any() and ee.grad[5].any()


def test_auto_on_cpu_runs_the_chunked_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    init = FusedLinearBackend.__init__

    def spy(self, *a, **k):
        init(self, *a, **k)
        seen.append(self.impl)

    monkeypatch.setattr(FusedLinearBackend, "__init__", spy)
    e, w, b, y, _ = make(torch.float32, seed=5)
    fused_linear_qtarget_loss(L.SFT(), e, w, y, bias=b)
    assert seen == ["torch"]
    assert default_chunk_elements(e.device, fused_linear=True) == DEFAULT_FUSED_CHUNK_ELEMENTS


BLOCKS = FusedLinearBlocks(16, 32, 16, 16, 32, num_warps=4, splits=2)


@pytest.mark.parametrize(
    "preset",
    [("target_sft", {"eta": 0.5}), ("label_smoothing", {}), ("sft_kl", {}), ("asft", {})],
    ids=preset_id,
)
def test_agrees_with_the_triton_fused_linear_kernels(preset) -> None:
    require_interpreter()
    name, params = preset
    e, w, b, y, kw = make(torch.float32, seed=6)
    keys = ("teacher_ids", "teacher_logprobs", "reference_ids", "reference_logprobs")
    kw = {k: kw[k] for k in keys}
    loss = L.get_preset(name, chunk_elements=CHUNK, **params)
    ref, gref = run(fused(loss, y, kw, 3.0, impl="torch"), e, w, b)
    out, got = run(fused(loss, y, kw, 3.0, impl="triton", blocks=BLOCKS), e, w, b)
    assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, r in zip(got, gref, strict=True):
        assert_close(a, r, rtol=1e-5, atol=1e-6)
