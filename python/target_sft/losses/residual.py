"""Residual choices π̃_t: where the mass ``1 − γ_t`` goes (§5.1, §6, Table 5, Appendix B.3).

A :class:`Residual` turns the per-row residual weight ``ρ_t = s_t (1 − γ_t)`` into target mass
(:class:`ResidualParts`): on the model itself (``sg[π_θ]``, no gradient), on the uniform
distribution, on the sparse teacher support (≤ K non-zeros per row) and, for GEM only, a signed
dense term. Everything is detached.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..kernels.contract import DenseTerm, SharpenedSoftmax, StatRequest
from ._inputs import SOURCES
from ._validate import check_eta, first_index, fmt_index
from .trust import TokenContext

__all__ = [
    "TAILS",
    "TAIL_FLOOR",
    "GEMResidual",
    "GuidedResidual",
    "Residual",
    "ResidualParts",
    "SelfResidual",
    "SparseResidual",
    "TailedTarget",
    "UniformResidual",
    "check_tail",
    "guided_target",
    "residual_from_name",
]


@dataclass
class ResidualParts:
    """Target mass of a residual, per row (all detached, compute dtype)."""

    p_mass: Tensor | None = None
    uniform_mass: Tensor | None = None
    support_mass: Tensor | None = None
    dense: list[tuple[DenseTerm, Tensor]] = field(default_factory=list)


#: where a truncated teacher's missing mass ``m = 1 − Σ_{k∈S} π_T(k)`` goes (the ``tail=`` option
#: of :class:`GuidedResidual`, :class:`SparseResidual` and the presets built on them):
#: ``"renormalize"`` spreads it over the support S in proportion to π_T (the default);
#: ``"model"`` spreads it over V∖S as the model's own distribution there (see
#: :class:`GuidedResidual` for the math and docs/LOSSES.md, "The teacher's missing tail")
TAILS: tuple[str, ...] = ("renormalize", "model")


def check_tail(tail: str) -> str:
    """``tail`` itself when it is one of :data:`TAILS`, else a ``ValueError``."""
    if tail not in TAILS:
        raise ValueError(f"tail = {tail!r} is not one of {TAILS}")
    return tail


#: the smallest model tail ``τ = 1 − π_θ(S)`` that ``tail="model"`` divides by (see
#: :func:`guided_target`): the same in every dtype, so that float32 and float64 compute one formula
TAIL_FLOOR: float = 1e-3


@dataclass
class TailedTarget:
    """A teacher-guided distribution π̃ over S ∪ (V∖S), per row (detached, compute dtype).

    ``on_support`` ``[N, K]`` is π̃ on the support. Off it, π̃_v = ``per_p · p_v`` (``per_p``
    ``[N]``; ``None`` with ``tail="renormalize"``: no mass off S), whose total is ``tail_mass =
    per_p · (1 − π_θ(S))``. ``p_support`` is ``p`` at the support (0 at padding).
    """

    on_support: Tensor
    p_support: Tensor
    per_p: Tensor | None = None
    tail_mass: Tensor | None = None

    def parts(self, rho: Tensor) -> ResidualParts:
        """The residual mass ``ρ π̃``: sparse on S plus ``ρ · per_p`` on ``sg[p]`` over all of V,
        minus its share on S (so that the mass on ``sg[p]`` lands on V∖S only)."""
        if self.per_p is None:
            return ResidualParts(support_mass=rho[:, None] * self.on_support)
        w = rho[:, None] * (self.on_support - self.per_p[:, None] * self.p_support)
        return ResidualParts(p_mass=rho * self.per_p, support_mass=w)

    def kl(self, ctx: TokenContext) -> Tensor:
        """``KL(π̃ ‖ π_θ)`` per row. Off S, π̃_v / p_v = ``per_p``, so the tail contributes
        ``tail_mass · log per_p`` (its ``Σ p_v log p_v`` cancels between the two terms)."""
        pi = self.on_support
        zs = ctx.stats.z_support
        assert zs is not None
        nll = ctx.stats.lse[:, None] - zs
        value = torch.where(pi != 0, pi * (torch.log(pi) + nll), torch.zeros_like(pi)).sum(-1)
        if self.per_p is None or self.tail_mass is None:
            return value
        tail = self.tail_mass * torch.log(self.per_p)
        return value + torch.where(self.tail_mass > 0, tail, torch.zeros_like(tail))


def _raise_if_no_support(ctx: TokenContext, rows: Tensor, who: str, why: str) -> None:
    hit = first_index(rows & ctx.batch.mask)
    if hit is None:
        return
    r = hit[0]
    idx = ctx.batch.label_index(r)
    src = ctx.batch.support_source
    raise ValueError(
        f"{src}_ids[{fmt_index(idx)}, :] {why} at a supervised position (labels[{fmt_index(idx)}]"
        f" = {int(ctx.batch.labels[r].item())}); {who} needs a non-empty {src} support there"
    )


def _masked_support_logprobs(ctx: TokenContext) -> tuple[Tensor, Tensor]:
    """The log-probs of the support the sweeps read (``-inf`` at padding) and its validity."""
    b = ctx.batch
    _, valid = b.support()
    lt = b.support_logprobs()
    return torch.where(valid, lt, torch.full_like(lt, float("-inf"))), valid


def guided_target(ctx: TokenContext, eta: float, tail: str, who: str) -> TailedTarget:
    """π̃ ∝ π_θ^{1−η} π_T^η over the support S and, with ``tail="model"``, over V∖S with the
    teacher's missing mass modelled by the model's own tail (``η = 1``: the teacher itself).

    ``tail="renormalize"``: ``π̃ = softmax_{a∈S}((1 − η) log p_a + η log π_T(a))``, zero off S.
    ``tail="model"``: with ``m = 1 − Σ_{k∈S} π_T(k)`` and ``τ = 1 − Σ_{k∈S} p_k``, the teacher
    outside S is ``π_T(v) ≈ m p_v / τ̂`` (``τ̂ = max(τ, TAIL_FLOOR)``), so that
    ``π_T(v)^η p_v^{1−η} = p_v (m / τ̂)^η`` is proportional to ``p_v``: the whole tail is one
    bucket of score ``log τ + η (log m − log τ̂)`` in the same softmax, and each ``v ∉ S`` gets
    ``c p_v`` with ``c = (m / τ̂)^η / Z``.

    Why the floor: ``π_θ(S) = Σ exp(z_S − lse)`` and the entropy are known to a few ulps of
    ``lse`` only (~2e-6 in float32), and ``c`` multiplies their rounding: in the gradient (``c p``
    is put on ``sg[p]`` over V and ``c p_k`` taken back on S) and in the value (the tail's
    ``Σ_{v∉S} p_v (lse − z_v)`` is the entropy minus its part on S). ``τ̂ ≥ 1e-3`` keeps
    ``c ≤ (m / 1e-3)^η / Z``; a row whose model tail is below it moves continuously toward
    ``tail="renormalize"`` (its tail holds ``m τ / 1e-3`` of the teacher instead of ``m``).
    """
    b = ctx.batch
    lt, valid = _masked_support_logprobs(ctx)
    if b.check:
        _raise_if_no_support(ctx, ~valid.any(-1), who, "has no valid entry (all -1)")
    zs = ctx.stats.z_support
    assert zs is not None
    log_p = torch.where(valid, zs - ctx.stats.lse[:, None], torch.full_like(lt, float("-inf")))
    if eta == 1.0:
        score = lt
    else:
        score = (1.0 - eta) * log_p + eta * lt
        score = torch.where(valid, score, torch.full_like(score, float("-inf")))
    p_support = torch.exp(log_p)
    if tail == "renormalize":
        ok = torch.isfinite(score).any(-1)
        if b.check:
            _raise_if_no_support(ctx, ~ok, who, "has no entry with a finite guided score")
        pi = torch.softmax(score, dim=-1)
        pi = torch.where(ok[:, None], pi, torch.zeros_like(pi))
        return TailedTarget(on_support=pi, p_support=p_support)
    kept = torch.exp(lt).sum(-1)
    if b.check:
        bad = first_index((kept > 1.05) & b.mask)
        if bad is not None:
            r = bad[0]
            raise ValueError(
                f"{b.support_source}_logprobs[{fmt_index(b.label_index(r))}, :] hold probability "
                f"{float(kept[r]):.4g} > 1: {who} needs log-probs of the {b.support_source}'s "
                "full softmax (as the cache stores them), not log-probs renormalised or shifted "
                "otherwise"
            )
    log_m = torch.log((1.0 - kept).clamp_min(0.0))
    # τ = 1 − π_θ(S) from log π_θ(S), accurate to the rounding of lse
    log_tau = torch.log((-torch.expm1(torch.logsumexp(log_p, -1))).clamp_min(0.0))
    log_tau_hat = log_tau.clamp_min(math.log(TAIL_FLOOR))
    # log (m / τ̂)^η: −inf when m = 0; 0 at η = 0 (π_T^0 ≡ 1, also where m = 0)
    log_ratio = eta * (log_m - log_tau_hat) if eta > 0 else torch.zeros_like(log_m)
    full = torch.cat([score, (log_tau + log_ratio)[:, None]], dim=-1)
    ok = torch.isfinite(full).any(-1)
    if b.check:
        _raise_if_no_support(ctx, ~ok, who, "has no finite guided score on S or its tail")
    log_z = torch.logsumexp(full, dim=-1)
    log_z = torch.where(ok, log_z, torch.zeros_like(log_z))
    pi = torch.where(ok[:, None], torch.exp(score - log_z[:, None]), torch.zeros_like(score))
    per_p = torch.where(ok, torch.exp(log_ratio - log_z), torch.zeros_like(log_z))
    tail_mass = torch.where(ok, torch.exp(log_tau + log_ratio - log_z), torch.zeros_like(log_z))
    return TailedTarget(on_support=pi, p_support=p_support, per_p=per_p, tail_mass=tail_mass)


class Residual(ABC):
    """A residual choice π̃_t."""

    #: the sparse distribution from a cache that π̃ reads (``"teacher"``: ``teacher_ids`` /
    #: ``teacher_logprobs``; ``"reference"``: ``reference_ids`` / ``reference_logprobs``), or
    #: ``None``; the loss sweeps exactly this support
    source: str | None = None

    @property
    def inputs(self) -> tuple[str, ...]:
        """The :class:`~target_sft.losses.LossInputs` fields π̃ cannot be formed without."""
        return () if self.source is None else (f"{self.source}_ids", f"{self.source}_logprobs")

    @property
    def needs_teacher(self) -> bool:
        """Whether the caller must pass ``teacher_ids`` / ``teacher_logprobs``."""
        return self.source == "teacher"

    @property
    def needs_reference(self) -> bool:
        """Whether the caller must pass ``reference_ids`` / ``reference_logprobs``."""
        return self.source == "reference"

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

    ``source`` says which: ``"teacher"`` (``teacher_ids`` / ``teacher_logprobs``; KD, Hybrid KD)
    or ``"reference"`` (``reference_ids`` / ``reference_logprobs``; SFT+KL's and ASFT's anchor).
    Below, π_T is that distribution.

    The cache stores ``log π_T`` over the full vocabulary, truncated to the top-K support ``S``, so
    the stored mass ``Σ_{a∈S} π_T(a) = 1 − m`` is below one (``m``: the missing tail).
    ``renormalize=True`` makes π̃ a distribution by spreading ``m``: with ``tail="renormalize"``
    (default) over S, ``π̃ = π_T|_S / (1 − m)``; with ``tail="model"`` over V∖S as the model's
    own distribution there, ``π̃_v = m p_v / (1 − π_θ(S))`` (:func:`guided_target` at η = 1).
    ``renormalize=False`` keeps the truncated values, which is what the untruncated formula
    computes when the tail is dropped; ``m`` then falls to ``sg[π_θ]`` (no gradient), i.e.
    ``π̃ = π_T|_S + m sg[π_θ]`` (``tail`` must stay ``"renormalize"``). With a full-vocabulary
    support all agree with Table 5.
    """

    def __init__(
        self, *, renormalize: bool = True, tail: str = "renormalize", source: str = "teacher"
    ) -> None:
        if source not in SOURCES:
            raise ValueError(f"source = {source!r} is not one of {SOURCES}")
        self.source = source
        self.renormalize = bool(renormalize)
        self.tail = check_tail(tail)
        if self.tail == "model" and not self.renormalize:
            raise ValueError(
                "renormalize=False keeps the truncated teacher (its missing mass on sg[π_θ]) and "
                "tail='model' spreads that mass over the model's tail: choose one"
            )

    def request(self) -> StatRequest:
        if self.renormalize and self.tail == "renormalize":
            return StatRequest()
        return StatRequest(entropy=True)

    def target(self, ctx: TokenContext) -> TailedTarget:
        """π̃ with ``renormalize=True`` (on S, and off S with ``tail="model"``)."""
        return guided_target(ctx, 1.0, self.tail, repr(self))

    def distribution(self, ctx: TokenContext) -> tuple[Tensor, Tensor]:
        """``(π̃ restricted to the support [N, K], self mass [N])`` (``tail="renormalize"``)."""
        if self.tail == "model":
            raise ValueError(f"{self!r}: π̃ has mass off the support; use target()")
        lt, _ = _masked_support_logprobs(ctx)
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
        if self.tail == "model":
            return self.target(ctx).parts(rho)
        pi, self_mass = self.distribution(ctx)
        parts = ResidualParts(support_mass=rho[:, None] * pi)
        if not self.renormalize:
            parts.p_mass = rho * self_mass
        return parts

    def describe(self) -> str:
        pi = "π_T" if self.source == "teacher" else "π_ref"
        if self.tail == "model":
            text = "π_T on S, m·sg[π_θ] / (1 − π_θ(S)) off S (m = 1 − π_T(S))"
        elif self.renormalize:
            text = "π_T|_S / π_T(S)"
        else:
            text = "π_T|_S + (1 − π_T(S)) sg[π_θ]"
        return text.replace("π_T", pi)

    def __repr__(self) -> str:
        src = "" if self.source == "teacher" else f", source={self.source!r}"
        if self.tail == "model":
            return f"SparseResidual(tail='model'{src})"
        return f"SparseResidual(renormalize={self.renormalize}{src})"


