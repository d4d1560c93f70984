"""SFT data in: ``tokenize_sft`` for every row format against TRL's own dataset preparation
(``SFTTrainer`` of the installed trl, on a tiny random Llama and a BPE tokenizer trained here with a
chat template), the builder's input checks (duplicate keys, bad rows named by line, all before the
teacher loads), the inputs (JSONL, Parquet, ``datasets``, generators) and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from build_helpers import (
    assert_records_equal,
    chat_template,
    save_chat_tokenizer,
    save_tiny_llama,
    write_jsonl,
)
from target_sft import TeacherCache, tokenize_sft
from target_sft.build import JsonlDataset, build_teacher_cache
from target_sft.errors import CacheInputError
from target_sft.sft_data import SFTSource

HERE = Path(__file__).resolve().parent  # tests/builder
TESTS = HERE.parent  # the shared helpers (build_helpers.py, ...)
ROOT = TESTS.parent
K = 4

TOOLS = json.dumps(
    [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
)
CHATS: list[dict[str, Any]] = [
    {
        "id": "multi",
        "messages": [
            {"role": "system", "content": "You answer with Python code only."},
            {"role": "user", "content": "import os and list the directory"},
            {"role": "assistant", "content": "import os\nprint(os.listdir('.'))"},
            {"role": "user", "content": "now sort it"},
            {"role": "assistant", "content": "print(sorted(os.listdir('.')))"},
        ],
    },
    {
        "id": "tool",
        "tools": TOOLS,
        "messages": [
            {"role": "user", "content": "what is x?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"type": "function", "function": {"name": "lookup", "arguments": {"q": "x"}}}
                ],
            },
            {"role": "tool", "content": "x = 42"},
            {"role": "assistant", "content": "x is 42."},
        ],
    },
    {
        "id": "unicode",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say café ✓"},
            {"role": "assistant", "content": "café ✓"},
        ],
    },
    {
        "id": "long",
        "messages": [
            {"role": "user", "content": "def add(a, b):"},
            {"role": "assistant", "content": "    return a + b"},
            {"role": "user", "content": "def mul(a, b):"},
            {"role": "assistant", "content": "    return a * b"},
            {"role": "user", "content": "def neg(a):"},
            {"role": "assistant", "content": "    return -a"},
        ],
    },
]
CONV_PAIRS: list[dict[str, Any]] = [
    {
        "id": "c1",
        "prompt": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "return the sum"},
        ],
        "completion": [{"role": "assistant", "content": "return a + b"}],
    },
    {
        "id": "c2",
        "prompt": [{"role": "user", "content": "class Foo:"}],
        "completion": [{"role": "assistant", "content": "    pass"}],
    },
]
PLAIN_PAIRS: list[dict[str, Any]] = [
    {"id": "p1", "prompt": "def foo(x):", "completion": " return x"},
    {"id": "p2", "prompt": "The sky is", "completion": " blue."},
    {"id": "p3", "prompt": "for i in range(", "completion": "10): print(i)"},  # merges
]
TEXTS: list[dict[str, Any]] = [
    {"id": "t1", "text": "import sys\nsys.exit(0)"},
    {"id": "t2", "text": "The licence grants permission."},
]


# ---------------------------------------------------------------------------------------------
# Fixtures: a tokenizer trained here, a tiny Llama with its vocabulary, TRL's preparation


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama and the chat tokenizer (with {% generation %} marks) in one dir."""
    d = tmp_path_factory.mktemp("chat") / "llama"
    tok = save_chat_tokenizer(d, generation_marks=True)
    save_tiny_llama(d, vocab=len(tok), tokenizer=False)
    return d


