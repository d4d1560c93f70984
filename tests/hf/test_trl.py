"""``target_sft.trl``: TRL's ``SFTTrainer`` with the teacher cache, real parts only.

A tiny random Llama saved with ``save_pretrained`` is the teacher, a BPE tokenizer with a chat
template (``{% generation %}`` marks) is trained here, the caches are built from it by
``build_teacher_cache``, and the installed trl's ``SFTTrainer`` prepares the data and trains a
second tiny Llama on CPU:

* TRL prepares the rows (conversations, prompt/completion; keys from ``id`` or the row index):
  its labels equal the cached labels row by row, every batch's teacher tensors are the cached
  records of its rows' keys, and the first step's loss is ``compute_target_sft_loss`` of the
  initial model on that batch;
* a cache exported with ``TeacherCache.to_hf_dataset`` and ``skip_prepare_dataset``;
* TRL settings that disagree with the cache are errors naming the setting, at construction and,
  with the construction check off, per batch in the collator (a truncation reported as one).
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig

from build_helpers import save_chat_tokenizer, save_tiny_llama
from target_sft import (
    CacheMismatchError,
    TargetSFTCollator,
    TeacherCache,
    build_teacher_cache,
)
from target_sft.hf import compute_target_sft_loss
from target_sft.trl import TargetSFTSFTTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

K = 8
ETA = 0.5
WORDS = "the sum of two numbers is returned by this small function when it is called".split()


def _text(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, n))


def _chats(n: int = 8, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        msgs = [{"role": "user", "content": _text(rng, 3 + i % 4)}]
        msgs.append({"role": "assistant", "content": _text(rng, 2 + i % 5)})
        if i % 3 == 0:
            msgs += [
                {"role": "user", "content": _text(rng, 2)},
                {"role": "assistant", "content": _text(rng, 4)},
            ]
        rows.append({"id": f"chat-{i}", "messages": msgs})
    return rows


def _pairs(n: int = 6, seed: int = 1) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [
        {"id": f"pair-{i}", "prompt": _text(rng, 3 + i % 3), "completion": " " + _text(rng, 3)}
        for i in range(n)
    ]


CHATS, PAIRS = _chats(), _pairs()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The teacher (a tiny Llama with the chat tokenizer) and the student (another seed)."""
    root = tmp_path_factory.mktemp("trl")
    tok = save_chat_tokenizer(root / "teacher", generation_marks=True)
    save_tiny_llama(root / "teacher", seed=0, vocab=len(tok), tokenizer=False)
    save_tiny_llama(root / "student", seed=1, vocab=len(tok), tokenizer=False)
    return {"root": root, "teacher": root / "teacher", "student": root / "student"}


@pytest.fixture(scope="module")
def tok(dirs):
    return AutoTokenizer.from_pretrained(dirs["teacher"])


def _build(dirs: dict[str, Path], rows: list[dict], name: str, **kw: Any) -> TeacherCache:
    out = dirs["root"] / name
    build_teacher_cache(dirs["teacher"], rows, out, top_k=K, codec="exact", progress=False, **kw)
    return TeacherCache(out)


@pytest.fixture(scope="module")
def chat_cache(dirs) -> TeacherCache:
    return _build(dirs, CHATS, "chats")


@pytest.fixture(scope="module")
def pair_cache(dirs) -> TeacherCache:
    return _build(dirs, PAIRS, "pairs")


def student(dirs: dict[str, Path]) -> Any:
    return AutoModelForCausalLM.from_pretrained(dirs["student"], dtype=torch.float32)


