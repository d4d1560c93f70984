"""The Q-target framework: ``Q_t = γ_t δ_{y_t} + (1 − γ_t) π̃_t``, loss ``CE(Q_t, π_θ)`` (§4–5).

:class:`QTargetLoss` composes a :class:`~target_sft.losses.trust.Trust` (γ) and a
:class:`~target_sft.losses.residual.Residual` (π̃). Its value is exactly
``Σ_t s_t · CE(Q_t, π_θ(·|x_t))`` with ``Q_t`` held fixed (Eq. 3) and its logit gradient is exactly
``s_t (p_t − Q_t)`` (Eq. 6), computed by the sweeps of :mod:`target_sft.kernels` without any
extra ``N × V`` buffer. The named presets (:mod:`.presets`) subclass it and report the value of
their own published objective instead (same gradient).

The loss pipeline (:meth:`QTargetLoss.pipeline`) runs once for every loss and every backend
(:mod:`.backend`): materialised logits (``forward``) or the fused LM head
(:mod:`.fused_linear`).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..kernels.contract import GradPlan, StatRequest
from ..kernels.dispatch import check_impl, resolve_impl
from ._inputs import (
    LOSS_INPUT_NAMES,
    FlatBatch,
    LossInputs,
    prepare,
    take_deprecated_inputs,
)
from ._validate import check_logits, check_num_items, check_reduction, first_index
from .backend import Backend, LogitsBackend
from .residual import Residual, ResidualParts, residual_from_name
from .trust import ConstantTrust, TokenContext, Trust

__all__ = ["LOSS_OPTIONS", "QTarget", "QTargetLoss", "reduce_loss", "unexpected_keyword"]

#: keyword options every loss class takes besides its own parameters (:class:`QTargetLoss`'s;
#: a preset forwards them through ``**kwargs``)
LOSS_OPTIONS: tuple[str, ...] = (
    "ignore_index",
    "reduction",
    "chunk_elements",
    "check_inputs",
    "impl",
    "inplace_grad",
)
#: the per-token inputs a loss call takes by position after ``(logits, labels)``, as
#: :func:`~target_sft.losses.target_sft_loss` does
_POSITIONAL_INPUTS: tuple[str, ...] = ("teacher_ids", "teacher_logprobs")


def unexpected_keyword(
    owner: str, name: str, valid: Iterable[str], what: str = "parameters"
) -> TypeError:
    """``TypeError("TargetSFT got an unexpected keyword argument 'etta'; its parameters are eta,
    ignore_index, …; did you mean 'eta'?")``: the error of a wrong keyword, naming the class the
    user called (not the base class the keyword was forwarded to) and what it accepts."""
    valid = list(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return TypeError(
        f"{owner} got an unexpected keyword argument {name!r}; its {what} are "
        + ", ".join(valid)
        + hint
    )


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
            ``"teacher_raw"``, ``"reference"``, ``"reference_raw"``.
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

    Call with ``(logits, labels, teacher_ids=None, teacher_logprobs=None, *, token_weights=None,
    sequence_weights=None, sequence_ids=None, reference_ids=None, reference_logprobs=None,
    reference_label_logprobs=None, old_logprobs=None, num_items_in_batch=None, reduction=None)``.
    ``logits`` ``[B, L, V]`` with ``labels`` ``[B, L]`` are shifted inside exactly as HF does;
    ``[N, V]`` with ``[N]`` are used as aligned. Every other
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
        **unexpected: Any,
    ) -> None:
        if unexpected:  # forwarded by a preset's **kwargs: name the preset, not this class
            cls = type(self)
            raise unexpected_keyword(cls.__name__, next(iter(unexpected)), cls.parameter_names())
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

    @classmethod
    def parameter_names(cls) -> tuple[str, ...]:
        """The keyword parameters of this class: its own (``eta`` for :class:`TargetSFT`,
        ``gamma`` and ``residual`` for :class:`QTargetLoss`, …), then the :data:`LOSS_OPTIONS`
        it takes (a preset forwards them through ``**kwargs``)."""
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        forwards = any(p.kind is p.VAR_KEYWORD for p in params)
        named = [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        own = [n for n in named if n not in LOSS_OPTIONS]
        return (*own, *(o for o in LOSS_OPTIONS if forwards or o in named))

    @property
    def required_inputs(self) -> tuple[str, ...]:
        """The :class:`~target_sft.losses.LossInputs` fields this loss cannot run without (its
        trust's, then its residual's), e.g. ``("reference_label_logprobs", "sequence_ids")`` for
        iw-SFT; a trainer checks its data can provide them before the first step."""
        return tuple(dict.fromkeys((*self.gamma.inputs, *self.residual.inputs)))

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

    # ----------------------------------------------------------------- the pipeline
    def stat_request(self) -> StatRequest:
        """Row statistics the forward sweep must compute for this loss (trust and value)."""
        return self.gamma.request() | self._value_request()

    def kernel_impl(
        self,
        device: torch.device,
        dtype: torch.dtype,
        *,
        impl: str | None = None,
        fused_linear: bool = False,
    ) -> str:
        """``"torch"`` or ``"triton"`` for inputs on ``device`` of ``dtype`` (``impl``: this loss's
        own by default; rules in ``docs/KERNELS.md``)."""
        request = self.stat_request() | self.residual.request()
        return resolve_impl(
            self.impl if impl is None else impl,
            device,
            request,
            dtype=dtype,
            fused_linear=fused_linear,
        )

    def pipeline(
        self,
        backend: Backend,
        labels: Tensor,
        inputs: LossInputs,
        *,
        num_items_in_batch: int | float | Tensor | None = None,
        reduction: str | None = None,
    ) -> Tensor:
        """The loss against a backend (:mod:`.backend`): the one pipeline of every loss.

        Inputs validated and flattened against the backend's logits shape → row statistics (the
        backend's forward sweep) → the Q-target (γ, scale, residual masses) → the per-row value →
        the gradient plan → the backend's autograd Function → the reduction.
        """
        red = check_reduction(self.reduction if reduction is None else reduction)
        check_num_items(num_items_in_batch)
        with torch.no_grad():
            batch = self._prepare(backend, labels, inputs)
            ctx = self._stats(batch, backend)
            target = self._target(ctx)
            value = self._value(ctx, target)
            value = torch.where(batch.mask, value, torch.zeros_like(value))
            plan = _plan(ctx, target)
        per_row = backend.attach(value, plan, ctx)
        return reduce_loss(per_row, batch, red, num_items_in_batch)

    def _prepare(self, backend: Backend, labels: Tensor, inputs: LossInputs) -> FlatBatch:
        source = self.residual.source
        if source is not None and (
            getattr(inputs, f"{source}_ids") is None
            or getattr(inputs, f"{source}_logprobs") is None
        ):
            raise ValueError(self._missing_support(source))
        return prepare(
            backend.logits,
            labels,
            inputs,
            ignore_index=self.ignore_index,
            check=self.check_inputs,
            flat_logits=backend.flat_logits,
            support_source=source,
        )

    def _missing_support(self, source: str) -> str:
        """The error of a call without the sparse distribution the residual reads."""
        what = f"{type(self).__name__} with residual {self.residual!r} needs {source}_ids and "
        if source == "teacher":
            return what + (
                "teacher_logprobs (the teacher's top-k from its cache: TargetSFTCollator(teacher))"
            )
        hint = ""
        if getattr(self, "anchor", None) == "reference":
            hint = "; or anchor='teacher' to take the anchor from teacher_ids / teacher_logprobs"
        return what + (
            "reference_logprobs (the reference model's top-k: build a cache of the reference "
            "model with role='reference' and collate with TargetSFTCollator(teacher, "
            f"reference=...)){hint}"
        )

    def _stats(self, batch: FlatBatch, backend: Backend) -> TokenContext:
        stats = backend.row_stats(batch, self.stat_request())
        if self.check_inputs:
            bad = first_index(~torch.isfinite(stats.lse))
            if bad is not None:
                raise ValueError(backend.bad_row(batch, bad[0]))
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

    # ----------------------------------------------------------------- entry points
    def target(self, logits: Tensor, labels: Tensor, **inputs: Tensor | None) -> QTarget:
        """The Q-target decomposition (γ, scale, residual mass) for these inputs, no graph."""
        extra = {k: inputs.pop(k) for k in list(inputs) if k not in LOSS_INPUT_NAMES}
        take_deprecated_inputs(inputs, extra)
        if extra:
            self._bad_call(0, extra)
        with torch.no_grad():
            backend = LogitsBackend(logits.detach(), chunk_elements=self.chunk_elements)
            batch = self._prepare(backend, labels, LossInputs(**inputs))
            return self._target(self._stats(batch, backend))

    def forward(
        self,
        logits: Tensor,
        labels: Tensor,
        teacher_ids: Tensor | None = None,
        teacher_logprobs: Tensor | None = None,
        *extra: Any,
        token_weights: Tensor | None = None,
        sequence_weights: Tensor | None = None,
        sequence_ids: Tensor | None = None,
        reference_ids: Tensor | None = None,
        reference_logprobs: Tensor | None = None,
        reference_label_logprobs: Tensor | None = None,
        old_logprobs: Tensor | None = None,
        num_items_in_batch: int | float | Tensor | None = None,
        reduction: str | None = None,
        **unexpected: Any,
    ) -> Tensor:
        """The loss (see the class docstring for the arguments; the per-token ones are the fields
        of :class:`~target_sft.losses.LossInputs`). ``teacher_ids`` and ``teacher_logprobs`` may
        be given by position, as to :func:`~target_sft.losses.target_sft_loss`; a wrong keyword
        is a ``TypeError`` naming this loss's class and the inputs it takes. The deprecated
        ``ref_logprobs`` (:data:`~target_sft.losses.DEPRECATED_INPUT_NAMES`) is taken through
        ``**unexpected`` as ``reference_label_logprobs``, with a ``DeprecationWarning``."""
        fields = {
            "teacher_ids": teacher_ids,
            "teacher_logprobs": teacher_logprobs,
            "token_weights": token_weights,
            "sequence_weights": sequence_weights,
            "sequence_ids": sequence_ids,
            "reference_ids": reference_ids,
            "reference_logprobs": reference_logprobs,
            "reference_label_logprobs": reference_label_logprobs,
            "old_logprobs": old_logprobs,
        }
        take_deprecated_inputs(fields, unexpected)
        if extra or unexpected:
            self._bad_call(len(extra), unexpected)
        inputs = LossInputs(**fields)
        check_logits(logits)
        backend = LogitsBackend(
            logits,
            impl=self.kernel_impl(logits.device, logits.dtype),
            chunk_elements=self.chunk_elements,
            inplace_grad=self.inplace_grad,
        )
        return self.pipeline(
            backend, labels, inputs, num_items_in_batch=num_items_in_batch, reduction=reduction
        )

    def _bad_call(self, n_extra: int, unexpected: dict[str, Any]) -> None:
        names = type(self).__name__
        if n_extra:
            raise TypeError(
                f"{names} takes (logits, labels, {', '.join(_POSITIONAL_INPUTS)}) by position, "
                f"got {n_extra + 4} positional arguments; pass the other inputs by keyword "
                f"({', '.join(n for n in LOSS_INPUT_NAMES if n not in _POSITIONAL_INPUTS)})"
            )
        raise unexpected_keyword(
            names,
            next(iter(unexpected)),
            (*LOSS_INPUT_NAMES, "num_items_in_batch", "reduction"),
            what="inputs",
        )

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


def _plan(ctx: TokenContext, target: QTarget) -> GradPlan:
    """The backward sweep's per-row quantities (``g = κ·p − Q̂``) of a Q-target."""
    b = ctx.batch
    parts = target.parts
    p_mass = parts.p_mass if parts.p_mass is not None else torch.zeros_like(target.scale)
    support = valid = None
    if parts.support_mass is not None:
        support, valid = b.support()
    return GradPlan(
        lse=ctx.stats.lse,
        kappa=target.scale - p_mass,
        labels=b.safe_labels,
        label_mass=target.scale * target.gamma,
        support=support,
        support_valid=valid,
        support_mass=parts.support_mass,
        uniform_mass=parts.uniform_mass,
        dense=list(parts.dense),
    )