@pytest.fixture(scope="module")
def tok(teacher_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(teacher_dir)


@pytest.fixture(scope="module")
def tok_unmarked(teacher_dir: Path):
    """The same tokenizer, its template without {% generation %} marks (same rendering)."""
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(teacher_dir)
    t.chat_template = chat_template(generation_marks=False)
    return t


def trl_prepare(rows: list[dict], tok: Any, model_dir: Path, tmp: Path, **config: Any) -> dict:
    """TRL's own dataset preparation (``SFTTrainer`` with ``SFTConfig(**config)``): id ->
    (input_ids, labels)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    config.setdefault("max_length", None)
    fields = {k: None for r in rows for k in r}  # from_list takes its columns from the first row
    rows = [{**fields, **r} for r in rows]
    args = SFTConfig(output_dir=str(tmp), report_to=[], bf16=False, use_cpu=True, **config)
    trainer = SFTTrainer(
        model=str(model_dir), args=args, train_dataset=Dataset.from_list(rows), processing_class=tok
    )
    return {r["id"]: (r["input_ids"], r["labels"]) for r in trainer.train_dataset}


@pytest.fixture(scope="module")
def trl_chats(teacher_dir, tok, tmp_path_factory) -> dict:
    return trl_prepare(
        CHATS, tok, teacher_dir, tmp_path_factory.mktemp("trl"), assistant_only_loss=True
    )


def ours(rows: list[dict], tokenizer: Any, **kw: Any) -> dict:
    return {r["id"]: (r["input_ids"], r["labels"]) for r in tokenize_sft(rows, tokenizer, **kw)}


def build(teacher, data, out, **kw):
    kw.setdefault("top_k", K)
    kw.setdefault("codec", "exact")
    kw.setdefault("progress", False)
    return build_teacher_cache(teacher, data, out, **kw)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), str(TESTS)]))
    return subprocess.run(
        [sys.executable, "-m", "target_sft.cli", *args], capture_output=True, text=True, env=env
    )


def broken_teacher(tmp: Path, tok: Any) -> Path:
    """A teacher directory whose model cannot load (config.json is not JSON): any error raised
    with it came before the teacher loaded. Its tokenizer is saved in ``tmp / "tok"``."""
    d = tmp / "broken-teacher"
    tok.save_pretrained(d)
    tok.save_pretrained(tmp / "tok")
    (d / "config.json").write_text("{ this is not a model config")
    return d


# ---------------------------------------------------------------------------------------------
# tokenize_sft against TRL


def test_tokenizer_is_real_and_the_template_has_all_roles(tok, tok_unmarked):
    assert len(tok) >= 1000
    ids = tok("import os")["input_ids"]
    assert ids[0] == tok.bos_token_id and 2 <= len(ids) <= 6  # BPE merges, not characters
    text = tok.apply_chat_template(CHATS[1]["messages"], tools=json.loads(TOOLS), tokenize=False)
    for part in ("<|user|>", "<|assistant|>", "<|tool|>", "<|call|>", "tools: ", "lookup"):
        assert part in text
    assert "{% generation %}" in tok.chat_template
    assert "{% generation %}" not in tok_unmarked.chat_template


def test_messages_labels_equal_trl_assistant_only_loss(tok, trl_chats):
    got = ours(CHATS, tok)
    assert set(got) == set(trl_chats)
    for key, (ids, labels) in trl_chats.items():
        assert got[key][0] == ids, key
        assert got[key][1] == labels, key
        assert any(x != -100 for x in labels) and labels.count(-100) > 0
    # supervised = the assistant turns with their end-of-turn token, nothing else
    ids, labels = got["multi"]
    sup = [t for t in labels if t != -100]
    assert (
        tok.decode(sup)
        == "import os\nprint(os.listdir('.'))<|end|>print(sorted(os.listdir('.')))<|end|>"
    )


def test_incremental_templating_equals_the_generation_marks(tok, tok_unmarked, trl_chats):
    assert ours(CHATS, tok_unmarked) == trl_chats


def test_conversational_prompt_completion_equals_trl(teacher_dir, tok, tok_unmarked, tmp_path):
    want = trl_prepare(CONV_PAIRS, tok, teacher_dir, tmp_path, assistant_only_loss=True)
    assert ours(CONV_PAIRS, tok) == want
    assert ours(CONV_PAIRS, tok_unmarked) == want
    _, labels = want["c1"]
    assert tok.decode([t for t in labels if t != -100]) == "return a + b<|end|>"


def test_plain_prompt_completion_and_text_equal_trl(teacher_dir, tok, tmp_path):
    want = trl_prepare(PLAIN_PAIRS, tok, teacher_dir, tmp_path / "pc")  # completion_only_loss
    assert ours(PLAIN_PAIRS, tok) == want
    ids, labels = want["p1"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    n_prompt = len(tok("def foo(x):")["input_ids"])
    assert labels == [-100] * n_prompt + ids[n_prompt:]
    assert tok.decode(ids[n_prompt:]) == " return x<|eos|>"
    want = trl_prepare(TEXTS, tok, teacher_dir, tmp_path / "lm")
    got = ours(TEXTS, tok)
    assert got == want
    ids, labels = got["t1"]
    assert labels == ids and ids[-1] == tok.eos_token_id


def test_prompt_response_is_a_user_and_an_assistant_turn(tok):
    got = tokenize_sft({"id": 3, "prompt": "class Foo:", "response": "    pass"}, tok)
    pair = tokenize_sft(
        {
            "prompt": [{"role": "user", "content": "class Foo:"}],
            "completion": [{"role": "assistant", "content": "    pass"}],
        },
        tok,
    )
    assert got == {**pair, "id": 3}
    tok_plain = type(tok).from_pretrained(tok.name_or_path)
    tok_plain.chat_template = None  # no template: plain-text prompt/completion
    assert tokenize_sft({"prompt": "a", "response": "b"}, tok_plain) == tokenize_sft(
        {"prompt": "a", "completion": "b"}, tok_plain
    )


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_max_length_truncation_equals_trl(teacher_dir, tok, tmp_path, mode):
    full = ours(CHATS, tok)
    got = ours(CHATS, tok, max_length=20, truncation=mode)
    for key, (ids, labels) in full.items():
        sl = slice(None, 20) if mode == "keep_start" else slice(-20, None)
        assert got[key] == (ids[sl], labels[sl])
    want = trl_prepare(
        CHATS, tok, teacher_dir, tmp_path, assistant_only_loss=True, max_length=20,
        truncation_mode=mode,
    )  # fmt: skip
    assert want  # TRL drops rows left without a supervised token; we keep them
    for key, value in want.items():
        assert got[key] == value, key


def test_tokenize_sft_as_a_datasets_map_function(tok):
    import datasets

    rows = [{"tools": None, **r} for r in CHATS]
    ds = datasets.Dataset.from_list(rows).map(tokenize_sft, fn_kwargs={"tokenizer": tok})
    want = tokenize_sft(CHATS, tok)
    assert [r["input_ids"] for r in ds] == [w["input_ids"] for w in want]
    assert [r["labels"] for r in ds] == [w["labels"] for w in want]


def test_pretokenised_rows_pass_through(tok):
    row = {"id": "x", "input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, -100]}
    assert tokenize_sft(row, tok) == row
    assert tokenize_sft({"input_ids": [5, 6, 7]}) == {"input_ids": [5, 6, 7], "labels": [5, 6, 7]}
    assert tokenize_sft(row, max_length=2, truncation="keep_end")["labels"] == [7, -100]


# ---------------------------------------------------------------------------------------------
# Errors name the row and the field


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
         "messages[0] (role 'user') has no 'content'"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                       {"role": "assistant", "content": "a"}]},
         "messages[0] (role 'user'): 'content' is a list; only string content"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "gpt", "content": "a"}]},
         "'messages' has no assistant turn (roles: ['user', 'gpt'])"),
        ({"messages": []}, "'messages' must be a non-empty list of messages"),
        ({"messages": [{"content": "hi"}]}, "messages[0] has no 'role'"),
        ({"conversations": [{"from": "human", "value": "hi"}]},
         "has no 'input_ids', 'messages', 'prompt'+'completion'"),
        ({"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]},
         "must both be strings (plain text) or both lists of messages"),
        ({"prompt": "a", "completion": "b", "text": "c"}, "matches several row formats"),
        ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user",
          "content": "b"}]}, "'completion' has no assistant turn"),
        ({"text": 5}, "'text' must be a string, got a int"),
        ({"input_ids": [5, -1]}, "negative id -1"),
    ],
)  # fmt: skip
def test_bad_rows_are_named(tok, row, message):
    rows = [{"text": "fine"}, {"text": "fine too"}, row]
    with pytest.raises(CacheInputError) as e:
        tokenize_sft(rows, tok)
    assert "row 2" in str(e.value) and message in str(e.value), str(e.value)


def test_more_errors(tok):
    with pytest.raises(
        CacheInputError, match=r"row 0 holds text \(text\) but there is no tokenizer"
    ):
        tokenize_sft([{"text": "hello"}])
    with pytest.raises(CacheInputError, match="the dataset is empty"):
        tokenize_sft([], tok)
    with pytest.raises(CacheInputError, match="max_length = 0 must be a positive"):
        tokenize_sft({"text": "a"}, tok, max_length=0)
    with pytest.raises(CacheInputError, match="truncation must be"):
        tokenize_sft({"text": "a"}, tok, truncation="left")
    no_template = type(tok).from_pretrained(tok.name_or_path)
    no_template.chat_template = None
    with pytest.raises(CacheInputError, match="needs a tokenizer with a chat template"):
        tokenize_sft(CHATS[0], no_template)


def test_a_template_with_no_way_to_find_the_assistant_tokens_is_an_error(tok):
    t = type(tok).from_pretrained(tok.name_or_path)
    # no generation marks, and the last message is rendered differently (an EOS after it), so a
    # conversation's prefix is not a token prefix of the whole
    t.chat_template = chat_template(False).replace(
        "{% endfor %}", "{% if loop.last and not add_generation_prompt %}<|eos|>{% endif %}"
        "{% endfor %}"
    )  # fmt: skip
    with pytest.raises(CacheInputError) as e:
        tokenize_sft([CHATS[2], CHATS[0]], t)
    msg = str(e.value)
    assert "row 1" in msg and "gives no way to find the assistant tokens" in msg
    assert "{% generation %}" in msg
    # marks that cover nothing are an error too, not an empty mask
    t.chat_template = "{{ bos_token }}{% generation %}{% endgeneration %}" + chat_template(False)
    with pytest.raises(CacheInputError, match="cover no token"):
        tokenize_sft(CHATS[0], t)


# ---------------------------------------------------------------------------------------------
# The builder: inputs, keys, checks before the teacher


def test_chat_jsonl_builds_identical_caches_through_cli_and_python_with_trl_labels(
    teacher_dir, tok, trl_chats, tmp_path
):
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    r = cli("cache", "build", "--teacher", str(teacher_dir), "--data", str(data),
            "--out", str(tmp_path / "cli"), "--top-k", str(K), "--codec", "exact")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"OK: {tmp_path / 'cli'}: {len(CHATS)} records" in r.stdout
    assert f"{len(CHATS)}/{len(CHATS)} [" in r.stderr  # the progress bar has a total
    build(teacher_dir, CHATS, tmp_path / "py")
    a, b = TeacherCache(tmp_path / "cli"), TeacherCache(tmp_path / "py")
    assert_records_equal(a, b)
    assert sorted(a.keys()) == sorted(trl_chats)
    for key, (ids, labels) in trl_chats.items():
        assert a[key].input_ids.tolist() == ids
        assert a[key].labels.tolist() == labels
        assert a[key].n_supervised == sum(x != -100 for x in labels[1:])
    assert a.info.tokenizer["fingerprint"] == b.info.tokenizer["fingerprint"]


def test_parquet_datasets_and_generators_build_the_same_cache(teacher_dir, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"tools": None, **r} for r in CHATS]  # Arrow takes its columns from the first row
    ref = TeacherCache(build(teacher_dir, rows, tmp_path / "list").info.path)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "saved"))
    inputs = {
        "parquet": str(tmp_path / "d.parquet"),
        "dataset": ds,
        "iterable": ds.to_iterable_dataset(),
        "saved": str(tmp_path / "saved"),
        "generator": (dict(r) for r in rows),
        "jsonl": str(write_jsonl(tmp_path / "d.jsonl", rows)),
    }
    for name, data in inputs.items():
        res = build(teacher_dir, data, tmp_path / name)
        assert res.info.records == len(rows), name
        assert_records_equal(TeacherCache(tmp_path / name), ref)


def test_duplicate_keys_are_an_error_before_the_teacher_loads(tok, teacher_dir, tmp_path):
    rows = [{"id": "same", "text": f"line {i}"} for i in range(50)]
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": "x"}, *rows])
    teacher = broken_teacher(tmp_path, tok)
    with pytest.raises(CacheInputError) as e:
        build(teacher, data, tmp_path / "c", tokenizer=tok)
    msg = str(e.value)
    assert "duplicate key 'same' (field 'id')" in msg
    assert "sample 1 (" + str(data) + ":2 (sample 1)) and sample 2 (" + str(data) + ":3" in msg
    assert "id_field=None (CLI: --id-field none)" in msg
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
    # a list names the items; keys can straddle any window/rank split: all rows are checked
    rows = [{"id": 7, "text": "a"}, *[{"id": f"b{i}", "text": "b"} for i in range(8)]]
    with pytest.raises(CacheInputError, match=r"sample 0 \(dataset item 0\) and sample 9"):
        build(teacher, [*rows, {"id": 7, "text": "c"}], tmp_path / "c", tokenizer=tok, window=2)
    # an id colliding with another row's index is a duplicate too
    with pytest.raises(CacheInputError, match=r"duplicate key 1 \(field 'id'\)"):
        build(
            teacher,
            [{"text": "a"}, {"text": "b"}, {"id": 1, "text": "c"}],
            tmp_path / "c",
            tokenizer=tok,
        )
    # id_field=None keys by the sample index: all 51 records
    res = build(teacher_dir, data, tmp_path / "ok", id_field=None)
    assert res.info.records == 51
    assert sorted(TeacherCache(tmp_path / "ok").keys()) == list(range(51))


def test_a_generator_with_duplicate_keys_commits_nothing(tok, tmp_path):
    walked = []

    def rows():
        for i in range(30):
            walked.append(i)
            yield {"id": "dup" if i in (3, 27) else f"r{i}", "text": f"row {i}"}

    teacher = broken_teacher(tmp_path, tok)
    with pytest.raises(CacheInputError, match=r"duplicate key 'dup'.*sample 3 .* sample 27"):
        build(teacher, rows(), tmp_path / "c", tokenizer=tok, window=4)
    assert walked == list(range(30))  # read once (into memory); no teacher, no record
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").glob("*.safetensors"))


def test_bad_data_is_reported_before_the_teacher_loads(tok, tmp_path):
    teacher = broken_teacher(tmp_path, tok)
    good = [{"id": i, "messages": CHATS[0]["messages"]} for i in range(3)]
    bad = {"id": "bad", "messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}
    # far past the first rows: the schema of every row is checked, not only the head
    rows = good * 30
    rows = [dict(r, id=i) for i, r in enumerate(rows)] + [bad]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(CacheInputError) as e:
        build(teacher, data, tmp_path / "c", tokenizer=tok)
    assert (
        f"{data}:91 (sample 90) (key 'bad'): messages[1] (role 'assistant') has no 'content'"
        in (str(e.value))
    )
    r = cli("cache", "build", "--teacher", str(teacher), "--tokenizer", str(tmp_path / "tok"),
            "--data", str(data), "--out", str(tmp_path / "c"), "-q")  # fmt: skip
    assert r.returncode == 1
    assert "has no 'content'" in r.stderr and "config" not in r.stderr.lower()
    # the same data with the bad row fixed reaches the teacher, which fails to load
    write_jsonl(data, rows[:-1])
    with pytest.raises(Exception) as e:
        build(teacher, data, tmp_path / "c", tokenizer=tok)
    assert not isinstance(e.value, CacheInputError)


def test_cli_id_field_none_max_length_and_parquet(teacher_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": "same", **{k: v for k, v in r.items() if k != "id"}} for r in CHATS]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    args = ("cache", "build", "--teacher", str(teacher_dir), "--data", str(tmp_path / "d.parquet"),
            "--top-k", str(K), "-q", "--max-length", "24", "--truncation", "keep_end")  # fmt: skip
    r = cli(*args, "--out", str(tmp_path / "a"))
    assert r.returncode == 1
    assert (
        f"duplicate key 'same' (field 'id'): sample 0 ({tmp_path / 'd.parquet'} row 0)" in r.stderr
    )
    assert "--id-field none" in r.stderr
    r = cli(*args, "--out", str(tmp_path / "b"), "--id-field", "none")
    assert r.returncode == 0, r.stderr
    cache = TeacherCache(tmp_path / "b")
    full = tokenize_sft(CHATS, cache_tokenizer(teacher_dir))
    for i, want in enumerate(full):
        np.testing.assert_array_equal(cache[i].input_ids, want["input_ids"][-24:])
        np.testing.assert_array_equal(cache[i].labels, want["labels"][-24:])


def cache_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_source_counts_rows_and_names_jsonl_lines_after_blank_lines(tok, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('\n{"text": "a"}\n\n\n{"text": "b"}\n{"text": 3}\n')
    src = SFTSource(str(p), tok)
    with pytest.raises(CacheInputError, match=r"d.jsonl:6 \(sample 2\): 'text' must be a string"):
        src.check()
    p.write_text('\n{"text": "a"}\n\n\n{"text": "b"}\n')
    src = SFTSource(str(p), tok)
    assert src.check() == 2 and len(src) == 2
    assert src.where(1) == f"{p}:5 (sample 1)"
    assert not hasattr(src, "__getitem__")  # the builder walks a file
    # JsonlDataset (public) yields the rows as they are, or tokenised with a tokenizer
    assert list(JsonlDataset(p)) == [{"text": "a"}, {"text": "b"}]
    assert list(JsonlDataset(p, tok)) == tokenize_sft([{"text": "a"}, {"text": "b"}], tok)
    assert SFTSource([{"text": "a"}], tok)[0] == {"text": "a"}  # and indexes a sequence

    class OldStyle:  # len() and indexing, no __iter__ (the sequence protocol before Iterable)
        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int) -> dict:
            return {"text": "abc"[i]}

    src = SFTSource(OldStyle(), tok)
    assert src.check() == 3 and src[2] == {"text": "c"}
    assert [r["labels"] for r in tokenize_sft(OldStyle(), tok)] == [
        r["labels"] for r in tokenize_sft([{"text": c} for c in "abc"], tok)
    ]
    with pytest.raises(CacheInputError, match="the dataset is empty"):
        SFTSource([], tok).check()
    (tmp_path / "x.csv").write_text("text\na\n")
    with pytest.raises(CacheInputError, match="unsupported data file"):
        SFTSource(str(tmp_path / "x.csv"), tok)


def test_every_rank_refuses_duplicates_that_straddle_ranks(tok, tmp_path):
    """Two torchrun ranks, windows of 2 samples: the duplicate pair (samples 0 and 3) is split
    over rank 0 and rank 1, and each rank checks the whole dataset, so both refuse it before
    loading the teacher (whose config.json is broken)."""
    import socket

    teacher = broken_teacher(tmp_path, tok)
    rows = [{"id": k, "text": f"row {i}"} for i, k in enumerate(["x", "a", "b", "x", "c"])]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT / "python"), str(TESTS)]),
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           f"--master-port={port}", "-m", "target_sft.cli", "cache", "build",
           "--teacher", str(teacher), "--tokenizer", str(tmp_path / "tok"), "--data", str(data),
           "--out", str(tmp_path / "c"), "--window", "2", "-q"]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    want = f"duplicate key 'x' (field 'id'): sample 0 ({data}:1 (sample 0)) and sample 3"
    assert r.stderr.count(want) == 2, r.stderr  # one line per rank
    assert "config" not in r.stderr.replace(str(tmp_path), "")


def test_cache_build_help_shows_defaults_and_purposes(capsys):
    from target_sft.cli import main

    with pytest.raises(SystemExit) as e:
        main(["cache", "build", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for part in (
        "--top-k TOP_K teacher tokens kept per position (default: 64)",
        "--id-field ID_FIELD row field holding the record key",
        "'none' keys every record by its sample index (default: id)",
        "--max-length MAX_LENGTH keep at most this many tokens per row (default: no limit)",
        "which end of a row longer than --max-length is kept (default: keep_start)",
        "--data DATA a .jsonl file, a .parquet file, or a directory saved with datasets' "
        "save_to_disk",
        "--shard-size SHARD_SIZE payload bytes per shard file (default: 256MiB)",
    ):
        assert part in text, part
    assert "(default: None)" not in text
