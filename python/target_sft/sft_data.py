"""SFT data in: one tokenisation for every row format, and the readers of the build's inputs.

:func:`tokenize_sft` turns any supported row into ``{"input_ids", "labels"}`` (Hugging Face
convention: ``labels`` aligned with ``input_ids``, ``-100`` = not supervised). The cache builder
(:func:`target_sft.build_teacher_cache`) and the ``target-sft cache build`` command call it, and
training data tokenised with it gets the very tokens and masks the cache holds, so a cache and a
training batch cannot disagree.

Row formats (the first that applies, in this order; ``None`` counts as absent):

* **pre-tokenised**: ``input_ids`` and optionally ``labels`` (absent: every position supervised).
* **messages**: a conversation ``[{"role": ..., "content": ...}, ...]`` (system, user, assistant,
  tool turns, assistant ``tool_calls``; a row's ``tools`` and ``chat_template_kwargs`` go to the
  template). Rendered with the tokenizer's chat template; only the assistant turns are supervised.
* **prompt/completion** (TRL's keys): plain text, or conversational (two lists of messages).
* **prompt/response**: with a chat template, a user turn and an assistant turn (conversational
  prompt/completion); without one, plain-text prompt/completion.
* **text**: language modelling, every token supervised.

The masks are TRL's (``SFTTrainer`` of trl 1.x, checked against it in
``tests/builder/test_sft_data.py``):

* conversations: ``assistant_only_loss`` — the template's ``{% generation %}`` marks when it has
  them (``apply_chat_template(..., return_assistant_tokens_mask=True)``); otherwise by templating
  incrementally (each assistant turn is what rendering the conversation up to it adds after the
  generation prompt), which needs every such prefix render to be a token prefix of the whole
  render, else an error says the template gives no way to find the assistant tokens.
  TRL itself, for a template without marks, trains with its own ``*_training`` template, which
  can supervise a token more per turn (Qwen2.5's: the newline after ``<|im_start|>assistant``);
  to train with TRL, give the tokenizer TRL's training template before building the cache
  (``TargetSFTSFTTrainer`` checks the two agree and names the fix, docs/HF.md).
  Conversational prompt/completion supervises the assistant tokens of the completion (TRL with
  ``assistant_only_loss`` and ``completion_only_loss``).
* plain-text prompt/completion: ``completion_only_loss`` — ``tokenizer(prompt)`` and
  ``tokenizer(prompt + completion + eos)`` (the EOS text appended unless the completion ends with
  it); the completion starts where the two token sequences first differ.
* text: ``tokenizer(text + eos)`` (EOS appended unless present), all supervised.

Truncation (``max_length``): ``truncation="keep_start"`` (default, TRL's default) keeps the first
``max_length`` tokens, ``"keep_end"`` the last; ``input_ids`` and ``labels`` are cut together. A
row left without a supervised token is kept (TRL drops it; here it is a record with no rows).

A conversation with no assistant turn is an **error**, not skipped: it has nothing to supervise,
and in practice it means the data names its roles differently (``"gpt"``, ``"bot"``) or lost its
answers, which a count of skipped rows would hide. Filter such rows out before building if they
are expected.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from target_sft.cache import IGNORE_INDEX
from target_sft.checks import as_int32
from target_sft.errors import CacheInputError

__all__ = [
    "HEAD_ROWS",
    "JsonlDataset",
    "ParquetDataset",
    "SFTSource",
    "open_dataset",
    "prepare_row",
    "sample_key",
    "tokenize_sft",
]

Truncation = Literal["keep_start", "keep_end"]

#: Rows fully tokenised before the teacher loads (every row's key and schema are checked).
HEAD_ROWS = 64

_FORMATS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("messages", ("messages",)),
    ("prompt/completion", ("prompt", "completion")),
    ("prompt/response", ("prompt", "response")),
    ("text", ("text",)),
)
_GENERATION_MARK = re.compile(r"\{%-?\s*generation\s*-?%\}")


# ---------------------------------------------------------------------------------------------
# Parsing a row (no tokenizer needed): the schema check every row gets before the teacher loads


@dataclass
class _Row:
    kind: str  # "tokens", "messages", "prompt/completion", "prompt/response", "text"
    input_ids: Any = None
    labels: Any = None
    messages: list[Any] | None = None  # messages, or the prompt of a conversational pair
    completion: Any = None  # str, or a list of messages
    prompt: str | None = None
    text: str | None = None
    tools: Any = None
    template_kwargs: dict[str, Any] | None = None

    @property
    def needs_tokenizer(self) -> bool:
        return self.kind != "tokens"


def _present(row: Mapping[str, Any], key: str) -> bool:
    return key in row and row[key] is not None


def _check_messages(msgs: Any, where: str, field: str) -> list[Any]:
    if not isinstance(msgs, (list, tuple)) or not msgs:
        raise CacheInputError(
            f"{where}: {field!r} must be a non-empty list of messages "
            f'({{"role": ..., "content": ...}}), got {_describe(msgs)}'
        )
    for i, m in enumerate(msgs):
        if not isinstance(m, Mapping):
            raise CacheInputError(
                f"{where}: {field}[{i}] is {_describe(m)}, not a message "
                '({"role": ..., "content": ...})'
            )
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise CacheInputError(
                f"{where}: {field}[{i}] has no 'role' string (keys: {sorted(m.keys())})"
            )
        content = m.get("content")
        if content is None:
            if m.get("tool_calls"):
                continue  # an assistant turn that only calls tools
            raise CacheInputError(
                f"{where}: {field}[{i}] (role {role!r}) has no 'content' (and no 'tool_calls')"
            )
        if not isinstance(content, str):
            raise CacheInputError(
                f"{where}: {field}[{i}] (role {role!r}): 'content' is {_describe(content)}; "
                "only string content is supported (not lists of content parts)"
            )
    return list(msgs)


def _describe(x: Any) -> str:
    if isinstance(x, (list, tuple)) and not x:
        return "an empty list"
    return f"a {type(x).__name__}"


def _str_field(row: Mapping[str, Any], key: str, where: str) -> str:
    v = row[key]
    if not isinstance(v, str):
        raise CacheInputError(f"{where}: {key!r} must be a string, got {_describe(v)}")
    return v


def _parse_row(row: Any, where: str) -> _Row:
    """The row's format and fields, checked; raises :class:`CacheInputError` naming ``where``
    and the field."""
    if not isinstance(row, Mapping) and not (hasattr(row, "keys") and hasattr(row, "__getitem__")):
        raise CacheInputError(
            f"{where} is {_describe(row)}; rows must be dicts with 'input_ids' (and optionally "
            "'labels'), 'messages', 'prompt'/'completion', 'prompt'/'response' or 'text'"
        )
    if _present(row, "input_ids"):
        return _Row("tokens", input_ids=row["input_ids"], labels=row.get("labels"))
    found = [name for name, keys in _FORMATS if all(_present(row, k) for k in keys)]
    if not found:
        raise CacheInputError(
            f"{where} has no 'input_ids', 'messages', 'prompt'+'completion', 'prompt'+'response' "
            f"or 'text' field (its fields: {sorted(row.keys())}); see docs/BUILD.md for the row "
            "formats"
        )
    if len(found) > 1:
        raise CacheInputError(
            f"{where} matches several row formats ({', '.join(found)}); keep the fields of one "
            "(which one to train on is ambiguous)"
        )
    kind = found[0]
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError as e:
            raise CacheInputError(f"{where}: 'tools' is a string but not JSON ({e})") from None
    kw = row.get("chat_template_kwargs")
    if kw is not None and not isinstance(kw, Mapping):
        raise CacheInputError(
            f"{where}: 'chat_template_kwargs' must be a dict, got {_describe(kw)}"
        )
    chat = {"tools": tools, "template_kwargs": dict(kw) if kw else None}
    if kind == "messages":
        msgs = _check_messages(row["messages"], where, "messages")
        _need_assistant(msgs, where, "messages")
        return _Row(kind, messages=msgs, **chat)
    if kind == "text":
        return _Row(kind, text=_str_field(row, "text", where))
    second = "completion" if kind == "prompt/completion" else "response"
    p, c = row["prompt"], row[second]
    if isinstance(p, str) and isinstance(c, str):
        return _Row(kind, prompt=p, completion=c, **chat)
    if isinstance(p, (list, tuple)) and isinstance(c, (list, tuple)):
        prompt = _check_messages(p, where, "prompt")
        completion = _check_messages(c, where, second)
        _need_assistant(completion, where, second)
        return _Row(kind, messages=prompt, completion=completion, **chat)
    raise CacheInputError(
        f"{where}: 'prompt' and {second!r} must both be strings (plain text) or both lists of "
        f"messages (conversational); got {_describe(p)} and {_describe(c)}"
    )


def _need_assistant(msgs: list[Any], where: str, field: str) -> None:
    if not any(m.get("role") == "assistant" for m in msgs):
        roles = [m.get("role") for m in msgs]
        raise CacheInputError(
            f"{where}: {field!r} has no assistant turn (roles: {roles}), so nothing in it would "
            "be supervised; rename the roles to 'assistant' or filter these rows out"
        )


# ---------------------------------------------------------------------------------------------
# Encoding a parsed row


def _ids(x: Any) -> list[int]:
    if hasattr(x, "keys") and "input_ids" in x:  # BatchEncoding
        x = x["input_ids"]
    if hasattr(x, "tolist"):
        x = x.tolist()
    return [int(i) for i in x]


def _template(tokenizer: Any) -> str | None:
    t = getattr(tokenizer, "chat_template", None)
    if isinstance(t, Mapping):  # named templates
        t = t.get("default") or next(iter(t.values()), None)
    return t or None


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _Chat:
    """Renders conversations of one row with the tokenizer's chat template."""

    def __init__(self, tokenizer: Any, row: _Row, where: str) -> None:
        self.tok = tokenizer
        self.where = where
        self.template = _template(tokenizer)
        if self.template is None:
            raise CacheInputError(
                f"{where}: a conversation needs a tokenizer with a chat template, and "
                f"{type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '')!r}) has none; "
                "set tokenizer.chat_template or use plain-text rows"
            )
        self.kwargs: dict[str, Any] = dict(row.template_kwargs or {})
        if row.tools is not None:
            self.kwargs["tools"] = row.tools

    def render(
        self, msgs: list[Any], *, add_generation_prompt: bool = False, mask: bool = False
    ) -> tuple[list[int], list[int] | None]:
        try:
            out = self.tok.apply_chat_template(
                msgs,
                tokenize=True,
                return_dict=True,
                add_generation_prompt=add_generation_prompt,
                return_assistant_tokens_mask=mask,
                **self.kwargs,
            )
        except Exception as e:  # a template's own raise_exception, a jinja error
            raise CacheInputError(
                f"{self.where}: the chat template failed on this conversation: "
                f"{type(e).__name__}: {e}"
            ) from None
        ids = _ids(out)
        m = [int(b) for b in out["assistant_masks"]] if mask else None
        return ids, m

    def assistant_mask(self, msgs: list[Any]) -> tuple[list[int], list[int]]:
        """Token ids of the whole conversation and 1 on its assistant tokens."""
        if _GENERATION_MARK.search(self.template or ""):
            ids, m = self.render(msgs, mask=True)
            assert m is not None
            if not any(m):
                raise CacheInputError(
                    f"{self.where}: the chat template has {{% generation %}} marks but they "
                    "cover no token of this conversation's assistant turns; fix the template"
                )
            return ids, m
        ids, _ = self.render(msgs)
        m = [0] * len(ids)
        for i, msg in enumerate(msgs):
            if msg.get("role") != "assistant":
                continue
            before, _ = self.render(msgs[:i], add_generation_prompt=True)
            upto, _ = self.render(msgs[: i + 1])
            if ids[: len(before)] != before or ids[: len(upto)] != upto or len(upto) < len(before):
                raise CacheInputError(
                    f"{self.where}: the chat template gives no way to find the assistant tokens: "
                    f"it has no {{% generation %}} marks, and rendering the conversation up to "
                    f"turn {i} (the assistant turn) is not a token prefix of rendering it whole. "
                    "Add {% generation %}...{% endgeneration %} around the assistant part of the "
                    "template (transformers' return_assistant_tokens_mask), or pass tokenised "
                    "input_ids/labels"
                )
            m[len(before) : len(upto)] = [1] * (len(upto) - len(before))
        if not any(m):
            raise CacheInputError(
                f"{self.where}: the chat template renders this conversation's assistant turns "
                "as no token; nothing would be supervised"
            )
        return ids, m


