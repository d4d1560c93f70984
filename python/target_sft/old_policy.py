"""Proximal SFT's old policy from the training run itself: :class:`OldPolicyStore` and
:class:`OldPolicyCallback` (docs/HF.md, "Proximal SFT: the old policy").

Proximal SFT's ratio ``r = π_θ(y) / π_old(y)`` needs the old policy's log-prob of every label.
Instead of a second model in memory, the trainer records, as batches pass through
``compute_loss``, the current policy's (detached) log-prob of each supervised label, per sample
key; the next time the sample comes (the next epoch), those are its ``old_logprobs``. So π_old of
a sample is the policy that last trained on it. A sample seen for the first time gets the current
policy's own log-probs (``r = 1``: the policy that produced the batch is π_old, as at PSFT's first
update on fresh data).

* :func:`label_logprobs` / :func:`label_logprobs_from_hidden`: the label log-probs ``[B, L]``
  (aligned with ``labels``), computed in row chunks, never an ``N × V`` float32 buffer.
* :class:`OldPolicyStore`: sample key → float32 array of that sample's label log-probs over its
  supervised positions, in the order the batch lays them out (row-major; ``sequence_ids`` says
  which sample a position belongs to). 4 bytes per supervised token, on every rank.
* :class:`OldPolicyCallback`: a ``transformers.TrainerCallback`` holding the store: after every
  optimizer step it shares the step's new records between ranks (DDP: samples change ranks
  between epochs), and it saves the store with every checkpoint (``old_policy_logprobs.npz``);
  ``TargetSFTTrainer`` restores it on ``train(resume_from_checkpoint=...)``.

This module imports ``transformers`` (``import target_sft`` does not).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import TrainerCallback

from target_sft.cache import Key
from target_sft.kernels.contract import StatRequest, compute_dtype
from target_sft.kernels.reference import fused_row_stats, row_stats

__all__ = [
    "OLD_POLICY_FILE",
    "OldPolicyCallback",
    "OldPolicyStore",
    "label_logprobs",
    "label_logprobs_from_hidden",
]

#: the store's file inside a checkpoint directory
OLD_POLICY_FILE = "old_policy_logprobs.npz"
_IGNORE_INDEX = -100


def _supervised(labels: Tensor, ignore_index: int) -> Tensor:
    """``[B, L]`` mask of the positions the loss trains on: a label, and ``t ≥ 1`` (HF's shift:
    nothing predicts position 0)."""
    mask = labels != ignore_index
    mask[:, 0] = False
    return mask


def _rows(labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(b, t, y)`` of the supervised positions: the logits of row ``(b, t − 1)`` predict
    ``y = labels[b, t]``."""
    b, t = _supervised(labels, ignore_index).nonzero(as_tuple=True)
    return b, t, labels[b, t].long()


@torch.no_grad()
def label_logprobs(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = _IGNORE_INDEX,
    chunk_elements: int | None = None,
) -> Tensor:
    """The detached log-prob ``log π_θ(labels[b, t])`` at every supervised position of a batch
    (label-aligned ``[B, L]``, 0 elsewhere), from the model's logits with HF's shift (row
    ``t − 1`` predicts ``labels[t]``), by the losses' chunked sweep (no ``[N, V]`` float32
    buffer: at most ``chunk_elements`` logits at a time).

    Args:
        logits: ``[B, L, V]``.
        labels: ``[B, L]`` (``ignore_index`` where unsupervised).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"label_logprobs needs logits [B, L, V] and labels [B, L], got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    out = torch.zeros(labels.shape, dtype=compute_dtype(logits.dtype), device=logits.device)
    b, t, y = _rows(labels, ignore_index)
    if b.numel():
        st = row_stats(logits[b, t - 1], y, None, StatRequest(), chunk_elements)
        out[b, t] = st.z_label - st.lse
    return out


@torch.no_grad()
def label_logprobs_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    softcap: float | None = None,
    ignore_index: int = _IGNORE_INDEX,
    chunk_elements: int | None = None,
) -> Tensor:
    """:func:`label_logprobs` of the logits ``softcap·tanh((hidden @ weight.T + bias)/softcap)``
    without building them (the fused-linear sweep: ``chunk_elements`` logits at a time; what the
    trainer uses with ``fused_linear=True``).

    Args:
        hidden: the last hidden states ``[B, L, H]``.
        weight: the LM head's weight ``[V, H]`` (``bias``: ``[V]``).
        labels: ``[B, L]``.
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"label_logprobs_from_hidden needs hidden [B, L, H] and labels [B, L], got "
            f"{tuple(hidden.shape)} and {tuple(labels.shape)}"
        )
    out = torch.zeros(labels.shape, dtype=compute_dtype(weight.dtype), device=hidden.device)
    b, t, y = _rows(labels, ignore_index)
    if b.numel():
        h = hidden[b, t - 1].detach()
        every = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
        st = fused_row_stats(
            h,
            weight.detach(),
            None if bias is None else bias.detach(),
            y,
            None,
            every,
            StatRequest(),
            softcap=softcap,
            chunk_elements=chunk_elements,
        )
        out[b, t] = st.z_label - st.lse
    return out


