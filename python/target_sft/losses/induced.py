"""Induced targets (Eq. 6): ``Q = p − ∂L/∂z`` for any differentiable token-level loss, and the
data behind Figure 3 (``Q`` on the observed token and on the others as a function of ``p_y``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["InducedTargetCurve", "induced_target", "induced_target_curve", "p_loss_closed_form"]


def _accepts_reduction(fn: Callable[..., Any]) -> bool:
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    return "reduction" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )


def induced_target(
    loss_fn: Callable[..., Tensor],
    logits: Tensor,
    labels: Tensor,
    *args: Any,
    dtype: torch.dtype | None = torch.float64,
    **kwargs: Any,
) -> Tensor:
    """The target ``Q = p − ∂L/∂z`` that ``loss_fn`` drives the model toward (Eq. 6).

    ``loss_fn(logits, labels, *args, **kwargs)`` may be any differentiable token-level loss (a
    preset, :class:`~target_sft.losses.QTargetLoss`, ``F.cross_entropy``, a lambda, …). The
    gradient is taken of the **sum** of its per-token losses: when ``loss_fn`` accepts a
    ``reduction`` keyword and none is given, ``reduction="sum"`` is passed (a ``mean`` would scale
    ``∂L/∂z`` by 1/N). Rows that the loss ignores get ``Q = p``.

    Args:
        loss_fn: the loss.
        logits: ``[..., V]`` logits (detached and converted to ``dtype`` first).
        labels: labels for ``loss_fn``.
        *args, **kwargs: passed through to ``loss_fn``.
        dtype: compute dtype (float64 by default; ``None`` keeps the logits' dtype).

    Returns:
        ``Q`` with the shape of ``logits``, in ``dtype``; each row sums to 1 up to rounding.
    """
    z = logits.detach()
    if dtype is not None:
        z = z.to(dtype)
    z = z.clone().requires_grad_(True)
    if "reduction" not in kwargs and _accepts_reduction(loss_fn):
        kwargs["reduction"] = "sum"
    with torch.enable_grad():
        loss = loss_fn(z, labels, *args, **kwargs)
        (grad,) = torch.autograd.grad(loss.sum(), z, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(z)
    p = torch.softmax(z.detach().to(grad.dtype), dim=-1)
    return p - grad


@dataclass(frozen=True)
class InducedTargetCurve:
    """Figure-3 data: induced target vs. the model probability of the observed token.

    Rows follow ``p_y``; ``p`` and ``q`` are ``[M, V]`` (the model distribution and the induced
    target), ``q_y = q[:, label]``, ``q_other = q[:, other]`` (a non-observed token ``other``),
    ``grad = p − q`` and ``q_sum`` the row sums of ``q`` (1 up to rounding).
    """

    p_y: Tensor
    p: Tensor
    q: Tensor
    q_y: Tensor
    q_other: Tensor
    p_other: Tensor
    grad: Tensor
    q_sum: Tensor
    label: int
    other: int


def induced_target_curve(
    loss_fn: Callable[..., Tensor],
    p_y: Tensor | None = None,
    *,
    vocab_size: int = 8,
    label: int = 0,
    other: int | None = None,
    others: Tensor | None = None,
    teacher_probs: Tensor | None = None,
    reference_probs: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    **loss_kwargs: Any,
) -> InducedTargetCurve:
    """Induced target of ``loss_fn`` on a sweep of ``p_y`` (Figure 3), for any loss or preset.

    For each ``p_y`` the model distribution puts ``p_y`` on ``label`` and ``(1 − p_y) · others`` on
    the remaining tokens (``others``: a distribution over the ``V − 1`` other tokens, uniform by
    default). ``teacher_probs`` (a dense ``[V]`` distribution) is passed to teacher-based losses as
    a full-vocabulary support (``teacher_ids``/``teacher_logprobs``), ``reference_probs`` likewise
    to reference-anchored ones (SFT+KL, ASFT: ``reference_ids``/``reference_logprobs``). Per-token
    inputs such as ``old_logprobs`` go through ``loss_kwargs`` with shape ``[M]``.

    Args:
        loss_fn: any loss accepted by :func:`induced_target` (``[M, V]`` logits, ``[M]`` labels).
        p_y: the sweep (default: 101 points in ``[0.005, 0.995]``).
        vocab_size: V.
        label: the observed token.
        other: the non-observed token reported in ``q_other`` (default: the most likely other).
        others: the shape of the non-observed mass, ``[V − 1]``.
        teacher_probs: optional dense teacher distribution ``[V]``.
        reference_probs: optional dense reference-model distribution ``[V]``.
        dtype: compute dtype.
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size = {vocab_size} must be >= 2")
    if not 0 <= label < vocab_size:
        raise ValueError(f"label = {label} is outside the vocabulary [0, {vocab_size})")
    if p_y is None:
        p_y = torch.linspace(0.005, 0.995, 101, dtype=dtype)
    p_y = p_y.to(dtype).reshape(-1)
    if bool(((p_y <= 0) | (p_y >= 1)).any()):
        raise ValueError("p_y values must lie strictly inside (0, 1)")
    if others is None:
        others = torch.full((vocab_size - 1,), 1.0 / (vocab_size - 1), dtype=dtype)
    others = others.to(dtype).reshape(-1)
    if others.numel() != vocab_size - 1 or bool((others <= 0).any()):
        raise ValueError(f"others must be a positive [{vocab_size - 1}] distribution")
    others = others / others.sum()
    m = p_y.numel()
    rest = torch.tensor([v for v in range(vocab_size) if v != label], dtype=torch.long)
    p = torch.zeros(m, vocab_size, dtype=dtype)
    p[:, label] = p_y
    p[:, rest] = (1.0 - p_y)[:, None] * others[None, :]
    logits = torch.log(p)
    labels = torch.full((m,), label, dtype=torch.long)
    kwargs = dict(loss_kwargs)
    for source, probs in (("teacher", teacher_probs), ("reference", reference_probs)):
        if probs is None:
            continue
        tp = probs.to(dtype).reshape(-1)
        if tp.numel() != vocab_size:
            raise ValueError(f"{source}_probs must have {vocab_size} entries, got {tp.numel()}")
        kwargs[f"{source}_ids"] = (
            torch.arange(vocab_size, dtype=torch.int32).expand(m, -1).contiguous()
        )
        kwargs[f"{source}_logprobs"] = torch.log(tp / tp.sum()).expand(m, -1).contiguous()
    q = induced_target(loss_fn, logits, labels, dtype=dtype, **kwargs)
    if other is None:
        other = int(rest[int(torch.argmax(others))].item())
    if not 0 <= other < vocab_size or other == label:
        raise ValueError(f"other = {other} must be a token other than label = {label}")
    p_model = torch.softmax(logits, dim=-1)
    return InducedTargetCurve(
        p_y=p_y,
        p=p_model,
        q=q,
        q_y=q[:, label],
        q_other=q[:, other],
        p_other=p_model[:, other],
        grad=p_model - q,
        q_sum=q.sum(-1),
        label=label,
        other=other,
    )


def p_loss_closed_form(p_y: Tensor, p_other: Tensor) -> tuple[Tensor, Tensor]:
    """Appendix D, Eq. 16: ``Q_y = 2p_y − p_y²`` and ``Q_k = (1 − p_y) p_k`` for the p-loss/DFT."""
    return 2.0 * p_y - p_y**2, (1.0 - p_y) * p_other
