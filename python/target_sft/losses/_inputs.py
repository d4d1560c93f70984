"""The loss inputs: :class:`LossInputs` (the per-token tensors), their validation, flattening and
HF-style shifting (:func:`prepare` → :class:`FlatBatch`).

With ``[B, L, V]`` logits and ``[B, L]`` labels the loss shifts exactly as HF's ``ForCausalLMLoss``:
the labels are padded on the right with ``ignore_index`` and shifted left by one, so logits row
``(b, t)`` predicts ``labels[b, t + 1]`` and the last position of every sequence is unsupervised.
The logits themselves are only *viewed* as ``[B·L, V]`` (no copy). Every tensor aligned with the
labels (teacher top-k, per-token weights, reference / old-policy log-probs) is shifted the same way.
With ``[N, V]`` logits and ``[N]`` labels nothing is shifted.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from ..kernels.contract import compute_dtype
from ._validate import (
    check_labels,
    check_logits,
    check_per_token,
    check_teacher,
    first_index,
    fmt_index,
)

__all__ = ["LOSS_INPUT_NAMES", "FlatBatch", "LossInputs", "prepare"]


@dataclass(frozen=True)
class LossInputs:
    """The tensors a loss takes besides the logits and the labels (every one optional).

    Which ones a loss needs depends on its trust and residual choices (docs/LOSSES.md). All are
    aligned with ``labels`` (``[B, L, ...]`` or ``[N, ...]``; ``teacher_ids[b, t]`` belongs to
    ``labels[b, t]``) except the per-sequence ones. The field names are the keyword arguments of
    every loss call and the batch keys a trainer routes to the loss (:data:`LOSS_INPUT_NAMES`).
    """

    #: teacher / reference top-k ids ``[..., K]`` (integer, ``-1`` pads)
    teacher_ids: Tensor | None = None
    #: their log-probs ``[..., K]`` (log-softmax over the full vocabulary, ``-inf`` pads)
    teacher_logprobs: Tensor | None = None
    #: per-token weights (CFT's critical-token mask, …)
    token_weights: Tensor | None = None
    #: per-sequence weights ``[B]`` (``[N, V]`` logits: indexed by ``sequence_ids``)
    sequence_weights: Tensor | None = None
    #: ``[N]`` sequence index of each row, for ``[N, V]`` logits
    sequence_ids: Tensor | None = None
    #: reference-model log-prob of each label (iw-SFT)
    ref_logprobs: Tensor | None = None
    #: old-policy log-prob of each label (Proximal SFT)
    old_logprobs: Tensor | None = None

    def as_dict(self) -> dict[str, Tensor | None]:
        """``{name: tensor or None}`` in field order (the keyword arguments of a loss call)."""
        return {name: getattr(self, name) for name in LOSS_INPUT_NAMES}


#: the field names of :class:`LossInputs`, in order
LOSS_INPUT_NAMES: tuple[str, ...] = tuple(f.name for f in fields(LossInputs))


@dataclass
class FlatBatch:
    """The loss inputs flattened to rows (one row per logit vector), labels already aligned."""

    logits: Tensor
    labels: Tensor
    mask: Tensor
    safe_labels: Tensor
    vocab: int
    ignore_index: int
    lead_shape: tuple[int, ...]
    shifted: bool
    cdt: torch.dtype
    teacher_ids: Tensor | None = None
    teacher_logprobs: Tensor | None = None
    token_weights: Tensor | None = None
    ref_logprobs: Tensor | None = None
    old_logprobs: Tensor | None = None
    sequence_index: Tensor | None = None
    num_sequences: int | None = None
    sequence_weights: Tensor | None = None
    check: bool = True

    @property
    def n_rows(self) -> int:
        return int(self.labels.shape[0])

    def label_index(self, row: int) -> tuple[int, ...]:
        """Index, in the caller's label-aligned tensors, of the label that row ``row`` predicts."""
        if not self.shifted:
            return (row,)
        length = self.lead_shape[1]
        return (row // length, row % length + 1)

    def logits_index(self, row: int) -> tuple[int, ...]:
        """Index of row ``row`` in the caller's logits (without the vocabulary dimension)."""
        if not self.shifted:
            return (row,)
        length = self.lead_shape[1]
        return (row // length, row % length)

    def support(self) -> tuple[Tensor, Tensor]:
        """``(ids clamped to valid indices, validity mask)`` of the teacher support."""
        if self.teacher_ids is None:
            raise ValueError("this loss needs teacher_ids and teacher_logprobs")
        valid = self.teacher_ids >= 0
        return self.teacher_ids.clamp_min(0), valid

    def require(self, name: str, who: str) -> Tensor:
        """A per-token / per-sequence input that ``who`` cannot do without."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"{who} needs {name}, which was not given")
        return value

    def check_finite_supervised(self, name: str, values: Tensor) -> None:
        """``values`` ([N]) must be finite at supervised rows (index reported in caller terms)."""
        if not self.check:
            return
        row = first_index(~torch.isfinite(values) & self.mask)
        if row is not None:
            r = row[0]
            raise ValueError(
                f"{name}[{fmt_index(self.label_index(r))}] = {values[r].item()} is not finite at a "
                "supervised position"
            )


def _shift(t: Tensor, pad_value: float | int) -> Tensor:
    """HF shift of a label-aligned tensor ``[B, L, ...]``: drop position 0, pad one at the end."""
    pad = torch.full_like(t[:, :1], pad_value)
    return torch.cat([t[:, 1:], pad], dim=1)


def prepare(
    logits: Tensor,
    labels: Tensor,
    inputs: LossInputs,
    *,
    ignore_index: int = -100,
    check: bool = True,
    flat_logits: Tensor | None = None,
) -> FlatBatch:
    """Validate and flatten the inputs (see the module docstring for the alignment contract).

    ``logits`` may be a stand-in with the logits' shape, dtype and device (zero strides: only its
    shape is read) when the logits are never materialised; ``flat_logits`` is an already flattened
    ``[N, V]`` alias of ``logits`` (to avoid a second copy when ``logits`` cannot be viewed as
    ``[N, V]``).
    """
    teacher_ids, teacher_logprobs = inputs.teacher_ids, inputs.teacher_logprobs
    sequence_ids, sequence_weights = inputs.sequence_ids, inputs.sequence_weights
    check_logits(logits)
    check_labels(labels, logits, ignore_index, values=check)
    vocab = int(logits.shape[-1])
    shifted = logits.dim() == 3
    cdt = compute_dtype(logits.dtype)
    if (teacher_ids is None) != (teacher_logprobs is None):
        missing = "teacher_logprobs" if teacher_logprobs is None else "teacher_ids"
        raise ValueError(f"{missing} is missing: pass both teacher_ids and teacher_logprobs")
    if teacher_ids is not None and teacher_logprobs is not None:
        check_teacher(teacher_ids, teacher_logprobs, labels, vocab, values=check)
    per_token = {
        "token_weights": inputs.token_weights,
        "ref_logprobs": inputs.ref_logprobs,
        "old_logprobs": inputs.old_logprobs,
    }
    for name, t in per_token.items():
        if t is not None:
            check_per_token(name, t, labels)

    lead_shape = tuple(int(s) for s in logits.shape[:-1])
    z = logits.reshape(-1, vocab) if flat_logits is None else flat_logits
    labels = labels.long()
    if shifted:
        labels = _shift(labels, ignore_index)
        if teacher_ids is not None and teacher_logprobs is not None:
            teacher_ids = _shift(teacher_ids, -1)
            teacher_logprobs = _shift(teacher_logprobs, float("-inf"))
        per_token = {k: (None if t is None else _shift(t, 0)) for k, t in per_token.items()}
    flat_labels = labels.reshape(-1)
    mask = flat_labels != ignore_index
    safe = torch.where(mask, flat_labels, torch.zeros_like(flat_labels))

    batch = FlatBatch(
        logits=z,
        labels=flat_labels,
        mask=mask,
        safe_labels=safe,
        vocab=vocab,
        ignore_index=ignore_index,
        lead_shape=lead_shape,
        shifted=shifted,
        cdt=cdt,
        check=check,
    )
    if teacher_ids is not None and teacher_logprobs is not None:
        k = int(teacher_ids.shape[-1])
        batch.teacher_ids = teacher_ids.reshape(-1, k).long()
        batch.teacher_logprobs = teacher_logprobs.reshape(-1, k).to(cdt)
    for name, t in per_token.items():
        if t is not None:
            setattr(batch, name, t.reshape(-1).to(cdt))

    # Sequence structure (for sequence-level weights such as iw-SFT).
    if shifted:
        b, length = lead_shape
        batch.sequence_index = torch.arange(b, device=z.device).repeat_interleave(length)
        batch.num_sequences = b
        if sequence_ids is not None:
            raise ValueError(
                "sequence_ids is only for [N, V] logits; with [B, L, V] rows of b are one sequence"
            )
    elif sequence_ids is not None:
        check_per_token("sequence_ids", sequence_ids, flat_labels)
        if sequence_ids.is_floating_point():
            raise ValueError(f"sequence_ids must be an integer tensor, got {sequence_ids.dtype}")
        sid = sequence_ids.long()
        if check:
            idx = first_index(sid < 0)
            if idx is not None:
                raise ValueError(
                    f"sequence_ids[{fmt_index(idx)}] = {int(sid[idx].item())} is negative"
                )
        batch.sequence_index = sid
        batch.num_sequences = int(sid.max().item()) + 1 if sid.numel() else 0
    if sequence_weights is not None:
        if batch.sequence_index is None or batch.num_sequences is None:
            raise ValueError(
                "sequence_weights with [N, V] logits needs sequence_ids ([N]) to map tokens to "
                "sequences"
            )
        if not isinstance(sequence_weights, Tensor) or sequence_weights.dim() != 1:
            shape = tuple(sequence_weights.shape) if isinstance(sequence_weights, Tensor) else "?"
            raise ValueError(f"sequence_weights must be a 1-D tensor, got shape {shape}")
        if shifted and sequence_weights.shape[0] != batch.num_sequences:
            raise ValueError(
                f"sequence_weights has shape {tuple(sequence_weights.shape)} but logits has "
                f"{batch.num_sequences} sequences: expected shape ({batch.num_sequences},)"
            )
        if not shifted and sequence_weights.shape[0] < batch.num_sequences:
            raise ValueError(
                f"sequence_weights has shape {tuple(sequence_weights.shape)} but sequence_ids goes "
                f"up "
                f"to {batch.num_sequences - 1}"
            )
        batch.sequence_weights = sequence_weights.to(device=z.device, dtype=cdt)
    return batch