def config(tmp: Path, **kw: Any) -> SFTConfig:
    base: dict[str, Any] = dict(
        output_dir=str(tmp),
        report_to=[],
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        max_length=None,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return SFTConfig(**base)


class KeyedCollator(TargetSFTCollator):
    """Records the keys of every batch it builds, in order."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.keys: list[list[Any]] = []

    def __call__(self, items):
        self.keys.append([it["key"] for it in items])
        return super().__call__(items)


class Recording(TargetSFTSFTTrainer):
    """Records every ``compute_loss`` call: the batch, the loss and ``num_items_in_batch``."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = out[0] if return_outputs else out
        if not hasattr(self, "calls"):
            self.calls = []
        self.calls.append(
            ({k: v.detach().clone() for k, v in inputs.items()}, loss.detach(), num_items_in_batch)
        )
        return out


def assert_batch_is_the_cache(batch: dict[str, torch.Tensor], keys: list, cache: TeacherCache):
    """Row ``b`` of the batch holds exactly the cached record of ``keys[b]``: its tokens, its
    labels (``-100`` at position 0, as the collator sets) and its teacher rows at their
    supervised positions (``-1``/``-inf`` elsewhere), then the label column of the default
    ``label_in_support=True``: the label and its cached log-prob where it is outside the top-k."""
    for b, key in enumerate(keys):
        rec = cache[key]
        n = rec.n_tokens
        np.testing.assert_array_equal(batch["input_ids"][b, :n].numpy(), rec.input_ids)
        np.testing.assert_array_equal(batch["labels"][b, 1:n].numpy(), rec.labels[1:])
        assert int(batch["attention_mask"][b].sum()) == n
        pos = rec.supervised_positions
        assert pos.size > 0
        k = rec.topk_ids.shape[1]
        assert batch["teacher_ids"].shape[-1] == k + 1
        np.testing.assert_array_equal(batch["teacher_ids"][b, pos, :k].numpy(), rec.topk_ids)
        lps = batch["teacher_logprobs"][b, pos, :k].numpy()
        np.testing.assert_array_equal(lps, rec.topk_logprobs)
        outside = ~(rec.topk_ids == rec.labels[pos][:, None]).any(1)
        want_ids = np.where(outside, rec.labels[pos], -1)
        want_lps = np.where(outside, rec.label_logprobs, -np.inf).astype(np.float32)
        np.testing.assert_array_equal(batch["teacher_ids"][b, pos, k].numpy(), want_ids)
        np.testing.assert_array_equal(batch["teacher_logprobs"][b, pos, k].numpy(), want_lps)
        off = np.setdiff1d(np.arange(batch["input_ids"].shape[1]), pos)
        assert (batch["teacher_ids"][b, off] == -1).all()
        assert torch.isneginf(batch["teacher_logprobs"][b, off]).all()


def train_and_check(trainer: Recording, collator: KeyedCollator, cache: TeacherCache, model0):
    params0 = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert len(trainer.calls) == 3
    for (batch, loss, _), keys in zip(trainer.calls, collator.keys, strict=False):
        assert_batch_is_the_cache(batch, keys, cache)
        assert torch.isfinite(loss)
    # the first step's loss: the Q-target loss of the initial model on that very batch
    batch, loss, n_items = trainer.calls[0]
    want = compute_target_sft_loss(model0, batch, "target_sft", eta=ETA, num_items_in_batch=n_items)
    assert n_items is not None and int(n_items) == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(loss, want.detach(), rtol=0, atol=0)
    assert any(
        not torch.equal(a, b) for a, b in zip(params0, trainer.model.parameters(), strict=True)
    )


# ---------------------------------------------------------------------------------------------
# (a) TRL prepares the dataset


def test_conversations_trl_prepares_keys_labels_and_loss(dirs, tok, chat_cache, tmp_path):
    model = student(dirs)
    model0 = copy.deepcopy(model)
    collator = KeyedCollator(chat_cache, pad_token_id=tok.pad_token_id)
    trainer = Recording(
        model,
        config(tmp_path, assistant_only_loss=True, shuffle_dataset=True),
        data_collator=collator,
        train_dataset=Dataset.from_list(CHATS),
        processing_class=tok,
        loss="target_sft",
        loss_kwargs={"eta": ETA},
    )
    # TRL's assistant_only_loss labels are the cached ones (target_sft.tokenize_sft), every row
    prepared = {r["key"]: r for r in trainer.train_dataset}
    assert sorted(prepared) == sorted(r["id"] for r in CHATS)
    for key, row in prepared.items():
        rec = chat_cache[key]
        np.testing.assert_array_equal(row["input_ids"], rec.input_ids)
        np.testing.assert_array_equal(row["labels"], rec.labels)
        assert 0 < rec.n_supervised < rec.n_tokens - 1  # the prompt is not supervised
    train_and_check(trainer, collator, chat_cache, model0)


def test_prompt_completion_and_row_index_keys(dirs, tok, tmp_path):
    """Plain prompt/completion rows (TRL's completion_only_loss, its default here) in a cache
    keyed by row index (id_field=None), trained through the trainer's own collator."""
    rows = [{k: v for k, v in r.items() if k != "id"} for r in PAIRS]
    cache = _build(dirs, rows, "pairs-by-index", id_field=None)
    assert sorted(cache.keys()) == list(range(len(rows)))
    model = student(dirs)
    model0 = copy.deepcopy(model)
    trainer = Recording(
        model,
        config(tmp_path, shuffle_dataset=True),
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        teacher_cache=cache.path,
        key_field=None,
        loss="target_sft",
        loss_kwargs={"eta": ETA},
    )
    assert trainer.completion_only_loss
    assert isinstance(trainer.data_collator, TargetSFTCollator)
    for row in trainer.train_dataset:
        np.testing.assert_array_equal(row["labels"], cache[row["key"]].labels)
    keys = KeyedCollator(cache, pad_token_id=tok.pad_token_id)
    trainer.data_collator = keys
    train_and_check(trainer, keys, cache, model0)


def test_max_length_that_agrees_with_the_cache(dirs, tok, tmp_path):
    """A cache built with max_length=L serves TRL's max_length=L (same truncation)."""
    cache = _build(dirs, CHATS, "chats-12", max_length=12)
    trainer = TargetSFTSFTTrainer(
        student(dirs),
        config(tmp_path, assistant_only_loss=True, max_length=12),
        train_dataset=Dataset.from_list(CHATS),
        processing_class=tok,
        teacher_cache=cache,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[1] == 12
    assert (batch["teacher_ids"][:, :, 0] >= 0).any()


def test_label_in_support_from_the_trl_config(dirs, tok, chat_cache, tmp_path):
    """TargetSFTTRLConfig.label_in_support reaches the collator the trainer makes (default
    True: K + 1 teacher columns; False: the bare top-k); a given collator must agree."""
    from target_sft.config import TargetSFTTRLConfig

    base = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_length=None)
    base.update(per_device_train_batch_size=2, assistant_only_loss=True, save_strategy="no")
    for value in (True, False):
        args = TargetSFTTRLConfig(**{**base, "label_in_support": value})
        trainer = TargetSFTSFTTrainer(
            student(dirs),
            args,
            train_dataset=Dataset.from_list(CHATS),
            processing_class=tok,
            teacher_cache=chat_cache,
        )
        assert trainer.data_collator.label_in_support is value
        batch = next(iter(trainer.get_train_dataloader()))
        assert batch["teacher_ids"].shape[-1] == chat_cache.top_k + int(value)
    with pytest.raises(ValueError, match=r"args\.label_in_support=False but the data_collator's"):
        TargetSFTSFTTrainer(
            student(dirs),
            TargetSFTTRLConfig(**{**base, "label_in_support": False}),
            train_dataset=Dataset.from_list(CHATS),
            processing_class=tok,
            data_collator=TargetSFTCollator(chat_cache, pad_token_id=tok.pad_token_id),
        )


def test_evaluation_datasets_get_their_keys(dirs, tok, chat_cache, tmp_path):
    """eval_dataset (one, or a dict) and a dataset passed to evaluate() are keyed and checked
    like the training set; the eval loss is the Q-target loss of the model on them."""
    rows = Dataset.from_list(CHATS)
    trainer = TargetSFTSFTTrainer(
        student(dirs),
        config(tmp_path, assistant_only_loss=True, per_device_eval_batch_size=8),
        train_dataset=rows,
        eval_dataset={"a": Dataset.from_list(CHATS[:3]), "b": rows},
        processing_class=tok,
        teacher_cache=chat_cache,
    )
    assert sorted(r["key"] for r in trainer.eval_dataset["a"]) == ["chat-0", "chat-1", "chat-2"]
    loss_b = trainer.evaluate(eval_dataset="b")["eval_loss"]
    # one batch of all 8 rows: the loss of compute_target_sft_loss on the collated rows
    batch = trainer.data_collator(
        [{k: r[k] for k in ("key", "input_ids", "labels")} for r in trainer.eval_dataset["b"]]
    )
    with torch.no_grad():
        want = compute_target_sft_loss(trainer.model.eval(), batch, "target_sft", eta=ETA)
    assert loss_b == pytest.approx(float(want), rel=1e-6)
    fresh = trainer.evaluate(eval_dataset=Dataset.from_list(CHATS[3:5]))
    assert np.isfinite(fresh["eval_loss"])


def test_a_template_without_generation_marks_needs_trls_training_template(dirs, tmp_path):
    """Qwen2.5's chat template (trl's copy) has no {% generation %} marks, so SFTTrainer trains
    with trl's training template, which supervises the newline after "<|im_start|>assistant"
    (tokenize_sft's incremental templating does not): a cache built with the plain template is
    refused naming the fix; one built with ``get_training_chat_template`` agrees row by row."""
    import trl
    from trl.chat_template_utils import get_training_chat_template

    d = tmp_path / "qwen-tpl"
    tok = save_chat_tokenizer(d, generation_marks=True)
    tok.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.save_pretrained(d)
    save_tiny_llama(d, seed=0, vocab=len(tok), tokenizer=False)
    rows = CHATS[:4]
    build_teacher_cache(d, rows, d / "plain", top_k=K, codec="exact", progress=False, tokenizer=tok)
    plain = TeacherCache(d / "plain")

    def trainer(tokenizer, cache):
        return TargetSFTSFTTrainer(
            AutoModelForCausalLM.from_pretrained(d),
            config(tmp_path / "out", assistant_only_loss=True),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            teacher_cache=cache,
        )

    (newline,) = tok.encode("\n", add_special_tokens=False)
    with pytest.raises(
        CacheMismatchError,
        match=rf"TRL trains with its own training chat template .*batch {newline} \(supervised\), "
        r"cache -100 .*get_training_chat_template\(tok\)",
    ):
        trainer(tok, plain)
    tok.chat_template = get_training_chat_template(tok)
    build_teacher_cache(
        d, rows, d / "marked", top_k=K, codec="exact", progress=False, tokenizer=tok
    )
    t = trainer(tok, TeacherCache(d / "marked"))
    assert t.chat_template is None  # TRL kept the (now marked) template
    for r in t.train_dataset:
        np.testing.assert_array_equal(r["labels"], t.data_collator.cache[r["key"]].labels)


# ---------------------------------------------------------------------------------------------
# (b) the cache as a datasets.Dataset


def test_to_hf_dataset_rows_are_the_records(chat_cache):
    ds = chat_cache.to_hf_dataset(chunk=3)
    assert ds.column_names == ["key", "input_ids", "labels"]
    assert len(ds) == len(chat_cache)
    for i, row in enumerate(ds):
        rec = chat_cache.record_at(i)
        assert row["key"] == rec.key
        np.testing.assert_array_equal(row["input_ids"], rec.input_ids)
        np.testing.assert_array_equal(row["labels"], rec.labels)


def test_skip_prepare_dataset_trains_on_the_exported_cache(dirs, tok, pair_cache, tmp_path):
    model = student(dirs)
    model0 = copy.deepcopy(model)
    collator = KeyedCollator(pair_cache, pad_token_id=tok.pad_token_id)
    trainer = Recording(
        model,
        config(tmp_path, dataset_kwargs={"skip_prepare_dataset": True}),
        data_collator=collator,
        train_dataset=pair_cache.to_hf_dataset(),
        processing_class=tok,
    )
    assert trainer.train_dataset.column_names == ["key", "input_ids", "labels"]
    train_and_check(trainer, collator, pair_cache, model0)


# ---------------------------------------------------------------------------------------------
# settings that disagree with the cache


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"packing": True}, r"SFTConfig\(packing=True\).*TargetSFTCollator\(packing=True"),
        ({"padding_free": True}, r"SFTConfig\(padding_free=True\)"),
        (
            {
                "dataset_kwargs": {"skip_prepare_dataset": True},
                "max_length": 8,
                "truncation_mode": "keep_end",
            },
            r"truncation_mode='keep_end'",
        ),
    ],
)
def test_settings_the_cache_cannot_honour(dirs, tok, chat_cache, tmp_path, setting, message):
    kw = dict(setting)
    if "packing" in kw:
        kw["max_length"] = 64
    with pytest.raises(ValueError, match=message):
        TargetSFTSFTTrainer(
            student(dirs),
            config(tmp_path, **kw),
            train_dataset=Dataset.from_list(CHATS),
            processing_class=tok,
            teacher_cache=chat_cache,
        )


