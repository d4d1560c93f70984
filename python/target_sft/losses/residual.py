"""Residual choices π̃_t: where the mass ``1 − γ_t`` goes (§5.1, §6, Table 5, Appendix B.3).

A :class:`Residual` turns the per-row residual weight ``ρ_t = s_t (1 − γ_t)`` into target mass
(:class:`ResidualParts`): on the model itself (``sg[π_θ]``, no gradient), on the uniform
distribution, on the sparse teacher support (≤ K non-zeros per row) and, for GEM only, a signed
dense term. Everything is detached.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..kernels.contract import DenseTerm, SharpenedSoftmax, StatRequest
from ._validate import check_eta, first_index, fmt_index
from .trust import TokenContext

__all__ = [
    "GEMResidual",
    "GuidedResidual",
    "Residual",
    "ResidualParts",
    "SelfResidual",
    "SparseResidual",
    "UniformResidual",
    "residual_from_name",
]


@dataclass
class ResidualParts:
    """Target mass of a residual, per row (all detached, compute dtype)."""

    p_mass: Tensor | None = None
    uniform_mass: Tensor | None = None
    support_mass: Tensor | None = None
    dense: list[tuple[DenseTerm, Tensor]] = field(default_factory=list)


def _raise_if_no_support(ctx: TokenContext, rows: Tensor, who: str, why: str) -> None:
    hit = first_index(rows & ctx.batch.mask)
    if hit is None:
        return
    r = hit[0]
    idx = ctx.batch.label_index(r)
    raise ValueError(
        f"teacher_ids[{fmt_index(idx)}, :] {why} at a supervised position (labels[{fmt_index(idx)}]"
        f" = {int(ctx.batch.labels[r].item())}); {who} needs a non-empty teacher support there"
    )


def _masked_teacher_logprobs(ctx: TokenContext) -> tuple[Tensor, Tensor]:
    b = ctx.batch
    _, valid = b.support()
    lt = b.teacher_logprobs
    assert lt is not None
    return torch.where(valid, lt, torch.full_like(lt, float("-inf"))), valid


class Residual(ABC):
    """A residual choice π̃_t."""

    #: whether the caller must pass ``teacher_ids`` / ``teacher_logprobs``
    needs_teacher: bool = False

    def request(self) -> StatRequest:
        """Row statistics needed to evaluate ``CE(π̃, π_θ)`` (the gradient needs none)."""
        return StatRequest()

    @abstractmethod
    def build(self, ctx: TokenContext, rho: Tensor, scale: Tensor) -> ResidualParts:
        """Target mass for residual weight ``rho`` (= s·(1 − γ)) and overall scale ``scale``."""

    def describe(self) -> str:
        return repr(self)


class SelfResidual(Residual):
    """π̃ = sg[π_θ] — the self-matching residual of every token-weighted variant (Cor. 1).

    ``CE(Q, π_θ)`` then has gradient ``γ (p − δ_y)``; the residual contributes ``(1 − γ) H(π_θ)`` to
    the value and nothing to the gradient.
    """

    def request(self) -> StatRequest:
        return StatRequest(entropy=True)

    def build(self, ctx: TokenContext, rho: Tensor, scale: Tensor) -> ResidualParts:
        return ResidualParts(p_mass=rho)

    def describe(self) -> str:
        return "sg[π_θ]"

    def __repr__(self) -> str:
        return "SelfResidual()"


class UniformResidual(Residual):
    """π̃ = Unif(V) (label smoothing)."""

    def request(self) -> StatRequest:
        return StatRequest(sum_logits=True)

    def build(self, ctx: TokenContext, rho: Tensor, scale: Tensor) -> ResidualParts:
        return ResidualParts(uniform_mass=rho)

    def describe(self) -> str:
        return "Unif(V)"

    def __repr__(self) -> str:
        return "UniformResidual()"


class SparseResidual(Residual):
    """π̃ = a sparse reference / teacher distribution read from the cache (KD, SFT+KL, ASFT).

    The cache stores ``log π_T`` over the full vocabulary, truncated to the top-K support ``S``, so
    the stored mass ``m = Σ_{a∈S} π_T(a)`` is below one. ``renormalize=True`` uses
    ``π̃ = π_T|_S / m``. ``renormalize=False`` keeps the truncated values, which is what the
    untruncated formula computes when the tail is dropped; the missing mass ``1 − m`` then falls to
    ``sg[π_θ]`` (no gradient), i.e. ``π̃ = π_T|_S + (1 − m) sg[π_θ]``. With a full-vocabulary
    support both agree with Table 5.
    """

    needs_teacher = True

    def __init__(self, *, renormalize: bool = True) -> None:
        self.renormalize = bool(renormalize)

    def request(self) -> StatRequest:
        return StatRequest() if self.renormalize else StatRequest(entropy=True)

    def distribution(self, ctx: TokenContext) -> tuple[Tensor, Tensor]:
        """``(π̃ restricted to the support [N, K], self mass [N])``."""
        lt, _ = _masked_teacher_logprobs(ctx)
        has_mass = torch.isfinite(lt).any(-1)
        if self.renormalize:
            if ctx.batch.check:
                _raise_if_no_support(
                    ctx,
                    ~has_mass,
                    "SparseResidual(renormalize=True)",
                    "has no valid entry with finite log-prob",
                )
            pi = torch.softmax(lt, dim=-1)
            pi = torch.where(has_mass[:, None], pi, torch.zeros_like(pi))
            return pi, torch.zeros_like(pi[:, 0])
        r = torch.exp(lt)
        return r, 1.0 - r.sum(-1)

    def build(self, ctx: TokenContext, rho: Tensor, scale: Tensor) -> ResidualParts:
        pi, self_mass = self.distribution(ctx)
        parts = ResidualParts(support_mass=rho[:, None] * pi)
        if not self.renormalize:
            parts.p_mass = rho * self_mass
        return parts

    def describe(self) -> str:
        return "π_T|_S / m" if self.renormalize else "π_T|_S + (1 − m) sg[π_θ]"

    def __repr__(self) -> str:
        return f"SparseResidual(renormalize={self.renormalize})"


class GuidedResidual(Residual):
    """π̃(a) ∝ π_θ(a)^{1−η} π_T(a)^η over the teacher support S (TARGET-SFT, §6), stop-gradient.

    Computed as ``softmax_{a∈S}((1 − η)(z_a − lse) + η log π_T(a))``. ``η = 1`` is the renormalised
    teacher; ``η = 0`` is ``sg[π_θ]`` over the **whole** vocabulary (``π_T^0 ≡ 1``, the convention
    ``0^0 = 1`` for tokens outside S), which makes TARGET-SFT at ``η = 0`` exactly DFT. As
    ``η → 0⁺`` with a truncated support the residual tends to ``π_θ|_S / π_θ(S)`` instead.
    """

    needs_teacher = True

    def __init__(self, eta: float = 0.5) -> None:
        self.eta = check_eta(eta)
        if self.eta == 0.0:
            self.needs_teacher = False

    def request(self) -> StatRequest:
        return StatRequest(entropy=True) if self.eta == 0.0 else StatRequest()

    def distribution(self, ctx: TokenContext) -> Tensor:
        """π̃ on the support, ``[N, K]`` (rows without support are zero)."""
        lt, valid = _masked_teacher_logprobs(ctx)
        if self.eta == 1.0:
            score = lt
        else:
            zs = ctx.stats.z_support
            assert zs is not None
            student = zs - ctx.stats.lse[:, None]
            score = (1.0 - self.eta) * student + self.eta * lt
            score = torch.where(valid, score, torch.full_like(score, float("-inf")))
        ok = torch.isfinite(score).any(-1)
        if ctx.batch.check:
            _raise_if_no_support(
                ctx,
                ~valid.any(-1),
                f"GuidedResidual(eta={self.eta:g})",
                "has no valid entry (all -1)",
            )
            _raise_if_no_support(
                ctx,
                ~ok,
                f"GuidedResidual(eta={self.eta:g})",
                "has no entry with a finite guided score",
            )
        pi = torch.softmax(score, dim=-1)
        return torch.where(ok[:, None], pi, torch.zeros_like(pi))

    def build(self, ctx: TokenContext, rho: Tensor, scale: Tensor) -> ResidualParts:
        if self.eta == 0.0:
            return ResidualParts(p_mass=rho)
        return ResidualParts(support_mass=rho[:, None] * self.distribution(ctx))

    def describe(self) -> str:
        return f"∝ π_θ^{1 - self.eta:g} π_T^{self.eta:g} on S"

    def __repr__(self) -> str:
        return f"GuidedResidual(eta={self.eta:g})"


class GEMResidual(Residual):
    """Signed residual of GEM (App. B.3): ``Q = γ δ_y + (1 − γ) sg[π_θ] + λ (sg[π_θ] − π_θ^{(β)})``.

    ``π_θ^{(β)} ∝ sg[π_θ]^{1/β}`` is the β-sharpened model distribution (dense, recomputed chunk by
    chunk). The positive branch ``π̃⁺ = sg[π_θ]`` carries no gradient, the negative branch pushes
    mass *away* from the model's strongest alternatives. GEM itself is γ = 1, λ = 1 (Table 5).
    """

    def __init__(self, beta: float = 0.7, *, repulsion: float = 1.0) -> None:
        self.term = SharpenedSoftmax(beta)
        self.beta = self.term.beta
        self.repulsion = float(repulsion)

    def request(self) -> StatRequest:
        return StatRequest(entropy=True, dense=(self.term,))

    def build(self, ctx: TokenContext, rho: Tensor, scale: Tensor) -> ResidualParts:
        lam = self.repulsion * scale
        return ResidualParts(p_mass=rho + lam, dense=[(self.term, -lam)])

    def describe(self) -> str:
        return f"(1−γ) sg[π_θ] + {self.repulsion:g}(sg[π_θ] − π_θ^(β={self.beta:g}))"

    def __repr__(self) -> str:
        return f"GEMResidual(beta={self.beta:g}, repulsion={self.repulsion:g})"


def residual_from_name(name: str) -> Residual:
    """``"self"``, ``"uniform"``, ``"teacher"`` (renormalised sparse) or ``"teacher_raw"``."""
    table: dict[str, Residual] = {
        "self": SelfResidual(),
        "uniform": UniformResidual(),
        "teacher": SparseResidual(renormalize=True),
        "teacher_raw": SparseResidual(renormalize=False),
    }
    if name not in table:
        raise ValueError(f"residual = {name!r} is not one of {sorted(table)} (or pass a Residual)")
    return table[name]
