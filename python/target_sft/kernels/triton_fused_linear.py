"""Fused LM-head + Q-target loss without materialising the logits (Cut Cross-Entropy style).

``z = softcap·tanh((h Wᵀ + b)/softcap)`` is never stored. Three Triton kernels:

1. **LSE forward** (:func:`_lse_kernel`): a grid of (row block × vocabulary split) programs; each
   computes logit tiles ``[BLOCK_M, BLOCK_N]`` with ``tl.dot`` over ``H`` (fp32 accumulation) and
   keeps an online log-sum-exp per row (plus ``Σ e^{z−m} z`` for the entropy and ``Σ z`` when a
   loss needs them). The splits' partial ``(m, s, t)`` (``[splits, N]`` floats) are combined on the
   host. Row blocks with no supervised row are skipped.
2. **Indexed dots** (:func:`_gather_kernel`): ``z`` at ``S ∪ {y}`` per row, ``h · W[id]`` in fp32.
3. **Recomputing backward** (:func:`_backward_kernel`): per (row block, vocabulary block) tile it
   recomputes ``z``, forms ``g = κ p − c/V − Σ_j Q̂_j 1[col = id_j]`` in fp32 (the sparse target is
   subtracted inside the tile, so ``p − Q`` is never rounded before the cancellation), applies the
   softcap chain rule, and accumulates ``dE += g W`` and ``dW += gᵀ E`` (and ``db``) into float32
   buffers with atomic adds.

The per-row masses (κ, the sparse target, the uniform mass) come from the same preset code as the
PyTorch reference, so every preset whose target is sparse, uniform or self-residual is supported
(not GEM — a dense term — and not EAFT, whose top-k entropy needs the logits).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ..losses._validate import check_eta
from ..losses.presets import TargetSFT
from ..losses.qtarget import QTargetLoss, _plan, reduce_loss
from ..losses.trust import TokenContext
from .dispatch import check_impl, interpreting, resolve_impl
from .reference import GradPlan, RowStats
from .triton_logits import round_to_bf16

__all__ = ["FusedLinearBlocks", "fused_linear_qtarget_loss", "fused_linear_target_sft_loss"]


class FusedLinearBlocks:
    """Tile sizes of the fused-linear kernels (tests use small ones; defaults target H100)."""

    def __init__(
        self,
        block_m: int = 64,
        block_n: int = 128,
        block_h: int = 64,
        bwd_block_m: int = 64,
        bwd_block_n: int = 64,
        num_warps: int = 8,
        num_stages: int = 3,
        splits: int | None = None,
    ) -> None:
        self.block_m, self.block_n, self.block_h = block_m, block_n, block_h
        self.bwd_block_m, self.bwd_block_n = bwd_block_m, bwd_block_n
        self.num_warps, self.num_stages, self.splits = num_warps, num_stages, splits


@triton.jit
def _logit_tile(
    e_ptr,
    w_ptr,
    b_ptr,
    rows64,
    rmask,
    cols,
    cmask,
    H,
    stride_e,
    stride_w,
    softcap,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_N]`` tile of logits in float32: ``E[rows] · W[cols]ᵀ`` over ``H``
    (masked), plus the bias, through the softcap. Shared by the forward and the backward, which
    must compute bit-identical logits."""
    cols64 = cols.to(tl.int64)
    hs = tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hm = (h0 + hs) < H
        e = tl.load(
            e_ptr + rows64[:, None] * stride_e + (h0 + hs)[None, :],
            mask=rmask[:, None] & hm[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + cols64[:, None] * stride_w + (h0 + hs)[None, :],
            mask=cmask[:, None] & hm[None, :],
            other=0.0,
        )
        if DOT_F32:
            acc += tl.dot(e.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(e, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        acc = softcap * (2.0 * tl.sigmoid(2.0 * acc / softcap) - 1.0)
    return acc


@triton.jit
def _lse_kernel(
    e_ptr,
    w_ptr,
    b_ptr,
    active_ptr,
    m_ptr,
    s_ptr,
    t_ptr,
    sum_ptr,
    N,
    V,
    H,
    stride_e,
    stride_w,
    tiles_per_split,
    softcap,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ENTROPY: tl.constexpr,
    SUM: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    act = tl.load(active_ptr + rows, mask=rmask, other=0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    t = tl.zeros([BLOCK_M], tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    if tl.max(act, axis=0) > 0:
        n_tiles = tl.cdiv(V, BLOCK_N)
        t0 = pid_s * tiles_per_split
        t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
        rows64 = rows.to(tl.int64)
        for tile in range(t0, t1):
            cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            cmask = cols < V
            acc = _logit_tile(
                e_ptr, w_ptr, b_ptr, rows64, rmask, cols, cmask, H, stride_e, stride_w, softcap,
                HAS_BIAS, SOFTCAP, DOT_F32, BLOCK_M, BLOCK_N, BLOCK_H,
            )  # fmt: skip
            z = tl.where(cmask[None, :], acc, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(z - m_new[:, None])
            s = s * alpha + tl.sum(p, axis=1)
            if ENTROPY:
                t = t * alpha + tl.sum(p * tl.where(cmask[None, :], z, 0.0), axis=1)
            if SUM:
                total += tl.sum(tl.where(cmask[None, :], z, 0.0), axis=1)
            m = m_new
    off = pid_s * N + rows
    tl.store(m_ptr + off, m, mask=rmask)
    tl.store(s_ptr + off, s, mask=rmask)
    if ENTROPY:
        tl.store(t_ptr + off, t, mask=rmask)
    if SUM:
        tl.store(sum_ptr + off, total, mask=rmask)


@triton.jit
def _gather_kernel(
    e_ptr,
    w_ptr,
    b_ptr,
    ids_ptr,
    out_ptr,
    n_ids,
    H,
    stride_e,
    stride_w,
    softcap,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    kin = k < n_ids
    ids = tl.load(ids_ptr + row * n_ids + k, mask=kin, other=0).to(tl.int64)
    hs = tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_K], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hm = (h0 + hs) < H
        e = tl.load(e_ptr + row * stride_e + h0 + hs, mask=hm, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + ids[:, None] * stride_w + (h0 + hs)[None, :],
            mask=kin[:, None] & hm[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(w * e[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + ids, mask=kin, other=0.0).to(tl.float32)
    if SOFTCAP:
        acc = softcap * (2.0 * tl.sigmoid(2.0 * acc / softcap) - 1.0)
    tl.store(out_ptr + row * n_ids + k, acc, mask=kin)


@triton.jit
def _backward_kernel(
    e_ptr,
    w_ptr,
    b_ptr,
    active_ptr,
    lse_ptr,
    kappa_ptr,
    unif_ptr,
    ids_ptr,
    mass_ptr,
    de_ptr,
    dw_ptr,
    db_ptr,
    N,
    V,
    H,
    n_ids,
    stride_e,
    stride_w,
    softcap,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    UNIFORM: tl.constexpr,
    DOT_F32: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    act = tl.load(active_ptr + rows, mask=rmask, other=0)
    if tl.max(act, axis=0) > 0:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < V
        rows64 = rows.to(tl.int64)
        cols64 = cols.to(tl.int64)
        hs = tl.arange(0, BLOCK_H)
        acc = _logit_tile(
            e_ptr, w_ptr, b_ptr, rows64, rmask, cols, cmask, H, stride_e, stride_w, softcap,
            HAS_BIAS, SOFTCAP, DOT_F32, BLOCK_M, BLOCK_N, BLOCK_H,
        )  # fmt: skip
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
        kap = tl.load(kappa_ptr + rows, mask=rmask, other=0.0)
        live = kap != 0.0
        lse = tl.where(live, lse, 0.0)
        g = tl.where(live[:, None], kap[:, None] * tl.exp(acc - lse[:, None]), 0.0)
        if UNIFORM:
            g -= tl.load(unif_ptr + rows, mask=rmask, other=0.0)[:, None]
        # Sparse target mass (label + support), subtracted in float32 inside the tile.
        for j in range(0, n_ids):
            idj = tl.load(ids_ptr + rows64 * n_ids + j, mask=rmask, other=-1)
            mj = tl.load(mass_ptr + rows64 * n_ids + j, mask=rmask, other=0.0)
            g -= tl.where(idj[:, None] == cols[None, :], mj[:, None], 0.0)
        if SOFTCAP:
            c = acc / softcap
            g = g * (1.0 - c * c)
        g = tl.where(rmask[:, None] & cmask[None, :], g, 0.0)
        if HAS_BIAS:
            tl.atomic_add(db_ptr + cols, tl.sum(g, axis=0), mask=cmask)
        if DOT_F32:
            if ROUND_BF16:
                gd = round_to_bf16(g)
            else:
                gd = g.to(e_ptr.dtype.element_ty).to(tl.float32)
        else:
            gd = g.to(e_ptr.dtype.element_ty)
        for h0 in range(0, H, BLOCK_H):
            hm = (h0 + hs) < H
            w = tl.load(
                w_ptr + cols64[:, None] * stride_w + (h0 + hs)[None, :],
                mask=cmask[:, None] & hm[None, :],
                other=0.0,
            )
            e = tl.load(
                e_ptr + rows64[:, None] * stride_e + (h0 + hs)[None, :],
                mask=rmask[:, None] & hm[None, :],
                other=0.0,
            )
            if DOT_F32:
                de = tl.dot(gd, w.to(tl.float32), input_precision="ieee")
                dw = tl.dot(tl.trans(gd), e.to(tl.float32), input_precision="ieee")
            else:
                de = tl.dot(gd, w)
                dw = tl.dot(tl.trans(gd), e)
            tl.atomic_add(
                de_ptr + rows64[:, None] * H + (h0 + hs)[None, :],
                de,
                mask=rmask[:, None] & hm[None, :],
            )
            tl.atomic_add(
                dw_ptr + cols64[:, None] * H + (h0 + hs)[None, :],
                dw,
                mask=cmask[:, None] & hm[None, :],
            )


def _dot_f32(t: Tensor) -> bool:
    # fp32 inputs: exact fp32 dots. Under the interpreter, bf16 dots are emulated through fp32
    # (bf16 × bf16 products are exact in fp32, so the arithmetic is the same).
    return t.dtype == torch.float32 or interpreting()


def _splits(n_row_blocks: int, n_tiles: int, device: torch.device, want: int | None) -> int:
    if want is not None:
        return max(1, min(int(want), n_tiles))
    sms = 132
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, triton.cdiv(4 * sms, max(n_row_blocks, 1))))


class _FusedLinear:
    """Everything the fused backward needs besides the saved tensors."""

    def __init__(self, blocks: FusedLinearBlocks, softcap: float | None) -> None:
        self.blocks = blocks
        self.softcap = softcap
        self.plan: GradPlan | None = None
        self.active: Tensor | None = None
        self.ids: Tensor | None = None
        self.mass: Tensor | None = None


def _stats(
    e: Tensor,
    w: Tensor,
    b: Tensor | None,
    active: Tensor,
    ids: Tensor,
    request: Any,
    fl: _FusedLinear,
) -> tuple[RowStats, Tensor]:
    n, hdim = e.shape
    vocab = int(w.shape[0])
    bl = fl.blocks
    dev = e.device
    n_tiles = triton.cdiv(vocab, bl.block_n)
    n_rb = triton.cdiv(max(n, 1), bl.block_m)
    splits = _splits(n_rb, n_tiles, dev, bl.splits)
    per = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, per)
    m = torch.empty(splits, n, dtype=torch.float32, device=dev)
    s = torch.empty_like(m)
    t = torch.empty_like(m) if request.entropy else m
    tot = torch.empty_like(m) if request.sum_logits else m
    n_ids = int(ids.shape[1])
    zs = torch.empty(n, n_ids, dtype=torch.float32, device=dev)
    cap = 0.0 if fl.softcap is None else float(fl.softcap)
    if n > 0:
        _lse_kernel[(n_rb, splits)](
            e,
            w,
            w if b is None else b,
            active,
            m,
            s,
            t,
            tot,
            n,
            vocab,
            hdim,
            e.stride(0),
            w.stride(0),
            per,
            cap,
            HAS_BIAS=b is not None,
            SOFTCAP=fl.softcap is not None,
            ENTROPY=bool(request.entropy),
            SUM=bool(request.sum_logits),
            DOT_F32=_dot_f32(e),
            BLOCK_M=bl.block_m,
            BLOCK_N=bl.block_n,
            BLOCK_H=bl.block_h,
            num_warps=bl.num_warps,
            num_stages=bl.num_stages,
        )
        _gather_kernel[(n,)](
            e,
            w,
            w if b is None else b,
            ids,
            zs,
            n_ids,
            hdim,
            e.stride(0),
            w.stride(0),
            cap,
            HAS_BIAS=b is not None,
            SOFTCAP=fl.softcap is not None,
            BLOCK_K=max(2, triton.next_power_of_2(n_ids)),
            BLOCK_H=min(128, max(16, triton.next_power_of_2(hdim))),
        )
    mx = m.amax(0)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    scale = torch.exp(m - mx)
    ssum = (s * scale).sum(0)
    lse = mx + torch.log(ssum)
    live = active.bool()
    lse = torch.where(live, lse, torch.zeros_like(lse))
    entropy = None
    if request.entropy:
        entropy = torch.where(live, lse - (t * scale).sum(0) / ssum, torch.zeros_like(lse))
    sum_logits = tot.sum(0) if request.sum_logits else None
    stats = RowStats(
        lse=lse,
        z_label=zs[:, 0],
        z_support=zs[:, 1:] if n_ids > 1 else None,
        entropy=entropy,
        sum_logits=sum_logits,
    )
    return stats, zs


class _FusedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        values: Tensor,
        fl: _FusedLinear,
    ) -> Tensor:
        ctx.save_for_backward(hidden, weight, bias)
        ctx.fl = fl
        return values.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_values: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        hidden, weight, bias = ctx.saved_tensors
        fl: _FusedLinear = ctx.fl
        plan = fl.plan
        assert plan is not None and fl.active is not None and fl.ids is not None
        assert fl.mass is not None
        n, hdim = hidden.shape
        vocab = int(weight.shape[0])
        g = grad_values.to(torch.float32)
        kappa = (plan.kappa * g).float().contiguous()
        uniform = None if plan.uniform_mass is None else (plan.uniform_mass * g / vocab).float()
        mass = (fl.mass * g[:, None]).float().contiguous()
        de = torch.zeros(n, hdim, dtype=torch.float32, device=hidden.device)
        dw = torch.zeros(vocab, hdim, dtype=torch.float32, device=hidden.device)
        db = (
            torch.zeros(vocab, dtype=torch.float32, device=hidden.device)
            if bias is not None
            else dw
        )
        bl = fl.blocks
        if n > 0:
            grid = (triton.cdiv(n, bl.bwd_block_m), triton.cdiv(vocab, bl.bwd_block_n))
            _backward_kernel[grid](
                hidden,
                weight,
                weight if bias is None else bias,
                fl.active,
                plan.lse,
                kappa,
                kappa if uniform is None else uniform.contiguous(),
                fl.ids,
                mass,
                de,
                dw,
                db,
                n,
                vocab,
                hdim,
                int(fl.ids.shape[1]),
                hidden.stride(0),
                weight.stride(0),
                0.0 if fl.softcap is None else float(fl.softcap),
                HAS_BIAS=bias is not None,
                SOFTCAP=fl.softcap is not None,
                UNIFORM=uniform is not None,
                DOT_F32=_dot_f32(hidden),
                ROUND_BF16=hidden.dtype == torch.bfloat16 and interpreting(),
                BLOCK_M=bl.bwd_block_m,
                BLOCK_N=bl.bwd_block_n,
                BLOCK_H=bl.block_h,
                num_warps=bl.num_warps,
                num_stages=bl.num_stages,
            )
        d_hidden = de.to(hidden.dtype) if ctx.needs_input_grad[0] else None
        d_weight = dw.to(weight.dtype) if ctx.needs_input_grad[1] else None
        d_bias = None
        if bias is not None and ctx.needs_input_grad[2]:
            d_bias = db.to(bias.dtype)
        return d_hidden, d_weight, d_bias, None, None


def _torch_reference(
    loss_fn: QTargetLoss,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    softcap: float | None,
    labels: Tensor,
    inputs: dict[str, Any],
) -> Tensor:
    logits = F.linear(hidden, weight, bias)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return loss_fn(logits, labels, **inputs)


def fused_linear_qtarget_loss(
    loss_fn: QTargetLoss,
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    softcap: float | None = None,
    impl: str = "auto",
    blocks: FusedLinearBlocks | None = None,
    teacher_ids: Tensor | None = None,
    teacher_logprobs: Tensor | None = None,
    token_weights: Tensor | None = None,
    sequence_weights: Tensor | None = None,
    sequence_ids: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
    reduction: str | None = None,
) -> Tensor:
    """``loss_fn`` (any supported preset) of ``softcap·tanh((hidden Wᵀ + bias)/softcap)``.

    ``hidden`` is ``[B, L, H]`` (shifted against ``[B, L]`` labels exactly like ``[B, L, V]``
    logits) or ``[N, H]``; ``lm_head_weight`` is ``[V, H]``. With ``impl="triton"`` (or ``"auto"``
    on CUDA) the logits are never materialised; ``impl="torch"`` (or ``"auto"`` elsewhere)
    computes them with ``F.linear`` and runs the PyTorch reference of ``loss_fn``. Same value and
    gradients (w.r.t. ``hidden``, ``lm_head_weight`` and ``bias``) either way.
    """
    check_impl(impl)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden has shape {tuple(hidden.shape)}: expected [B, L, H] or [N, H]")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"lm_head_weight has shape {tuple(lm_head_weight.shape)} but hidden has shape "
            f"{tuple(hidden.shape)}: expected [V, {hidden.shape[-1]}]"
        )
    vocab = int(lm_head_weight.shape[0])
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}: expected ({vocab},)")
    if softcap is not None and not float(softcap) > 0:
        raise ValueError(f"softcap = {softcap} must be > 0 (or None)")
    inputs: dict[str, Any] = {
        "teacher_ids": teacher_ids,
        "teacher_logprobs": teacher_logprobs,
        "token_weights": token_weights,
        "sequence_weights": sequence_weights,
        "sequence_ids": sequence_ids,
        "ref_logprobs": ref_logprobs,
        "old_logprobs": old_logprobs,
    }
    request = loss_fn._request()
    which = "torch"
    if hidden.dtype == torch.float64:
        if impl == "triton":
            raise ValueError("impl='triton' takes float32/bf16/fp16 inputs, not float64")
    else:
        which = resolve_impl(impl, hidden.device, request, fused_linear=True)
    if which == "torch":
        extra = {"num_items_in_batch": num_items_in_batch, "reduction": reduction}
        return _torch_reference(
            loss_fn, hidden, lm_head_weight, bias, softcap, labels, {**inputs, **extra}
        )

    red = loss_fn.reduction if reduction is None else reduction
    fl = _FusedLinear(blocks or FusedLinearBlocks(), None if softcap is None else float(softcap))
    h2d = hidden.reshape(-1, hidden.shape[-1])
    if h2d.stride(-1) != 1:
        h2d = h2d.contiguous()
    w = lm_head_weight if lm_head_weight.stride(-1) == 1 else lm_head_weight.contiguous()
    if w.dtype != h2d.dtype:
        raise ValueError(f"hidden is {h2d.dtype} but lm_head_weight is {w.dtype}: they must match")
    # A zero-stride stand-in with the logits' shape: validation and shifting need only the shape.
    shape_only = h2d.new_zeros(()).expand(*hidden.shape[:-1], vocab)
    with torch.no_grad():
        batch = loss_fn._prepare(
            shape_only, labels, inputs, flat_logits=shape_only.reshape(-1, vocab)
        )
        active = batch.mask.to(torch.int32).contiguous()
        label_col = batch.safe_labels[:, None]
        if batch.teacher_ids is not None:
            support, valid = batch.support()
            gather_ids = torch.cat([label_col, support], dim=1).to(torch.int32).contiguous()
        else:
            gather_ids = label_col.to(torch.int32).contiguous()
        stats, _ = _stats(
            h2d.detach(),
            w.detach(),
            None if bias is None else bias.detach(),
            active,
            gather_ids,
            request,
            fl,
        )
        ctx = TokenContext(batch=batch, stats=stats)
        target = loss_fn._target(ctx)
        value = loss_fn._value(ctx, target)
        value = torch.where(batch.mask, value, torch.zeros_like(value))
        plan = _plan(ctx, target, None)
        ids = [plan.labels[:, None]]
        mass = [plan.label_mass[:, None]]
        if plan.support is not None and plan.support_mass is not None:
            _, valid = batch.support()
            ids.append(torch.where(valid, plan.support, -1))
            mass.append(plan.support_mass)
        fl.plan = plan
        fl.active = active
        fl.ids = torch.cat(ids, dim=1).to(torch.int32).contiguous()
        fl.mass = torch.cat(mass, dim=1).float().contiguous()
    per_row = _FusedLinearFunction.apply(h2d, w, bias, value, fl)
    return reduce_loss(per_row, batch, red, num_items_in_batch)


def fused_linear_target_sft_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    *,
    eta: float = 0.5,
    bias: Tensor | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | float | Tensor | None = None,
    check_inputs: bool = True,
    impl: str = "auto",
    blocks: FusedLinearBlocks | None = None,
) -> Tensor:
    """TARGET-SFT (:func:`~target_sft.losses.target_sft_loss`) straight from the hidden states.

    ``logits = softcap·tanh((hidden @ lm_head_weightᵀ + bias)/softcap)`` (no softcap / bias when
    ``None``) are never materialised with ``impl="triton"`` (``"auto"`` on CUDA): an online
    log-sum-exp over vocabulary tiles, indexed dots at ``S ∪ {y}``, and a backward that recomputes
    the logit tiles and accumulates ``d hidden``, ``d weight`` (and ``d bias``) in float32.
    ``hidden`` ``[B, L, H]`` is shifted against ``labels`` ``[B, L]`` like HF causal-LM logits.
    """
    loss_fn = TargetSFT(
        eta=check_eta(eta),
        ignore_index=ignore_index,
        reduction=reduction,
        check_inputs=check_inputs,
    )
    return fused_linear_qtarget_loss(
        loss_fn,
        hidden,
        lm_head_weight,
        labels,
        bias=bias,
        softcap=softcap,
        impl=impl,
        blocks=blocks,
        teacher_ids=teacher_ids,
        teacher_logprobs=teacher_logprobs,
        num_items_in_batch=num_items_in_batch,
    )
