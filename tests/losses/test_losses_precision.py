"""Half-precision logits, float32 internals, chunking, and the no-N×V-buffer guarantee.

Documented tolerances (docs/LOSSES.md), against the float64 answer on the *same* (rounded) logits:

* loss (returned in float32): ``|ℓ − ℓ64| ≤ 2e-6 · max(1, |ℓ64|)``;
* gradient (returned in the logits' dtype): ``|g − g64| ≤ u · |g64| + 4e-6 · w + δ`` with ``u`` the
  unit roundoff of the logits' dtype (2^-8 bf16, 2^-11 fp16, 2^-24 fp32), ``w`` the per-token weight
  of the reduction (1/n for ``mean``) and ``δ = 2^-25`` for fp16 (subnormal rounding), else 0.
  The ``4e-6 · w`` term is the float32 floor for ``|logits| ≤ 30``.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from target_sft import losses as L

N, V, K = 192, 1000, 32
UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
SUBNORMAL = {torch.bfloat16: 0.0, torch.float16: 2.0**-25, torch.float32: 0.0}


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    z = 3.0 * torch.randn(N, V, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    z[torch.arange(0, N, 3), y[::3]] += 15.0  # confident: 1 − p_y ~ 1e-4 .. 1e-6
    z[torch.arange(1, N, 3), y[1::3]] += 6.0
    y[::17] = -100
    lp, ids = torch.log_softmax(3.0 * torch.randn(N, V, generator=g), -1).topk(K, -1)
    rlp, rids = torch.log_softmax(2.0 * torch.randn(N, V, generator=g), -1).topk(K // 2, -1)
    logp = torch.log_softmax(z.double(), -1).gather(1, y.clamp_min(0)[:, None]).squeeze(1)
    kw = {
        "teacher_ids": ids.to(torch.int32),
        "teacher_logprobs": lp,
        "token_weights": torch.rand(N, generator=g),
        "reference_ids": rids.to(torch.int32),
        "reference_logprobs": rlp,
        "reference_label_logprobs": (logp - 0.01).float(),
        "old_logprobs": (logp + 0.1 * torch.randn(N, generator=g, dtype=torch.float64)).float(),
        "sequence_ids": torch.arange(N) // 16,
    }
    return z, y, kw


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("name", sorted(L.PRESETS))
def test_half_precision_within_documented_tolerance(name: str, dtype: torch.dtype) -> None:
    z, y, kw = batch()
    zh = z.to(dtype)
    z16 = zh.clone().requires_grad_(True)
    z64 = zh.double().requires_grad_(True)  # the same rounded logits, exactly
    kw64 = {k: (v.double() if v.is_floating_point() else v) for k, v in kw.items()}
    loss = L.get_preset(name)
    out = loss(z16, y, **kw)
    ref = loss(z64, y, **kw64)
    out.backward()
    ref.backward()
    assert out.dtype == torch.float32
    assert z16.grad is not None and z16.grad.dtype == dtype
    lref = float(ref.detach())
    assert abs(float(out.detach()) - lref) <= 2e-6 * max(1.0, abs(lref))
    w = 1.0 / float((y != -100).sum())
    g, g64 = z16.grad.double(), z64.grad
    bound = UNIT[dtype] * g64.abs() + 4e-6 * w + SUBNORMAL[dtype]
    excess = (g - g64).abs() - bound
    assert float(excess.max()) <= 0.0, f"worst excess {float(excess.max()):.3e}"


def test_confident_tokens_do_not_cancel_in_bf16() -> None:
    """p − Q for p_y ≈ 1 is formed in float32: the label gradient keeps bf16's relative accuracy."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(64, V, generator=g)
    y = torch.randint(0, V, (64,), generator=g)
    margin = torch.linspace(9.0, 13.0, 64)  # 1 − p_y from ~1e-2 down to ~3e-4
    z[torch.arange(64), y] += margin
    zb = z.bfloat16().requires_grad_(True)
    z64 = zb.detach().double().requires_grad_(True)
    for loss in (L.SFT(), L.DFT(), L.TargetSFT(eta=0.5)):
        zb.grad = None
        z64.grad = None
        # teacher support = the label plus K − 1 other tokens (TARGET-SFT's label gradient is
        # −(1 − p_y) π̃(y), zero when the label is outside the support)
        teacher = torch.log_softmax(torch.randn(64, V, generator=g), -1)
        teacher[torch.arange(64), y] = 10.0
        lp, ids = torch.log_softmax(teacher, -1).topk(K, -1)
        assert bool((ids[:, 0] == y).all())
        kw = {"teacher_ids": ids.int(), "teacher_logprobs": lp}
        kw = kw if isinstance(loss, L.TargetSFT) else {}
        loss(zb, y, reduction="sum", **kw).backward()
        loss(z64, y, reduction="sum", **kw).backward()
        gy = zb.grad.double().gather(1, y[:, None]).squeeze(1)
        gy64 = z64.grad.gather(1, y[:, None]).squeeze(1)
        assert bool((gy64.abs() > 1e-4).all())
        # one bf16 rounding of the result plus the float32 floor (w = 1 for reduction="sum");
        # forming p − Q in bf16 instead gives errors of 100% here (p_y rounds to 1)
        excess = (gy - gy64).abs() - (2.0**-8 * gy64.abs() + 4e-6)
        assert float(excess.max()) <= 0.0, float(excess.max())