def _trainer(dirs, tok, rows, cache, tmp, check_rows=64, **kw):
    return TargetSFTSFTTrainer(
        student(dirs),
        config(tmp, **kw),
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        teacher_cache=cache,
        check_rows=check_rows,
    )


def test_disagreeing_settings_are_named_at_construction(
    dirs, tok, chat_cache, pair_cache, tmp_path
):
    with pytest.raises(
        CacheMismatchError,
        match=r"train_dataset row 0 \(key 'chat-0'\): SFTConfig\(assistant_only_loss=False\) "
        r"supervises every token.*set assistant_only_loss=True",
    ):
        _trainer(dirs, tok, CHATS, chat_cache, tmp_path)
    with pytest.raises(
        CacheMismatchError, match=r"SFTConfig\(completion_only_loss=False\) supervises the prompt"
    ):
        _trainer(dirs, tok, PAIRS, pair_cache, tmp_path, completion_only_loss=False)
    n = chat_cache["chat-0"].n_tokens
    with pytest.raises(
        CacheMismatchError,
        match=rf"\(key 'chat-0'\): the batch's ids are a prefix of the cached ids: TRL's "
        rf"max_length=10 truncated the sample from {n} to 10 tokens; build the cache with the "
        r"same max_length .* or raise SFTConfig.max_length to at least",
    ):
        _trainer(dirs, tok, CHATS, chat_cache, tmp_path, assistant_only_loss=True, max_length=10)
    with pytest.raises(CacheMismatchError, match=r"the cached ids are a truncation of the batch's"):
        short = _build(dirs, CHATS, "chats-10", max_length=10)
        _trainer(dirs, tok, CHATS, short, tmp_path, assistant_only_loss=True)
    with pytest.raises(KeyError, match=r"key 'pair-0' is not in the cache"):
        _trainer(dirs, tok, PAIRS, chat_cache, tmp_path)


