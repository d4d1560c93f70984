"""Identity checks between a teacher cache and what trains on it: the tokenizer and the student's
vocabulary (docs/DATA.md, "Tokenizer and vocabulary checks").

* :func:`tokenizer_fingerprint` — the manifest's ``tokenizer`` entry, written by the builder: a
  content hash of everything that decides which ids a text becomes (the backend definition, the
  vocabulary, the special tokens, the chat template), independent of the path it was loaded from.
* :class:`TokenizerCheck` — compares a tokenizer with the entries of the caches it meets, once per
  recorded fingerprint (the collator, the trainer and the report use it).
* :func:`student_vocab` / :func:`check_student_vocab` / :func:`check_ids_in_vocab` — the student's
  vocabulary (embedding rows, ``lm_head`` outputs) against the ids a cache can hold and the ids of
  a batch, checked before the forward pass.

Nothing here imports torch or transformers (torch tensors are handled when given).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from target_sft.errors import CacheInputError, CacheMismatchError

__all__ = [
    "TOKENIZER_FINGERPRINT_VERSION",
    "StudentVocab",
    "TokenizerCheck",
    "check_ids_in_vocab",
    "check_student_vocab",
    "student_vocab",
    "tokenizer_fingerprint",
]

#: version of :func:`tokenizer_fingerprint`'s hash, recorded as ``fingerprint_version`` (a
#: manifest without it was written by version 1, which still hashed the backend's transient
#: truncation/padding settings and the pad token)
TOKENIZER_FINGERPRINT_VERSION = 2

#: what allows a mismatch, named in every message
_ALLOW = "allow_tokenizer_mismatch=True"


def _base_tokenizer(tokenizer: Any) -> Any:
    """A processor's tokenizer (``processor.tokenizer``), else the object itself."""
    if not hasattr(tokenizer, "get_vocab") and hasattr(tokenizer, "tokenizer"):
        return tokenizer.tokenizer
    return tokenizer