def _encode(row: _Row, tokenizer: Any, where: str) -> tuple[Any, Any]:
    """``(input_ids, labels)`` of a parsed row, before truncation."""
    if row.kind == "tokens":
        return row.input_ids, row.labels
    if tokenizer is None:
        raise CacheInputError(
            f"{where} holds text ({row.kind}) but there is no tokenizer; pass tokenizer= "
            "(CLI: --tokenizer), or a teacher directory that has one"
        )
    if row.kind == "messages":
        assert row.messages is not None
        ids, m = _Chat(tokenizer, row, where).assistant_mask(row.messages)
        return ids, [t if b else IGNORE_INDEX for t, b in zip(ids, m, strict=True)]
    eos = getattr(tokenizer, "eos_token", None)
    if row.kind == "text":
        assert row.text is not None
        text = row.text if not eos or row.text.endswith(eos) else row.text + eos
        ids = _ids(tokenizer(text))
        return ids, list(ids)
    conversational = isinstance(row.completion, list)
    if not conversational and row.kind == "prompt/response" and _template(tokenizer):
        row = _Row(
            row.kind,
            messages=[{"role": "user", "content": row.prompt}],
            completion=[{"role": "assistant", "content": row.completion}],
            tools=row.tools,
            template_kwargs=row.template_kwargs,
        )
        conversational = True
    if conversational:
        assert row.messages is not None
        chat = _Chat(tokenizer, row, where)
        prompt_ids, _ = chat.render(row.messages, add_generation_prompt=True)
        ids, m = chat.assistant_mask([*row.messages, *row.completion])
        start = _common_prefix(prompt_ids, ids)
        labels = [
            t if b and i >= start else IGNORE_INDEX
            for i, (t, b) in enumerate(zip(ids, m, strict=True))
        ]
        return ids, labels
    assert row.prompt is not None and isinstance(row.completion, str)
    completion = row.completion
    if eos and not completion.endswith(eos):
        completion += eos
    prompt_ids = _ids(tokenizer(row.prompt))
    ids = _ids(tokenizer(row.prompt + completion))
    start = _common_prefix(prompt_ids, ids)
    return ids, [IGNORE_INDEX] * start + ids[start:]


