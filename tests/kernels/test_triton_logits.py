"""The Triton logits kernel (``impl="triton"``) against the float64 PyTorch reference.

Runs on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, set in conftest.py), on
small shapes with a 64-wide vocabulary tile so that ``V = 300`` spans several tiles and ends in a
partial one. Tolerances, against float64 on the *same* (rounded) logits (as docs/LOSSES.md):

* loss: ``|ℓ − ℓ64| ≤ 2e-6 · max(1, |ℓ64|)`` (float32 statistics);
* gradient: ``|g − g64| ≤ u·|g64| + 4e-6·w`` with ``u`` the unit roundoff of the logits' dtype
  (one final rounding; ``p − Q`` is formed in float32) and ``w`` the per-token reduction weight.
"""

from __future__ import annotations

import pytest
import torch
from triton_helpers import SUPPORTED, as64, make_batch, preset_id, require_interpreter

from target_sft import losses as L
from target_sft.kernels import triton_logits

require_interpreter()

N, V, K = 12, 300, 6
UNIT = {torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_logits, "DEFAULT_BLOCK_V", 64)


def run(loss: L.QTargetLoss, z: torch.Tensor, y: torch.Tensor, kw: dict, **call: object):
    zz = z.clone().requires_grad_(True)
    out = loss(zz, y, **kw, **call)
    out.sum().backward()
    assert zz.grad is not None
    return out.detach(), zz.grad


