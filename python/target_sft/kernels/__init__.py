"""Fused Triton kernels for the Q-target losses (see ``docs/KERNELS.md``).

* :mod:`.triton_logits` — the two sweeps of :mod:`target_sft.kernels.reference` (row statistics and
  the logit gradient ``p − Q``) as Triton kernels over materialised logits; selected with
  ``impl="triton"`` (or ``"auto"`` on CUDA) in :class:`~target_sft.losses.QTargetLoss`, every preset
  and :func:`~target_sft.losses.target_sft_loss`.
* :mod:`.triton_fused_linear` — :func:`fused_linear_target_sft_loss` and
  :func:`fused_linear_qtarget_loss`: the loss straight from the last hidden states and the LM-head
  weight, without materialising the logits (Cut Cross-Entropy style).

Triton is imported lazily: importing this package (or ``target_sft``) never imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .dispatch import IMPLS, resolve_impl, triton_unsupported_reason

__all__ = [
    "IMPLS",
    "fused_linear_qtarget_loss",
    "fused_linear_target_sft_loss",
    "resolve_impl",
    "triton_unsupported_reason",
]


def __getattr__(name: str) -> Any:
    if name in ("fused_linear_target_sft_loss", "fused_linear_qtarget_loss"):
        from . import triton_fused_linear

        return getattr(triton_fused_linear, name)
    raise AttributeError(f"module 'target_sft.kernels' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .triton_fused_linear import fused_linear_qtarget_loss, fused_linear_target_sft_loss