def _to_int_array(name: str, x: Any, where: str) -> np.ndarray:
    """A 1-D int32 array of token ids (the cache's own conversion, with the row's location)."""
    if not hasattr(x, "detach") and len(np.shape(x)) == 1 and np.size(x) == 0:
        return np.zeros(0, np.int32)  # an empty list is float64 to numpy
    try:
        a = as_int32(name, x)
    except CacheInputError as e:
        raise CacheInputError(f"{where}: {e}") from None
    if a.ndim != 1:
        raise CacheInputError(
            f"{where}: {name} must be a 1-D sequence of token ids, got shape {a.shape}"
        )
    return a


def _check_tokens(ids: Any, labels: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    a = _to_int_array("input_ids", ids, where)
    b = _to_int_array("labels", labels, where) if labels is not None else a.copy()
    if a.size == 0:
        raise CacheInputError(f"{where}: input_ids is empty")
    if b.shape != a.shape:
        raise CacheInputError(
            f"{where}: labels has {b.size} entries but input_ids has {a.size}; they must "
            "be aligned (Hugging Face convention: the model shifts them, -100 = unsupervised)"
        )
    if a.min() < 0:
        raise CacheInputError(f"{where}: input_ids holds a negative id {int(a.min())}")
    bad = (b < 0) & (b != IGNORE_INDEX)
    if bad.any():
        t = int(np.argmax(bad))
        raise CacheInputError(
            f"{where}: labels[{t}] = {int(b[t])}; labels must be token ids or -100"
        )
    return a, b


def _truncate(
    ids: np.ndarray, labels: np.ndarray, max_length: int | None, truncation: str
) -> tuple[np.ndarray, np.ndarray]:
    if max_length is None or ids.size <= max_length:
        return ids, labels
    sl = slice(None, max_length) if truncation == "keep_start" else slice(-max_length, None)
    return ids[sl], labels[sl]


def _check_options(max_length: int | None, truncation: str) -> None:
    if max_length is not None and (isinstance(max_length, bool) or int(max_length) < 1):
        raise CacheInputError(f"max_length = {max_length} must be a positive number or None")
    if truncation not in ("keep_start", "keep_end"):
        raise CacheInputError(f'truncation must be "keep_start" or "keep_end", got {truncation!r}')


def sample_key(index: int, row: Any, id_field: str | None, where: str) -> int | str:
    """A row's record key: its ``id_field`` value (an int or a str), or its sample ``index``
    when ``id_field`` is ``None`` or the row has no such field (or it is ``None``)."""
    if id_field is None or not hasattr(row, "get"):
        return index
    key = row.get(id_field)
    if key is None:
        return index
    if isinstance(key, np.integer):
        key = int(key)
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise CacheInputError(
            f"{where}: the key {id_field!r} must be an int or a str, not {type(key).__name__} "
            "(or pass id_field=None to key records by sample index)"
        )
    return key


def _keyed(where: str, key: int | str, index: int) -> str:
    """``where`` with the row's key when it is not the index."""
    return where if key == index and not isinstance(key, str) else f"{where} (key {key!r})"


def prepare_row(
    index: int,
    row: Any,
    *,
    tokenizer: Any = None,
    id_field: str | None = "id",
    max_length: int | None = None,
    truncation: Truncation = "keep_start",
    where: str | None = None,
) -> tuple[int | str, np.ndarray, np.ndarray]:
    """``(key, input_ids, labels)`` of one row (int32 arrays, checked): what the cache builder
    stores. ``where`` names the row in errors (default ``dataset item {index}``)."""
    where = where or f"dataset item {index}"
    key = sample_key(index, row, id_field, where)
    where = _keyed(where, key, index)
    ids, labels = _encode(_parse_row(row, where), tokenizer, where)
    return (key, *_truncate(*_check_tokens(ids, labels, where), max_length, truncation))


def tokenize_sft(
    row_or_rows: Any,
    tokenizer: Any = None,
    *,
    max_length: int | None = None,
    truncation: Truncation = "keep_start",
    id_field: str | None = "id",
) -> Any:
    """``{"input_ids": [...], "labels": [...]}`` for one row, or a list of them for a sequence
    or iterable of rows (a ``datasets.Dataset`` too); the ``id_field`` value is kept.

    The one tokenisation of SFT rows: the cache builder and the CLI use it; tokenise training
    data with it too and the batches match the cache.
    Row formats, masks and the truncation rule are in this module's docstring and
    docs/BUILD.md. Works as a ``datasets`` map function: ``ds.map(tokenize_sft,
    fn_kwargs={"tokenizer": tok})``.

    Args:
        row_or_rows: a dict (one row), or a sequence/iterable of dicts.
        tokenizer: a Hugging Face tokenizer (needed for every format but pre-tokenised rows).
        max_length: keep at most this many tokens per row (``None``: no limit).
        truncation: ``"keep_start"`` keeps the first ``max_length`` tokens (TRL's default),
            ``"keep_end"`` the last.
        id_field: the field copied to the output (the record key); ``None`` copies nothing.

    Raises:
        CacheInputError: a row that cannot be tokenised, naming it (``row N``) and the field.
    """
    _check_options(max_length, truncation)

    def one(row: Any, where: str, index: int) -> dict[str, Any]:
        _, ids, labels = prepare_row(
            index,
            row,
            tokenizer=tokenizer,
            id_field=None,
            max_length=max_length,
            truncation=truncation,
            where=where,
        )
        out: dict[str, Any] = {"input_ids": ids.tolist(), "labels": labels.tolist()}
        if id_field is not None and hasattr(row, "get") and row.get(id_field) is not None:
            out[id_field] = row[id_field]
        return out

    if isinstance(row_or_rows, Mapping) or (
        hasattr(row_or_rows, "keys") and hasattr(row_or_rows, "__getitem__")
    ):
        return one(row_or_rows, "the row", 0)
    rows = row_or_rows
    if not isinstance(rows, Iterable) and hasattr(rows, "__len__") and hasattr(rows, "__getitem__"):
        rows = map(rows.__getitem__, range(len(rows)))  # a sequence without __iter__
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Iterable):
        raise CacheInputError(
            f"tokenize_sft takes a dict or an iterable of dicts, got {_describe(row_or_rows)}"
        )
    out = [one(row, f"row {i}", i) for i, row in enumerate(rows)]
    if not out:
        raise CacheInputError("tokenize_sft: the dataset is empty (no rows)")
    return out


