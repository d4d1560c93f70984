"""Triton kernels over materialised logits: the two sweeps of :mod:`.reference`, on the GPU.

* :func:`row_stats_triton` — one program per row streams the vocabulary once in ``BLOCK_V`` tiles
  with an online log-sum-exp (running max ``m`` and ``s = Σ e^{z−m}``, rescaled when ``m`` grows),
  optionally ``t = Σ e^{z−m} z`` (entropy ``H = lse − t/s``) and ``Σ z``, then gathers the logits at
  the label and the teacher support (``S ∪ {y}``) in float32. Nothing of size ``N × V`` is written.
* :func:`logit_grad_triton` — one program per row writes ``g·(κ p − c/V)`` (formed in float32) tile
  by tile into the gradient buffer (the logits' dtype; optionally the logits buffer itself), then,
  after a block barrier, rewrites the ≤ K + 1 sparse positions with the full float32 value
  ``g·(κ p − c/V − Q̂_k)``, recomputed from the float32 logits saved by the forward. So ``p − Q``
  is never formed in bf16 (no cancellation for confident tokens) and no float32 ``N × V`` buffer
  exists. Duplicates (label inside the support) are merged on the host so that every position is
  written by one lane only.
* :class:`TritonLogitsFunction` — the autograd Function whose backward is
  :func:`logit_grad_triton` (the counterpart of :class:`.reference.QTargetFunction`).

Same contract as the reference (:mod:`.contract`: :class:`~.contract.StatRequest` in,
:class:`~.contract.RowStats` out, :class:`~.contract.GradPlan` for the backward), so every loss
whose target is sparse, uniform or self-residual runs here unchanged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from .contract import DEFAULT_CHUNK_ELEMENTS, GradPlan, RowStats, StatRequest, rows_per_chunk
from .dispatch import interpreting

__all__ = [
    "TritonLogitsFunction",
    "logit_grad_triton",
    "round_to_bf16",
    "row_stats_triton",
    "sparse_fixup_plan",
    "sparse_logits",
]

#: Vocabulary tile of one program iteration (elements). Tests pass smaller tiles.
DEFAULT_BLOCK_V = 4096


@triton.jit
def round_to_bf16(x):
    """float32 → the nearest bf16 value (ties to even), still as float32.

    Used only under the Triton interpreter, whose float32 → bf16 stores truncate; GPUs already
    round to nearest even, so there the values are identical without it.
    """
    r = x.to(tl.int32, bitcast=True)
    r = r + 0x7FFF + ((r >> 16) & 1)
    r = r & -65536
    return r.to(tl.float32, bitcast=True)


@triton.jit
def _row_stats_kernel(
    z_ptr,
    stride_z,
    ids_ptr,
    stride_ids,
    n_ids,
    lse_ptr,
    ent_ptr,
    sum_ptr,
    zs_ptr,
    V,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ENTROPY: tl.constexpr,
    SUM: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_z
    offs = tl.arange(0, BLOCK_V)
    m = float("-inf")
    s = 0.0
    t = 0.0
    total = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        inside = cols < V
        z = tl.load(base + cols, mask=inside, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe)
        s = s * alpha + tl.sum(e, axis=0)
        if ENTROPY:
            t = t * alpha + tl.sum(e * tl.where(z > float("-inf"), z, 0.0), axis=0)
        if SUM:
            total += tl.sum(tl.where(inside, z, 0.0), axis=0)
        m = m_new
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    lse = m_safe + tl.log(s)
    tl.store(lse_ptr + row, lse)
    if ENTROPY:
        tl.store(ent_ptr + row, lse - t / s)
    if SUM:
        tl.store(sum_ptr + row, total)
    # Gathers at S ∪ {y} (ids already clamped to valid columns), kept in float32.
    k = tl.arange(0, BLOCK_K)
    kin = k < n_ids
    ids = tl.load(ids_ptr + row * stride_ids + k, mask=kin, other=0).to(tl.int64)
    zg = tl.load(base + ids, mask=kin, other=0.0).to(tl.float32)
    tl.store(zs_ptr + row * n_ids + k, zg, mask=kin)


@triton.jit
def _logit_grad_kernel(
    z_ptr,
    stride_z,
    out_ptr,
    stride_out,
    lse_ptr,
    kappa_ptr,
    unif_ptr,
    ids_ptr,
    mass_ptr,
    zs_ptr,
    n_ids,
    V,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UNIFORM: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    zbase = z_ptr + row * stride_z
    obase = out_ptr + row * stride_out
    lse = tl.load(lse_ptr + row)
    kap = tl.load(kappa_ptr + row)
    live = kap != 0.0
    lse_safe = tl.where(live, lse, 0.0)
    if UNIFORM:
        u = tl.load(unif_ptr + row)
    else:
        u = 0.0
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        inside = cols < V
        z = tl.load(zbase + cols, mask=inside, other=0.0).to(tl.float32)
        g = tl.where(live, kap * tl.exp(z - lse_safe), 0.0) - u
        if ROUND_BF16:
            g = round_to_bf16(g)
        tl.store(obase + cols, g.to(out_ptr.dtype.element_ty), mask=inside)
    # Every lane's dense stores must land before the sparse positions are rewritten.
    tl.debug_barrier()
    k = tl.arange(0, BLOCK_K)
    kin = k < n_ids
    ids = tl.load(ids_ptr + row * n_ids + k, mask=kin, other=-1).to(tl.int64)
    ok = kin & (ids >= 0)
    zs = tl.load(zs_ptr + row * n_ids + k, mask=kin, other=0.0)
    mass = tl.load(mass_ptr + row * n_ids + k, mask=kin, other=0.0)
    g = tl.where(live, kap * tl.exp(zs - lse_safe), 0.0) - u - mass
    if ROUND_BF16:
        g = round_to_bf16(g)
    tl.store(obase + tl.where(ok, ids, 0), g.to(out_ptr.dtype.element_ty), mask=ok)


def _block_k(n: int) -> int:
    return max(2, triton.next_power_of_2(max(n, 1)))


def _block_v(vocab: int, block_v: int | None) -> int:
    b = DEFAULT_BLOCK_V if block_v is None else int(block_v)
    return max(16, min(triton.next_power_of_2(b), triton.next_power_of_2(vocab)))


def _topk_entropy(z: Tensor, k: int) -> Tensor:
    """EAFT's top-k entropy, chunked in PyTorch (``torch.topk`` on the stored dtype)."""
    n, vocab = z.shape
    out = torch.empty(n, dtype=torch.float32, device=z.device)
    step = rows_per_chunk(n, vocab, DEFAULT_CHUNK_ELEMENTS * 16)
    for a in range(0, n, step):
        top = z[a : a + step].topk(k, dim=-1, sorted=False).values.float()
        out[a : a + step] = torch.special.entr(torch.softmax(top, dim=-1)).sum(-1)
    return out