def _key_json(key: Key) -> list[Any]:
    return ["i", int(key)] if isinstance(key, (int, np.integer)) else ["s", str(key)]


def _key_from_json(item: Sequence[Any]) -> Key:
    kind, value = item
    return int(value) if kind == "i" else str(value)


class OldPolicyStore:
    """Label log-probs of the old policy per sample key (module docstring).

    ``store[key]`` is a float32 array holding the sample's label log-probs at its supervised
    positions, in the order a batch lays them out (the positions ``(b, t)`` with
    ``sequence_ids[b, t]`` = the sample's index and ``labels[b, t] != -100``, ``t ≥ 1``, row by
    row). Memory: 4 bytes per supervised token (plus about 100 bytes per sample), on every rank.

    To start from a fixed policy (PSFT's π_old held for a whole run) instead of the trained one,
    :meth:`record_batch` that policy's :func:`label_logprobs` over the training set before
    training, and give the trainer ``OldPolicyCallback(store, frozen=True)`` (docs/HF.md).
    """

    def __init__(self) -> None:
        self._data: dict[Key, np.ndarray] = {}
        self._pending: list[tuple[Key, np.ndarray]] = []

    # ---- mapping ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __getitem__(self, key: Key) -> np.ndarray:
        return self._data[key]

    def keys(self) -> Iterable[Key]:
        return self._data.keys()

    @property
    def nbytes(self) -> int:
        """Bytes of the stored log-probs (4 per supervised token)."""
        return sum(a.nbytes for a in self._data.values())

    def __repr__(self) -> str:
        return f"OldPolicyStore({len(self)} samples, {self.nbytes} bytes)"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OldPolicyStore):
            return NotImplemented
        return self._data.keys() == other._data.keys() and all(
            np.array_equal(a, other._data[k]) for k, a in self._data.items()
        )

    def record(self, key: Key, logprobs: Any) -> None:
        """Store one sample's label log-probs (a copy, float32), replacing what it had."""
        a = np.array(logprobs, dtype=np.float32).reshape(-1)
        self._data[key] = a
        self._pending.append((key, a))

    # ---- batches ---------------------------------------------------------------------------

    @staticmethod
    def _layout(
        batch: Mapping[str, Any], ignore_index: int
    ) -> tuple[list[Key], Tensor, np.ndarray, list[np.ndarray]]:
        """``(sample_keys, supervised mask [B, L], sample of each supervised position,
        positions of each sample)`` of a batch (row-major order of the supervised positions)."""
        keys = batch.get("sample_keys")
        labels = batch.get("labels")
        if keys is None:
            raise ValueError(
                "the batch has no 'sample_keys': the old-policy store needs each sample's cache "
                "key; collate with TargetSFTCollator(..., return_keys=True) (TargetSFTTrainer "
                "turns it on for its TargetSFTCollator)"
            )
        if labels is None:
            raise ValueError("the batch has no 'labels'")
        keys = list(keys)
        mask = _supervised(labels, ignore_index)
        sids = batch.get("sequence_ids")
        if sids is None:
            if batch.get("cu_seqlens") is not None:
                raise ValueError(
                    "a packed batch without 'sequence_ids': the old-policy store cannot tell "
                    "which sample each position belongs to (TargetSFTCollator emits them)"
                )
            if len(keys) != int(labels.shape[0]):
                raise ValueError(
                    f"a padded batch without 'sequence_ids' must have one row per sample: "
                    f"{int(labels.shape[0])} rows but {len(keys)} sample_keys"
                )
            sids = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)
        elif tuple(sids.shape) != tuple(labels.shape):
            raise ValueError(
                f"sequence_ids has shape {tuple(sids.shape)} but labels {tuple(labels.shape)}"
            )
        else:
            # every sample of a batch has positions in it, numbered 0..n-1: keys and tensors
            # line up only if the ids name exactly len(keys) samples (a batch split or
            # dispatched by code that does not know sample_keys would pair them wrongly)
            n_items = int(sids.max().item()) + 1 if sids.numel() else 0
            if n_items != len(keys):
                raise ValueError(
                    f"the batch has {len(keys)} sample_keys but its sequence_ids name {n_items} "
                    "samples: the keys do not line up with the tensors (was the batch split or "
                    "dispatched by code that does not know 'sample_keys', e.g. accelerate's "
                    "dispatch_batches or split_batches?); the old-policy store needs the "
                    "collator's batch as it is"
                )
        owner = sids[mask].cpu().numpy().astype(np.int64)
        if owner.size and (owner.min() < 0 or owner.max() >= len(keys)):
            bad = int(owner.min() if owner.min() < 0 else owner.max())
            raise ValueError(
                f"sequence_ids holds {bad} at a supervised position, but the batch has "
                f"{len(keys)} sample_keys"
            )
        order = np.argsort(owner, kind="stable")
        bounds = np.searchsorted(owner[order], np.arange(len(keys) + 1))
        where = [order[bounds[i] : bounds[i + 1]] for i in range(len(keys))]
        return keys, mask, owner, where

    def old_logprobs(
        self,
        batch: Mapping[str, Any],
        current: Tensor,
        *,
        ignore_index: int = _IGNORE_INDEX,
    ) -> Tensor:
        """``old_logprobs`` ``[B, L]`` for a batch (``sample_keys``, ``labels``,
        ``sequence_ids``): each stored sample's log-probs at its supervised positions, and
        ``current`` (the policy's own label log-probs, :func:`label_logprobs`) for samples not
        in the store (``r = 1``) and elsewhere.

        Raises:
            ValueError: a stored array whose length is not the sample's number of supervised
                positions in this batch (naming the key; e.g. ``max_length`` changed since it
                was recorded); no ``sample_keys``; ``sequence_ids`` that do not fit them.
        """
        keys, mask, _, where = self._layout(batch, ignore_index)
        flat = current.detach()[mask].cpu().numpy().copy()
        hit = False
        for key, pos in zip(keys, where, strict=True):
            old = self._data.get(key)
            if old is None:
                continue
            if old.size != pos.size:
                raise ValueError(
                    f"the old-policy log-probs stored for sample {key!r} cover {old.size} "
                    f"supervised tokens, but the sample has {pos.size} in this batch: its tokens "
                    "or labels changed since they were recorded (max_length, truncation, another "
                    "cache); start the store afresh (a new OldPolicyStore, or train without "
                    "resuming)"
                )
            flat[pos] = old
            hit = True
        out = current.detach().clone()
        if hit:
            out[mask] = torch.from_numpy(flat).to(device=out.device, dtype=out.dtype)
        return out

    def record_batch(
        self, batch: Mapping[str, Any], logprobs: Tensor, *, ignore_index: int = _IGNORE_INDEX
    ) -> None:
        """Record every sample of a batch: its entries of ``logprobs`` (``[B, L]``, aligned with
        ``labels``, e.g. :func:`label_logprobs` of the policy) at its supervised positions."""
        keys, mask, _, where = self._layout(batch, ignore_index)
        flat = logprobs.detach()[mask].float().cpu().numpy()
        for key, pos in zip(keys, where, strict=True):
            self.record(key, flat[pos])

    # ---- ranks -----------------------------------------------------------------------------

    def sync(self) -> None:
        """Share the records made since the last call with every rank (``torch.distributed``,
        when initialised with more than one process): afterwards every rank holds the same
        store. Call it on every rank at the same point (the callback does, after every
        optimizer step)."""
        pending, self._pending = self._pending, []
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, pending)
        for records in gathered:  # in rank order: the same result on every rank
            for key, a in records:
                self._data[key] = np.asarray(a, dtype=np.float32)

    # ---- files -----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the store to ``path`` (an ``.npz`` with no pickled objects), atomically."""
        path = Path(path)
        keys = list(self._data)
        arrays = [self._data[k] for k in keys]
        offsets = np.zeros(len(keys) + 1, dtype=np.int64)
        np.cumsum([a.size for a in arrays], out=offsets[1:])
        values = np.concatenate(arrays) if arrays else np.zeros(0, np.float32)
        names = json.dumps([_key_json(k) for k in keys]).encode()
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, values=values, offsets=offsets, keys=np.frombuffer(names, np.uint8))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> OldPolicyStore:
        """A store written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as z:
            values, offsets = z["values"], z["offsets"]
            keys = [_key_from_json(k) for k in json.loads(z["keys"].tobytes().decode())]
        if offsets.size != len(keys) + 1 or int(offsets[-1]) != values.size:
            raise ValueError(f"{path}: not an old-policy store (offsets do not fit the values)")
        store = cls()
        for i, key in enumerate(keys):
            store._data[key] = values[offsets[i] : offsets[i + 1]].astype(np.float32)
        return store

    def load_state_from(self, other: OldPolicyStore) -> None:
        """Replace this store's records by ``other``'s."""
        self._data = dict(other._data)
        self._pending = []


class OldPolicyCallback(TrainerCallback):
    """The trainer side of the old-policy store (module docstring).

    ``TargetSFTTrainer`` adds one by itself when its loss needs ``old_logprobs`` (Proximal SFT)
    and none was given; pass your own (``callbacks=[OldPolicyCallback(store)]``) to start from a
    filled store.

    Args:
        store: the store (default: a new, empty one).
        frozen: never record: π_old stays what ``store`` holds (a fixed policy; samples not in
            it get ``r = 1``), and checkpoints still hold it.
    """

    def __init__(self, store: OldPolicyStore | None = None, *, frozen: bool = False) -> None:
        self.store = OldPolicyStore() if store is None else store
        self.frozen = bool(frozen)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Share the step's records between ranks."""
        self.store.sync()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the store into the checkpoint just saved (by the process that saves)."""
        if not getattr(args, "should_save", True):
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            raise FileNotFoundError(
                f"OldPolicyCallback: the checkpoint {folder} to save the old-policy store in does "
                "not exist (a hyper-parameter search's run directory is not supported)"
            )
        self.store.save(folder / OLD_POLICY_FILE)

    def restore(self, checkpoint: str | os.PathLike[str]) -> None:
        """Load the store saved in ``checkpoint`` (what the trainer does on resume).

        Raises:
            FileNotFoundError: the checkpoint holds no store (saved without this callback): π_old
                of every sample trained on before it would silently become the current policy.
        """
        path = Path(checkpoint) / OLD_POLICY_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist: the checkpoint {checkpoint} was saved without the "
                "old-policy store that Proximal SFT's old_logprobs come from, so resuming from it "
                "would change π_old; resume from a checkpoint saved with it, or start the run "
                "afresh"
            )
        self.store.load_state_from(OldPolicyStore.load(path))
