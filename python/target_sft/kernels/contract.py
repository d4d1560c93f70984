"""The sweep contract: what a loss asks of the kernels and what they hand back.

Every Q-target loss is computed in two sweeps over the vocabulary, whichever implementation runs
them (the chunked PyTorch reference :mod:`.reference`, the Triton row kernels
:mod:`.triton_logits`, or the fused-linear kernels :mod:`.triton_fused_linear`):

* **forward**: per row, ``lse = logsumexp(z)``, the label logit ``z_y``, the logits at the sparse
  support ``S`` and, only when the loss asks for them (:class:`StatRequest`), the entropy
  ``H(p)``, ``Σ_v z_v``, the top-k entropy and ``CE(D, p)`` for dense detached distributions
  ``D`` (:class:`DenseTerm`). The result is a :class:`RowStats`.
* **backward**: the logit gradient of ``Σ_t s_t · CE(Q_t, π_θ)`` is ``g_t = κ_t · p_t − Q̂_t``,
  where ``Q̂_t`` (the target mass, scale included) is sparse plus a few structured parts::

      Q̂_t = a_t · δ_{y_t} + Σ_j w_{t,j} · δ_{S_{t,j}} + (c_t / V) · 1 + Σ_i e_{t,i} · D_i(z_t)

  and ``κ_t = s_t − (mass that Q̂_t puts on sg[p_t])``. These per-row quantities are a
  :class:`GradPlan`; every implementation forms ``g`` in float32 (float64 for float64 logits),
  so ``p − Q`` is never formed in bf16.

The loss side (:mod:`target_sft.losses`) turns :class:`RowStats` into γ, π̃ and the loss value and
builds the :class:`GradPlan`; nothing here knows about presets. This module imports torch only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "DEFAULT_CUDA_CHUNK_ELEMENTS",
    "DEFAULT_FUSED_CHUNK_ELEMENTS",
    "DenseTerm",
    "FusedLinearBlocks",
    "GradPlan",
    "RowStats",
    "SharpenedSoftmax",
    "StatRequest",
    "compute_dtype",
    "default_chunk_elements",
    "rows_per_chunk",
]

#: Elements of one row chunk (rows × V) on CPU: 4 MiB of float32, so that the few passes over a
#: chunk run from cache (1.5-3x faster than 2^24-element chunks on a 2-core EPYC, V = 151,936).
DEFAULT_CHUNK_ELEMENTS: int = 1 << 20
#: ... and on CUDA, where each chunk costs kernel launches: 256 MiB of float32 per temporary.
DEFAULT_CUDA_CHUNK_ELEMENTS: int = 1 << 26
#: ... and on CPU for the fused-linear reference, whose chunk is also a matmul ``[rows, H] × [H, V]``
#: that reads the whole LM head: 32 MiB of float32 (~55 rows at V = 151,936; 3x faster than
#: 2^20-element chunks on a 2-core EPYC, H = 256).
DEFAULT_FUSED_CHUNK_ELEMENTS: int = 1 << 23


def default_chunk_elements(device: torch.device, *, fused_linear: bool = False) -> int:
    """Chunk size (rows × V elements) used when a loss is given ``chunk_elements=None``
    (``fused_linear``: for the fused-linear reference, whose chunks are logits it computes)."""
    if device.type == "cuda":
        return DEFAULT_CUDA_CHUNK_ELEMENTS
    return DEFAULT_FUSED_CHUNK_ELEMENTS if fused_linear else DEFAULT_CHUNK_ELEMENTS


def rows_per_chunk(n_rows: int, vocab: int, chunk_elements: int) -> int:
    """Rows of one chunk of at most ``chunk_elements`` elements (at least one row)."""
    return max(1, min(max(n_rows, 1), chunk_elements // max(vocab, 1)))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the loss is computed in: float64 for float64 logits, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class DenseTerm(ABC):
    """A detached dense distribution ``D(z)`` over the vocabulary, recomputed from each chunk.

    Used for targets that cannot be sparse (GEM's sharpened model distribution). ``density``
    receives a chunk of logits in the compute dtype and its row ``logsumexp``; it must return a
    new ``[rows, V]`` tensor whose rows sum to one.
    """

    @abstractmethod
    def density(self, z: Tensor, lse: Tensor) -> Tensor:
        """``D`` for a chunk of rows ``z`` ([rows, V], compute dtype) with ``lse`` ([rows])."""


class SharpenedSoftmax(DenseTerm):
    """``D = softmax(z / β) ∝ sg[π_θ]^{1/β}``: the β-sharpened model distribution (GEM)."""

    def __init__(self, beta: float) -> None:
        if not (beta > 0.0):
            raise ValueError(f"beta = {beta} must be > 0")
        self.beta = float(beta)

    def density(self, z: Tensor, lse: Tensor) -> Tensor:
        return torch.softmax(z / self.beta, dim=-1)

    def __repr__(self) -> str:
        return f"SharpenedSoftmax(beta={self.beta})"


@dataclass(frozen=True)
class StatRequest:
    """Which optional per-row statistics a loss needs from the forward sweep."""

    entropy: bool = False
    sum_logits: bool = False
    topk: int | None = None
    dense: tuple[DenseTerm, ...] = ()

    def __or__(self, other: StatRequest) -> StatRequest:
        if self.topk is not None and other.topk is not None and self.topk != other.topk:
            raise ValueError(f"conflicting top-k requests: {self.topk} and {other.topk}")
        dense = self.dense + tuple(d for d in other.dense if all(d is not e for e in self.dense))
        return StatRequest(
            entropy=self.entropy or other.entropy,
            sum_logits=self.sum_logits or other.sum_logits,
            topk=self.topk if self.topk is not None else other.topk,
            dense=dense,
        )


@dataclass
class RowStats:
    """Per-row statistics of the logits, all detached, in the compute dtype."""

    lse: Tensor
    z_label: Tensor
    z_support: Tensor | None = None
    entropy: Tensor | None = None
    sum_logits: Tensor | None = None
    topk_entropy: Tensor | None = None
    topk: int | None = None
    dense_ce: list[Tensor] = field(default_factory=list)
    dense_terms: tuple[DenseTerm, ...] = ()

    def ce_to(self, term: DenseTerm) -> Tensor:
        """``CE(D, π_θ) = −Σ_v D_v log p_v`` for a requested dense term."""
        for t, value in zip(self.dense_terms, self.dense_ce, strict=True):
            if t is term:
                return value
        raise KeyError(f"{term!r} was not requested from the forward sweep")


@dataclass
class GradPlan:
    """Everything the backward sweep needs: ``g = κ·p − Q̂`` per row (see the module docstring).

    All tensors are detached, in the compute dtype, and zero on unsupervised rows.
    """

    lse: Tensor
    kappa: Tensor
    labels: Tensor
    label_mass: Tensor
    #: the support ids clamped to valid columns (``[N, K]``), when the target has support mass
    support: Tensor | None = None
    #: which support entries are real (not ``-1`` padding), ``[N, K]`` (with ``support``)
    support_valid: Tensor | None = None
    support_mass: Tensor | None = None
    uniform_mass: Tensor | None = None
    dense: list[tuple[DenseTerm, Tensor]] = field(default_factory=list)
    #: rows × V per chunk of the PyTorch reference (``None``: :func:`default_chunk_elements`)
    chunk_elements: int | None = None


class FusedLinearBlocks:
    """Tile sizes of the fused-linear kernels (tests use small ones; defaults target H100)."""

    def __init__(
        self,
        block_m: int = 64,
        block_n: int = 128,
        block_h: int = 64,
        bwd_block_m: int = 64,
        bwd_block_n: int = 64,
        num_warps: int = 8,
        num_stages: int = 3,
        splits: int | None = None,
    ) -> None:
        self.block_m, self.block_n, self.block_h = block_m, block_n, block_h
        self.bwd_block_m, self.bwd_block_n = bwd_block_m, bwd_block_n
        self.num_warps, self.num_stages, self.splits = num_warps, num_stages, splits

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"FusedLinearBlocks({fields})"