@torch.no_grad()
def row_stats_triton(
    z: Tensor,
    labels: Tensor,
    support: Tensor | None,
    request: StatRequest,
    *,
    block_v: int | None = None,
) -> RowStats:
    """Triton version of :func:`.reference.row_stats` (same contract)."""
    if request.dense:
        raise ValueError("the Triton kernels do not implement dense target terms (GEM)")
    if z.dtype == torch.float64:
        raise ValueError("the Triton kernels take float32/bf16/fp16 logits, not float64")
    if z.stride(-1) != 1:
        z = z.contiguous()
    n, vocab = z.shape
    dev = z.device
    ids = labels[:, None] if support is None else torch.cat([labels[:, None], support], dim=1)
    ids = ids.to(torch.int32).contiguous()
    n_ids = int(ids.shape[1])
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    ent = torch.empty(n, dtype=torch.float32, device=dev) if request.entropy else lse
    tot = torch.empty(n, dtype=torch.float32, device=dev) if request.sum_logits else lse
    zs = torch.empty(n, n_ids, dtype=torch.float32, device=dev)
    if n > 0:
        _row_stats_kernel[(n,)](
            z,
            z.stride(0),
            ids,
            ids.stride(0),
            n_ids,
            lse,
            ent,
            tot,
            zs,
            vocab,
            BLOCK_V=_block_v(vocab, block_v),
            BLOCK_K=_block_k(n_ids),
            ENTROPY=bool(request.entropy),
            SUM=bool(request.sum_logits),
        )
    k = None if request.topk is None else min(int(request.topk), vocab)
    return RowStats(
        lse=lse,
        z_label=zs[:, 0],
        z_support=None if support is None else zs[:, 1:],
        entropy=ent if request.entropy else None,
        sum_logits=tot if request.sum_logits else None,
        topk_entropy=None if k is None else _topk_entropy(z, k),
        topk=k,
    )


def sparse_logits(stats: RowStats, plan: GradPlan) -> Tensor:
    """The float32 logits at ``[label, support...]`` (``[N, 1 (+K)]``) from the forward sweep: what
    :func:`logit_grad_triton` rewrites the sparse positions from (columns as in the plan)."""
    if plan.support is None:
        return stats.z_label[:, None].float().contiguous()
    if stats.z_support is None:
        raise RuntimeError("the plan has support mass but the forward gathered no support logits")
    return torch.cat([stats.z_label[:, None], stats.z_support], dim=1).float().contiguous()