@pytest.mark.parametrize("name", sorted(L.PRESETS))
def test_chunking_does_not_change_the_result(name: str) -> None:
    z, y, kw = batch(2)
    z = z[:40].double()
    y = y[:40]
    kw = {k: v[:40] for k, v in kw.items()}
    outs = []
    for chunk in (V, 7 * V + 3, 1 << 24):  # 1 row, 7 rows, everything at once
        zz = z.clone().requires_grad_(True)
        loss = type(L.get_preset(name))(chunk_elements=chunk)
        out = loss(zz, y, **kw)
        out.backward()
        outs.append((out.detach(), zz.grad))
    for out, grad in outs[1:]:
        torch.testing.assert_close(out, outs[0][0], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(grad, outs[0][1], atol=1e-12, rtol=1e-12)


class _Allocations(TorchDispatchMode):
    """Records every non-view tensor produced by an ATen op."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[str, int, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor):
                    self.records.append((str(func), o.numel(), o.dtype))
        return out


@pytest.mark.parametrize("name", sorted(L.PRESETS))
def test_no_hidden_n_by_v_buffers(name: str) -> None:
    """Forward: nothing bigger than one row chunk. Backward: one N×V buffer, the bf16 gradient."""
    z, y, kw = batch(3)
    n = 48
    zb = z[:n].bfloat16().requires_grad_(True)
    y = y[:n]
    kw = {k: v[:n] for k, v in kw.items()}
    rows = 4
    loss = type(L.get_preset(name))(chunk_elements=rows * V)
    with _Allocations() as fwd:
        out = loss(zb, y, **kw)
    with _Allocations() as bwd:
        out.backward()
    chunk = rows * V
    assert max(numel for _, numel, _ in fwd.records) <= chunk, [
        r for r in fwd.records if r[1] > chunk
    ]
    big = [r for r in bwd.records if r[1] > chunk]
    assert len(big) == 1 and big[0][1] == n * V and big[0][2] == torch.bfloat16, big


def test_cross_entropy_baseline_does_allocate_n_by_v_float32() -> None:
    """The same probe on HF-style F.cross_entropy(logits.float()) sees several float32 N×V buffers
    (so the probe above can fail)."""
    z, y, _ = batch(3)
    zb = z[:48].bfloat16().requires_grad_(True)
    with _Allocations() as rec:
        torch.nn.functional.cross_entropy(zb.float(), y[:48]).backward()
    f32 = [r for r in rec.records if r[1] == 48 * V and r[2] == torch.float32]
    assert len(f32) >= 3
