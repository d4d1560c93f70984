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

Entry points, on the contract of :mod:`.contract`: :func:`fused_linear_row_stats` (the forward
sweep: :class:`~.contract.RowStats` from the hidden states) and :class:`FusedLinearFunction` (the
autograd Function whose backward is the recomputing kernel, driven by a
:class:`~.contract.GradPlan`). The per-row masses (κ, the sparse target, the uniform mass) come
from the loss code shared with the PyTorch reference, so every loss whose target is sparse,
uniform or self-residual is supported (not GEM — a dense term — and not EAFT, whose top-k entropy
needs the logits). The loss entry points live in :mod:`target_sft.losses.fused_linear`.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .contract import FusedLinearBlocks, GradPlan, RowStats, StatRequest
from .dispatch import interpreting
from .triton_logits import round_to_bf16

__all__ = ["FusedLinearBlocks", "FusedLinearFunction", "fused_linear_row_stats"]


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


def _active(rows: Tensor) -> Tensor:
    """The kernels' ``int32`` row mask."""
    return rows.to(torch.int32).contiguous()


@torch.no_grad()
def fused_linear_row_stats(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    support: Tensor | None,
    rows: Tensor,
    request: StatRequest,
    *,
    softcap: float | None = None,
    blocks: FusedLinearBlocks | None = None,
) -> RowStats:
    """:class:`~.contract.RowStats` of ``z = softcap·tanh((hidden Wᵀ + bias)/softcap)`` without
    materialising ``z`` (the fused counterpart of :func:`.reference.row_stats`).

    ``hidden`` is ``[N, H]`` (last dimension contiguous), ``weight`` ``[V, H]`` of the same dtype,
    ``bias`` ``[V]`` or ``None``; ``labels`` ([N]) and ``support`` ([N, K]) are valid column indices
    (the caller clamps ignored labels and padding to 0), ``rows`` ([N], bool) marks the rows whose
    statistics are needed: the others get ``lse = 0`` (their row blocks are skipped when no row
    of the block is needed). ``request`` may ask for the entropy and ``Σ z``, not for a top-k or
    dense terms (:func:`.dispatch.triton_unsupported_reason` with ``fused_linear=True``).
    """
    if request.dense or request.topk is not None:
        raise ValueError("the fused-linear kernel computes no top-k entropy and no dense term")
    bl = blocks or FusedLinearBlocks()
    n, hdim = hidden.shape
    vocab = int(weight.shape[0])
    dev = hidden.device
    active = _active(rows)
    label_col = labels[:, None]
    ids = label_col if support is None else torch.cat([label_col, support], dim=1)
    ids = ids.to(torch.int32).contiguous()
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
    cap = 0.0 if softcap is None else float(softcap)
    if n > 0:
        _lse_kernel[(n_rb, splits)](
            hidden,
            weight,
            weight if bias is None else bias,
            active,
            m,
            s,
            t,
            tot,
            n,
            vocab,
            hdim,
            hidden.stride(0),
            weight.stride(0),
            per,
            cap,
            HAS_BIAS=bias is not None,
            SOFTCAP=softcap is not None,
            ENTROPY=bool(request.entropy),
            SUM=bool(request.sum_logits),
            DOT_F32=_dot_f32(hidden),
            BLOCK_M=bl.block_m,
            BLOCK_N=bl.block_n,
            BLOCK_H=bl.block_h,
            num_warps=bl.num_warps,
            num_stages=bl.num_stages,
        )
        _gather_kernel[(n,)](
            hidden,
            weight,
            weight if bias is None else bias,
            ids,
            zs,
            n_ids,
            hdim,
            hidden.stride(0),
            weight.stride(0),
            cap,
            HAS_BIAS=bias is not None,
            SOFTCAP=softcap is not None,
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
    return RowStats(
        lse=lse,
        z_label=zs[:, 0],
        z_support=zs[:, 1:] if n_ids > 1 else None,
        entropy=entropy,
        sum_logits=sum_logits,
    )


def _sparse_target(plan: GradPlan) -> tuple[Tensor, Tensor]:
    """``(ids [N, 1 (+K)] int32, mass float32)`` of the sparse target (padding: id −1)."""
    ids = [plan.labels[:, None]]
    mass = [plan.label_mass[:, None]]
    if plan.support is not None and plan.support_mass is not None:
        valid = plan.support_valid if plan.support_valid is not None else plan.support_mass != 0
        ids.append(torch.where(valid, plan.support, -1))
        mass.append(plan.support_mass)
    ids_t = torch.cat(ids, dim=1).to(torch.int32).contiguous()
    return ids_t, torch.cat(mass, dim=1).float().contiguous()


class FusedLinearFunction(torch.autograd.Function):
    """Attach precomputed per-row loss values to ``(hidden, weight, bias)``; the backward
    recomputes the logit tiles and accumulates ``d hidden``, ``d weight`` and ``d bias`` from the
    plan's ``g = κ·p − Q̂`` (float32 buffers, cast to the inputs' dtypes at the end).

    ``forward(hidden [N, H], weight [V, H], bias [V] | None, values [N], plan, rows [N] bool,
    softcap, blocks)`` returns ``values`` (a copy).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        values: Tensor,
        plan: GradPlan,
        rows: Tensor,
        softcap: float | None,
        blocks: FusedLinearBlocks | None,
    ) -> Tensor:
        ctx.save_for_backward(hidden, weight, bias)
        ctx.plan = plan
        ctx.active = _active(rows)
        ctx.ids, ctx.mass = _sparse_target(plan)
        ctx.softcap = softcap
        ctx.blocks = blocks or FusedLinearBlocks()
        return values.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_values: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        hidden, weight, bias = ctx.saved_tensors
        plan: GradPlan = ctx.plan
        softcap: float | None = ctx.softcap
        n, hdim = hidden.shape
        vocab = int(weight.shape[0])
        g = grad_values.to(torch.float32)
        kappa = (plan.kappa * g).float().contiguous()
        uniform = None if plan.uniform_mass is None else (plan.uniform_mass * g / vocab).float()
        mass = (ctx.mass * g[:, None]).float().contiguous()
        de = torch.zeros(n, hdim, dtype=torch.float32, device=hidden.device)
        dw = torch.zeros(vocab, hdim, dtype=torch.float32, device=hidden.device)
        db = (
            torch.zeros(vocab, dtype=torch.float32, device=hidden.device)
            if bias is not None
            else dw
        )
        bl: FusedLinearBlocks = ctx.blocks
        if n > 0:
            grid = (triton.cdiv(n, bl.bwd_block_m), triton.cdiv(vocab, bl.bwd_block_n))
            _backward_kernel[grid](
                hidden,
                weight,
                weight if bias is None else bias,
                ctx.active,
                plan.lse,
                kappa,
                kappa if uniform is None else uniform.contiguous(),
                ctx.ids,
                mass,
                de,
                dw,
                db,
                n,
                vocab,
                hdim,
                int(ctx.ids.shape[1]),
                hidden.stride(0),
                weight.stride(0),
                0.0 if softcap is None else float(softcap),
                HAS_BIAS=bias is not None,
                SOFTCAP=softcap is not None,
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
        return d_hidden, d_weight, d_bias, None, None, None, None, None
