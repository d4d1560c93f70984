"""The loss inputs: :class:`LossInputs` (the per-token tensors), their validation, flattening and
HF-style shifting (:func:`prepare` → :class:`FlatBatch`).

With ``[B, L, V]`` logits and ``[B, L]`` labels the loss shifts exactly as HF's ``ForCausalLMLoss``:
the labels are padded on the right with ``ignore_index`` and shifted left by one, so logits row
``(b, t)`` predicts ``labels[b, t + 1]`` and the last position of every sequence is unsupervised.
The logits themselves are only *viewed* as ``[B·L, V]`` (no copy). Every tensor aligned with the
labels (teacher / reference top-k, per-token weights, reference / old-policy label log-probs,
``sequence_ids``) is shifted the same way.
With ``[N, V]`` logits and ``[N]`` labels nothing is shifted.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from ..kernels.contract import compute_dtype
from ._validate import (
    check_labels,
    check_logits,
    check_per_token,
    check_sequence_ids,
    check_support,
    first_index,
    fmt_index,
)

__all__ = [
    "DEPRECATED_INPUT_NAMES",
    "LOSS_INPUT_NAMES",
    "SOURCES",
    "FlatBatch",
    "LossInputs",
    "prepare",
    "take_deprecated_inputs",
]

#: the sparse distributions a batch can carry (each as ``{source}_ids`` / ``{source}_logprobs``,
#: the top-k of a cache): the teacher's and the reference model's
SOURCES: tuple[str, ...] = ("teacher", "reference")


#: what to pass as ``sequence_ids``, said by the errors about it
_SEQUENCE_IDS_HINT = (
    "(the collator's batch['sequence_ids']; for rows of one sample each, "
    "torch.arange(B)[:, None].expand(B, L))"
)


@dataclass(frozen=True)
class LossInputs:
    """The tensors a loss takes besides the logits and the labels (every one optional).

    Which ones a loss needs depends on its trust and residual choices (docs/LOSSES.md). All are
    aligned with ``labels`` (``[B, L, ...]`` or ``[N, ...]``; ``teacher_ids[b, t]`` belongs to
    ``labels[b, t]``) except ``sequence_weights`` (one per sample). The field names are the
    keyword arguments of every loss call and the batch keys a trainer routes to the loss
    (:data:`LOSS_INPUT_NAMES`); :data:`DEPRECATED_INPUT_NAMES` lists old keyword names the calls
    still accept.
    """

    #: teacher top-k ids ``[..., K]`` (integer, ``-1`` pads)
    teacher_ids: Tensor | None = None
    #: their log-probs ``[..., K]`` (log-softmax over the full vocabulary, ``-inf`` pads)
    teacher_logprobs: Tensor | None = None
    #: per-token weights (CFT's critical-token mask, …)
    token_weights: Tensor | None = None
    #: per-sample weights ``[S]``, indexed by ``sequence_ids`` (without it: one per row of
    #: ``[B, L, V]`` logits)
    sequence_weights: Tensor | None = None
    #: the sample each label belongs to (integer, ``[B, L]`` or ``[N]``; negative only where the
    #: label is ignored): per-sequence terms group tokens by it (packed rows)
    sequence_ids: Tensor | None = None
    #: reference-model top-k ids ``[..., Kr]`` (SFT+KL's and ASFT's anchor; ``-1`` pads)
    reference_ids: Tensor | None = None
    #: their log-probs ``[..., Kr]`` (full-vocabulary log-softmax, ``-inf`` pads)
    reference_logprobs: Tensor | None = None
    #: reference-model log-prob of each label (iw-SFT; formerly ``ref_logprobs``)
    reference_label_logprobs: Tensor | None = None
    #: old-policy log-prob of each label (Proximal SFT)
    old_logprobs: Tensor | None = None

    def as_dict(self) -> dict[str, Tensor | None]:
        """``{name: tensor or None}`` in field order (the keyword arguments of a loss call)."""
        return {name: getattr(self, name) for name in LOSS_INPUT_NAMES}


#: the field names of :class:`LossInputs`, in order
LOSS_INPUT_NAMES: tuple[str, ...] = tuple(f.name for f in fields(LossInputs))

#: old keyword name → its :class:`LossInputs` field; every loss call still accepts the old name
#: (through its ``**kwargs``, not its signature) with a ``DeprecationWarning``
DEPRECATED_INPUT_NAMES: dict[str, str] = {"ref_logprobs": "reference_label_logprobs"}


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside this package's losses and torch (a loss is
    called through ``nn.Module.__call__``), counted from the caller of this function."""
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith(
        ("target_sft.losses", "torch")
    ):
        frame = frame.f_back
        level += 1
    return level


