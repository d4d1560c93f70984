"""Input checks with error messages that name the tensor and the offending index.

Every check raises :class:`ValueError`. The checks that look at tensor *values* (ranges, NaNs,
duplicates) synchronise with the device once each; pass ``check_inputs=False`` to the losses to skip
them on a hot path once a pipeline is known to be sound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

import torch
from torch import Tensor

__all__ = [
    "REDUCTIONS",
    "check_eta",
    "check_labels",
    "check_logits",
    "check_num_items",
    "check_per_token",
    "check_probability_like",
    "check_reduction",
    "check_sequence_ids",
    "check_support",
    "first_index",
    "fmt_index",
]

REDUCTIONS = ("mean", "sum", "none")


def fmt_index(index: Sequence[int]) -> str:
    """``(3, 17, 5)`` → ``"3, 17, 5"`` (for ``name[3, 17, 5]``)."""
    return ", ".join(str(int(i)) for i in index)


def first_index(mask: Tensor) -> tuple[int, ...] | None:
    """Index of the first ``True`` of ``mask`` (row-major), or ``None``."""
    if mask.numel() == 0 or not bool(mask.any()):
        return None
    return tuple(int(i) for i in mask.nonzero()[0].tolist())


def check_reduction(reduction: str) -> str:
    """``reduction`` must be one of ``mean``, ``sum``, ``none``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction = {reduction!r} is not one of {REDUCTIONS}")
    return reduction


def check_eta(eta: float) -> float:
    """Teacher intensity ``η`` must be a real number in ``[0, 1]``."""
    if isinstance(eta, Tensor):
        if eta.numel() != 1:
            raise ValueError(f"eta must be a scalar, got a tensor of shape {tuple(eta.shape)}")
        eta = float(eta.item())
    if not isinstance(eta, Real) or isinstance(eta, bool):
        raise ValueError(f"eta = {eta!r} must be a real number in [0, 1]")
    value = float(eta)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"eta = {value} is outside [0, 1]")
    return value


def check_probability_like(
    name: str, value: float, *, low: float = 0.0, high: float = 1.0
) -> float:
    """A hyper-parameter that must lie in ``[low, high]``."""
    v = float(value)
    if math.isnan(v) or not low <= v <= high:
        raise ValueError(f"{name} = {v} is outside [{low}, {high}]")
    return v


def check_logits(logits: Tensor) -> None:
    """``logits`` must be a floating tensor ``[B, L, V]`` or ``[N, V]`` with ``V ≥ 1``."""
    if not isinstance(logits, Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() not in (2, 3):
        raise ValueError(
            f"logits has shape {tuple(logits.shape)}: expected [B, L, V] (HF causal LM, shifted "
            "inside) or [N, V] (already aligned with labels)"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if logits.shape[-1] < 1:
        raise ValueError(f"logits has an empty vocabulary dimension: shape {tuple(logits.shape)}")


def check_labels(labels: Tensor, logits: Tensor, ignore_index: int, *, values: bool) -> None:
    """Shape ``logits.shape[:-1]``, integer dtype, values in ``[0, V)`` or ``ignore_index``."""
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    expected = tuple(logits.shape[:-1])
    if tuple(labels.shape) != expected:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but logits has shape {tuple(logits.shape)}: "
            f"expected labels of shape {expected}"
        )
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"labels is on {labels.device} but logits is on {logits.device}")
    if not values:
        return
    vocab = logits.shape[-1]
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    idx = first_index(bad)
    if idx is not None:
        value = int(labels[idx].item())
        raise ValueError(
            f"labels[{fmt_index(idx)}] = {value} is outside the vocabulary [0, {vocab}) and is not "
            f"ignore_index ({ignore_index})"
        )


