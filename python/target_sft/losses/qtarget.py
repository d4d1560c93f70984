"""The Q-target framework: ``Q_t = γ_t δ_{y_t} + (1 − γ_t) π̃_t``, loss ``CE(Q_t, π_θ)`` (§4–5).

:class:`QTargetLoss` composes a :class:`~target_sft.losses.trust.Trust` (γ) and a
:class:`~target_sft.losses.residual.Residual` (π̃). Its value is exactly
``Σ_t s_t · CE(Q_t, π_θ(·|x_t))`` with ``Q_t`` held fixed (Eq. 3) and its logit gradient is exactly
``s_t (p_t − Q_t)`` (Eq. 6), computed by the chunked kernel in :mod:`target_sft.kernels.reference` without any extra
``N × V`` buffer. The named presets (:mod:`.presets`) subclass it and report the value of their
own published objective instead (same gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..kernels.dispatch import check_impl, resolve_impl
from ..kernels.reference import GradPlan, QTargetFunction, StatRequest, row_stats
from ._inputs import FlatBatch, prepare
from ._validate import check_logits, check_num_items, check_reduction, first_index, fmt_index
from .residual import Residual, ResidualParts, residual_from_name
from .trust import ConstantTrust, TokenContext, Trust

__all__ = ["QTarget", "QTargetLoss", "reduce_loss"]


@dataclass
class QTarget:
    """The Q-target decomposition of one batch (all detached, rows as in the flattened batch).

    ``gamma`` and ``scale`` are ``[N]``; ``parts`` holds the residual mass (already multiplied by
    ``scale · (1 − gamma)``); ``mask`` marks supervised rows. ``dense()`` materialises ``Q`` as an
    ``[N, V]`` tensor — for tests and plots on small vocabularies only.
    """

    gamma: Tensor
    scale: Tensor
    parts: ResidualParts
    mask: Tensor
    batch: FlatBatch
    lse: Tensor

    def dense(self) -> Tensor:
        """``Q`` as a dense ``[N, V]`` tensor (unsupervised rows: zeros)."""
        b = self.batch
        z = b.logits.detach().to(b.cdt)
        p = torch.softmax(z, dim=-1)
        s = torch.where(self.scale != 0, self.scale, torch.ones_like(self.scale))
        q = torch.zeros_like(p)
        q.scatter_add_(1, b.safe_labels[:, None], (self.scale * self.gamma)[:, None])
        parts = self.parts
        if parts.p_mass is not None:
            q += parts.p_mass[:, None] * p
        if parts.uniform_mass is not None:
            q += parts.uniform_mass[:, None] / b.vocab
        if parts.support_mass is not None:
            ids, _ = b.support()
            q.scatter_add_(1, ids, parts.support_mass)
        for term, e in parts.dense:
            q += e[:, None] * term.density(z, self.lse)
        q = q / s[:, None]
        return torch.where(self.mask[:, None], q, torch.zeros_like(q))


def _reduce_denominator(
    batch: FlatBatch, num_items_in_batch: int | float | Tensor | None, like: Tensor
) -> Tensor | float:
    if num_items_in_batch is None:
        return batch.mask.sum().to(like.dtype).clamp_min(1.0)
    if isinstance(num_items_in_batch, Tensor):
        n = num_items_in_batch.reshape(()).to(
            device=like.device, dtype=like.dtype, non_blocking=True
        )
        return n.clamp_min(1.0)
    return max(float(num_items_in_batch), 1.0)


def reduce_loss(
    per_row: Tensor,
    batch: FlatBatch,
    reduction: str,
    num_items_in_batch: int | float | Tensor | None = None,
) -> Tensor:
    """``mean`` (over supervised tokens, or ÷ ``num_items_in_batch``), ``sum`` or ``none``.

    ``none`` returns the per-position losses in the logits' leading shape (``[B, L]`` with
    position ``t`` predicting ``labels[:, t + 1]``, or ``[N]``), zero where unsupervised. An
    all-ignored batch gives ``0`` (not NaN) and a zero gradient. The denominator never syncs with
    the device: ``max(n, 1)``.
    """
    check_reduction(reduction)
    check_num_items(num_items_in_batch)
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError(
            f"num_items_in_batch only applies to reduction='mean' (got reduction={reduction!r})"
        )
    if reduction == "none":
        return per_row.reshape(batch.lead_shape)
    total = per_row.sum()
    if reduction == "sum":
        return total
    return total / _reduce_denominator(batch, num_items_in_batch, total)


class QTargetLoss(nn.Module):
    """Q-target loss ``Σ_t s_t · CE(γ_t δ_{y_t} + (1 − γ_t) π̃_t, π_θ)`` with (γ, π̃) stop-gradient.

    Args:
        gamma: label trust γ_t — a :class:`Trust` or a constant.
        residual: residual π̃_t — a :class:`Residual` or ``"self"``, ``"uniform"``, ``"teacher"``,
            ``"teacher_raw"``.
        ignore_index: label value of unsupervised positions.
        reduction: default reduction (``mean`` over supervised tokens, ``sum``, ``none``).
        chunk_elements: rows × V processed at once (bounds the temporaries); ``None`` picks
            2^20 on CPU (cache-sized) and 2^26 on CUDA.
        check_inputs: run the value checks (ranges, NaNs, duplicates); they sync with the device.
        impl: ``"auto"`` (Triton kernels for CUDA logits when the loss is supported, else the
            PyTorch reference), ``"torch"`` or ``"triton"`` (see ``docs/KERNELS.md``).
        inplace_grad: with the Triton kernels, write the logit gradient into the logits buffer
            (no second ``N × V`` buffer; the logits are overwritten during the backward, so they
            must not be used afterwards). Ignored by the PyTorch reference.

    Call with ``(logits, labels, *, teacher_ids=None, teacher_logprobs=None, token_weights=None,
    sequence_weights=None, sequence_ids=None, ref_logprobs=None, old_logprobs=None,
    num_items_in_batch=None, reduction=None)``. ``logits`` ``[B, L, V]`` with ``labels`` ``[B, L]``
    are shifted inside exactly as HF does; ``[N, V]`` with ``[N]`` are used as aligned. Every other
    per-token input is aligned with ``labels``. The returned loss is float32 (float64 for float64
    logits); the gradient has the logits' dtype and is formed in float32.
    """

    #: Table 5 row, for presets
    paper_row: str = "Q-target framework (Eq. 2-3)"

    def __init__(
        self,
        gamma: Trust | float = 1.0,
        residual: Residual | str = "self",
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        chunk_elements: int | None = None,
        check_inputs: bool = True,
        impl: str = "auto",
        inplace_grad: bool = False,
    ) -> None:
        super().__init__()
        self.gamma: Trust = gamma if isinstance(gamma, Trust) else ConstantTrust(float(gamma))
        self.residual: Residual = (
            residual if isinstance(residual, Residual) else residual_from_name(residual)
        )
        self.ignore_index = int(ignore_index)
        self.reduction = check_reduction(reduction)
        if chunk_elements is not None and int(chunk_elements) < 1:
            raise ValueError(f"chunk_elements = {chunk_elements} must be >= 1")
        self.chunk_elements = None if chunk_elements is None else int(chunk_elements)
        self.check_inputs = bool(check_inputs)
        self.impl = check_impl(impl)
        self.inplace_grad = bool(inplace_grad)

    # ----------------------------------------------------------------- hooks for the presets
    def _gamma_and_scale(self, ctx: TokenContext) -> tuple[Tensor, Tensor]:
        """γ_t and the overall per-token scale s_t (Cor. 2's ``a_t + b_t``; 1 by default)."""
        gamma = self.gamma(ctx)
        return gamma, torch.ones_like(gamma)

    def _value_request(self) -> StatRequest:
        """Statistics needed by :meth:`_value` (beyond lse, z_y and the support logits)."""
        return self.residual.request()

    def _value(self, ctx: TokenContext, target: QTarget) -> Tensor:
        """Per-row loss value; the framework's is ``s · CE(Q, π_θ)`` exactly."""
        return ce_value(ctx, target)

    # ----------------------------------------------------------------- main entry points
    def _prepare(
        self,
        logits: Tensor,
        labels: Tensor,
        inputs: dict[str, Tensor | None],
        flat_logits: Tensor | None = None,
    ) -> FlatBatch:
        needs_teacher = self.residual.needs_teacher
        if needs_teacher and (
            inputs.get("teacher_ids") is None or inputs.get("teacher_logprobs") is None
        ):
            raise ValueError(
                f"{type(self).__name__} with residual {self.residual!r} needs teacher_ids and "
                "teacher_logprobs (the sparse distribution from the cache)"
            )
        return prepare(
            logits,
            labels,
            ignore_index=self.ignore_index,
            check=self.check_inputs,
            flat_logits=flat_logits,
            **inputs,
        )

    def _request(self) -> StatRequest:
        return self.gamma.request() | self._value_request()

    def _resolve_impl(self, z: Tensor) -> str:
        """``"torch"`` or ``"triton"`` for these logits (rules in ``docs/KERNELS.md``)."""
        if self.impl == "torch":
            return "torch"
        if z.dtype == torch.float64:
            if self.impl == "triton":
                raise ValueError("impl='triton' takes float32/bf16/fp16 logits, not float64")
            return "torch"
        return resolve_impl(self.impl, z.device, self._request() | self.residual.request())

    def _stats(self, batch: FlatBatch, impl: str = "torch") -> TokenContext:
        request = self._request()
        support = None
        if batch.teacher_ids is not None:
            support, _ = batch.support()
        if impl == "triton":
            from ..kernels.triton_logits import row_stats_triton

            stats = row_stats_triton(batch.logits, batch.safe_labels, support, request)
        else:
            stats = row_stats(
                batch.logits, batch.safe_labels, support, request, self.chunk_elements
            )
        if self.check_inputs:
            _check_rows_finite(batch, stats.lse)
        return TokenContext(batch=batch, stats=stats)

    def _target(self, ctx: TokenContext) -> QTarget:
        b = ctx.batch
        gamma, scale = self._gamma_and_scale(ctx)
        zero = torch.zeros_like(gamma)
        gamma = torch.where(b.mask, gamma, zero)
        scale = torch.where(b.mask, scale, zero)
        rho = scale * (1.0 - gamma)
        parts = self.residual.build(ctx, rho, scale)
        parts = _mask_parts(parts, b.mask)
        return QTarget(
            gamma=gamma, scale=scale, parts=parts, mask=b.mask, batch=b, lse=ctx.stats.lse
        )

    def target(self, logits: Tensor, labels: Tensor, **inputs: Tensor | None) -> QTarget:
        """The Q-target decomposition (γ, scale, residual mass) for these inputs, no graph."""
        with torch.no_grad():
            batch = self._prepare(logits.detach(), labels, inputs)
            ctx = self._stats(batch)
            return self._target(ctx)

    def forward(
        self,
        logits: Tensor,
        labels: Tensor,
        *,
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
        """The loss (see the class docstring for the arguments)."""
        red = check_reduction(self.reduction if reduction is None else reduction)
        check_num_items(num_items_in_batch)
        inputs = {
            "teacher_ids": teacher_ids,
            "teacher_logprobs": teacher_logprobs,
            "token_weights": token_weights,
            "sequence_weights": sequence_weights,
            "sequence_ids": sequence_ids,
            "ref_logprobs": ref_logprobs,
            "old_logprobs": old_logprobs,
        }
        check_logits(logits)
        # The [N, V] view that autograd sees is taken with grad mode on (a copy only if the
        # logits are not viewable, e.g. a non-contiguous slice); the sweeps use its detached alias.
        z2d = logits.reshape(-1, logits.shape[-1])
        impl = self._resolve_impl(logits)
        with torch.no_grad():
            batch = self._prepare(logits, labels, inputs, flat_logits=z2d.detach())
            ctx = self._stats(batch, impl)
            target = self._target(ctx)
            value = self._value(ctx, target)
            value = torch.where(batch.mask, value, torch.zeros_like(value))
            plan = _plan(ctx, target, self.chunk_elements)
            if impl == "triton":
                _triton_plan(plan, ctx, inplace=self.inplace_grad)
        per_row = QTargetFunction.apply(z2d, value, plan)
        return reduce_loss(per_row, batch, red, num_items_in_batch)

    def extra_repr(self) -> str:
        text = f"gamma={self.gamma!r}, residual={self.residual!r}, reduction={self.reduction!r}"
        return text if self.impl == "auto" else f"{text}, impl={self.impl!r}"

    def describe(self) -> str:
        """``"γ = …, π̃ = …"``."""
        return f"γ = {self.gamma.describe()}, π̃ = {self.residual.describe()}"


# --------------------------------------------------------------------- helpers
def _mask_parts(parts: ResidualParts, mask: Tensor) -> ResidualParts:
    def m(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        mm = mask if t.dim() == 1 else mask[:, None]
        return torch.where(mm, t, torch.zeros_like(t))

    return ResidualParts(
        p_mass=m(parts.p_mass),
        uniform_mass=m(parts.uniform_mass),
        support_mass=m(parts.support_mass),
        dense=[(term, m(e)) for term, e in parts.dense],  # type: ignore[misc]
    )


def _check_rows_finite(batch: FlatBatch, lse: Tensor) -> None:
    bad = first_index(~torch.isfinite(lse))
    if bad is None:
        return
    r = bad[0]
    row = batch.logits[r]
    where = batch.logits_index(r)
    nan = first_index(torch.isnan(row))
    if nan is not None:
        raise ValueError(f"logits[{fmt_index((*where, nan[0]))}] is NaN")
    pinf = first_index(row == float("inf"))
    if pinf is not None:
        raise ValueError(
            f"logits[{fmt_index((*where, pinf[0]))}] = inf; logits must be finite or -inf"
        )
    raise ValueError(f"logits[{fmt_index(where)}, :] are all -inf")


def ce_value(ctx: TokenContext, target: QTarget) -> Tensor:
    """``s · CE(Q, π_θ) = Σ_k (s Q)_k (lse − z_k)`` per row, from the row statistics."""
    st = ctx.stats
    lse = st.lse
    parts = target.parts
    value = target.scale * target.gamma * (lse - st.z_label)
    if parts.p_mass is not None:
        if st.entropy is None:  # pragma: no cover - guaranteed by _value_request
            raise RuntimeError("the entropy of π_θ was not computed")
        value = value + parts.p_mass * st.entropy
    if parts.uniform_mass is not None:
        if st.sum_logits is None:  # pragma: no cover
            raise RuntimeError("Σ z was not computed")
        value = value + parts.uniform_mass * (lse - st.sum_logits / ctx.batch.vocab)
    if parts.support_mass is not None:
        value = value + support_ce(ctx, parts.support_mass)
    for term, e in parts.dense:
        value = value + e * st.ce_to(term)
    return value


def support_ce(ctx: TokenContext, mass: Tensor) -> Tensor:
    """``Σ_{j} mass_j (lse − z_{S_j})`` (0 where the mass is 0, even for −inf logits)."""
    zs = ctx.stats.z_support
    assert zs is not None
    nll = ctx.stats.lse[:, None] - zs
    return torch.where(mass != 0, mass * nll, torch.zeros_like(mass)).sum(-1)


def _triton_plan(plan: GradPlan, ctx: TokenContext, *, inplace: bool) -> None:
    """Add what the Triton backward needs: the float32 logits gathered at ``[y, S...]``."""
    st = ctx.stats
    plan.impl = "triton"
    plan.inplace = inplace
    if plan.support is not None:
        assert st.z_support is not None
        plan.z_sparse = torch.cat([st.z_label[:, None], st.z_support], dim=1).contiguous()
        ids = ctx.batch.teacher_ids
        assert ids is not None
        plan.support_valid = ids >= 0
    else:
        plan.z_sparse = st.z_label[:, None].contiguous()


def _plan(ctx: TokenContext, target: QTarget, chunk_elements: int | None) -> GradPlan:
    b = ctx.batch
    parts = target.parts
    p_mass = parts.p_mass if parts.p_mass is not None else torch.zeros_like(target.scale)
    support = None
    if parts.support_mass is not None:
        support, _ = b.support()
    return GradPlan(
        lse=ctx.stats.lse,
        kappa=target.scale - p_mass,
        labels=b.safe_labels,
        label_mass=target.scale * target.gamma,
        support=support,
        support_mass=parts.support_mass,
        uniform_mass=parts.uniform_mass,
        dense=list(parts.dense),
        chunk_elements=chunk_elements,
    )