def _fingerprint_hash(tokenizer: Any, version: int) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    specials = dict(getattr(tokenizer, "special_tokens_map", {}) or {})
    if backend is not None:
        text = backend.to_str()
        if version >= 2:
            # truncation/padding are call-time settings that the last __call__ left in the
            # backend (tok(..., truncation=True) changes them): not part of the tokenizer
            d = json.loads(text)
            d.pop("truncation", None)
            d.pop("padding", None)
            text = json.dumps(d, sort_keys=True, ensure_ascii=False)
        h.update(text.encode())
    vocab = tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    if version >= 2:
        # which existing token pads a batch changes no id of any text (a new pad token adds a
        # token, which the vocabulary above records)
        specials.pop("pad_token", None)
    h.update(json.dumps(specials, sort_keys=True, default=str).encode())
    h.update(str(getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()[:32]


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """The manifest's ``tokenizer`` entry: ``name`` (where it was loaded from), ``class``,
    ``size`` (``len(tokenizer)``), ``fingerprint`` and ``fingerprint_version``.

    The fingerprint hashes the content that decides token ids: the fast tokenizer's whole
    definition (normalizer, pre-tokenizer, model, added tokens, post-processor; without the
    truncation/padding left by the last call), the vocabulary, the special tokens (but the pad
    token) and the chat template. The same files loaded from another path give the same value.
    ``{}`` for ``None``."""
    if tokenizer is None:
        return {}
    tokenizer = _base_tokenizer(tokenizer)
    return {
        "name": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        "class": type(tokenizer).__name__,
        "size": len(tokenizer),
        "fingerprint": _fingerprint_hash(tokenizer, TOKENIZER_FINGERPRINT_VERSION),
        "fingerprint_version": TOKENIZER_FINGERPRINT_VERSION,
    }


def _describe_tokenizer(entry: Mapping[str, Any]) -> str:
    size = entry.get("size")
    parts = [str(entry.get("class", "?"))]
    if size is not None:
        parts.append(f"{size:,} tokens")
    parts.append(f"fingerprint {entry.get('fingerprint')}")
    return f"{entry.get('name', '?')!r} ({', '.join(parts)})"


def _cache_tokenizer(info: Any) -> tuple[str, Mapping[str, Any]]:
    """``(cache path, manifest tokenizer entry)`` of a CacheInfo (or anything with both)."""
    return str(getattr(info, "path", "?")), dict(getattr(info, "tokenizer", None) or {})


_warned_unrecorded: set[str] = set()


def _warn_unrecorded(path: str, where: str) -> None:
    if path in _warned_unrecorded:
        return
    _warned_unrecorded.add(path)
    warnings.warn(
        f"{where}: the cache {path} records no tokenizer fingerprint (built without a "
        "tokenizer), so the tokenizer cannot be checked against it; build the cache with "
        "tokenizer=... to have it checked",
        stacklevel=4,
    )


class TokenizerCheck:
    """The expected tokenizer of a training or plotting run, checked against caches.

    Args:
        tokenizer: a tokenizer (or a processor with ``.tokenizer``), or a
            :func:`tokenizer_fingerprint` dict.
        allow_mismatch: warn instead of raising :class:`CacheMismatchError` on a mismatch.
        what: how messages name the tokenizer (e.g. ``"TargetSFTCollator(tokenizer=...)"``).

    :meth:`check` compares the tokenizer with a cache's manifest entry; the verdict is kept per
    recorded fingerprint, so checking every batch's caches costs a dict lookup. Holds only the
    fingerprints (it pickles small, e.g. into DataLoader workers).
    """

    def __init__(self, tokenizer: Any, *, allow_mismatch: bool = False, what: str) -> None:
        if isinstance(tokenizer, Mapping):
            self.entry = dict(tokenizer)
            self._legacy: str | None = None
        else:
            tok = _base_tokenizer(tokenizer)
            if not hasattr(tok, "get_vocab"):
                raise CacheInputError(
                    f"{what}: expected a tokenizer (with get_vocab), got {type(tokenizer).__name__}"
                )
            self.entry = tokenizer_fingerprint(tok)
            self._legacy = _fingerprint_hash(tok, 1)  # to check caches written by version 1
        self.allow_mismatch = bool(allow_mismatch)
        self.what = what
        self._verdicts: dict[tuple[str, int], bool] = {}

    @property
    def fingerprint(self) -> str:
        return str(self.entry.get("fingerprint"))

    def _expected(self, version: int) -> str | None:
        if version == int(self.entry.get("fingerprint_version", 1)):
            return self.fingerprint
        return self._legacy if version == 1 else None

    def check(self, info: Any, where: str = "") -> None:
        """Raise :class:`CacheMismatchError` (warn with ``allow_mismatch``) unless the cache of
        ``info`` (a :class:`~target_sft.cache.CacheInfo`) was built with this tokenizer. A cache
        without a recorded fingerprint gets one warning per path."""
        path, entry = _cache_tokenizer(info)
        recorded = entry.get("fingerprint")
        where = where or self.what
        if not recorded:
            _warn_unrecorded(path, where)
            return
        version = int(entry.get("fingerprint_version", 1))
        key = (str(recorded), version)
        if key in self._verdicts:
            return
        expected = self._expected(version)
        if expected == recorded:
            self._verdicts[key] = True
            return
        mine = dict(self.entry)
        if expected is not None:
            mine["fingerprint"] = expected
        msg = (
            f"{where}: tokenizer mismatch: the cache {path} was built with the tokenizer "
            f"{_describe_tokenizer(entry)}, but {self.what} is {_describe_tokenizer(mine)}. The "
            "cached token ids and teacher top-k ids would be read as other tokens. Use the "
            "tokenizer the cache was built with, or rebuild the cache with this one; pass "
            f"{_ALLOW} only if you know both give the same ids"
        )
        if expected is None:
            msg += (
                f" (the cache's fingerprint is of version {version}, which this library cannot "
                "compute)"
            )
        if not self.allow_mismatch:
            raise CacheMismatchError(msg)
        warnings.warn(f"{msg} [{_ALLOW}: continuing]", stacklevel=3)
        self._verdicts[key] = False  # warned once

    def __repr__(self) -> str:
        return (
            f"TokenizerCheck({_describe_tokenizer(self.entry)}, "
            f"allow_mismatch={self.allow_mismatch})"
        )


# ---------------------------------------------------------------------------------------------
# The student's vocabulary


class StudentVocab:
    """How many token ids a model can take: ``size`` = the smallest of its input embedding rows
    and its output layer's rows (``config.vocab_size`` when it exposes neither); ``text`` names
    each size for messages."""

    def __init__(self, size: int, text: str) -> None:
        self.size = int(size)
        self.text = text

    def __repr__(self) -> str:
        return f"StudentVocab({self.size}, {self.text!r})"


def _unwrap_model(model: Any) -> Any:
    for _ in range(8):  # DDP / FSDP (.module), torch.compile (._orig_mod)
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None or inner is model or not callable(inner):
            break
        model = inner
    return model


def _rows(module: Any) -> int | None:
    for name in ("num_embeddings", "out_features"):
        v = getattr(module, name, None)
        if isinstance(v, int):
            return v
    w = getattr(module, "weight", None)
    shape = getattr(w, "shape", None)
    return int(shape[0]) if shape is not None and len(shape) == 2 else None


def student_vocab(model: Any) -> StudentVocab | None:
    """The vocabulary of a ``transformers`` model (or any module with
    ``get_input_embeddings``/``get_output_embeddings`` or a ``config.vocab_size``); ``None`` when
    it has none of them. Wrappers (DDP, FSDP, ``torch.compile``) are looked through."""
    m = _unwrap_model(model)
    sizes: list[tuple[int, str]] = []
    for getter, label in (
        ("get_input_embeddings", "embedding rows"),
        ("get_output_embeddings", "lm_head outputs"),
    ):
        fn = getattr(m, getter, None)
        if not callable(fn):
            continue
        try:
            module = fn()
        except (NotImplementedError, AttributeError):
            continue
        n = _rows(module) if module is not None else None
        if n is not None:
            sizes.append((n, f"{n:,} {label}"))
    cfg = getattr(m, "config", None)
    cv = getattr(cfg, "vocab_size", None) if cfg is not None else None
    if not sizes and isinstance(cv, int):
        sizes.append((cv, f"config.vocab_size {cv:,}"))
    if not sizes:
        return None
    text = ", ".join(t for _, t in sizes)
    if isinstance(cv, int) and not text.startswith("config"):
        text += f"; config.vocab_size {cv:,}"
    return StudentVocab(min(n for n, _ in sizes), text)


def check_student_vocab(
    vocab: StudentVocab | None, info: Any, *, where: str, allow_mismatch: bool = False
) -> None:
    """The static check of a student against a cache (``info``: a CacheInfo).

    The cache's token ids (``input_ids``, ``labels``) come from its tokenizer, so they reach the
    recorded tokenizer size (``len(tokenizer)``; the teacher's logit count when no tokenizer is
    recorded): a student with fewer rows is a :class:`CacheMismatchError` (a warning with
    ``allow_mismatch``). Teacher top-k ids range over all the teacher's logits (the cache's
    ``vocab_size``, e.g. Qwen's 151,936 rows for 151,665 tokens): a student with fewer rows than
    that but at least the tokenizer's size gets a warning, and any batch holding such an id is an
    error (:func:`check_ids_in_vocab`). A student *larger* than the cache is fine."""
    if vocab is None:
        return
    path, entry = _cache_tokenizer(info)
    cache_vocab = int(getattr(info, "vocab_size", 0) or 0)
    tok_size = entry.get("size")
    reach = int(tok_size) if isinstance(tok_size, int) and tok_size > 0 else cache_vocab
    src = (
        f"its tokenizer has {reach:,} tokens"
        if reach != cache_vocab or isinstance(tok_size, int)
        else f"its teacher has {cache_vocab:,} logits and no tokenizer is recorded"
    )
    if vocab.size < reach:
        msg = (
            f"{where}: the student's vocabulary ({vocab.text}) is smaller than the ids the cache "
            f"{path} holds ({src}): token ids >= {vocab.size:,} cannot be embedded. Resize the "
            "student's embeddings (model.resize_token_embeddings(len(tokenizer))) or use the "
            "cache built for this student"
        )
        if not allow_mismatch:
            raise CacheMismatchError(msg + f"; {_ALLOW} turns this into a warning")
        warnings.warn(f"{msg} [{_ALLOW}: continuing]", stacklevel=3)
        return
    if vocab.size < cache_vocab:
        warnings.warn(
            f"{where}: the student's vocabulary ({vocab.text}) is smaller than the teacher's "
            f"{cache_vocab:,} logits of the cache {path}: a batch whose teacher top-k holds an "
            f"id >= {vocab.size:,} will be refused (the tokenizer's ids all fit)",
            stacklevel=3,
        )


def check_ids_in_vocab(vocab: StudentVocab | None, tensors: Mapping[str, Any], where: str) -> None:
    """Raise :class:`CacheMismatchError` if an id of ``tensors`` (name → torch tensor or numpy
    array: ``input_ids``, ``labels``, ``teacher_ids``, …) is ``>= vocab.size``, naming the
    tensor, the index, the id and the student's sizes. Padding values (``-100``, ``-1``) are
    negative and pass. One device synchronisation for all the tensors."""
    if vocab is None:
        return
    present = [(k, t) for k, t in tensors.items() if t is not None and _numel(t) > 0]
    if not present:
        return
    if all(hasattr(t, "detach") for _, t in present):
        import torch

        maxima = [t.detach().max().to(torch.int64) for _, t in present]
        if len({m.device for m in maxima}) == 1:
            largest = [int(x) for x in torch.stack(maxima).tolist()]  # one synchronisation
        else:
            largest = [int(m) for m in maxima]
    else:
        largest = [int(np.max(_as_numpy(t))) for _, t in present]
    for (name, t), mx in zip(present, largest, strict=True):
        if mx < vocab.size:
            continue
        a = _as_numpy(t)
        idx = np.unravel_index(int(np.argmax(a.reshape(-1) >= vocab.size)), a.shape)
        raise CacheMismatchError(
            f"{where}: {name}[{', '.join(str(int(i)) for i in idx)}] = {int(a[idx])} is outside "
            f"the student's vocabulary ({vocab.text}; ids must be < {vocab.size:,}): the data "
            "was tokenized for a larger vocabulary. Use the student whose tokenizer built the "
            "cache, or resize its embeddings (model.resize_token_embeddings)"
        )


def _numel(t: Any) -> int:
    n = t.numel() if hasattr(t, "numel") else np.size(t)
    return int(n)


def _as_numpy(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
