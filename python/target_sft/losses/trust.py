"""Label-trust choices γ_t: how much target mass stays on the observed token y_t (§4.1, §5.1).

A :class:`Trust` maps a :class:`TokenContext` to a detached ``[N]`` tensor γ. All of them are
stop-gradient (Table 5: "(γ_t, π̃_t) are treated as stop-gradient"). γ may leave ``[0, 1]`` (iw-SFT
weights, the Proximal-SFT ratio); ``Q_t = γ δ_y + (1 − γ) π̃`` still sums to one.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels.contract import RowStats, StatRequest
from ._inputs import FlatBatch
from ._validate import check_probability_like

__all__ = [
    "ClippedRatioTrust",
    "ConstantTrust",
    "ImportanceWeightTrust",
    "ModelProbTrust",
    "SequenceWeightTrust",
    "ThresholdTrust",
    "TokenContext",
    "TokenWeightTrust",
    "TopKEntropyTrust",
    "Trust",
]


@dataclass
class TokenContext:
    """What trust and residual choices see: the batch, the row statistics and ``log p_y``."""

    batch: FlatBatch
    stats: RowStats

    @property
    def log_p_label(self) -> Tensor:
        """``log π_θ(y_t)`` per row (detached, compute dtype; junk on unsupervised rows)."""
        return self.stats.z_label - self.stats.lse

    @property
    def p_label(self) -> Tensor:
        """``p_t = π_θ(y_t)`` per row (detached)."""
        return torch.exp(self.log_p_label)


class Trust(ABC):
    """A label-trust choice γ_t (detached, ``[N]``)."""

    #: the :class:`~target_sft.losses.LossInputs` fields this choice cannot run without
    inputs: tuple[str, ...] = ()

    def request(self) -> StatRequest:
        """Row statistics this choice needs from the forward sweep."""
        return StatRequest()

    @abstractmethod
    def __call__(self, ctx: TokenContext) -> Tensor:
        """γ_t for every row (values on unsupervised rows are ignored)."""

    def describe(self) -> str:
        """A short formula, e.g. ``"p_y^0.5"``."""
        return repr(self)


class ConstantTrust(Trust):
    """γ_t = c (SFT: c = 1; label smoothing: 1 − ε; KD: 0; hybrid KD: 1 − λ)."""

    def __init__(self, value: float) -> None:
        self.value = float(value)
        if math.isnan(self.value):
            raise ValueError("ConstantTrust value is NaN")

    def __call__(self, ctx: TokenContext) -> Tensor:
        return torch.full_like(ctx.stats.lse, self.value)

    def describe(self) -> str:
        return f"{self.value:g}"

    def __repr__(self) -> str:
        return f"ConstantTrust({self.value:g})"


class ModelProbTrust(Trust):
    """γ_t = sg[p_t]^α — model probability as evidence (DFT / p-loss: α = 1; Beyond-log: α)."""

    def __init__(self, alpha: float = 1.0) -> None:
        if not (alpha >= 0.0):
            raise ValueError(f"alpha = {alpha} must be >= 0")
        self.alpha = float(alpha)

    def __call__(self, ctx: TokenContext) -> Tensor:
        return torch.exp(self.alpha * ctx.log_p_label)

    def describe(self) -> str:
        return "p_y" if self.alpha == 1.0 else f"p_y^{self.alpha:g}"

    def __repr__(self) -> str:
        return f"ModelProbTrust(alpha={self.alpha:g})"


class ThresholdTrust(Trust):
    """γ_t = 1[sg[p_t] > τ] (ProFiT, Table 4/5) or 1[sg[p_t] ≥ τ] with ``inclusive=True``."""

    def __init__(self, tau: float, *, inclusive: bool = False) -> None:
        self.tau = check_probability_like("tau", tau)
        self.inclusive = bool(inclusive)

    def __call__(self, ctx: TokenContext) -> Tensor:
        p = ctx.p_label
        keep = p >= self.tau if self.inclusive else p > self.tau
        return keep.to(p.dtype)

    def describe(self) -> str:
        return f"1[p_y {'>=' if self.inclusive else '>'} {self.tau:g}]"

    def __repr__(self) -> str:
        return f"ThresholdTrust(tau={self.tau:g}, inclusive={self.inclusive})"


class TopKEntropyTrust(Trust):
    """γ_t = (H(π_θ^{(k)}) / log k)^α, the entropy of the renormalised top-k distribution (EAFT).

    ``k`` is capped at the vocabulary size (then ``log k`` uses the capped k). α = 1 is the paper.
    """

    def __init__(self, k: int = 20, *, alpha: float = 1.0) -> None:
        if int(k) < 2:
            raise ValueError(f"k = {k} must be >= 2 (the entropy of one token is always 0)")
        if not (alpha >= 0.0):
            raise ValueError(f"alpha = {alpha} must be >= 0")
        self.k = int(k)
        self.alpha = float(alpha)

    def request(self) -> StatRequest:
        return StatRequest(topk=self.k)

    def __call__(self, ctx: TokenContext) -> Tensor:
        h = ctx.stats.topk_entropy
        k = ctx.stats.topk
        if h is None or k is None:  # pragma: no cover - guaranteed by request()
            raise RuntimeError("top-k entropy was not computed")
        if k < 2:
            raise ValueError(f"TopKEntropyTrust needs a vocabulary of at least 2 tokens, got {k}")
        w = h / math.log(k)
        return w if self.alpha == 1.0 else w.clamp_min(0) ** self.alpha

    def describe(self) -> str:
        base = f"H(top-{self.k}) / log {self.k}"
        return base if self.alpha == 1.0 else f"({base})^{self.alpha:g}"

    def __repr__(self) -> str:
        return f"TopKEntropyTrust(k={self.k}, alpha={self.alpha:g})"


class TokenWeightTrust(Trust):
    """γ_t = w_t given by the caller per token (``token_weights``, aligned with labels; CFT)."""

    inputs = ("token_weights",)

    def __call__(self, ctx: TokenContext) -> Tensor:
        w = ctx.batch.require("token_weights", "TokenWeightTrust")
        ctx.batch.check_finite_supervised("token_weights", w)
        return w

    def describe(self) -> str:
        return "w_t (caller)"

    def __repr__(self) -> str:
        return "TokenWeightTrust()"


class SequenceWeightTrust(Trust):
    """γ_t = w_{s(t)} given by the caller per sequence (``sequence_weights``).

    ``s(t)`` is the sample of token t, ``sequence_ids[t]`` (required: packed rows hold several
    samples; ``sequence_weights`` is indexed by sample id).
    """

    inputs = ("sequence_weights", "sequence_ids")

    def __call__(self, ctx: TokenContext) -> Tensor:
        b = ctx.batch
        w = b.require("sequence_weights", "SequenceWeightTrust")
        idx, _ = b.sequences("SequenceWeightTrust's weight")
        out = w[idx]
        b.check_finite_supervised("sequence_weights", out)
        return out

    def describe(self) -> str:
        return "w_b (caller, per sequence)"

    def __repr__(self) -> str:
        return "SequenceWeightTrust()"


class ImportanceWeightTrust(Trust):
    """γ_t = w(τ) = q(τ) / π_ref(τ) per trajectory (iw-SFT), with q = sg[π_θ].

    ``log w_b = T · Σ_{t ∈ b, supervised} (sg[log π_θ(y_t)] − log π_ref(y_t))`` from the caller's
    ``reference_label_logprobs`` (reference log-prob of each label, aligned with labels). The
    trajectory ``b`` of a token is its sample, ``sequence_ids`` (required: packed rows hold
    several). Paper (Table 4):
    ``T = 1``, a plain sum, no clipping. The authors' code instead uses the per-token *mean*
    (``length_normalize=True``), ``T = 1`` and clips w to ``[0, 16]`` (``clip=(0, 16)``).
    """

    inputs = ("reference_label_logprobs", "sequence_ids")

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        length_normalize: bool = False,
        clip: tuple[float, float] | None = None,
    ) -> None:
        self.temperature = float(temperature)
        self.length_normalize = bool(length_normalize)
        if clip is not None:
            lo, hi = float(clip[0]), float(clip[1])
            if not lo <= hi:
                raise ValueError(f"clip = {clip} must satisfy low <= high")
            clip = (lo, hi)
        self.clip = clip

    def __call__(self, ctx: TokenContext) -> Tensor:
        b = ctx.batch
        ref = b.require("reference_label_logprobs", "iw-SFT (ImportanceWeightTrust)")
        idx, n_sequences = b.sequences("iw-SFT's importance weight")
        b.check_finite_supervised("reference_label_logprobs", ref)
        zero = torch.zeros_like(ref)
        diff = torch.where(b.mask, ctx.log_p_label - ref, zero)
        total = torch.zeros(n_sequences, dtype=diff.dtype, device=diff.device)
        total.index_add_(0, idx, diff)
        if self.length_normalize:
            count = torch.zeros_like(total).index_add_(0, idx, b.mask.to(diff.dtype))
            total = total / count.clamp_min(1)
        w = torch.exp(self.temperature * total)
        if self.clip is not None:
            w = w.clamp(self.clip[0], self.clip[1])
        return w[idx]

    def describe(self) -> str:
        agg = "mean" if self.length_normalize else "sum"
        return f"exp({self.temperature:g}·{agg}_t(log p_t − log π_ref(y_t)))" + (
            f" clipped to {self.clip}" if self.clip else ""
        )

    def __repr__(self) -> str:
        return (
            f"ImportanceWeightTrust(temperature={self.temperature:g}, "
            f"length_normalize={self.length_normalize}, clip={self.clip})"
        )


class ClippedRatioTrust(Trust):
    """γ_t = r_t · 1[r_t ≤ 1 + ε], r_t = sg[p_t] / π_old(y_t) (Proximal SFT's induced trust).

    This is exactly the gradient weight of ``−min(r, clip(r, 1 − ε, 1 + ε))`` (advantage 1): the
    lower clip never binds (``min`` keeps the unclipped ``r``), the upper clip zeroes the update.
    """

    inputs = ("old_logprobs",)

    def __init__(self, epsilon: float = 0.2) -> None:
        if not (epsilon >= 0.0):
            raise ValueError(f"epsilon = {epsilon} must be >= 0")
        self.epsilon = float(epsilon)

    def __call__(self, ctx: TokenContext) -> Tensor:
        old = ctx.batch.require("old_logprobs", "Proximal SFT (ClippedRatioTrust)")
        ctx.batch.check_finite_supervised("old_logprobs", old)
        r = torch.exp(ctx.log_p_label - old)
        return torch.where(r <= 1.0 + self.epsilon, r, torch.zeros_like(r))

    def describe(self) -> str:
        return f"r·1[r <= {1 + self.epsilon:g}], r = p_y / π_old(y)"

    def __repr__(self) -> str:
        return f"ClippedRatioTrust(epsilon={self.epsilon:g})"