def check(out, grad, ref, gref, dtype, weight: float) -> None:
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert grad.dtype == dtype
    lref = ref.double()
    assert (out.double() - lref).abs().max() <= 2e-6 * max(1.0, float(lref.abs().max()))
    err = (grad.double() - gref).abs()
    tol = UNIT[dtype] * gref.abs() + 4e-6 * weight
    assert (err <= tol).all(), float((err - tol).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("preset", SUPPORTED, ids=preset_id)
def test_preset_matches_float64_reference(preset, dtype: torch.dtype) -> None:
    name, params = preset
    z64, y, kw = make_batch(N, V, K)
    z = z64.to(dtype)
    out, grad = run(L.get_preset(name, impl="triton", **params), z, y, kw)
    ref, gref = run(L.get_preset(name, impl="torch", **params), z.double(), y, as64(kw))
    check(out, grad, ref, gref, dtype, 1.0 / int((y != -100).sum()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_target_sft_loss_3d_shifted_inplace_and_num_items(dtype: torch.dtype) -> None:
    z64, y, kw = make_batch(N, V, K, seed=1)
    b, length = 3, N // 3
    z = z64.to(dtype).reshape(b, length, V)
    ids = kw["teacher_ids"].reshape(b, length, K)
    lp = kw["teacher_logprobs"].reshape(b, length, K)
    labels = y.reshape(b, length)
    num = torch.tensor(7)
    args = {"eta": 0.5, "num_items_in_batch": num}
    zz = z.clone().requires_grad_(True)
    out = L.target_sft_loss(zz, labels, ids, lp, impl="triton", inplace_grad=True, **args)
    out.backward()
    assert zz.grad is not None
    # In place: the gradient lives in the logits' own storage (the logits are consumed).
    assert zz.grad.data_ptr() == zz.data_ptr()
    z_ref = z.double().requires_grad_(True)
    ref = L.target_sft_loss(z_ref, labels, ids, lp.double(), impl="torch", **args)
    ref.backward()
    assert z_ref.grad is not None
    check(out.detach(), zz.grad, ref.detach(), z_ref.grad, dtype, 1.0 / 7)


@pytest.mark.parametrize("params", [{}, {"tail": "model"}], ids=["renorm", "tail_model"])
@pytest.mark.parametrize("name", ["sft_kl", "asft"])
def test_reference_anchor_3d_shifted(name: str, params: dict) -> None:
    """SFT+KL / ASFT read reference_ids / reference_logprobs ([B, L, Kr], label-aligned, shifted
    like labels) in the Triton kernel exactly as in the PyTorch reference; the teacher tensors in
    the same batch (another support) are not read."""
    z64, y, kw = make_batch(N, V, K, seed=3)
    b, length = 3, N // 3
    z = z64.float().reshape(b, length, V)
    labels = y.reshape(b, length)
    kw3 = {
        k: kw[k].reshape(b, length, -1)
        for k in ("teacher_ids", "teacher_logprobs", "reference_ids", "reference_logprobs")
    }
    out, grad = run(L.get_preset(name, impl="triton", **params), z, labels, kw3)
    ref, gref = run(L.get_preset(name, impl="torch", **params), z.double(), labels, as64(kw3))
    check(out, grad, ref, gref, torch.float32, 1.0 / int((labels[:, 1:] != -100).sum()))
    teacher, _ = run(
        L.get_preset(name, impl="torch", anchor="teacher", **params), z.double(), labels, as64(kw3)
    )
    assert abs(float(teacher - ref)) > 1e-4


def test_inplace_equals_out_of_place() -> None:
    z64, y, kw = make_batch(N, V, K, seed=2)
    z = z64.to(torch.bfloat16)
    grads = []
    for inplace in (False, True):
        zz = z.clone().requires_grad_(True)
        loss = L.TargetSFT(eta=0.2, impl="triton", inplace_grad=inplace)
        loss(
            zz, y, teacher_ids=kw["teacher_ids"], teacher_logprobs=kw["teacher_logprobs"]
        ).backward()
        assert zz.grad is not None
        grads.append(zz.grad.clone())
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(reduction: str) -> None:
    z64, y, kw = make_batch(N, V, K, seed=3)
    z = z64.float()
    out, grad = run(L.KD(impl="triton", reduction=reduction), z, y, kw)
    ref, gref = run(L.KD(impl="torch", reduction=reduction), z.double(), y, as64(kw))
    assert out.shape == ref.shape
    check(out, grad, ref, gref, torch.float32, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_all_rows_ignored(dtype: torch.dtype) -> None:
    z64, y, kw = make_batch(N, V, K, seed=4)
    y = torch.full_like(y, -100)
    for loss in (L.TargetSFT(impl="triton"), L.SFT(impl="triton"), L.LabelSmoothing(impl="triton")):
        out, grad = run(loss, z64.to(dtype), y, kw)
        assert float(out) == 0.0
        assert torch.isfinite(grad).all() and not grad.any()


def test_confident_tokens_do_not_cancel_in_bf16() -> None:
    """1 − p_y ≈ 1e-3: p_y rounds to 1 in bf16, yet the label gradient is right to 0.5 %."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(4, V, generator=g, dtype=torch.float64)
    y = torch.tensor([3, 50, 150, 299])
    z[torch.arange(4), y] += 12.5
    zb = z.bfloat16()
    _out, grad = run(L.SFT(impl="triton", reduction="sum"), zb, y, {})
    _ref, gref = run(L.SFT(impl="torch", reduction="sum"), zb.double(), y, {})
    gy = grad.double()[torch.arange(4), y]
    ry = gref[torch.arange(4), y]
    assert (ry.abs() > 1e-4).all() and (ry.abs() < 1e-2).all()
    assert ((gy - ry).abs() <= 5e-3 * ry.abs()).all()


def test_auto_uses_torch_on_cpu_and_gem_is_torch_only(monkeypatch: pytest.MonkeyPatch) -> None:
    z64, y, kw = make_batch(N, V, K, seed=6)
    z = z64.float()
    called = []
    real = triton_logits.row_stats_triton

    def spy(*a, **k):  # type: ignore[no-untyped-def]
        called.append(1)
        return real(*a, **k)

    monkeypatch.setattr(triton_logits, "row_stats_triton", spy)
    L.TargetSFT()(z, y, teacher_ids=kw["teacher_ids"], teacher_logprobs=kw["teacher_logprobs"])
    assert not called  # auto on CPU: the PyTorch reference
    L.TargetSFT(impl="triton")(
        z, y, teacher_ids=kw["teacher_ids"], teacher_logprobs=kw["teacher_logprobs"]
    )
    assert called
    with pytest.raises(ValueError, match="dense target term"):
        L.GEM(impl="triton")(z, y)
    with pytest.raises(ValueError, match="float64"):
        L.SFT(impl="triton")(z64, y)
    with pytest.raises(ValueError, match="impl"):
        L.SFT(impl="cuda")
    # GEM under auto falls back to the reference (documented), even where Triton would run.
    assert torch.isfinite(L.GEM()(z, y))


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    z64, y, _ = make_batch(N, V, K, seed=7)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        L.SFT(impl="triton")(z64.float(), y)