class GuidedResidual(Residual):
    """π̃(a) ∝ π_θ(a)^{1−η} π_T(a)^η (TARGET-SFT, §6), stop-gradient.

    The paper's π̃ is over the whole vocabulary; the cache has π_T only on the top-K support S,
    missing ``m = 1 − Σ_{k∈S} π_T(k)``. ``tail`` says what stands for π_T off S:

    * ``"renormalize"`` (default): nothing — π̃ lives on S,
      ``softmax_{a∈S}((1 − η)(z_a − lse) + η log π_T(a))``.
    * ``"model"``: the missing mass spread as the model's own tail,
      ``π_T(v) ≈ m p_v / (1 − P_S)`` for ``v ∉ S`` (``P_S = Σ_{k∈S} p_k``). Then
      ``p_v^{1−η} π_T(v)^η = p_v (m / (1 − P_S))^η`` is proportional to ``p_v``, so with
      ``Z = Σ_{k∈S} p_k^{1−η} π_T(k)^η + (1 − P_S)^{1−η} m^η``::

          π̃_k = p_k^{1−η} π_T(k)^η / Z   (k ∈ S),      π̃_v = c · p_v,  c = (m / (1 − P_S))^η / Z   (v ∉ S)

      i.e. mass ``c`` on ``sg[p]`` over all of V minus ``c p_k`` on S: no N × V buffer, one more
      per-row scalar in the kernel plan. The value needs the entropy (``Σ_{v∉S} p_v (lse − z_v) =
      H − Σ_{k∈S} p_k (lse − z_k)``). ``1 − P_S`` below :data:`TAIL_FLOOR` (1e-3) is raised to
      it (:func:`guided_target` says why).

    ``η = 1`` is the (tail-completed) teacher; ``η = 0`` is ``sg[π_θ]`` over the **whole**
    vocabulary for either tail (``π_T^0 ≡ 1``, the convention ``0^0 = 1`` off S), which makes
    TARGET-SFT at ``η = 0`` exactly DFT. As ``η → 0⁺`` with a truncated support and
    ``tail="renormalize"`` the residual tends to ``π_θ|_S / π_θ(S)`` instead; with ``tail="model"``
    it tends to ``sg[π_θ]``.
    """

    def __init__(self, eta: float = 0.5, *, tail: str = "renormalize") -> None:
        self.eta = check_eta(eta)
        self.tail = check_tail(tail)
        self.source = None if self.eta == 0.0 else "teacher"

    def request(self) -> StatRequest:
        if self.eta == 0.0 or self.tail == "model":
            return StatRequest(entropy=True)
        return StatRequest()

    def target(self, ctx: TokenContext) -> TailedTarget:
        """π̃ on the support and, with ``tail="model"``, off it (η > 0)."""
        return guided_target(ctx, self.eta, self.tail, repr(self))

    def distribution(self, ctx: TokenContext) -> Tensor:
        """π̃ on the support, ``[N, K]`` (rows without support are zero)."""
        return self.target(ctx).on_support

    def build(self, ctx: TokenContext, rho: Tensor, scale: Tensor) -> ResidualParts:
        if self.eta == 0.0:
            return ResidualParts(p_mass=rho)
        return self.target(ctx).parts(rho)

    def describe(self) -> str:
        where = "on S" if self.tail == "renormalize" else "on V, π_T ≈ m·π_θ/(1 − π_θ(S)) off S"
        return f"∝ π_θ^{1 - self.eta:g} π_T^{self.eta:g} {where}"

    def __repr__(self) -> str:
        if self.tail == "model":
            return f"GuidedResidual(eta={self.eta:g}, tail='model')"
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
    """``"self"``, ``"uniform"``, ``"teacher"`` / ``"reference"`` (renormalised sparse, from the
    teacher's / the reference model's top-k) or ``"teacher_raw"`` / ``"reference_raw"``."""
    table: dict[str, Residual] = {
        "self": SelfResidual(),
        "uniform": UniformResidual(),
        "teacher": SparseResidual(renormalize=True),
        "teacher_raw": SparseResidual(renormalize=False),
        "reference": SparseResidual(renormalize=True, source="reference"),
        "reference_raw": SparseResidual(renormalize=False, source="reference"),
    }
    if name not in table:
        raise ValueError(f"residual = {name!r} is not one of {sorted(table)} (or pass a Residual)")
    return table[name]
