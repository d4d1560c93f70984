"""TRL ``SFTTrainer`` integration: :class:`TargetSFTSFTTrainer`.

``TargetSFTTrainerMixin`` (``target_sft.hf``: the Q-target loss, the tokenizer and vocabulary
checks) on top of ``trl.SFTTrainer``, for the two ways a TRL user works (docs/HF.md, "TRL"):

* **TRL prepares the dataset** (conversational ``messages``, prompt/completion, text): every row
  keeps its cache key — the ``key_field`` value, or the row index, exactly as
  :func:`~target_sft.build_teacher_cache` keyed it (``id_field``) — in a ``key`` column added
  before TRL sees the data, which survives TRL's preparation and ``remove_unused_columns``. The
  collator (:class:`~target_sft.TargetSFTCollator`) pulls each row's teacher record by key and
  checks the row's ``input_ids`` (token hash) and ``labels`` (TRL's ``assistant_masks`` /
  ``completion_mask``) against the record.
* **A cache exported as a** ``datasets.Dataset`` (:meth:`TeacherCache.to_hf_dataset
  <target_sft.TeacherCache.to_hf_dataset>`: ``key``, ``input_ids``, ``labels``) with
  ``SFTConfig(dataset_kwargs={"skip_prepare_dataset": True})``.

TRL settings that the cache cannot honour are errors naming the setting, before anything is
prepared (``packing``, ``eval_packing``, ``padding_free``; TRL's loss knobs, ``loss_type`` and
``label_smoothing_factor``, are the mixin's loss resolution's, as for every trainer); the
settings that shape the tokens and labels (``max_length``, ``truncation_mode``,
``assistant_only_loss``, ``completion_only_loss``, the chat template) are checked on the rows TRL
prepared: the first ``check_rows`` rows of every dataset at construction (an error that names
the setting that disagrees and what to do), every row of every batch in the collator (an error
naming the key and the first differing position).

This module imports ``trl`` (``import target_sft`` does not).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import numpy as np
from trl import SFTConfig, SFTTrainer
from trl.data_utils import is_conversational

from target_sft.cache import IGNORE_INDEX, CacheRecord, TeacherCache
from target_sft.collate import TargetSFTCollator
from target_sft.errors import CacheInputError, CacheKeyError, CacheMismatchError
from target_sft.hf import TargetSFTTrainerMixin
from target_sft.sft_data import sample_key

__all__ = ["KEY_COLUMN", "TargetSFTSFTTrainer", "add_cache_keys"]

#: the column that carries each row's cache key (what :class:`TargetSFTCollator` reads)
KEY_COLUMN = "key"
#: rows of each dataset checked against the cache at construction
CHECK_ROWS = 64

_DEFAULTS = {f.name: f.default for f in fields(SFTConfig)}


def _setting(args: Any, name: str) -> Any:
    """``args.name``, or SFTConfig's default (``SFTTrainer`` turns a plain
    ``TrainingArguments`` into an ``SFTConfig`` with its defaults)."""
    return getattr(args, name, _DEFAULTS.get(name))


def _columns(dataset: Any) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names is None:  # an IterableDataset with unknown features
        names = list(next(iter(dataset)).keys())
    return list(names)


def add_cache_keys(dataset: Any, key_field: str | None = "id") -> Any:
    """``dataset`` (a ``datasets.Dataset`` or ``IterableDataset`` of raw rows) with a ``key``
    column holding each row's cache key as :func:`~target_sft.build_teacher_cache` computed it
    from the same rows: the ``key_field`` value, or the row's index where it has none (or
    ``key_field=None``, the builder's ``id_field=None``). A dataset that already has a ``key``
    column and no ``key_field`` column (one from :meth:`TeacherCache.to_hf_dataset`) is returned
    as it is.

    Raises:
        CacheInputError: the dataset has both a ``key`` column and a ``key_field`` column.
    """
    cols = _columns(dataset)
    if KEY_COLUMN in cols and (key_field is None or key_field not in cols):
        return dataset
    if KEY_COLUMN in cols and key_field != KEY_COLUMN:
        raise CacheInputError(
            f"the dataset has both a {KEY_COLUMN!r} column and the key field {key_field!r}; the "
            f"{KEY_COLUMN!r} column is where the trainer puts each row's cache key: rename it, "
            f"or pass key_field={KEY_COLUMN!r} if it holds the keys"
        )

    def keyed(row: Mapping[str, Any], index: int) -> dict[str, Any]:
        return {KEY_COLUMN: sample_key(index, row, key_field, f"dataset row {index}")}

    kw: dict[str, Any] = {"with_indices": True}
    if hasattr(dataset, "num_rows"):  # Dataset (IterableDataset.map takes no desc)
        kw["desc"] = "Adding cache keys"
    return dataset.map(keyed, **kw)


def _first(ids: np.ndarray, other: np.ndarray) -> int:
    """The first position where two int arrays differ (the shorter length if one is a prefix)."""
    n = min(ids.size, other.size)
    diff = np.flatnonzero(ids[:n] != other[:n])
    return int(diff[0]) if diff.size else n


def _label(x: int) -> str:
    return "-100 (not supervised)" if x == IGNORE_INDEX else f"{x} (supervised)"


class TargetSFTSFTTrainer(TargetSFTTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` that trains with a Q-target loss on teacher-cache batches.

    ``TargetSFTSFTTrainer(model, args=SFTConfig(...), train_dataset=ds, processing_class=tok,
    teacher_cache="cache/", loss="target_sft", loss_kwargs={"eta": 0.5})``; every other argument
    is ``SFTTrainer``'s. See the module docstring and docs/HF.md.

    Keyword args (besides the mixin's ``loss``, ``loss_kwargs``, ``allow_tokenizer_mismatch``):
        teacher_cache: the cache the rows are looked up in (a :class:`TeacherCache` or its path);
            not needed when ``data_collator`` is a :class:`TargetSFTCollator` with a cache.
        reference_cache: the reference model's cache (``role="reference"``), for the losses that
            read it (SFT+KL, ASFT, iw-SFT): the default collator aligns it with the teacher cache
            by key and adds the ``reference_*`` tensors (docs/HF.md). With a ``data_collator``,
            give it there (``TargetSFTCollator(cache, reference=...)``).
        key_field: the row field holding the cache key, as ``build_teacher_cache(id_field=...)``
            (``None``: the row index). Ignored for a dataset with a ``key`` column and no such
            field (:meth:`TeacherCache.to_hf_dataset`).
        check_rows: rows of each dataset checked against the cache at construction (every batch
            is checked anyway; this gives the error that names the TRL setting at once).

    ``data_collator`` defaults to a :class:`TargetSFTCollator` over ``teacher_cache`` (pad id:
    ``SFTConfig.pad_token``, else the tokenizer's pad token, else its EOS, as TRL's;
    ``pad_to_multiple_of`` from the config; with ``skip_prepare_dataset`` also
    ``max_length``, since TRL then truncates nothing).

    Raises:
        ValueError: a TRL setting the cache cannot honour (named, with what to do instead); a
            ``data_collator`` that is not a :class:`TargetSFTCollator`; no cache.
        CacheKeyError: a row's key is not in the cache.
        CacheMismatchError: a checked row's tokens or labels differ from the cache (the setting
            that disagrees is named where it can be told: ``max_length``/``truncation_mode``,
            ``assistant_only_loss``, ``completion_only_loss``).
    """

    def __init__(
        self,
        model: Any,
        args: SFTConfig | Any = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        *,
        teacher_cache: TeacherCache | str | os.PathLike[str] | None = None,
        reference_cache: TeacherCache | str | os.PathLike[str] | None = None,
        key_field: str | None = "id",
        check_rows: int = CHECK_ROWS,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = SFTConfig(output_dir="trainer_output")
        skip = bool((_setting(args, "dataset_kwargs") or {}).get("skip_prepare_dataset", False))
        self._check_settings(args, skip, kwargs)
        if train_dataset is None:
            raise ValueError("train_dataset is required")
        self._key_field = key_field
        self._check_rows = int(check_rows)
        first = next(iter(train_dataset))
        self._conversational = is_conversational(first)
        self._prompt_completion = "prompt" in first and "completion" in first
        train_dataset = add_cache_keys(train_dataset, key_field)
        eval_dataset = self._with_keys(eval_dataset)
        data_collator = self._collator(
            data_collator, teacher_cache, args, processing_class, skip, reference_cache
        )
        self._cache: TeacherCache = data_collator.cache
        super().__init__(
            model,
            args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self._check_prepared(self.train_dataset, "train_dataset")
        if isinstance(self.eval_dataset, Mapping):
            for name, ds in self.eval_dataset.items():
                self._check_prepared(ds, f"eval_dataset[{name!r}]")
        elif self.eval_dataset is not None:
            self._check_prepared(self.eval_dataset, "eval_dataset")

    # ---- settings --------------------------------------------------------------------------

    @staticmethod
    def _check_settings(args: Any, skip: bool, kwargs: Mapping[str, Any]) -> None:
        """The TRL settings a cache cannot honour: each an error naming it and what to do."""
        pack = (
            "pack in the collator instead: TargetSFTCollator(packing=True, max_length=...) "
            "(the teacher rows stay aligned with each sample; docs/HF.md, packed batches)"
        )
        for name in ("packing", "eval_packing", "padding_free"):
            if _setting(args, name):
                raise ValueError(
                    f"SFTConfig({name}=True): TRL then concatenates the rows of a batch "
                    "(padding-free) or of the dataset (packing) itself, which drops their cache "
                    f"keys and TargetSFTCollator with them; set {name}=False and {pack}"
                )
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "compute_loss_func would be ignored: the loss is TargetSFTSFTTrainer's loss= "
                "argument (a preset name or a callable)"
            )
        if skip and _setting(args, "max_length") is not None:
            if _setting(args, "truncation_mode") == "keep_end":
                raise ValueError(
                    f"SFTConfig(max_length={_setting(args, 'max_length')}, "
                    "truncation_mode='keep_end') with "
                    "skip_prepare_dataset: the collator can only keep the start of a cached "
                    "sample (teacher rows computed with the whole context do not apply to its "
                    "end); build the cache with max_length and truncation='keep_end' and set "
                    "max_length=None here"
                )

    def _with_keys(self, eval_dataset: Any) -> Any:
        if eval_dataset is None or isinstance(eval_dataset, str):
            return eval_dataset
        if isinstance(eval_dataset, Mapping):
            return {name: add_cache_keys(ds, self._key_field) for name, ds in eval_dataset.items()}
        return add_cache_keys(eval_dataset, self._key_field)

    @staticmethod
    def _collator(
        collator: Any, cache: Any, args: Any, tok: Any, skip: bool, reference: Any = None
    ) -> TargetSFTCollator:
        if collator is not None and reference is not None:
            raise ValueError(
                "pass the reference cache once: reference_cache= or the data_collator's "
                "(TargetSFTCollator(cache, reference=...)), not beside a data_collator"
            )
        if collator is not None:
            if not isinstance(collator, TargetSFTCollator):
                raise ValueError(
                    f"data_collator is a {type(collator).__name__}; TargetSFTSFTTrainer needs a "
                    "target_sft.TargetSFTCollator (it adds the teacher tensors the loss takes), "
                    "or none (one is made over teacher_cache)"
                )
            if collator.cache is None:
                raise ValueError(
                    "the TargetSFTCollator has no cache to look the rows' keys up in: "
                    "TargetSFTCollator(cache, ...)"
                )
            if cache is not None:
                raise ValueError(
                    "pass the cache once: teacher_cache= or the data_collator's cache "
                    f"({collator.cache.path}), not both"
                )
            return collator
        if cache is None:
            raise ValueError(
                "TargetSFTSFTTrainer needs the teacher cache the rows were cached in: "
                "teacher_cache='cache/' (or data_collator=TargetSFTCollator(cache, ...))"
            )
        inner = getattr(tok, "tokenizer", tok)  # a processor's tokenizer
        pad = _setting(args, "pad_token") or getattr(inner, "pad_token", None)
        pad = pad or getattr(inner, "eos_token", None)
        if pad is None:
            raise ValueError("no pad token: set SFTConfig(pad_token=...) or give the tokenizer one")
        multiple = _setting(args, "pad_to_multiple_of")
        return TargetSFTCollator(
            cache,
            pad_token_id=int(inner.convert_tokens_to_ids(pad)),
            max_length=_setting(args, "max_length") if skip else None,
            pad_to_multiple_of=multiple if isinstance(multiple, int) else None,
            label_in_support=bool(getattr(args, "label_in_support", True)),
            reference=reference,
        )

    # ---- rows against the cache ------------------------------------------------------------

    def _check_prepared(self, dataset: Any, label: str) -> None:
        """The first ``check_rows`` rows of a prepared dataset against their cached records."""
        if self._check_rows <= 0 or dataset is None:
            return
        cache = self._cache
        for i, row in enumerate(dataset):
            if i >= self._check_rows:
                break
            if KEY_COLUMN not in row:
                raise ValueError(
                    f"{label} row {i} has no {KEY_COLUMN!r} column after TRL's preparation "
                    f"(columns: {sorted(row)}); it carries each row's cache key"
                )
            key = row[KEY_COLUMN]
            try:
                rec = cache.get(key)
            except CacheKeyError:
                raise CacheKeyError(
                    f"{label} row {i}: key {key!r} is not in the cache at {cache.path}; the "
                    "cache was built from other rows, or keyed otherwise (key_field="
                    f"{self._key_field!r} here; build_teacher_cache(id_field=...) there)"
                ) from None
            problem = self._describe_row(row, rec)
            if problem is not None:
                raise CacheMismatchError(f"{label} row {i} (key {key!r}): {problem}")

    def _describe_row(self, row: Mapping[str, Any], rec: CacheRecord) -> str | None:
        """Why a row TRL prepared disagrees with its cached record (naming the TRL setting
        where it can be told), or ``None`` when tokens and labels are equal."""
        args = self.args
        ids = np.asarray(row["input_ids"], np.int64)
        cached = rec.input_ids.astype(np.int64)
        n, m = ids.size, cached.size
        max_length, mode = _setting(args, "max_length"), _setting(args, "truncation_mode")
        fix = (
            f"build the cache with the same max_length (build_teacher_cache(..., "
            f"max_length={n}, truncation={mode!r}), `target-sft cache build --max-length {n}`) "
            f"or raise SFTConfig.max_length to at least {m} (None: no truncation)"
        )
        if n < m and np.array_equal(cached[:n], ids):
            return (
                f"the batch's ids are a prefix of the cached ids: TRL's max_length={max_length} "
                f"truncated the sample from {m} to {n} tokens; {fix}"
            )
        if n < m and np.array_equal(cached[m - n :], ids):
            return (
                f"the batch's ids are a suffix of the cached ids: TRL's max_length={max_length} "
                f"with truncation_mode='keep_end' cut the sample from {m} to its last {n} tokens; "
                f"{fix}"
            )
        if m < n and (np.array_equal(ids[:m], cached) or np.array_equal(ids[n - m :], cached)):
            return (
                f"the cached ids are a truncation of the batch's ({m} of {n} tokens): the cache "
                f"was built with max_length={m}; set SFTConfig(max_length={m}) with the cache's "
                "truncation side, or build the cache without max_length"
            )
        if n != m or not np.array_equal(ids, cached):
            t = _first(ids, cached)
            return (
                f"TRL tokenised the row differently from the cache at position {t} (batch id "
                f"{ids[t] if t < n else 'none'}, cached id {cached[t] if t < m else 'none'}; "
                f"{n} vs {m} tokens): another tokenizer, chat template (SFTConfig."
                "chat_template_path), eos_token, or other data; build the cache from the same "
                "rows with the same tokenizer"
            )
        labels = np.asarray(row["labels"], np.int64)
        want = rec.labels.astype(np.int64)
        if np.array_equal(labels, want):
            return None
        t = _first(labels, want)
        ours, theirs = labels != IGNORE_INDEX, want != IGNORE_INDEX
        at = (
            f"first at position {t}: batch {_label(int(labels[t]))}, cache "
            f"{_label(int(want[t]))}; {int(ours.sum())} vs {int(theirs.sum())} supervised tokens"
        )
        more = bool(np.all(ours[theirs])) and ours.sum() > theirs.sum()
        fewer = bool(np.all(theirs[ours])) and ours.sum() < theirs.sum()
        cfg = "SFTConfig"
        if more and self._conversational and not _setting(args, "assistant_only_loss"):
            return (
                f"{cfg}(assistant_only_loss=False) supervises every token of the conversation, "
                "but the cache supervises only its assistant tokens (target_sft.tokenize_sft, as "
                f"TRL's assistant_only_loss=True; {at}); set assistant_only_loss=True"
            )
        if self._conversational and getattr(self, "chat_template", None) is not None:
            # SFTTrainer swapped in trl's training template (the tokenizer's has no
            # {% generation %} marks): its assistant span may differ from tokenize_sft's
            # (Qwen2.5's: the newline after "<|im_start|>assistant" is supervised)
            return (
                "TRL trains with its own training chat template (the tokenizer's has no "
                "{% generation %} marks, so SFTTrainer swapped in trl's *_training.jinja for "
                f"assistant_only_loss), whose assistant tokens differ from the cached ones ({at}); "
                "build the cache with the template TRL trains with: tok.chat_template = "
                "trl.chat_template_utils.get_training_chat_template(tok); "
                "build_teacher_cache(..., tokenizer=tok), and pass that tok here"
            )
        if more and self._prompt_completion and not self.completion_only_loss:
            return (
                f"{cfg}(completion_only_loss=False) supervises the prompt too, but the cache "
                f"supervises only the completion ({at}); set completion_only_loss=True (or None)"
            )
        if fewer and _setting(args, "assistant_only_loss"):
            return (
                f"{cfg}(assistant_only_loss=True) supervises only the assistant tokens, but the "
                f"cache supervises more ({at}): it was built from rows with other labels; set "
                "assistant_only_loss=False, or build the cache with target_sft.tokenize_sft's "
                "masks"
            )
        if fewer and self._prompt_completion and self.completion_only_loss:
            return (
                f"{cfg}(completion_only_loss) supervises only the completion, but the cache "
                f"supervises more ({at}); set completion_only_loss=False, or build the cache "
                "with target_sft.tokenize_sft's masks"
            )
        return (
            f"the batch's labels differ from the cached labels ({at}): TRL supervises other "
            "tokens than the cache was built for (assistant_only_loss, completion_only_loss, "
            "the chat template's generation marks); build the cache from the same rows with "
            "target_sft.tokenize_sft's masks"
        )

    # ---- evaluation ------------------------------------------------------------------------

    def evaluate(self, eval_dataset: Any = None, *args: Any, **kwargs: Any) -> dict[str, float]:
        """``SFTTrainer.evaluate``; a dataset passed here gets its cache keys first."""
        return super().evaluate(self._with_keys(eval_dataset), *args, **kwargs)