def test_every_batch_is_checked_in_the_collator(dirs, tok, chat_cache, tmp_path):
    """With the construction check off, the collator still refuses what disagrees: a truncated
    sample as a truncation, other labels at their first differing position."""
    trainer = _trainer(
        dirs,
        tok,
        CHATS,
        chat_cache,
        tmp_path,
        check_rows=0,
        assistant_only_loss=True,
        max_length=10,
    )
    with pytest.raises(
        CacheMismatchError,
        match=r"\(key \"chat-\d\"\): the batch's ids are a prefix of the cached ids \(10 of \d+ "
        r"tokens\).*max_length=10",
    ):
        next(iter(trainer.get_train_dataloader()))
    trainer = _trainer(dirs, tok, CHATS, chat_cache, tmp_path, check_rows=0)
    with pytest.raises(
        CacheMismatchError,
        match=r"\(key \"chat-\d\"\): the batch's labels differ from the cached labels at position "
        r"\d+ \(batch \d+ \(supervised\), cache -100 \(not supervised\)",
    ):
        next(iter(trainer.get_train_dataloader()))


def test_import_target_sft_does_not_import_trl():
    """``import target_sft`` and its Trainer integration leave trl alone (only
    ``target_sft.TargetSFTSFTTrainer`` / ``target_sft.trl`` import it)."""
    code = "import sys, target_sft.hf; assert 'trl' not in sys.modules, 'trl imported'"
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(root / "python"), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr


def test_the_docs_example_runs(dirs, tok, tmp_path, monkeypatch):
    """docs/HF.md's TRL block, as written, with two tiny local models for the Qwen ones (and
    fewer rows and steps on CPU)."""
    import re

    text = (Path(__file__).resolve().parents[2] / "docs" / "HF.md").read_text()
    section = text[text.index("## TRL `SFTTrainer`") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    tok.save_pretrained(dirs["student"])
    subs = {
        '"Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"': (
            f"{str(dirs['teacher'])!r}, {str(dirs['student'])!r}"
        ),
        "range(256)": "range(6)",
        "num_train_epochs=1": "max_steps=2, use_cpu=True, bf16=False",
        "torch.bfloat16": "torch.float32",
        "top_k=64": "top_k=64, progress=False",
    }
    for old, new in subs.items():
        assert old in code, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    scope: dict[str, Any] = {}
    exec(compile(code, "docs/HF.md", "exec"), scope)
    assert scope["trainer"].state.global_step == 2
    assert len(scope["cache"]) == 6


def test_add_cache_keys_follows_the_builders_rule():
    from target_sft import CacheInputError
    from target_sft.trl import add_cache_keys

    ds = Dataset.from_list([{"id": "a", "text": "x"}, {"id": None, "text": "y"}])
    assert list(add_cache_keys(ds)["key"]) == ["a", 1]  # no id: the row index, as the builder
    assert list(add_cache_keys(Dataset.from_list([{"text": "x"}] * 3), None)["key"]) == [0, 1, 2]
    keyed = Dataset.from_list([{"key": 5, "input_ids": [1]}])
    assert add_cache_keys(keyed) is keyed
    with pytest.raises(CacheInputError, match="both a 'key' column and the key field 'id'"):
        add_cache_keys(Dataset.from_list([{"key": 5, "id": "a"}]))


def test_a_reference_cache_reaches_the_loss(dirs, tok, chat_cache, tmp_path):
    """``reference_cache=``: the default collator adds the reference tensors (aligned by key)
    and SFT+KL reads its anchor from them; without it, construction names ``reference=``."""
    out = dirs["root"] / "chats-reference"
    if not out.exists():
        build_teacher_cache(
            dirs["student"],
            CHATS,
            out,
            top_k=K,
            codec="exact",
            progress=False,
            tokenizer=tok,
            role="reference",
        )
    ref = TeacherCache(out)
    kw = dict(processing_class=tok, teacher_cache=chat_cache, loss="sft_kl")
    with pytest.raises(ValueError, match=r"reference="):
        TargetSFTSFTTrainer(
            student(dirs),
            config(tmp_path, assistant_only_loss=True),
            train_dataset=Dataset.from_list(CHATS),
            **kw,
        )
    model0 = student(dirs)
    trainer = Recording(
        student(dirs),
        config(tmp_path, assistant_only_loss=True, max_steps=2),
        train_dataset=Dataset.from_list(CHATS),
        reference_cache=ref,
        **kw,
    )
    trainer.train()
    batch, loss, n_items = trainer.calls[0]
    assert {"reference_ids", "reference_logprobs", "reference_label_logprobs"} <= set(batch)
    want = compute_target_sft_loss(model0, batch, "sft_kl", num_items_in_batch=n_items)
    torch.testing.assert_close(loss, want)


def test_proximal_sft_keys_dict_rows(dirs, tok, chat_cache, tmp_path):
    """TRL's rows are dicts with a ``key``: the old-policy store is keyed by them."""
    trainer = TargetSFTSFTTrainer(
        student(dirs),
        config(tmp_path, assistant_only_loss=True, max_steps=2),
        train_dataset=Dataset.from_list(CHATS),
        processing_class=tok,
        teacher_cache=chat_cache,
        loss="proximal_sft",
    )
    trainer.train()
    store = trainer.old_policy.store
    assert len(store) == 4 and set(store.keys()) <= {r["id"] for r in CHATS}
    for key in store.keys():
        assert store[key].size == int((chat_cache[key].labels[1:] != -100).sum())
