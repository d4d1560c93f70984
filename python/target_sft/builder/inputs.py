"""The dataset as the builder reads it: items (key, token ids, labels) from an
:class:`~target_sft.sft_data.SFTSource`, the planning pass that reads and checks every sample
once before the teacher loads (:class:`Scan`), and the second pass that reads a rank's batches
again, checked against the first (:func:`read_batches`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from target_sft import _core
from target_sft.cache import IGNORE_INDEX
from target_sft.errors import CacheInputError
from target_sft.sft_data import SFTSource, tokenize_sft

__all__ = [
    "Item",
    "Scan",
    "hash_ids",
    "make_item",
    "read_batches",
    "scan_source",
    "tokenize_prompt_response",
]


@dataclass
class Item:
    index: int
    key: int | str
    input_ids: np.ndarray  # int32 [T]
    labels: np.ndarray  # int32 [T]

    @property
    def n_rows(self) -> int:
        return int(np.count_nonzero(self.labels[1:] != IGNORE_INDEX))


def make_item(source: SFTSource, index: int, row: Any) -> Item:
    """The item of row ``index``: its key, tokens and labels as ``source`` makes them
    (:func:`target_sft.sft_data.prepare_row`: any row format, checked, naming the row)."""
    return Item(index, *source.prepare(index, row))


def hash_ids(a: np.ndarray) -> int:
    """XXH3-64 of int32 ids (the records' ``token_hash``, FORMAT.md §7)."""
    return int(_core.token_hash(a))


@dataclass
class Scan:
    """What the planning pass learnt about every sample (no token ids kept)."""

    keys: list[int | str]
    lengths: np.ndarray  # int64 [N]
    n_supervised: np.ndarray  # int64 [N]: rows (labels[t] != -100, t >= 1)
    token_hash: np.ndarray  # uint64 [N]
    labels_hash: np.ndarray  # uint64 [N]
    max_id: np.ndarray  # int64 [N]: the largest input id
    max_id_at: np.ndarray  # int64 [N]: its first position

    def __len__(self) -> int:
        return len(self.keys)

    def digest(self) -> str:
        """SHA-256 of every sample's key, token hash and labels hash, in order: what every rank
        must agree on (each plans the whole dataset and takes its own share of the plan)."""
        h = hashlib.sha256(json.dumps(self.keys).encode())
        h.update(self.token_hash.tobytes())
        h.update(self.labels_hash.tobytes())
        return h.hexdigest()

    def check_same(self, it: Item) -> None:
        """An item read again for the teacher pass is the one that was planned."""
        i = it.index
        if (
            i >= len(self.keys)
            or it.key != self.keys[i]
            or hash_ids(it.input_ids) != int(self.token_hash[i])
            or hash_ids(it.labels) != int(self.labels_hash[i])
        ):
            raise CacheInputError(
                f"dataset item {i} (key {it.key!r}) differs between two passes over the dataset "
                "(planning, then the teacher); the dataset must yield the same samples each time "
                "it is iterated (no shuffling or random augmentation)"
            )


def scan_source(source: SFTSource) -> Scan:
    """The planning pass, before the teacher loads: every row is read once
    (:meth:`SFTSource.rows <target_sft.sft_data.SFTSource.rows>`: keys unique, rows counted),
    checked and tokenised, and its length, supervised count, hashes and largest id are kept."""
    keys: list[int | str] = []
    cols: list[list[int]] = [[], [], [], [], [], []]
    for i, _key, row in source.rows():
        it = make_item(source, i, row)
        keys.append(it.key)
        top = int(np.argmax(it.input_ids))
        for c, v in zip(
            cols,
            (
                len(it.input_ids),
                it.n_rows,
                hash_ids(it.input_ids),
                hash_ids(it.labels),
                int(it.input_ids[top]),
                top,
            ),
            strict=True,
        ):
            c.append(v)
    ln, ns, th, lh, mx, at = cols
    scan = Scan(
        keys,
        np.asarray(ln, np.int64),
        np.asarray(ns, np.int64),
        np.asarray(th, np.uint64),
        np.asarray(lh, np.uint64),
        np.asarray(mx, np.int64),
        np.asarray(at, np.int64),
    )
    if not scan.n_supervised.any():
        raise CacheInputError(
            f"none of the {len(scan):,} samples has a supervised position (a label other than "
            "-100 at a position t >= 1): there is nothing to cache. Check the labels (the "
            "prompt/assistant masking) of the dataset"
        )
    return scan


def read_batches(source: SFTSource, scan: Scan, batches: list[list[int]]) -> Iterator[list[Item]]:
    """The items of ``batches`` (this rank's), read again from ``source`` and checked against
    the planning pass. A sequence is indexed directly; an iterable is walked once more."""
    if hasattr(source, "__getitem__"):
        for b in batches:
            items = [make_item(source, i, source[i]) for i in b]
            for it in items:
                scan.check_same(it)
            yield items
        return
    mine = {i for b in batches for i in b}
    got: dict[int, Item] = {}
    nb = 0
    for i, row in enumerate(source):
        if i in mine:
            it = make_item(source, i, row)
            scan.check_same(it)
            got[i] = it
        # the batches of a window are complete once its last sample is read
        while nb < len(batches) and max(batches[nb]) <= i:
            yield [got.pop(i) for i in batches[nb]]
            nb += 1
    if nb < len(batches):
        raise CacheInputError(
            f"the dataset yielded fewer samples on its second pass than on the first "
            f"({len(scan):,}); it must yield the same samples each time it is iterated"
        )


def tokenize_prompt_response(tokenizer: Any, prompt: str, response: str) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` for one prompt/response pair: :func:`tokenize_sft` of
    ``{"prompt": prompt, "response": response}`` (with a chat template, a user turn and an
    assistant turn; without one, plain-text prompt/completion)."""
    return tokenize_sft({"prompt": prompt, "response": response}, tokenizer)