def take_deprecated_inputs(inputs: dict[str, Any], extra: dict[str, Any]) -> None:
    """Move the deprecated keywords of ``extra`` (a call's ``**kwargs``) into ``inputs`` under
    their new names, with a ``DeprecationWarning`` pointing at the user's call; both names given
    is a ``ValueError``. What is left in ``extra`` is the caller's to refuse."""
    for old, new in DEPRECATED_INPUT_NAMES.items():
        if old not in extra:
            continue
        value = extra.pop(old)
        if inputs.get(new) is not None:
            raise ValueError(
                f"both {old} (the deprecated name) and {new} were given: pass only {new}"
            )
        warnings.warn(
            f"the loss input {old!r} is now called {new!r}: pass {new}=... ({old} will be removed)",
            DeprecationWarning,
            stacklevel=_user_stacklevel(),
        )
        inputs[new] = value


@dataclass
class FlatBatch:
    """The loss inputs flattened to rows (one row per logit vector), labels already aligned.

    ``support_source`` names the sparse distribution (``"teacher"`` or ``"reference"``, or
    ``None``) whose support the sweeps read: the loss's residual's
    (:attr:`~target_sft.losses.Residual.source`); :meth:`support` and :meth:`support_logprobs`
    return it by default.
    """

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
    reference_ids: Tensor | None = None
    reference_logprobs: Tensor | None = None
    token_weights: Tensor | None = None
    reference_label_logprobs: Tensor | None = None
    old_logprobs: Tensor | None = None
    #: ``[N]`` sample of each row (valid indices: padding rows point at 0, they are unsupervised)
    sequence_index: Tensor | None = None
    #: the number of samples (``max(sequence_ids) + 1``; computed when first needed:
    #: :meth:`sequences`)
    num_sequences: int | None = None
    sequence_weights: Tensor | None = None
    support_source: str | None = None
    check: bool = True

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

    def _source(self, source: str | None) -> str:
        src = self.support_source if source is None else source
        if src not in SOURCES:
            raise ValueError(f"no sparse support is read by this loss (source = {src!r})")
        return src

    def support(self, source: str | None = None) -> tuple[Tensor, Tensor]:
        """``(ids clamped to valid indices, validity mask)`` of the ``source`` support
        (default: :attr:`support_source`, the one the sweeps read)."""
        src = self._source(source)
        ids = getattr(self, f"{src}_ids")
        if ids is None:
            raise ValueError(f"this loss needs {src}_ids and {src}_logprobs")
        valid = ids >= 0
        return ids.clamp_min(0), valid

    def support_logprobs(self, source: str | None = None) -> Tensor:
        """The ``[N, K]`` log-probs of the ``source`` support (default: :attr:`support_source`)."""
        src = self._source(source)
        lp = getattr(self, f"{src}_logprobs")
        if lp is None:
            raise ValueError(f"this loss needs {src}_ids and {src}_logprobs")
        return lp  # type: ignore[no-any-return]

    def sequences(self, who: str) -> tuple[Tensor, int]:
        """``(sample index of each row [N], number of samples)``, what per-sequence terms group
        by. The count of samples given by ``sequence_ids`` is read from the device once, here, so
        that a batch carrying ``sequence_ids`` costs no sync to a loss that does not use it."""
        if self.sequence_index is None:
            raise ValueError(
                f"{who} is per sequence, and without sequence_ids the loss cannot tell "
                "a row holding one sample from a packed row holding several (it would weight a "
                "packed row as one trajectory): pass sequence_ids, the sample of each token "
                + _SEQUENCE_IDS_HINT
            )
        if self.num_sequences is None:
            idx = self.sequence_index
            self.num_sequences = int(idx.max().item()) + 1 if idx.numel() else 0
            if self.check and self.shifted:
                self._check_one_row_per_sample()
        return self.sequence_index, self.num_sequences

    def _check_one_row_per_sample(self) -> None:
        """With ``[B, L, V]`` logits a sample lies in one row (a packed row holds several
        samples, never the reverse): ``sequence_ids`` that put one sample's supervised tokens in
        two rows (e.g. zeros for a padded batch) would pool their weights, so they are refused."""
        idx, n, length = self.sequence_index, self.num_sequences, self.lead_shape[1]
        assert idx is not None and n is not None
        if n == 0:
            return
        sup = self.mask
        sid = idx[sup]
        row = torch.div(
            torch.arange(idx.numel(), device=idx.device), length, rounding_mode="floor"
        )[sup]
        lo = torch.full((n,), idx.numel(), device=idx.device).scatter_reduce(0, sid, row, "amin")
        hi = torch.full((n,), -1, device=idx.device).scatter_reduce(0, sid, row, "amax")
        bad = first_index((hi >= 0) & (lo != hi))
        if bad is not None:
            s_id = bad[0]
            raise ValueError(
                f"sequence_ids gives sample {s_id} supervised tokens in rows {int(lo[s_id])} and "
                f"{int(hi[s_id])} of the [B, L, V] logits, but a sample lies in one row (a packed "
                "row holds several samples, never the reverse): pass each token's own sample "
                + _SEQUENCE_IDS_HINT
            )

    def require(self, name: str, who: str) -> Tensor:
        """A per-token / per-sequence input that ``who`` cannot do without."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"{who} needs {name}, which was not given")
        return value  # type: ignore[no-any-return]

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
    support_source: str | None = None,
) -> FlatBatch:
    """Validate and flatten the inputs (see the module docstring for the alignment contract).

    ``logits`` may be a stand-in with the logits' shape, dtype and device (zero strides: only its
    shape is read) when the logits are never materialised; ``flat_logits`` is an already flattened
    ``[N, V]`` alias of ``logits`` (to avoid a second copy when ``logits`` cannot be viewed as
    ``[N, V]``). ``support_source`` is the sparse distribution the loss reads (its tensors must
    be given: the caller says what to pass).
    """
    sequence_ids, sequence_weights = inputs.sequence_ids, inputs.sequence_weights
    check_logits(logits)
    check_labels(labels, logits, ignore_index, values=check)
    vocab = int(logits.shape[-1])
    shifted = logits.dim() == 3
    cdt = compute_dtype(logits.dtype)
    sparse: dict[str, tuple[Tensor, Tensor]] = {}
    for source in SOURCES:
        ids, lp = getattr(inputs, f"{source}_ids"), getattr(inputs, f"{source}_logprobs")
        if (ids is None) != (lp is None):
            missing = f"{source}_logprobs" if lp is None else f"{source}_ids"
            raise ValueError(f"{missing} is missing: pass both {source}_ids and {source}_logprobs")
        if ids is not None and lp is not None:
            check_support(source, ids, lp, labels, vocab, values=check)
            sparse[source] = (ids, lp)
    if support_source is not None and support_source not in sparse:
        raise ValueError(f"this loss needs {support_source}_ids and {support_source}_logprobs")
    per_token = {
        "token_weights": inputs.token_weights,
        "reference_label_logprobs": inputs.reference_label_logprobs,
        "old_logprobs": inputs.old_logprobs,
    }
    for name, t in per_token.items():
        if t is not None:
            check_per_token(name, t, labels)
    if sequence_ids is not None:
        check_sequence_ids(sequence_ids, labels, ignore_index, values=check)

    lead_shape = tuple(int(s) for s in logits.shape[:-1])
    z = logits.reshape(-1, vocab) if flat_logits is None else flat_logits
    labels = labels.long()
    if shifted:
        labels = _shift(labels, ignore_index)
        sparse = {
            k: (_shift(ids, -1), _shift(lp, float("-inf"))) for k, (ids, lp) in sparse.items()
        }
        per_token = {k: (None if t is None else _shift(t, 0)) for k, t in per_token.items()}
        if sequence_ids is not None:
            sequence_ids = _shift(sequence_ids, -1)
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
        support_source=support_source,
        check=check,
    )
    for source, (ids, lp) in sparse.items():
        k = int(ids.shape[-1])
        setattr(batch, f"{source}_ids", ids.reshape(-1, k).long())
        setattr(batch, f"{source}_logprobs", lp.reshape(-1, k).to(cdt))
    for name, t in per_token.items():
        if t is not None:
            setattr(batch, name, t.reshape(-1).to(cdt))

    # Sequence structure (per-sequence weights: iw-SFT, SequenceWeightTrust): the tokens group
    # by sample through sequence_ids, which per-sequence terms require (a row of [B, L, V]
    # logits may hold one sample or several packed ones: nothing else tells them apart).
    if sequence_ids is not None:
        sid = sequence_ids.reshape(-1).long()
        batch.sequence_index = sid.clamp_min(0)  # padding rows are unsupervised: any valid index
    if sequence_weights is not None:
        _, n_sequences = batch.sequences("sequence_weights")
        if not isinstance(sequence_weights, Tensor) or sequence_weights.dim() != 1:
            shape = tuple(sequence_weights.shape) if isinstance(sequence_weights, Tensor) else "?"
            raise ValueError(f"sequence_weights must be a 1-D tensor, got shape {shape}")
        n_weights = int(sequence_weights.shape[0])
        if n_weights < n_sequences:
            raise ValueError(
                f"sequence_weights has shape {tuple(sequence_weights.shape)} but sequence_ids goes "
                f"up to {n_sequences - 1}: expected one weight per sample, at least "
                f"({n_sequences},)"
            )
        batch.sequence_weights = sequence_weights.to(device=z.device, dtype=cdt)
    return batch