# ---------------------------------------------------------------------------------------------
# Readers


class JsonlDataset:
    """The rows of a JSONL file, one JSON object per line, read lazily (an iterable; blank
    lines are skipped and do not count as samples).

    Rows are yielded as they are in the file; with ``tokenizer`` they are yielded tokenised
    (:func:`tokenize_sft`, the ``id`` kept). :func:`~target_sft.build_teacher_cache` reads them
    itself and names ``path:line`` in its errors."""

    def __init__(self, path: str | os.PathLike[str], tokenizer: Any = None) -> None:
        self.path = Path(path)
        self.tokenizer = tokenizer
        if not self.path.is_file():
            raise CacheInputError(f"{self.path} is not a file")

    def located(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(line number from 1, row)`` for every non-blank line."""
        with self.path.open("r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise CacheInputError(f"{self.path}:{lineno}: not valid JSON ({e})") from None
                if not isinstance(obj, dict):
                    raise CacheInputError(
                        f"{self.path}:{lineno}: expected a JSON object, got {_describe(obj)}"
                    )
                yield lineno, obj

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for lineno, obj in self.located():
            if self.tokenizer is None:
                yield obj
                continue
            _, ids, labels = prepare_row(
                0, obj, tokenizer=self.tokenizer, id_field=None, where=f"{self.path}:{lineno}"
            )
            out: dict[str, Any] = {"input_ids": ids.tolist(), "labels": labels.tolist()}
            if obj.get("id") is not None:
                out["id"] = obj["id"]
            yield out


def _require(module: str, what: str) -> Any:
    """Import ``module`` for ``what``, or say which extra brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise CacheInputError(
            f"{what} needs the {module.split('.')[0]!r} package: pip install 'target-sft[data]'"
        ) from None


class ParquetDataset:
    """The rows of a Parquet file (``pyarrow``), read lazily in record batches; ``len()`` is
    the file's row count."""

    def __init__(self, path: str | os.PathLike[str], batch_size: int = 1024) -> None:
        self.path = Path(path)
        self.batch_size = batch_size
        if not self.path.is_file():
            raise CacheInputError(f"{self.path} is not a file")
        pq = _require("pyarrow.parquet", f"reading {self.path}")
        try:
            self._meta = pq.ParquetFile(self.path).metadata
        except Exception as e:  # pyarrow's ArrowInvalid and friends
            raise CacheInputError(f"{self.path}: not a Parquet file ({e})") from None

    def __len__(self) -> int:
        return int(self._meta.num_rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import pyarrow.parquet as pq

        f = pq.ParquetFile(self.path)
        for batch in f.iter_batches(batch_size=self.batch_size):
            yield from batch.to_pylist()


def open_dataset(path: str | os.PathLike[str]) -> Any:
    """The dataset at ``path``: a ``.jsonl`` file (:class:`JsonlDataset`), a ``.parquet`` file
    (:class:`ParquetDataset`) or a directory written by ``datasets``' ``save_to_disk`` (a
    ``datasets.Dataset``)."""
    p = Path(path)
    if p.is_dir():
        if (p / "state.json").exists() or (p / "dataset_dict.json").exists():
            datasets = _require("datasets", f"reading {p}")
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                raise CacheInputError(
                    f"{p} holds a DatasetDict with splits {sorted(ds)}; name one split's "
                    f"directory (e.g. {p / next(iter(ds))})"
                )
            return ds
        raise CacheInputError(f"{p} is a directory but not one written by datasets' save_to_disk")
    if not p.exists():
        raise CacheInputError(f"{p}: no such file")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return JsonlDataset(p)
    if suffix in (".parquet", ".pq"):
        return ParquetDataset(p)
    raise CacheInputError(
        f"{p}: unsupported data file (suffix {p.suffix!r}); use .jsonl, .parquet or a directory "
        "saved with datasets' save_to_disk"
    )


# ---------------------------------------------------------------------------------------------
# A build's input: walked once before the teacher loads (keys, schema, first rows tokenised)


class SFTSource:
    """A dataset as the cache builder reads it: its rows (by index when the input is a
    sequence), where each one is (line numbers for JSONL), and how each one becomes
    ``(key, input_ids, labels)``.

    :meth:`rows` walks every row once, counting them and checking that keys are unique (every
    rank walks the whole dataset, since duplicates can straddle ranks): the builder tokenises
    each row it yields in its planning pass, before the teacher loads; :meth:`check` checks
    every row's schema and tokenises the first :data:`HEAD_ROWS`. Inputs:

    * a sequence (``len`` and indexing: a list, a ``datasets.Dataset``): rows read by index;
    * a re-iterable (``JsonlDataset``, ``ParquetDataset``, a ``datasets.IterableDataset``, any
      object whose ``__iter__`` starts afresh): walked once to check and plan, once more to
      build;
    * a one-shot iterator (a generator: ``iter(x) is x``): read into a list first, since it
      cannot be walked twice; so everything is checked before the teacher loads and before any
      record is written, at the cost of holding the rows in memory (use a file or a
      ``datasets.Dataset`` for data that does not fit);
    * a path: :func:`open_dataset`.
    """

    data: Any

    def __new__(cls, data: Any, *args: Any, **kwargs: Any) -> SFTSource:
        if isinstance(data, (str, os.PathLike)):
            data = open_dataset(data)
        indexed = hasattr(data, "__len__") and hasattr(data, "__getitem__")
        if isinstance(data, (Mapping, str, bytes)) or not (indexed or isinstance(data, Iterable)):
            raise CacheInputError(
                f"the dataset must be a sequence or iterable of dicts (or a .jsonl/.parquet "
                f"path), got {_describe(data)}"
            )
        if iter(data) is data:  # a generator or iterator: one pass only
            data, indexed = list(data), True
        self = super().__new__(_IndexedSource if indexed else cls)
        self.data = data
        return self

    def __init__(
        self,
        data: Any,
        tokenizer: Any = None,
        *,
        id_field: str | None = "id",
        max_length: int | None = None,
        truncation: Truncation = "keep_start",
    ) -> None:
        # ``data`` was opened by __new__ (a path, a generator), which also chose the class
        _check_options(max_length, truncation)
        data = self.data
        self.tokenizer = tokenizer
        self.id_field = id_field
        self.max_length = max_length
        self.truncation = truncation
        self.indexed = hasattr(data, "__len__") and hasattr(data, "__getitem__")
        self._count: int | None = len(data) if self.indexed else None
        self._skipped_lines: list[int] = []  # JSONL: blank lines before the rows

    # -- where a row is
    def where(self, index: int) -> str:
        """``path:line (sample i)`` for JSONL, ``path row i`` for Parquet, else
        ``dataset item i``."""
        if isinstance(self.data, JsonlDataset):
            line = index + 1  # plus the blank lines before it
            for b in self._skipped_lines:
                if b > line:
                    break
                line += 1
            return f"{self.data.path}:{line} (sample {index})"
        if isinstance(self.data, ParquetDataset):
            return f"{self.data.path} row {index}"
        return f"dataset item {index}"

    def _located(self) -> Iterator[tuple[int, Any, str]]:
        if isinstance(self.data, JsonlDataset):
            self._skipped_lines = []
            prev = 0
            for i, (lineno, row) in enumerate(self.data.located()):
                self._skipped_lines.extend(range(prev + 1, lineno))
                prev = lineno
                yield i, row, f"{self.data.path}:{lineno} (sample {i})"
            return
        rows = (
            self.data
            if isinstance(self.data, Iterable)
            else map(self.data.__getitem__, range(len(self.data)))
        )
        for i, row in enumerate(rows):
            yield i, row, self.where(i)

    # -- the protocol the builder (target_sft.builder) reads
    def __len__(self) -> int:
        if self._count is None:
            raise TypeError("the row count is known after check()")
        return self._count

    def __iter__(self) -> Iterator[Any]:
        if isinstance(self.data, JsonlDataset):
            return (row for _, row in self.data.located())
        return iter(self.data)

    def prepare(self, index: int, row: Any) -> tuple[int | str, np.ndarray, np.ndarray]:
        """``(key, input_ids, int32 labels)`` of row ``index`` (see :func:`prepare_row`)."""
        return prepare_row(
            index,
            row,
            tokenizer=self.tokenizer,
            id_field=self.id_field,
            max_length=self.max_length,
            truncation=self.truncation,
            where=self.where(index),
        )

    def rows(self) -> Iterator[tuple[int, int | str, Any]]:
        """Every row once, in order, as ``(index, key, row)``, its key checked against every
        key before it: a duplicate is a :class:`CacheInputError` naming the key and both rows
        (``path:line`` for JSONL). Once walked, the row count is known (``len``); an empty
        dataset is an error. The one pass that :meth:`check` and the builder's planning pass
        make over the data."""
        seen: dict[int | str, int] = {}
        n = 0
        for i, row, where in self._located():
            key = sample_key(i, row, self.id_field, where)
            j = seen.get(key)
            if j is not None:
                where_j = self.where(j)
                how = (
                    f"field {self.id_field!r}" if self.id_field is not None else "the sample index"
                )
                raise CacheInputError(
                    f"duplicate key {key!r} ({how}): sample {j} ({where_j}) and sample {i} "
                    f"({where}) have the same key, and a cache holds one record per key. If "
                    "this dataset's ids are not unique, key the records by sample index "
                    "instead: id_field=None (CLI: --id-field none)"
                )
            seen[key] = i
            yield i, key, row
            n += 1
        if n == 0:
            raise CacheInputError(f"the dataset is empty ({self._describe_data()} has no rows)")
        if self._count is not None and self._count != n:  # pragma: no cover - a lying __len__
            raise CacheInputError(f"the dataset says it has {self._count} rows but holds {n}")
        self._count = n

    def check(self, head: int = HEAD_ROWS) -> int:
        """Walk every row (:meth:`rows`: count, unique keys), check its schema, and tokenise the
        first ``head`` rows. Returns the row count. Raises :class:`CacheInputError` on the first
        problem."""
        for i, key, row in self.rows():
            if i < head:
                self.prepare(i, row)
            else:
                where = _keyed(self.where(i), key, i)
                parsed = _parse_row(row, where)
                if parsed.needs_tokenizer and self.tokenizer is None:
                    _encode(parsed, None, where)  # raises: text without a tokenizer
                if parsed.kind == "tokens":
                    _check_tokens(parsed.input_ids, parsed.labels, where)
        return len(self)

    def _describe_data(self) -> str:
        path = getattr(self.data, "path", None)
        return str(path) if path is not None else type(self.data).__name__


class _IndexedSource(SFTSource):
    """An :class:`SFTSource` over a sequence: the builder reads its windows by index."""

    def __getitem__(self, index: int) -> Any:
        return self.data[index]
