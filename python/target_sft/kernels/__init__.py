"""The sweeps over the vocabulary behind every Q-target loss (see ``docs/KERNELS.md``).

A leaf package: it imports torch (and, lazily, triton) only, never :mod:`target_sft.losses`.

* :mod:`.contract` — what a loss asks of the sweeps and gets back: :class:`StatRequest`,
  :class:`RowStats`, :class:`GradPlan`, dense target terms, the compute dtype and chunk sizes,
  the fused-linear tile sizes (:class:`FusedLinearBlocks`).
* :mod:`.reference` — the chunked PyTorch reference of the two sweeps (:func:`row_stats`,
  :func:`logit_grad`) and its autograd Function (:class:`QTargetFunction`); and of the
  fused-linear sweeps from the hidden states and the LM head, a chunk of rows at a time
  (:func:`fused_row_stats`, :class:`FusedQTargetFunction`).
* :mod:`.dispatch` — ``impl=`` (``"auto"``, ``"torch"``, ``"triton"``): which implementation runs.
* :mod:`.triton_logits` — the two sweeps as Triton kernels over materialised logits.
* :mod:`.triton_fused_linear` — the sweeps from the last hidden states and the LM-head weight
  without materialising the logits (Cut Cross-Entropy style).

The losses that drive them (:class:`~target_sft.losses.QTargetLoss`, every preset,
:func:`~target_sft.losses.target_sft_loss`, :func:`~target_sft.losses.fused_linear_qtarget_loss`,
:func:`~target_sft.losses.fused_linear_target_sft_loss`) live in :mod:`target_sft.losses`.

Triton is imported lazily: importing this package (or ``target_sft``) never imports it.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from .contract import (
    DEFAULT_CHUNK_ELEMENTS,
    DEFAULT_CUDA_CHUNK_ELEMENTS,
    DEFAULT_FUSED_CHUNK_ELEMENTS,
    DenseTerm,
    FusedLinearBlocks,
    GradPlan,
    RowStats,
    SharpenedSoftmax,
    StatRequest,
    compute_dtype,
    default_chunk_elements,
)
from .dispatch import IMPLS, check_impl, resolve_impl, triton_unsupported_reason
from .reference import (
    FusedQTargetFunction,
    QTargetFunction,
    fused_row_stats,
    logit_grad,
    row_stats,
)

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "DEFAULT_CUDA_CHUNK_ELEMENTS",
    "DEFAULT_FUSED_CHUNK_ELEMENTS",
    "IMPLS",
    "DenseTerm",
    "FusedLinearBlocks",
    "FusedQTargetFunction",
    "GradPlan",
    "QTargetFunction",
    "RowStats",
    "SharpenedSoftmax",
    "StatRequest",
    "check_impl",
    "compute_dtype",
    "default_chunk_elements",
    "fused_row_stats",
    "logit_grad",
    "resolve_impl",
    "row_stats",
    "triton_unsupported_reason",
]

#: names that moved to :mod:`target_sft.losses` (the loss entry points); still served here, with a
#: DeprecationWarning, by a lazy lookup (no import of the losses when this package is imported)
_MOVED_TO_LOSSES = ("fused_linear_qtarget_loss", "fused_linear_target_sft_loss")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_LOSSES:
        warnings.warn(
            f"target_sft.kernels.{name} moved to target_sft.losses.{name}: import it from there "
            "(this alias will be removed)",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module("target_sft.losses"), name)
    raise AttributeError(f"module 'target_sft.kernels' has no attribute {name!r}")
