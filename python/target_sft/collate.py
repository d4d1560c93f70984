"""Training batches from the teacher cache: :func:`build_batch` and :class:`TargetSFTCollator` (a
``collate_fn`` for ``torch.utils.data.DataLoader``). :class:`~target_sft.cache.TeacherCacheDataset`
lives beside :class:`~target_sft.cache.CacheSample` in ``cache.py`` and is re-exported here.

A whole batch is built by one native call: with the GIL released, in parallel over samples, each
cached record is decoded straight into its place in the output arrays. The layout (padded or
packed rows, HF label convention, teacher tensors aligned with ``labels``) is specified in
``docs/DATA.md``; the outputs plug into :func:`target_sft.target_sft_loss` as they are::

    ds = TeacherCacheDataset(cache)
    collate = TargetSFTCollator(cache, pad_token_id=tok.pad_token_id, max_length=4096)
    for batch in DataLoader(ds, batch_size=16, shuffle=True, num_workers=4, collate_fn=collate):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = target_sft_loss(logits, batch["labels"], batch["teacher_ids"],
                               batch["teacher_logprobs"], eta=0.5)

This module imports torch only when a collator returns tensors; :func:`build_batch` needs numpy.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from target_sft import _core
from target_sft.cache import (
    CacheRecord,
    CacheSample,
    Key,
    TeacherCache,
    TeacherCacheDataset,  # re-exported: it lived here before it moved beside CacheSample
)
from target_sft.checks import as_int32, check_int
from target_sft.errors import CacheInputError, CacheKeyError
from target_sft.fingerprint import TokenizerCheck

__all__ = ["TargetSFTCollator", "TeacherCacheDataset", "build_batch"]

_ALIGN = 64  # byte alignment of each output inside a shared-memory slot
_I64_MAX = 2**63 - 1  # the native options are int64

BatchItem = CacheSample | CacheRecord | Key | Mapping[str, Any]
"""What a batch is built from: a :class:`CacheSample`, a key of the collator's cache, a dict
with ``"key"`` (and optionally ``"input_ids"`` and ``"labels"``, checked against the record), or
a :class:`CacheRecord` already read."""

OutBuffers = Mapping[str, np.ndarray] | Callable[[str, tuple[int, ...], str], np.ndarray]


def _describe(item: object) -> str:
    text = repr(item)
    return text if len(text) <= 80 else text[:77] + "..."


def _native_item(i: int, item: Any, cache: TeacherCache | None) -> tuple[Any, ...]:
    """Turn one batch item into the tuple ``_core.build_batch`` takes."""
    if isinstance(item, CacheSample):
        return (item.cache._c, item.position)
    if isinstance(item, CacheRecord):
        return (
            item.key,
            item.input_ids,
            item.labels,
            item.topk_ids,
            item.topk_logprobs,
            item.label_logprobs,
            item.label_ranks,
        )
    given: dict[str, np.ndarray] = {}  # input_ids / labels to check against the record
    if isinstance(item, Mapping):
        if "key" not in item:
            raise CacheInputError(
                f"batch item {i} is a dict without a 'key' entry (keys: {sorted(map(str, item))}); "
                "a dict item must carry the cache key of its sample"
            )
        key = item["key"]
        for name in ("input_ids", "labels"):
            if item.get(name) is None:
                continue
            a = as_int32(f"batch item {i}: {name}", item[name])
            if a.ndim != 1:
                raise CacheInputError(
                    f"batch item {i} (key {key!r}): {name} must be 1-D, got shape {a.shape}"
                )
            given[name] = a
    else:
        key = item
    if isinstance(key, np.integer):
        key = int(key)
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise TypeError(
            f"batch item {i} is a {type(item).__name__} ({_describe(item)}); expected a "
            "CacheSample, a CacheRecord, a cache key (int or str) or a dict with 'key'"
        )
    if cache is None:
        raise CacheInputError(
            f"batch item {i} is the key {key!r} but no cache was given to look it up in; pass "
            "cache=... (or yield CacheSample objects, e.g. from TeacherCacheDataset)"
        )
    try:
        position = cache.position(key)
    except CacheKeyError as e:
        raise CacheKeyError(f"batch item {i}: {e}") from None
    if not given:
        return (cache._c, position)
    return (cache._c, position, given.get("input_ids"), given.get("labels"))


def _item_key(item: Any) -> Key:
    """The cache key of a batch item already checked by :func:`_native_item`."""
    if isinstance(item, (CacheSample, CacheRecord)):
        return item.key
    key = item["key"] if isinstance(item, Mapping) else item
    return int(key) if isinstance(key, np.integer) else key


def _native_references(
    items: Sequence[BatchItem], reference: TeacherCache | None
) -> list[tuple[Any, int]] | None:
    """Each item's reference record as ``(native cache, position)`` (``None``: the batch has no
    reference): the item's own (``CacheSample.reference``), else its key's record in
    ``reference``. Either every item has one or none has."""
    attached = [isinstance(it, CacheSample) and it.reference is not None for it in items]
    if reference is None and not any(attached):
        return None
    out: list[tuple[Any, int]] = []
    for i, item in enumerate(items):
        if isinstance(item, CacheSample) and item.reference is not None:
            out.append((item.reference.cache._c, item.reference.position))
            continue
        if reference is None:
            j = attached.index(True)
            raise CacheInputError(
                f"batch item {j} carries a reference record but batch item {i} "
                f"({_describe(item)}) does not, and no reference cache was given to look its key "
                "up in; the items of a batch all have a reference or none has (pass reference=..., "
                "or give every dataset the reference cache)"
            )
        if isinstance(item, CacheRecord):
            raise CacheInputError(
                f"batch item {i} is a CacheRecord (key {item.key!r}): a batch with a reference "
                "is built from CacheSample objects, keys or dicts with 'key' (the records are "
                "decoded, and their alignment checked, by the native builder)"
            )
        key = _item_key(item)
        try:
            out.append((reference._c, reference.position(key)))
        except CacheKeyError:
            raise CacheKeyError(
                f"batch item {i}: key {key!r} is not in the reference cache at {reference.path}; "
                "build the reference cache from the same rows (same keys) as the teacher's"
            ) from None
    return out


def _teacher_slot(where: str, teacher: Any, cache: Any) -> Any:
    """The teacher cache given as ``teacher=`` or by its old name ``cache=`` (not both)."""
    if cache is None:
        return teacher
    if teacher is not None and teacher is not cache:
        raise CacheInputError(
            f"{where}: cache= is the old name of teacher=; pass the teacher cache once, as "
            f"teacher=... (got teacher={teacher!r} and cache={cache!r})"
        )
    return cache


def _options(
    padding: str, max_length: int | None, pad_to_multiple_of: int | None, packing: bool
) -> dict[str, Any]:
    """The layout options as the native ``build_batch`` takes them. Only types are converted
    here (errors naming the argument); every rule (ranges, ``padding`` values, what needs
    ``max_length``) is checked once, by the native core (``BatchOptions::check``)."""
    if not isinstance(padding, str):
        raise CacheInputError(f"padding must be a str, got {padding!r} ({type(padding).__name__})")
    return {
        "packing": bool(packing),
        "max_length": None
        if max_length is None
        else check_int("max_length", max_length, None, _I64_MAX),
        "padding": padding,
        "pad_to_multiple_of": (
            1
            if pad_to_multiple_of is None
            else check_int("pad_to_multiple_of", pad_to_multiple_of, None, _I64_MAX)
        ),
    }


def build_batch(
    items: Sequence[BatchItem],
    *,
    cache: TeacherCache | None = None,
    teacher: TeacherCache | None = None,
    reference: TeacherCache | None = None,
    pad_token_id: int = 0,
    max_length: int | None = None,
    packing: bool = False,
    padding: Literal["longest", "max_length"] = "longest",
    pad_to_multiple_of: int | None = None,
    label_in_support: bool = True,
    threads: int = 0,
    out: OutBuffers | None = None,
) -> dict[str, Any]:
    """Build one training batch (numpy arrays) in a single native call.

    Args:
        items: the samples (see :data:`BatchItem`); they may come from several caches.
        cache: where int/str keys and dict items are looked up (the teacher cache).
        teacher: the same as ``cache`` (its new name; give one of them).
        reference: a reference cache (docs/DATA.md §Several caches): each item's key is looked
            up in it, unless the item is a :class:`CacheSample` carrying its ``reference``
            record; the batch then holds the ``reference_*`` tensors. Without it, a batch has
            a reference when its items carry one (all of them or none).
        pad_token_id: ``input_ids`` value at padding positions.
        max_length: truncate longer samples to this many tokens (their teacher rows with them);
            with ``packing``, the capacity of a row.
        packing: pack several samples per row (greedy first-fit in the given order) instead of
            one sample per row.
        padding: ``"longest"`` (the longest row) or ``"max_length"`` (fixed shape).
        pad_to_multiple_of: round the row length up to a multiple of this (e.g. 8 or 64).
        label_in_support: add a teacher column holding the label token and its cached log-prob
            where the label is outside the row's top-k (``-1``/``-inf`` elsewhere). On by
            default, so that a label outside the top-k gets the residual weight of the paper's
            full-vocabulary formula instead of none; ``False`` gives the bare top-k
            (docs/DATA.md, docs/LOSSES.md).
        threads: decoding threads (0: all cores, 1: the calling thread only).
        out: where to write: a dict ``name → array`` of buffers (e.g. pinned memory: pass
            ``tensor.numpy()``), each C-contiguous with the right dtype and at least as many
            elements as the output (its first elements are filled and returned as a view), or a
            callable ``(name, shape, dtype name) → array`` (dtype names are
            ``"int64"``, ``"int32"``, ``"float32"``). Names not given are
            allocated.

    Returns:
        ``input_ids`` int64 ``[B, L]``, ``labels`` int64 ``[B, L]`` (-100 where unsupervised),
        ``teacher_ids`` int32 ``[B, L, W]`` (-1 padding), ``teacher_logprobs`` float32
        ``[B, L, W]`` (-inf padding), ``W = K`` (``K + 1`` with ``label_in_support``); padded:
        ``attention_mask`` int64 ``[B, L]``; packed: ``position_ids`` int64 ``[B, L]``,
        ``cu_seqlens`` int32 ``[segments + 1]`` and ``max_seqlen`` (int); ``sequence_ids`` int64
        ``[B, L]`` (the index of the item each position belongs to, ``-1`` at padding); with a
        reference, ``reference_ids`` int32 / ``reference_logprobs`` float32 ``[B, L, Wr]``
        (``Wr = Kr`` or ``Kr + 1``, placed exactly like the teacher's) and
        ``reference_label_logprobs`` float32 ``[B, L]`` (``0.0`` where unsupervised). See
        docs/DATA.md.

    Raises:
        CacheInputError: bad options or items, output buffers too small or of the wrong dtype.
        CacheKeyError: a key or position not in its cache (a key missing from the reference
            cache names the key and the cache).
        CacheMismatchError: ``input_ids`` given with a key differ from the cached tokens (the
            message says how: a truncation — the batch's ids a prefix or a suffix of the cached
            ids, or the reverse — or the first differing position); ``labels`` given with a key
            differ from the cached labels (the first differing position); caches with different
            ``top_k`` or vocabularies in one batch; a reference record that is not the same
            sample as the teacher's (other tokens, labels or number of supervised tokens: the
            message names the key, both caches and the first difference).
        CacheCorruptionError: a record that does not decode.
        TypeError: an item of an unsupported type.
    """
    opts = _options(padding, max_length, pad_to_multiple_of, packing)
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)):
        raise TypeError(f"items must be a sequence of samples, got {type(items).__name__}")
    if len(items) == 0:
        raise CacheInputError("build_batch needs at least one sample")
    cache = _teacher_slot("build_batch", teacher, cache)
    native = [_native_item(i, item, cache) for i, item in enumerate(items)]
    return _core.build_batch(
        native,
        references=_native_references(items, reference),
        pad_token_id=int(pad_token_id),
        label_in_support=bool(label_in_support),
        threads=check_int("threads", threads, 0, 4096),
        out=out,
        **opts,
    )


class TargetSFTCollator:
    """A ``collate_fn`` for ``torch.utils.data.DataLoader`` that builds Target-SFT batches.

    Args:
        teacher: the teacher cache that int/str keys and dict items are looked up in (a
            :class:`TeacherCache` or its path; ``cache=`` is its old name). May be ``None``
            when every item is a :class:`CacheSample` or a :class:`CacheRecord`.
        reference: a reference cache (a :class:`TeacherCache` or its path, role
            ``"reference"``): every batch then also holds ``reference_ids``,
            ``reference_logprobs`` and ``reference_label_logprobs``, from each item's
            ``CacheSample.reference`` when it carries one, else from its key's record here
            (docs/DATA.md §Several caches).
        pad_token_id: ``input_ids`` value at padding positions (default: the tokenizer's pad
            token; required without a tokenizer).
        max_length: truncate samples to this many tokens; with ``packing``, the row capacity.
        packing: pack samples into rows of ``max_length`` (greedy first-fit, in batch order);
            adds ``position_ids``, ``cu_seqlens`` and ``max_seqlen`` and drops
            ``attention_mask`` (a ``[B, L]`` mask cannot express sample boundaries).
        padding: ``"longest"`` or ``"max_length"`` (fixed shapes, e.g. for ``torch.compile``).
        pad_to_multiple_of: round the row length up to a multiple of this (8 or 64 for tensor
            cores).
        label_in_support: one more teacher column with the label where it is outside the
            top-k (default; ``False``: the bare top-k, where a label outside it gets no
            residual weight; see docs/DATA.md).
        return_tensors: ``"pt"`` (torch tensors sharing the arrays' memory) or ``"np"``.
        threads: decoding threads per call; ``None`` picks 1 inside a DataLoader worker (the
            workers are the parallelism) and all cores in the main process.
        shared_memory_slots: inside a DataLoader worker, batches are written into slots of
            shared memory (what torch sends to the main process), each reused once the
            receiving process has dropped every tensor of the batch it held; at most this many
            slots per worker, each the size of a batch (0: ordinary memory, which torch copies
            into new shared memory for every batch). See ``target_sft/_shm.py``.
        tokenizer: the student's tokenizer (or its directory). Every cache the collator meets
            (``cache`` now, the cache of each :class:`CacheSample` in a batch) must have been
            built with it: its fingerprint is compared with the manifest's, once per cache, and
            a difference raises :class:`CacheMismatchError` naming both (docs/DATA.md).
        allow_tokenizer_mismatch: warn instead of raising on a tokenizer mismatch (for
            tokenizers you know give the same ids).
        return_keys: add ``sample_keys``: the items' cache keys in item order (a list), so that
            ``sample_keys[sequence_ids[b, t]]`` is the key of position ``(b, t)``.
        allow_role_mismatch: warn instead of raising when a cache's manifest role contradicts
            its slot (a reference-role cache as the teacher, or the reverse).

    Items may be :class:`CacheSample` objects (what :class:`TeacherCacheDataset` and the
    streaming datasets yield), keys, dicts with ``"key"`` and optionally ``"input_ids"`` and
    ``"labels"`` (rows a trainer prepared, e.g. TRL's: the tokens are checked against the
    record's hash and the labels against the record's labels; :class:`CacheMismatchError` names
    the key and says how they differ, a truncation reported as one), or :class:`CacheRecord`
    objects. Inside a DataLoader worker the tensors are written into
    recycled shared memory, so handing the batch to the main process copies nothing and faults in
    no new pages.
    """

    def __init__(
        self,
        teacher: TeacherCache | str | os.PathLike[str] | None = None,
        *,
        reference: TeacherCache | str | os.PathLike[str] | None = None,
        cache: TeacherCache | str | os.PathLike[str] | None = None,
        pad_token_id: int | None = None,
        max_length: int | None = None,
        packing: bool = False,
        padding: Literal["longest", "max_length"] = "longest",
        pad_to_multiple_of: int | None = None,
        label_in_support: bool = True,
        return_tensors: Literal["pt", "np"] = "pt",
        threads: int | None = None,
        shared_memory_slots: int = 8,
        tokenizer: Any = None,
        allow_tokenizer_mismatch: bool = False,
        return_keys: bool = False,
        allow_role_mismatch: bool = False,
    ) -> None:
        cache = _teacher_slot("TargetSFTCollator", teacher, cache)
        if cache is not None and not isinstance(cache, TeacherCache):
            cache = TeacherCache(cache)
        if reference is not None and not isinstance(reference, TeacherCache):
            reference = TeacherCache(reference)
        self.allow_role_mismatch = bool(allow_role_mismatch)
        if cache is not None:
            cache.check_role(
                "teacher", "TargetSFTCollator(teacher=...)", allow_mismatch=allow_role_mismatch
            )
        if reference is not None:
            reference.check_role(
                "reference", "TargetSFTCollator(reference=...)", allow_mismatch=allow_role_mismatch
            )
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None)
            if pad_token_id is None:
                raise CacheInputError(
                    "pad_token_id is required: pass pad_token_id=... or a tokenizer with a pad "
                    "token (tokenizer=...)"
                )
        if return_tensors not in ("pt", "np"):
            raise CacheInputError(f'return_tensors must be "pt" or "np", got {return_tensors!r}')
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, (int, np.integer)):
            raise CacheInputError(f"pad_token_id must be an int, got {pad_token_id!r}")
        if threads is not None:
            threads = check_int("threads", threads, 0, 4096)
        check_int("shared_memory_slots", shared_memory_slots, 0)
        self.cache = cache
        self.reference = reference
        self.return_keys = bool(return_keys)
        self.pad_token_id = int(pad_token_id)
        self.max_length = max_length
        self.packing = bool(packing)
        self.padding = padding
        self.pad_to_multiple_of = pad_to_multiple_of
        self.label_in_support = bool(label_in_support)
        self.return_tensors = return_tensors
        self.threads = threads
        self.shared_memory_slots = int(shared_memory_slots)
        # validate now, not on the first batch in a worker
        _core.check_batch_options(**_options(padding, max_length, pad_to_multiple_of, self.packing))
        self._tokenizer_check: TokenizerCheck | None = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer, allow_tokenizer_mismatch=allow_tokenizer_mismatch)

    def set_tokenizer(self, tokenizer: Any, *, allow_tokenizer_mismatch: bool = False) -> None:
        """Check every cache of the batches from now on against ``tokenizer`` (see the class
        docstring); ``cache`` is checked now. ``tokenizer`` may also be a
        :class:`~target_sft.fingerprint.TokenizerCheck` (``TargetSFTTrainer`` passes the check
        of its ``processing_class`` when the collator has no tokenizer of its own)."""
        if isinstance(tokenizer, TokenizerCheck):  # shared with the caller (the trainer)
            self._tokenizer_check = tokenizer
        else:
            self._tokenizer_check = TokenizerCheck(
                tokenizer,
                allow_mismatch=allow_tokenizer_mismatch,
                what="TargetSFTCollator's tokenizer",
            )
        if self.cache is not None:
            self._tokenizer_check.check(self.cache.info, "TargetSFTCollator(teacher=...)")
        if self.reference is not None:
            self._tokenizer_check.check(self.reference.info, "TargetSFTCollator(reference=...)")

    @property
    def teacher(self) -> TeacherCache | None:
        """The teacher cache (``cache`` is its old name)."""
        return self.cache

    @property
    def tokenizer_check(self) -> TokenizerCheck | None:
        """What batches are checked against (``None``: no tokenizer given)."""
        return self._tokenizer_check

    def _check_caches(self, items: Sequence[BatchItem]) -> None:
        """The role and tokenizer checks of the items' caches (teacher and reference): a dict
        lookup per distinct cache object (the verdict is kept per recorded fingerprint)."""
        check = self._tokenizer_check
        last: dict[str, Any] = {"teacher": self.cache, "reference": self.reference}
        for i, item in enumerate(items):
            if not isinstance(item, CacheSample):
                continue
            pairs = [("teacher", item.cache)]
            if item.reference is not None:
                pairs.append(("reference", item.reference.cache))
            for slot, c in pairs:
                if c is last[slot]:
                    continue
                last[slot] = c
                where = f"TargetSFTCollator: batch item {i}" + (
                    "'s reference" if slot == "reference" else ""
                )
                c.check_role(slot, where, allow_mismatch=self.allow_role_mismatch)
                if check is not None:
                    check.check(c.info, where)

    def __call__(self, items: Sequence[BatchItem]) -> dict[str, Any]:
        """Collate a list of items into a batch (dict of tensors, see :func:`build_batch`)."""
        self._check_caches(items)
        in_worker = _in_torch_worker()
        threads = self.threads
        if threads is None:
            threads = 1 if in_worker else 0
        kw = {
            "cache": self.cache,
            "reference": self.reference,
            "pad_token_id": self.pad_token_id,
            "max_length": self.max_length,
            "packing": self.packing,
            "padding": self.padding,
            "pad_to_multiple_of": self.pad_to_multiple_of,
            "label_in_support": self.label_in_support,
            "threads": threads,
        }
        if self.return_tensors == "np":
            return self._with_keys(items, build_batch(items, **kw))
        import torch

        slot = None
        if in_worker:
            # In a DataLoader worker: write into recycled shared memory (how torch hands tensors
            # to the main process), see target_sft/_shm.py.
            from target_sft import _shm

            pool = _shm.worker_pool(self.shared_memory_slots)
            slot = pool.acquire()
        if slot is None:
            # Main process, or no free slot: ordinary memory. (In a worker torch then copies
            # the batch into new shared memory when sending it, in the queue's feeder thread;
            # measured faster than writing into new shared memory directly.)
            batch = build_batch(items, **kw)
            return self._with_keys(
                items,
                {
                    k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                    for k, v in batch.items()
                },
            )
        tensors: dict[str, Any] = {}
        offset = 0
        width, ref_width = self._widths(items)
        # per token: input_ids, labels, attention_mask/position_ids, sequence_ids (int64), the
        # teacher rows (int32 + float32 per column) and, with a reference, its rows and label
        # log-prob (float32); one alignment pad per output
        per_token = 4 * 8 + 2 * 4 * width + (2 * 4 * ref_width + 4 if ref_width else 0)
        outputs = 6 + (3 if ref_width else 0)

        def alloc(name: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
            nonlocal offset
            if not tensors:  # the first output: room for the whole batch in the slot
                rows, length = shape[0], shape[1]
                pool.reserve(slot, rows * length * per_token + outputs * _ALIGN)
            t = _shm.view(pool.slots[slot]["storage"], offset, shape, getattr(torch, dtype))
            offset += -(-t.nbytes // _ALIGN) * _ALIGN
            tensors[name] = t
            return t.numpy()

        try:
            batch = build_batch(items, out=alloc, **kw)
        except BaseException:
            pool.abandon(slot)
            raise
        out = {
            k: tensors[k]
            if k in tensors
            else (torch.from_numpy(v) if isinstance(v, np.ndarray) else v)
            for k, v in batch.items()
        }
        return _shm.PooledBatch(self._with_keys(items, out), pool, slot)

    def _with_keys(self, items: Sequence[BatchItem], batch: dict[str, Any]) -> dict[str, Any]:
        """``batch`` with ``sample_keys`` when the collator returns keys."""
        if self.return_keys:
            batch["sample_keys"] = [_item_key(item) for item in items]
        return batch

    def _widths(self, items: Sequence[BatchItem]) -> tuple[int, int]:
        """Teacher and reference columns of the batch (0: no reference). Upper bounds are
        enough: they size a buffer."""
        k = kr = 0
        for item in items:
            if isinstance(item, CacheSample):
                k = max(k, item.cache.top_k)
                if item.reference is not None:
                    kr = max(kr, item.reference.cache.top_k)
            elif isinstance(item, CacheRecord):
                k = max(k, int(item.topk_ids.shape[1]) if item.topk_ids.ndim == 2 else 0)
            elif self.cache is not None:
                k = max(k, self.cache.top_k)
        if self.reference is not None:
            kr = max(kr, self.reference.top_k)
        extra = int(self.label_in_support)
        return max(k, 1) + extra, (kr + extra if kr else 0)

    def __repr__(self) -> str:
        ref = "" if self.reference is None else f"reference={self.reference!r}, "
        return (
            f"TargetSFTCollator(teacher={self.cache!r}, {ref}pad_token_id={self.pad_token_id}, "
            f"max_length={self.max_length}, packing={self.packing}, padding={self.padding!r}, "
            f"pad_to_multiple_of={self.pad_to_multiple_of}, "
            f"label_in_support={self.label_in_support})"
        )


def _in_torch_worker() -> bool:
    """Whether this process is a DataLoader worker (without importing torch)."""
    mod = sys.modules.get("torch.utils.data")
    return mod is not None and mod.get_worker_info() is not None
