"""The chunked PyTorch reference of the two sweeps (the Triton kernels mirror it).

* :func:`row_stats` — the forward sweep: :class:`~.contract.RowStats` of ``z`` ([N, V]), one row
  chunk at a time (``chunk_elements`` rows × V), so that no float32 ``N × V`` tensor exists.
* :func:`logit_grad` — the backward sweep: ``g = κ·p − Q̂`` per row from a
  :class:`~.contract.GradPlan`, formed in float32 (float64 for float64 logits) chunk by chunk and
  written once into a buffer of the logits' dtype. So ``p − Q`` is never formed in bf16, and the
  only ``N × V`` buffer is the gradient.
* :class:`QTargetFunction` — the autograd Function that attaches the per-row loss values
  (computed by the caller from the row statistics) to ``z``; its backward is :func:`logit_grad`.

Exact in float64; the Triton kernels are tested against it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .contract import (
    GradPlan,
    RowStats,
    StatRequest,
    compute_dtype,
    default_chunk_elements,
    rows_per_chunk,
)

__all__ = ["QTargetFunction", "logit_grad", "row_stats"]


def _chunk(z: Tensor, start: int, stop: int, cdt: torch.dtype) -> tuple[Tensor, bool]:
    """Rows ``start:stop`` of ``z`` in the compute dtype, and whether that is a private copy."""
    rows = z[start:stop]
    if rows.dtype == cdt:
        return rows, False
    return rows.to(cdt), True


@torch.no_grad()
def row_stats(
    z: Tensor,
    labels: Tensor,
    support: Tensor | None,
    request: StatRequest,
    chunk_elements: int | None = None,
) -> RowStats:
    """One chunked sweep over ``z`` ([N, V]) computing :class:`RowStats`.

    ``labels`` ([N], int64) and ``support`` ([N, K], int64) must already be valid indices (ignored
    labels and padding clamped to 0 by the caller).
    """
    n, vocab = z.shape
    cdt = compute_dtype(z.dtype)
    dev = z.device
    lse = torch.empty(n, dtype=cdt, device=dev)
    z_label = torch.empty(n, dtype=cdt, device=dev)
    z_support = None if support is None else torch.empty(support.shape, dtype=cdt, device=dev)
    entropy = torch.empty(n, dtype=cdt, device=dev) if request.entropy else None
    sum_logits = torch.empty(n, dtype=cdt, device=dev) if request.sum_logits else None
    k = None if request.topk is None else min(int(request.topk), vocab)
    topk_entropy = torch.empty(n, dtype=cdt, device=dev) if k is not None else None
    dense_ce = [torch.empty(n, dtype=cdt, device=dev) for _ in request.dense]

    needs_raw = bool(entropy is not None or sum_logits is not None or k is not None or dense_ce)
    if chunk_elements is None:
        chunk_elements = default_chunk_elements(z.device)
    step = rows_per_chunk(n, vocab, chunk_elements)
    for start in range(0, n, step):
        stop = min(start + step, n)
        zc, private = _chunk(z, start, stop, cdt)
        z_label[start:stop] = zc.gather(1, labels[start:stop, None]).squeeze(1)
        if z_support is not None and support is not None:
            z_support[start:stop] = zc.gather(1, support[start:stop])
        if private and not needs_raw:
            # Half-precision input: zc is our own float32 copy, so exp it in place (one pass less
            # than torch.logsumexp, no extra chunk buffer). Same algorithm:
            # max + log Σ exp(z − max).
            m = zc.amax(dim=-1, keepdim=True)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            lc = torch.log(zc.sub_(m).exp_().sum(-1)) + m.squeeze(1)
            lse[start:stop] = lc
            continue
        lc = torch.logsumexp(zc, dim=-1)
        lse[start:stop] = lc
        if entropy is not None:
            p = torch.exp(zc - lc[:, None])
            entropy[start:stop] = torch.special.entr(p).sum(-1)
            del p
        if sum_logits is not None:
            sum_logits[start:stop] = zc.sum(-1)
        if topk_entropy is not None and k is not None:
            top = zc.topk(k, dim=-1, sorted=False).values
            topk_entropy[start:stop] = torch.special.entr(torch.softmax(top, dim=-1)).sum(-1)
        for term, out in zip(request.dense, dense_ce, strict=True):
            d = term.density(zc, lc)
            logp = zc - lc[:, None]
            out[start:stop] = -torch.where(d > 0, d * logp, torch.zeros_like(d)).sum(-1)
            del d, logp
    return RowStats(
        lse=lse,
        z_label=z_label,
        z_support=z_support,
        entropy=entropy,
        sum_logits=sum_logits,
        topk_entropy=topk_entropy,
        topk=k,
        dense_ce=dense_ce,
        dense_terms=tuple(request.dense),
    )


@torch.no_grad()
def logit_grad(z: Tensor, plan: GradPlan, row_grad: Tensor) -> Tensor:
    """``∂/∂z`` of ``Σ_t row_grad_t · ℓ_t`` for the plan's per-row losses ``ℓ_t``.

    Formed in the compute dtype chunk by chunk and written into a buffer of ``z``'s dtype.
    """
    n, vocab = z.shape
    cdt = compute_dtype(z.dtype)
    g_rows = row_grad.to(cdt)
    kappa = plan.kappa * g_rows
    label_mass = plan.label_mass * g_rows
    support_mass = None if plan.support_mass is None else plan.support_mass * g_rows[:, None]
    uniform = None if plan.uniform_mass is None else plan.uniform_mass * g_rows / vocab
    dense = [(term, e * g_rows) for term, e in plan.dense]

    out = torch.empty_like(z, memory_format=torch.contiguous_format)
    chunk_elements = plan.chunk_elements or default_chunk_elements(z.device)
    step = rows_per_chunk(n, vocab, chunk_elements)
    for start in range(0, n, step):
        stop = min(start + step, n)
        zc, private = _chunk(z, start, stop, cdt)
        lc = plan.lse[start:stop, None]
        # Dense terms need the raw logits, so take them before zc may be overwritten by p.
        dense_parts = [(term.density(zc, plan.lse[start:stop]), e[start:stop]) for term, e in dense]
        g = zc.sub_(lc) if private else zc - lc
        g.exp_().mul_(kappa[start:stop, None])
        for d, e in dense_parts:
            g.sub_(d.mul_(e[:, None]))
        del dense_parts
        if uniform is not None:
            g.sub_(uniform[start:stop, None])
        g.scatter_add_(1, plan.labels[start:stop, None], -label_mass[start:stop, None])
        if support_mass is not None and plan.support is not None:
            g.scatter_add_(1, plan.support[start:stop], -support_mass[start:stop])
        out[start:stop].copy_(g)
        del g
    return out


class QTargetFunction(torch.autograd.Function):
    """Attach precomputed per-row loss values to ``z``; the backward is :func:`logit_grad`.

    ``forward(z, values, plan)`` returns ``values`` (a copy) so that autograd sees a function of
    ``z``; the gradient it propagates is exactly the plan's ``κ·p − Q̂`` per row.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, z: Tensor, values: Tensor, plan: GradPlan
    ) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z)
        ctx.plan = plan  # type: ignore[attr-defined]
        return values.clone()

    @staticmethod
    @once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_values: Tensor
    ) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        (z,) = ctx.saved_tensors  # type: ignore[attr-defined]
        if not ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            return None, None, None
        plan: GradPlan = ctx.plan  # type: ignore[attr-defined]
        return logit_grad(z, plan, grad_values), None, None