def check_support(
    source: str,
    ids: Tensor,
    logprobs: Tensor,
    labels: Tensor,
    vocab: int,
    *,
    values: bool,
) -> None:
    """A sparse distribution from a cache (``source``: ``"teacher"`` or ``"reference"``, named
    ``{source}_ids`` / ``{source}_logprobs`` in the messages) aligned with ``labels``
    (``[*labels.shape, K]``): ids in [-1, V) (``-1`` pads), log-probs not NaN / +inf, no token
    twice in one support."""
    id_name, lp_name = f"{source}_ids", f"{source}_logprobs"
    for name, t in ((id_name, ids), (lp_name, logprobs)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != labels.device:
            raise ValueError(f"{name} is on {t.device} but labels is on {labels.device}")
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"{id_name} must be an integer tensor (int32), got {ids.dtype}")
    if not logprobs.is_floating_point():
        raise ValueError(f"{lp_name} must be floating point, got {logprobs.dtype}")
    want = (*labels.shape, "K")
    if ids.dim() != labels.dim() + 1 or tuple(ids.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"{id_name} has shape {tuple(ids.shape)} but labels has shape "
            f"{tuple(labels.shape)}: {source} tensors must be aligned with labels, shape "
            f"[{', '.join(str(s) for s in want)}]"
        )
    if tuple(logprobs.shape) != tuple(ids.shape):
        raise ValueError(
            f"{lp_name} has shape {tuple(logprobs.shape)} but {id_name} has shape "
            f"{tuple(ids.shape)}: they must match"
        )
    if not values or ids.numel() == 0:
        return
    idx = first_index((ids < -1) | (ids >= vocab))
    if idx is not None:
        value = int(ids[idx].item())
        raise ValueError(
            f"{id_name}[{fmt_index(idx)}] = {value} is outside the vocabulary [0, {vocab}); "
            "use -1 for padding (was the cache built with a different tokenizer?)"
        )
    valid = ids >= 0
    idx = first_index(torch.isnan(logprobs) & valid)
    if idx is not None:
        raise ValueError(f"{lp_name}[{fmt_index(idx)}] is NaN")
    idx = first_index((logprobs == float("inf")) & valid)
    if idx is not None:
        raise ValueError(f"{lp_name}[{fmt_index(idx)}] = inf; log-probabilities must be <= 0")
    # Duplicated ids in one support would be counted twice by every residual.
    k = ids.shape[-1]
    if k > 1:
        flat = ids.reshape(-1, k).long()
        ordered, order = flat.sort(dim=-1)
        dup = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
        hit = first_index(dup)
        if hit is not None:
            row, col = hit
            token = int(ordered[row, col + 1].item())
            a, b = sorted((int(order[row, col].item()), int(order[row, col + 1].item())))
            lead = tuple(int(i) for i in torch.unravel_index(torch.tensor(row), ids.shape[:-1]))
            raise ValueError(
                f"{id_name}[{fmt_index(lead)}, :] lists token {token} twice (positions {a} and "
                f"{b}); a {source} support must not repeat a token"
            )


def check_per_token(name: str, t: Tensor, labels: Tensor) -> None:
    """A per-token input aligned with ``labels`` (same shape and device)."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(labels.shape):
        raise ValueError(
            f"{name} has shape {tuple(t.shape)} but labels has shape {tuple(labels.shape)}: "
            f"{name} must be aligned with labels"
        )
    if t.device != labels.device:
        raise ValueError(f"{name} is on {t.device} but labels is on {labels.device}")


def check_num_items(num_items_in_batch: int | float | Tensor | None) -> None:
    """``num_items_in_batch``: a non-negative number or a one-element tensor (not inspected)."""
    if num_items_in_batch is None:
        return
    if isinstance(num_items_in_batch, Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                "num_items_in_batch must be a number or a one-element tensor, got shape "
                f"{tuple(num_items_in_batch.shape)}"
            )
        return
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (Integral, Real)):
        raise ValueError(
            f"num_items_in_batch = {num_items_in_batch!r} must be a number or a tensor"
        )
    if math.isnan(float(num_items_in_batch)) or float(num_items_in_batch) < 0:
        raise ValueError(f"num_items_in_batch = {num_items_in_batch} must be >= 0")


def check_sequence_ids(
    sequence_ids: Tensor, labels: Tensor, ignore_index: int, *, values: bool
) -> None:
    """``sequence_ids``: an integer tensor aligned with ``labels`` (``[B, L]`` or ``[N]``), the
    sample each label belongs to; negative (``-1``: padding) only where ``labels`` is
    ``ignore_index``."""
    check_per_token("sequence_ids", sequence_ids, labels)
    if (
        sequence_ids.is_floating_point()
        or sequence_ids.dtype == torch.bool
        or sequence_ids.is_complex()
    ):
        raise ValueError(f"sequence_ids must be an integer tensor, got {sequence_ids.dtype}")
    if not values:
        return
    idx = first_index((sequence_ids < 0) & (labels != ignore_index))
    if idx is not None:
        raise ValueError(
            f"sequence_ids[{fmt_index(idx)}] = {int(sequence_ids[idx].item())} is negative at a "
            f"supervised position (labels[{fmt_index(idx)}] = {int(labels[idx].item())}): every "
            "supervised label must belong to a sample (negative ids mark padding only)"
        )
