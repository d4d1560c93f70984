"""The two backends of the loss pipeline: where the logits come from and which sweeps run on them.

:meth:`QTargetLoss.pipeline <target_sft.losses.QTargetLoss.pipeline>` runs every loss once
(inputs → row statistics → target → value → gradient plan → autograd → reduction) against a
:class:`Backend`:

* :class:`LogitsBackend` — materialised logits ``[B, L, V]`` / ``[N, V]``, swept by the chunked
  PyTorch reference (:mod:`target_sft.kernels.reference`) or the Triton row kernels
  (:mod:`target_sft.kernels.triton_logits`): ``impl="torch"`` / ``"triton"``.
* :class:`FusedLinearBackend` — the logits ``softcap·tanh((hidden Wᵀ + bias)/softcap)`` of the LM
  head, never materialised: swept chunk by chunk by the fused-linear PyTorch reference
  (:func:`target_sft.kernels.reference.fused_row_stats`, ``impl="torch"``) or tile by tile by the
  fused-linear Triton kernels (:mod:`target_sft.kernels.triton_fused_linear`, ``"triton"``).

A backend gives the pipeline the logits' shape (what the inputs are validated and shifted
against), the :class:`~target_sft.kernels.contract.RowStats` of the forward sweep, where a
non-finite row comes from (in its caller's terms), and the autograd Function that attaches the
per-row values with its backward sweep. Triton is imported only when a Triton backend runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from ..kernels.contract import FusedLinearBlocks, GradPlan, RowStats, StatRequest
from ..kernels.reference import FusedQTargetFunction, QTargetFunction, fused_row_stats, row_stats
from ._inputs import FlatBatch
from ._validate import first_index, fmt_index
from .trust import TokenContext

__all__ = ["Backend", "FusedLinearBackend", "LogitsBackend"]


def _support(batch: FlatBatch) -> Tensor | None:
    """The support the loss reads (:attr:`FlatBatch.support_source`: the teacher's or the
    reference's top-k) clamped to valid columns, or ``None`` when it reads none."""
    return None if batch.support_source is None else batch.support()[0]


class Backend(ABC):
    """What the loss pipeline sweeps. Build it with grad mode on (it holds the tensors that
    autograd differentiates)."""

    #: the logits ``[B, L, V]`` / ``[N, V]``, or a stand-in of their shape, dtype and device
    logits: Tensor
    #: the same as ``[N, V]`` rows, detached (what :class:`FlatBatch` carries)
    flat_logits: Tensor

    @abstractmethod
    def row_stats(self, batch: FlatBatch, request: StatRequest) -> RowStats:
        """The forward sweep over the rows of ``batch``."""

    @abstractmethod
    def bad_row(self, batch: FlatBatch, row: int) -> str:
        """Why row ``row`` has a non-finite ``lse``: the offending input and its index."""

    @abstractmethod
    def attach(self, values: Tensor, plan: GradPlan, ctx: TokenContext) -> Tensor:
        """``values`` ([N]) on the autograd graph; its backward is the plan's sweep."""


class LogitsBackend(Backend):
    """Materialised logits, swept by the PyTorch reference (``impl="torch"``) or the Triton row
    kernels (``impl="triton"``; ``inplace_grad``: the backward writes into the logits' buffer).

    ``impl`` is already resolved (:func:`target_sft.kernels.resolve_impl`); ``chunk_elements``
    bounds the reference's temporaries (``None``: its default for the device).
    """

    def __init__(
        self,
        logits: Tensor,
        *,
        impl: str = "torch",
        chunk_elements: int | None = None,
        inplace_grad: bool = False,
    ) -> None:
        if impl not in ("torch", "triton"):
            raise ValueError(f"impl = {impl!r}: a LogitsBackend runs 'torch' or 'triton'")
        self.logits = logits
        # The [N, V] view that autograd sees is taken with grad mode on (a copy only if the
        # logits are not viewable, e.g. a non-contiguous slice); the sweeps use its detached alias.
        self._z2d = logits.reshape(-1, logits.shape[-1])
        self.flat_logits = self._z2d.detach()
        self.impl = impl
        self.chunk_elements = chunk_elements
        self.inplace_grad = bool(inplace_grad)

    def row_stats(self, batch: FlatBatch, request: StatRequest) -> RowStats:
        support = _support(batch)
        if self.impl == "triton":
            from ..kernels.triton_logits import row_stats_triton  # imports Triton

            return row_stats_triton(batch.logits, batch.safe_labels, support, request)
        return row_stats(batch.logits, batch.safe_labels, support, request, self.chunk_elements)

    def bad_row(self, batch: FlatBatch, row: int) -> str:
        z = batch.logits[row]
        where = batch.logits_index(row)
        nan = first_index(torch.isnan(z))
        if nan is not None:
            return f"logits[{fmt_index((*where, nan[0]))}] is NaN"
        pinf = first_index(z == float("inf"))
        if pinf is not None:
            return f"logits[{fmt_index((*where, pinf[0]))}] = inf; logits must be finite or -inf"
        return f"logits[{fmt_index(where)}, :] are all -inf"

    def attach(self, values: Tensor, plan: GradPlan, ctx: TokenContext) -> Tensor:
        if self.impl == "triton":
            from ..kernels.triton_logits import TritonLogitsFunction

            return TritonLogitsFunction.apply(  # type: ignore[no-any-return]
                self._z2d, values, plan, ctx.stats, self.inplace_grad
            )
        plan.chunk_elements = self.chunk_elements
        return QTargetFunction.apply(self._z2d, values, plan)  # type: ignore[no-any-return]


class FusedLinearBackend(Backend):
    """The logits ``softcap·tanh((hidden Wᵀ + bias)/softcap)`` (no cap / bias when ``None``) of an
    LM head, never materialised: the fused-linear PyTorch reference (``impl="torch"``) recomputes
    them chunk by chunk (``chunk_elements`` rows × V; ``None``: its default for the device), the
    fused-linear Triton kernels (``"triton"``, tile sizes ``blocks``) tile by tile.

    ``hidden`` ``[B, L, H]`` / ``[N, H]``, ``weight`` ``[V, H]`` (same dtype), ``bias`` ``[V]``;
    the shapes are checked by :func:`~target_sft.losses.fused_linear_qtarget_loss`. ``impl`` is
    already resolved (:func:`target_sft.kernels.resolve_impl` with ``fused_linear=True``).
    """

    def __init__(
        self,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None = None,
        *,
        softcap: float | None = None,
        impl: str = "triton",
        chunk_elements: int | None = None,
        blocks: FusedLinearBlocks | None = None,
    ) -> None:
        if impl not in ("torch", "triton"):
            raise ValueError(f"impl = {impl!r}: a FusedLinearBackend runs 'torch' or 'triton'")
        h2d = hidden.reshape(-1, hidden.shape[-1])
        if h2d.stride(-1) != 1:
            h2d = h2d.contiguous()
        w = weight if weight.stride(-1) == 1 else weight.contiguous()
        if w.dtype != h2d.dtype:
            raise ValueError(
                f"hidden is {h2d.dtype} but lm_head_weight is {w.dtype}: they must match"
            )
        vocab = int(w.shape[0])
        self._hidden, self._weight, self._bias = h2d, w, bias
        self.softcap = None if softcap is None else float(softcap)
        self.impl = impl
        self.chunk_elements = chunk_elements
        self.blocks = blocks or FusedLinearBlocks()
        # A zero-stride stand-in with the logits' shape: validation and shifting need only that.
        self.logits = h2d.new_zeros(()).expand(*hidden.shape[:-1], vocab)
        self.flat_logits = self.logits.reshape(-1, vocab)

    def row_stats(self, batch: FlatBatch, request: StatRequest) -> RowStats:
        bias = None if self._bias is None else self._bias.detach()
        args = (self._hidden.detach(), self._weight.detach(), bias, batch.safe_labels)
        if self.impl == "torch":
            return fused_row_stats(
                *args,
                _support(batch),
                batch.mask,
                request,
                softcap=self.softcap,
                chunk_elements=self.chunk_elements,
            )
        from ..kernels.triton_fused_linear import fused_linear_row_stats  # imports Triton

        return fused_linear_row_stats(
            *args, _support(batch), batch.mask, request, softcap=self.softcap, blocks=self.blocks
        )

    def bad_row(self, batch: FlatBatch, row: int) -> str:
        where = fmt_index(batch.logits_index(row))
        h = first_index(~torch.isfinite(self._hidden[row]))
        if h is not None:
            return f"hidden[{where}, {h[0]}] = {self._hidden[row, h[0]].item()} is not finite"
        for name, t in (("lm_head_weight", self._weight), ("bias", self._bias)):
            bad = None if t is None else first_index(~torch.isfinite(t))
            if bad is not None and t is not None:
                return f"{name}[{fmt_index(bad)}] = {t[bad].item()} is not finite"
        return f"the logits of hidden[{where}] are not finite"

    def attach(self, values: Tensor, plan: GradPlan, ctx: TokenContext) -> Tensor:
        if self.impl == "torch":
            return FusedQTargetFunction.apply(  # type: ignore[no-any-return]
                self._hidden,
                self._weight,
                self._bias,
                values,
                plan,
                ctx.batch.mask,
                self.softcap,
                self.chunk_elements,
            )
        from ..kernels.triton_fused_linear import FusedLinearFunction

        return FusedLinearFunction.apply(  # type: ignore[no-any-return]
            self._hidden,
            self._weight,
            self._bias,
            values,
            plan,
            ctx.batch.mask,
            self.softcap,
            self.blocks,
        )
