"""The chunked PyTorch reference of the two sweeps (the Triton kernels mirror it).

* :func:`row_stats` — the forward sweep: :class:`~.contract.RowStats` of ``z`` ([N, V]), one row
  chunk at a time (``chunk_elements`` rows × V), so that no float32 ``N × V`` tensor exists.
* :func:`logit_grad` — the backward sweep: ``g = κ·p − Q̂`` per row from a
  :class:`~.contract.GradPlan`, formed in float32 (float64 for float64 logits) chunk by chunk and
  written once into a buffer of the logits' dtype. So ``p − Q`` is never formed in bf16, and the
  only ``N × V`` buffer is the gradient.
* :class:`QTargetFunction` — the autograd Function that attaches the per-row loss values
  (computed by the caller from the row statistics) to ``z``; its backward is :func:`logit_grad`.
* The fused-linear reference (the PyTorch counterpart of :mod:`.triton_fused_linear`, and its CPU
  path): the logits ``z = softcap·tanh((h Wᵀ + b)/softcap)`` of an LM head are never
  materialised. :func:`fused_row_stats` computes one row chunk of ``z`` at a time
  (:func:`head_logits`), takes the same per-chunk statistics as :func:`row_stats` and drops the
  chunk; :class:`FusedQTargetFunction`'s backward recomputes each chunk, forms the same
  ``g = κ·p − Q̂`` as :func:`logit_grad` on it and accumulates ``d hidden = g W``,
  ``d W += gᵀ h`` and ``d b += Σ g`` in float32 (float64 for float64 inputs). Peak extra memory:
  a few ``chunk × V`` buffers and float32 ``d W`` (plus a float32 copy of ``W`` for bf16 / fp16
  inputs), never ``N × V``. Only the rows that need statistics are computed.

Exact in float64; the Triton kernels are tested against it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .contract import (
    DenseTerm,
    GradPlan,
    RowStats,
    StatRequest,
    compute_dtype,
    default_chunk_elements,
    rows_per_chunk,
)

__all__ = [
    "FusedQTargetFunction",
    "QTargetFunction",
    "fused_row_stats",
    "head_logits",
    "logit_grad",
    "row_stats",
]

#: where a chunk's rows go in the ``[N]`` outputs: a slice, or the row indices
_Rows = slice | Tensor


def _chunk(z: Tensor, start: int, stop: int, cdt: torch.dtype) -> tuple[Tensor, bool]:
    """Rows ``start:stop`` of ``z`` in the compute dtype, and whether that is a private copy."""
    rows = z[start:stop]
    if rows.dtype == cdt:
        return rows, False
    return rows.to(cdt), True


def _empty_stats(
    n: int,
    vocab: int,
    support: Tensor | None,
    request: StatRequest,
    cdt: torch.dtype,
    device: torch.device,
    alloc: Any = torch.empty,
) -> RowStats:
    """The :class:`RowStats` buffers for ``n`` rows (``alloc``: ``torch.empty`` or ``torch.zeros``)."""
    k = None if request.topk is None else min(int(request.topk), vocab)

    def vec() -> Tensor:
        return alloc(n, dtype=cdt, device=device)  # type: ignore[no-any-return]

    return RowStats(
        lse=vec(),
        z_label=vec(),
        z_support=None if support is None else alloc(support.shape, dtype=cdt, device=device),
        entropy=vec() if request.entropy else None,
        sum_logits=vec() if request.sum_logits else None,
        topk_entropy=vec() if k is not None else None,
        topk=k,
        dense_ce=[vec() for _ in request.dense],
        dense_terms=tuple(request.dense),
    )


def _stats_into(
    out: RowStats,
    at: _Rows,
    zc: Tensor,
    private: bool,
    labels: Tensor,
    support: Tensor | None,
) -> None:
    """The row statistics of one chunk ``zc`` (compute dtype; ``private``: ours to overwrite)
    written into ``out`` at rows ``at``; ``labels`` / ``support`` are the chunk's."""
    out.z_label[at] = zc.gather(1, labels[:, None]).squeeze(1)
    if out.z_support is not None and support is not None:
        out.z_support[at] = zc.gather(1, support)
    raw = (out.entropy, out.sum_logits, out.topk_entropy)
    if private and all(t is None for t in raw) and not out.dense_ce:
        # zc is our own copy: exp it in place (one pass less than torch.logsumexp, no extra
        # chunk buffer). Same algorithm: max + log Σ exp(z − max).
        m = zc.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        out.lse[at] = torch.log(zc.sub_(m).exp_().sum(-1)) + m.squeeze(1)
        return
    lc = torch.logsumexp(zc, dim=-1)
    out.lse[at] = lc
    if out.entropy is not None:
        p = torch.exp(zc - lc[:, None])
        out.entropy[at] = torch.special.entr(p).sum(-1)
        del p
    if out.sum_logits is not None:
        out.sum_logits[at] = zc.sum(-1)
    if out.topk_entropy is not None and out.topk is not None:
        top = zc.topk(out.topk, dim=-1, sorted=False).values
        out.topk_entropy[at] = torch.special.entr(torch.softmax(top, dim=-1)).sum(-1)
    for term, ce in zip(out.dense_terms, out.dense_ce, strict=True):
        d = term.density(zc, lc)
        logp = zc - lc[:, None]
        ce[at] = -torch.where(d > 0, d * logp, torch.zeros_like(d)).sum(-1)
        del d, logp


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
    out = _empty_stats(n, vocab, support, request, cdt, z.device)
    if chunk_elements is None:
        chunk_elements = default_chunk_elements(z.device)
    step = rows_per_chunk(n, vocab, chunk_elements)
    for start in range(0, n, step):
        at = slice(start, min(start + step, n))
        zc, private = _chunk(z, at.start, at.stop, cdt)
        _stats_into(out, at, zc, private, labels[at], None if support is None else support[at])
    return out


