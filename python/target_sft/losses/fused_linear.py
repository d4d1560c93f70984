"""The losses straight from the last hidden states and the LM head (Cut Cross-Entropy style).

``logits = softcap·tanh((hidden Wᵀ + bias)/softcap)`` (no cap / bias when ``None``). The loss
runs its one pipeline (:meth:`QTargetLoss.pipeline <target_sft.losses.QTargetLoss.pipeline>`)
against the fused-linear backend (:class:`~target_sft.losses.backend.FusedLinearBackend`): the
logits are never materialised. ``impl="triton"`` (``"auto"`` on CUDA, for the losses the Triton
kernels implement) sweeps them tile by tile; ``impl="torch"`` (``"auto"`` elsewhere) with the
chunked PyTorch reference, a chunk of rows at a time (``loss_fn.chunk_elements``): same value and
gradients, memory ``O(chunk × V)`` either way. Kernels: ``docs/KERNELS.md``.
"""

from __future__ import annotations

from torch import Tensor

from ..kernels.contract import FusedLinearBlocks
from ..kernels.dispatch import check_impl
from ._inputs import LOSS_INPUT_NAMES, LossInputs, take_deprecated_inputs
from ._validate import check_eta
from .backend import FusedLinearBackend
from .presets import TargetSFT
from .qtarget import QTargetLoss, unexpected_keyword

__all__ = ["FusedLinearBlocks", "fused_linear_qtarget_loss", "fused_linear_target_sft_loss"]


def _check_head(
    hidden: Tensor, lm_head_weight: Tensor, bias: Tensor | None, softcap: float | None
) -> None:
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
    reference_ids: Tensor | None = None,
    reference_logprobs: Tensor | None = None,
    reference_label_logprobs: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    num_items_in_batch: int | float | Tensor | None = None,
    reduction: str | None = None,
    **deprecated: Tensor | None,
) -> Tensor:
    """``loss_fn`` (any supported preset) of ``softcap·tanh((hidden Wᵀ + bias)/softcap)``.

    ``hidden`` is ``[B, L, H]`` (shifted against ``[B, L]`` labels exactly like ``[B, L, V]``
    logits) or ``[N, H]``; ``lm_head_weight`` is ``[V, H]`` of the same dtype. The logits are
    never materialised: ``impl="triton"`` (or ``"auto"`` on CUDA) runs the fused-linear Triton
    kernels (tile sizes ``blocks``); ``impl="torch"`` (or ``"auto"`` elsewhere, and for the losses
    the Triton kernels do not implement) the chunked PyTorch reference (``loss_fn.chunk_elements``
    rows × V at a time). Same value and gradients (w.r.t. ``hidden``, ``lm_head_weight`` and
    ``bias``) as ``loss_fn`` on the materialised logits, computed in float32 (float64 for float64
    inputs). The per-token inputs are the fields of :class:`~target_sft.losses.LossInputs`
    (``**deprecated``: their old names, :data:`~target_sft.losses.DEPRECATED_INPUT_NAMES`, with
    a ``DeprecationWarning``).
    """
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
    take_deprecated_inputs(fields, deprecated)
    if deprecated:
        raise unexpected_keyword(
            "fused_linear_qtarget_loss",
            next(iter(deprecated)),
            (*LOSS_INPUT_NAMES, "num_items_in_batch", "reduction"),
            what="inputs",
        )
    check_impl(impl)
    _check_head(hidden, lm_head_weight, bias, softcap)
    inputs = LossInputs(**fields)
    which = loss_fn.kernel_impl(hidden.device, hidden.dtype, impl=impl, fused_linear=True)
    backend = FusedLinearBackend(
        hidden,
        lm_head_weight,
        bias,
        softcap=softcap,
        impl=which,
        chunk_elements=loss_fn.chunk_elements,
        blocks=blocks,
    )
    return loss_fn.pipeline(
        backend, labels, inputs, num_items_in_batch=num_items_in_batch, reduction=reduction
    )


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
    ``None``) are never materialised: with ``impl="triton"`` (``"auto"`` on CUDA) an online
    log-sum-exp over vocabulary tiles, indexed dots at ``S ∪ {y}``, and a backward that recomputes
    the logit tiles and accumulates ``d hidden``, ``d weight`` (and ``d bias``) in float32; with
    ``impl="torch"`` (``"auto"`` elsewhere) the same, a chunk of rows at a time, in PyTorch.
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
