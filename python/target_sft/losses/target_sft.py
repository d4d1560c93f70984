"""``target_sft_loss``: the functional form of TARGET-SFT (§6, Eq. 7–8)."""

from __future__ import annotations

from torch import Tensor

from ._validate import check_eta
from .presets import TargetSFT

__all__ = ["target_sft_loss"]


def target_sft_loss(
    logits: Tensor,
    labels: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    *,
    eta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | float | Tensor | None = None,
    chunk_elements: int | None = None,
    check_inputs: bool = True,
    impl: str = "auto",
    inplace_grad: bool = False,
) -> Tensor:
    """TARGET-SFT loss ``CE(Q_t, π_θ)`` with ``Q_t = p_y δ_{y_t} + (1 − p_y) π̃_t`` held fixed.

    * γ_t = sg[p_y], the model's probability of the observed token;
    * π̃_t(a) ∝ π_θ(a)^{1−η} π_T(a)^η, normalised over the teacher support ``S_t`` (stop-gradient):
      ``π̃ = softmax_{a∈S}((1 − η)(z_a − lse) + η log π_T(a))``;
    * per token ``ℓ = lse − p_y z_y − (1 − p_y) Σ_{a∈S} π̃(a) z_a``, logit gradient ``p − Q``
      (Q has at most K + 1 non-zeros); nothing of size ``N × V`` is allocated but the gradient.

    ``η = 1`` uses the renormalised teacher; ``η = 0`` uses ``sg[π_θ]`` over the whole vocabulary
    and so has exactly DFT's gradient (see :class:`~target_sft.losses.residual.GuidedResidual`).

    Args:
        logits: ``[B, L, V]`` (HF causal-LM logits; shifted inside exactly as HF's
            ``ForCausalLMLoss``: row ``(b, t)`` predicts ``labels[b, t + 1]``) or ``[N, V]`` already
            aligned with ``labels``. Any float dtype; computed in float32 (float64 for float64).
        labels: ``[B, L]`` or ``[N]`` token ids; ``ignore_index`` marks unsupervised positions.
        teacher_ids: ``[B, L, K]`` or ``[N, K]`` int32 teacher top-k ids aligned with ``labels``
            (``teacher_ids[b, t]`` is the support for predicting ``labels[b, t]``); ``-1`` pads.
        teacher_logprobs: same shape, float32 log-softmax over the full vocabulary; ``-inf`` pads.
        eta: teacher intensity η ∈ [0, 1] (the paper uses 0.2, 0.5, 1.0).
        ignore_index: label of unsupervised positions.
        reduction: ``"mean"`` over supervised tokens, ``"sum"`` or ``"none"`` (per position,
            shape of ``logits.shape[:-1]``).
        num_items_in_batch: with ``reduction="mean"``, divide the sum by this instead (HF
            Trainer's global supervised-token count for exact gradient accumulation); an int or a
            0-dim tensor (used without a host sync).
        chunk_elements: rows × V processed at once (``None``: 2^20 on CPU, 2^26 on CUDA).
        check_inputs: run the value checks (one device sync each).
        impl: ``"auto"`` (the Triton kernel for CUDA logits, the PyTorch reference elsewhere),
            ``"torch"`` or ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``); see
            ``docs/KERNELS.md``.
        inplace_grad: with the Triton kernel, write the gradient into the logits buffer (the
            logits are overwritten by the backward and must not be used afterwards).

    Returns:
        The loss (0-dim, or per position with ``reduction="none"``), float32 (float64 for float64
        logits). An all-ignored batch gives 0 and a zero gradient.

    Raises:
        ValueError: bad shapes, ids ≥ V or < −1, labels outside the vocabulary, NaN logits, η
            outside [0, 1], an empty teacher support at a supervised position, …; the message
            names the tensor and the index.
    """
    eta = check_eta(eta)
    loss = TargetSFT(
        eta=eta,
        ignore_index=ignore_index,
        reduction=reduction,
        chunk_elements=chunk_elements,
        check_inputs=check_inputs,
        impl=impl,
        inplace_grad=inplace_grad,
    )
    return loss(
        logits,
        labels,
        teacher_ids=teacher_ids,
        teacher_logprobs=teacher_logprobs,
        num_items_in_batch=num_items_in_batch,
    )