def sparse_fixup_plan(plan: GradPlan) -> tuple[Tensor, Tensor]:
    """``(ids [N, 1+K] int32, mass [N, 1+K] float32)``: the sparse target mass, merged.

    Column 0 is the label, columns 1.. the support. Padding and a label that also appears in the
    support get id −1 (its mass is added to the support entry), so no position appears twice.
    """
    labels = plan.labels
    if plan.support is None or plan.support_mass is None:
        return labels[:, None].to(torch.int32), plan.label_mass[:, None].float()
    sup = plan.support
    valid = plan.support_valid if plan.support_valid is not None else plan.support_mass != 0
    same = (sup == labels[:, None]) & valid
    mass_s = plan.support_mass + torch.where(same, plan.label_mass[:, None], 0.0)
    in_s = same.any(-1)
    ids = torch.cat(
        [torch.where(in_s, -1, labels)[:, None], torch.where(valid, sup, -1)], dim=1
    ).to(torch.int32)
    mass = torch.cat([plan.label_mass[:, None], mass_s], dim=1).float()
    return ids.contiguous(), mass.contiguous()


@torch.no_grad()
def logit_grad_triton(
    z: Tensor,
    plan: GradPlan,
    row_grad: Tensor,
    z_sparse: Tensor,
    *,
    inplace: bool = False,
    block_v: int | None = None,
) -> Tensor:
    """Triton version of :func:`.reference.logit_grad`; ``z_sparse`` is :func:`sparse_logits`.

    With ``inplace=True`` the gradient overwrites ``z`` (whose values are consumed: the caller
    must not use the logits after the backward), as Liger-Kernel does; otherwise a new buffer of
    ``z``'s dtype is returned.
    """
    if plan.dense:
        raise ValueError("the Triton kernels do not implement dense target terms (GEM)")
    n, vocab = z.shape
    g = row_grad.to(torch.float32)
    kappa = (plan.kappa * g).float().contiguous()
    uniform = None if plan.uniform_mass is None else (plan.uniform_mass * g / vocab).float()
    ids, mass = sparse_fixup_plan(plan)
    mass = (mass * g[:, None]).contiguous()
    if inplace and z.stride(-1) == 1:
        out = z
    else:
        out = torch.empty_like(z, memory_format=torch.contiguous_format)
        if z.stride(-1) != 1:
            z = z.contiguous()
    if n > 0:
        _logit_grad_kernel[(n,)](
            z,
            z.stride(0),
            out,
            out.stride(0),
            plan.lse,
            kappa,
            kappa if uniform is None else uniform.contiguous(),
            ids,
            mass,
            z_sparse,
            int(ids.shape[1]),
            vocab,
            BLOCK_V=_block_v(vocab, block_v),
            BLOCK_K=_block_k(int(ids.shape[1])),
            UNIFORM=uniform is not None,
            ROUND_BF16=out.dtype == torch.bfloat16 and interpreting(),
        )
    return out


class TritonLogitsFunction(torch.autograd.Function):
    """Attach precomputed per-row loss values to ``z``; the backward is :func:`logit_grad_triton`.

    ``forward(z, values, plan, stats, inplace)``: ``stats`` is the forward's
    :class:`~.contract.RowStats` (its float32 logits at the label and the support are kept for the
    backward); with ``inplace=True`` the backward writes the gradient into ``z``'s own storage.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        z: Tensor,
        values: Tensor,
        plan: GradPlan,
        stats: RowStats,
        inplace: bool,
    ) -> Tensor:
        ctx.save_for_backward(z)
        ctx.plan = plan  # type: ignore[attr-defined]
        ctx.z_sparse = sparse_logits(stats, plan)  # type: ignore[attr-defined]
        ctx.inplace = inplace  # type: ignore[attr-defined]
        return values.clone()

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_values: Tensor
    ) -> tuple[Tensor | None, None, None, None, None]:
        (z,) = ctx.saved_tensors  # type: ignore[attr-defined]
        if not ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            return None, None, None, None, None
        grad = logit_grad_triton(
            z,
            ctx.plan,  # type: ignore[attr-defined]
            grad_values,
            ctx.z_sparse,  # type: ignore[attr-defined]
            inplace=ctx.inplace,  # type: ignore[attr-defined]
        )
        return grad, None, None, None, None