class _ScaledPlan:
    """A :class:`GradPlan` times the incoming per-row gradient: forms ``g = κ·p − Q̂`` for any
    chunk of rows (the one backward of :func:`logit_grad` and :class:`FusedQTargetFunction`)."""

    def __init__(self, plan: GradPlan, row_grad: Tensor, vocab: int, cdt: torch.dtype) -> None:
        g_rows = row_grad.to(cdt)
        self.plan = plan
        self.kappa = plan.kappa * g_rows
        self.label_mass = plan.label_mass * g_rows
        self.support_mass = (
            None if plan.support_mass is None else plan.support_mass * g_rows[:, None]
        )
        self.uniform = None if plan.uniform_mass is None else plan.uniform_mass * g_rows / vocab
        self.dense: list[tuple[DenseTerm, Tensor]] = [(t, e * g_rows) for t, e in plan.dense]

    def grad(self, zc: Tensor, private: bool, at: _Rows) -> Tensor:
        """``g`` ([rows, V], compute dtype) for the logits ``zc`` of rows ``at`` (overwrites
        ``zc`` when ``private``)."""
        plan = self.plan
        lse = plan.lse[at]
        # Dense terms need the raw logits, so take them before zc may be overwritten by p.
        dense_parts = [(term.density(zc, lse), e[at]) for term, e in self.dense]
        g = zc.sub_(lse[:, None]) if private else zc - lse[:, None]
        g.exp_().mul_(self.kappa[at][:, None])
        for d, e in dense_parts:
            g.sub_(d.mul_(e[:, None]))
        del dense_parts
        if self.uniform is not None:
            g.sub_(self.uniform[at][:, None])
        g.scatter_add_(1, plan.labels[at][:, None], -self.label_mass[at][:, None])
        if self.support_mass is not None and plan.support is not None:
            g.scatter_add_(1, plan.support[at], -self.support_mass[at])
        return g


@torch.no_grad()
def logit_grad(z: Tensor, plan: GradPlan, row_grad: Tensor) -> Tensor:
    """``∂/∂z`` of ``Σ_t row_grad_t · ℓ_t`` for the plan's per-row losses ``ℓ_t``.

    Formed in the compute dtype chunk by chunk and written into a buffer of ``z``'s dtype.
    """
    n, vocab = z.shape
    cdt = compute_dtype(z.dtype)
    scaled = _ScaledPlan(plan, row_grad, vocab, cdt)
    out = torch.empty_like(z, memory_format=torch.contiguous_format)
    chunk_elements = plan.chunk_elements or default_chunk_elements(z.device)
    step = rows_per_chunk(n, vocab, chunk_elements)
    for start in range(0, n, step):
        at = slice(start, min(start + step, n))
        zc, private = _chunk(z, at.start, at.stop, cdt)
        out[at].copy_(scaled.grad(zc, private, at))
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


# --------------------------------------------------------------------- fused-linear reference
def head_logits(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None
) -> Tensor:
    """``softcap·tanh((hidden Wᵀ + bias)/softcap)`` (no cap / bias when ``None``) in the dtype of
    its inputs (the fused-linear reference passes them in the compute dtype)."""
    z = F.linear(hidden, weight, bias)
    return z if softcap is None else z.div_(softcap).tanh_().mul_(softcap)


class _Head:
    """The LM head in the compute dtype and the rows to sweep, in chunks of ``chunk_elements``."""

    def __init__(
        self,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        rows: Tensor,
        softcap: float | None,
        chunk_elements: int | None,
    ) -> None:
        self.cdt = compute_dtype(hidden.dtype)
        self.hidden = hidden
        self.weight = weight.to(self.cdt)
        self.bias = None if bias is None else bias.to(self.cdt)
        self.softcap = None if softcap is None else float(softcap)
        self.vocab = int(weight.shape[0])
        #: the rows that need statistics (and get a gradient), as indices
        self.active = rows.nonzero().squeeze(1)
        if chunk_elements is None:
            chunk_elements = default_chunk_elements(hidden.device, fused_linear=True)
        self.step = rows_per_chunk(int(self.active.numel()), self.vocab, chunk_elements)

    def chunks(self) -> Any:
        """``(row indices, hidden rows in the compute dtype)`` of each chunk."""
        for start in range(0, int(self.active.numel()), self.step):
            at = self.active[start : start + self.step]
            yield at, self.hidden.index_select(0, at).to(self.cdt)

    def logits(self, hc: Tensor) -> Tensor:
        return head_logits(hc, self.weight, self.bias, self.softcap)


@torch.no_grad()
def fused_row_stats(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    support: Tensor | None,
    rows: Tensor,
    request: StatRequest,
    *,
    softcap: float | None = None,
    chunk_elements: int | None = None,
) -> RowStats:
    """:class:`~.contract.RowStats` of ``z = softcap·tanh((hidden Wᵀ + bias)/softcap)`` without
    materialising ``z``: the PyTorch reference of
    :func:`.triton_fused_linear.fused_linear_row_stats` (same arguments), for every request
    (top-k entropy and dense terms included).

    ``hidden`` ``[N, H]``, ``weight`` ``[V, H]``, ``bias`` ``[V]`` or ``None``; ``labels`` ([N])
    and ``support`` ([N, K]) are valid column indices; only the rows marked in ``rows`` ([N],
    bool) are computed, the others get zeros. ``chunk_elements`` bounds a chunk's logits (rows × V;
    ``None``: :func:`~.contract.default_chunk_elements` with ``fused_linear=True``).
    """
    head = _Head(hidden, weight, bias, rows, softcap, chunk_elements)
    out = _empty_stats(
        int(hidden.shape[0]), head.vocab, support, request, head.cdt, hidden.device, torch.zeros
    )
    with torch.autocast(hidden.device.type, enabled=False):
        for at, hc in head.chunks():
            zc = head.logits(hc)
            _stats_into(out, at, zc, True, labels[at], None if support is None else support[at])
            del zc
    return out


class FusedQTargetFunction(torch.autograd.Function):
    """Attach precomputed per-row loss values to ``(hidden, weight, bias)``; the backward
    recomputes the logits chunk by chunk and accumulates ``d hidden``, ``d weight`` and
    ``d bias`` from the plan's ``g = κ·p − Q̂`` in the compute dtype (cast to the inputs' dtypes
    at the end): the PyTorch reference of :class:`.triton_fused_linear.FusedLinearFunction`.

    ``forward(hidden [N, H], weight [V, H], bias [V] | None, values [N], plan, rows [N] bool,
    softcap, chunk_elements)`` returns ``values`` (a copy).
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
        chunk_elements: int | None,
    ) -> Tensor:
        ctx.save_for_backward(hidden, weight, bias, rows)
        ctx.plan = plan
        ctx.softcap = softcap
        ctx.chunk_elements = chunk_elements
        return values.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_values: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        hidden, weight, bias, rows = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        head = _Head(hidden, weight, bias, rows, ctx.softcap, ctx.chunk_elements)
        cdt, dev = head.cdt, hidden.device
        scaled = _ScaledPlan(ctx.plan, grad_values, head.vocab, cdt)
        dh = torch.zeros(hidden.shape, dtype=cdt, device=dev) if need_h else None
        dw = torch.zeros(weight.shape, dtype=cdt, device=dev) if need_w else None
        db = torch.zeros(head.vocab, dtype=cdt, device=dev) if need_b and bias is not None else None
        cap = head.softcap
        with torch.autocast(dev.type, enabled=False):
            for at, hc in head.chunks():
                zc = F.linear(hc, head.weight, head.bias)
                if cap is None:
                    g = scaled.grad(zc, True, at)
                else:
                    t = zc.div_(cap).tanh_()  # tanh(a / c): z = c·t, dz/da = 1 − t²
                    g = scaled.grad(t * cap, True, at)
                    g.mul_(t.square_().neg_().add_(1.0))
                    del t
                if dh is not None:
                    dh.index_copy_(0, at, g @ head.weight)
                if dw is not None:
                    dw.addmm_(g.T, hc)
                if db is not None:
                    db.add_(g.sum(0))
                del g, zc
        return (
            None if dh is None else dh.to(hidden.dtype),
            None if dw is None else dw.to(weight.dtype),
            None if db is None or bias is None else db.to(bias.dtype),
            None,
            None,
            None,
            None,
            None,
        )
