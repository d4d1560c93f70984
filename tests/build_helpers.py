"""Shared by the cache-builder tests and their torchrun worker (tests/builder/build_worker.py):
a tiny random Llama saved with ``save_pretrained``, a tiny word-level tokenizer with a chat template,
generated samples, and a float64 reference for what the cache must hold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

VOCAB = 1000


def tiny_config(vocab: int = VOCAB, **extra: Any) -> dict[str, Any]:
    """The shape of every tiny test model (Llama, Qwen2, ...): 2 layers, 4 heads, GQA."""
    return dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        **extra,
    )


def save_tiny_llama(path: Path, seed: int = 0, vocab: int = VOCAB, tokenizer: bool = True) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**tiny_config(vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    if tokenizer:
        save_tiny_tokenizer(path, vocab)
    return path


#: the tiny causal LMs of each family: (config class, model class) names in ``transformers``
TINY_FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}


def save_tiny_model(
    path: Path, family: str, seed: int = 0, vocab: int = VOCAB, **config: Any
) -> Path:
    """A tiny random causal LM of ``family`` (:data:`TINY_FAMILIES`, or any transformers
    ``<Name>Config`` / ``<Name>ForCausalLM`` pair given as ``"Name"``), saved with
    ``save_pretrained``; ``config`` overrides :func:`tiny_config`."""
    import transformers

    cfg_name, model_name = TINY_FAMILIES.get(family, (f"{family}Config", f"{family}ForCausalLM"))
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_name)(**{**tiny_config(vocab), **config})
    getattr(transformers, model_name)(cfg).save_pretrained(path)
    return path


def save_tiny_tokenizer(
    path: Path,
    vocab: int = VOCAB,
    chat_template: str | None = None,
    shuffle_seed: int | None = None,
) -> None:
    """``chat_template`` replaces the default one; ``shuffle_seed`` gives the words other ids
    (the same tokens and size, another vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<user>": 4, "<assistant>": 5}
    ids = np.arange(len(words), vocab)
    if shuffle_seed is not None:
        ids = np.random.default_rng(shuffle_seed).permutation(ids)
    for i, j in zip(range(len(words), vocab), ids.tolist(), strict=True):
        words[f"w{i}"] = j
    tk = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.chat_template = (
        "{% for m in messages %}{{ '<' + m['role'] + '> ' + m['content'] + ' ' }}"
        "{% if m['role'] == 'assistant' %}{{ '</s> ' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}"
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(path)


def make_samples(n: int, seed: int = 0, vocab: int = VOCAB, max_len: int = 40) -> list[dict]:
    """Samples of varied length with a masked prompt; one of length 1 and one with no
    supervised position, so the edge cases are always in the data."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = int(rng.integers(2, max_len))
        ids = rng.integers(6, vocab, t)
        labels = ids.copy()
        labels[: int(rng.integers(0, t))] = -100
        if i % 7 == 3:  # a noisy demonstration: a label that is not the next input token
            labels[-1] = int(rng.integers(6, vocab))
        out.append({"id": f"s{i:04d}", "input_ids": ids.tolist(), "labels": labels.tolist()})
    if n >= 2:
        out[0]["input_ids"], out[0]["labels"] = [7], [7]
        out[1]["labels"] = [-100] * len(out[1]["input_ids"])
    return out


def write_jsonl(path: Path, samples: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


def reference_logprobs(model: Any, sample: dict) -> tuple[np.ndarray, np.ndarray]:
    """(positions t of the rows, float64 log-softmax [S, V] of the logits predicting them),
    from one unbatched, unpadded forward pass."""
    ids = torch.tensor([sample["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    lp = torch.log_softmax(logits, -1).numpy()
    labels = np.asarray(sample["labels"])
    pos = np.flatnonzero(labels[1:] != -100) + 1
    return pos, lp[pos - 1]


def canonical_rows(rec: Any) -> tuple[np.ndarray, np.ndarray]:
    """A record's top-k rows sorted by id: the compact codec keeps each row's (id, log-prob)
    pairs but not their order (docs/FORMAT.md §5), so equal content means equal sorted rows."""
    order = np.argsort(rec.topk_ids, axis=1, kind="stable")
    return (
        np.take_along_axis(rec.topk_ids, order, 1),
        np.take_along_axis(rec.topk_logprobs, order, 1),
    )


def assert_records_equal(a: Any, b: Any) -> None:
    """Two caches hold the same records: same keys, tokens, labels, label log-probs and ranks,
    and per row the same (id, log-prob) pairs, bit for bit."""
    assert len(a) == len(b)
    assert sorted(map(str, a.keys())) == sorted(map(str, b.keys()))
    for key in a.keys():
        ra, rb = a[key], b[key]
        for f in ("input_ids", "labels", "label_logprobs", "label_ranks"):
            np.testing.assert_array_equal(getattr(ra, f), getattr(rb, f), err_msg=f"{key}.{f}")
        for x, y, f in zip(
            canonical_rows(ra), canonical_rows(rb), ("ids", "logprobs"), strict=True
        ):
            np.testing.assert_array_equal(x, y, err_msg=f"{key}.topk_{f}")


# ---------------------------------------------------------------------------------------------
# A real BPE tokenizer trained here with a chat template (tests/builder/test_sft_data.py)

CHAT_SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>", "<|end|>", "<|call|>"]
CHAT_ROLES = ["system", "user", "assistant", "tool"]


def chat_template(generation_marks: bool) -> str:
    """A chat template for the roles system/user/assistant/tool, with tool calls and a tool list.
    The assistant part (content, tool calls and the end-of-turn token) is wrapped in
    ``{% generation %}`` marks when ``generation_marks``; both variants render the same text."""
    gen, end = ("{% generation %}", "{% endgeneration %}") if generation_marks else ("", "")
    return (
        "{{ bos_token }}"
        "{% if tools %}<|system|>tools: {{ tools | tojson }}<|end|>{% endif %}"
        "{% for m in messages %}"
        "{% if m['role'] == 'assistant' %}"
        "<|assistant|>" + gen + "{% if m['content'] %}{{ m['content'] }}{% endif %}"
        "{% if m['tool_calls'] %}<|call|>{{ m['tool_calls'] | tojson }}{% endif %}"
        "<|end|>" + end + "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )


def training_text(max_chars: int = 600_000) -> list[str]:
    """Text found on this machine: the standard library's own ``.py`` files (sorted by name, so
    every run trains on the same text) and the common licences."""
    import glob
    import sysconfig

    files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))
    files += sorted(glob.glob("/usr/share/common-licenses/*"))
    out: list[str] = []
    total = 0
    for f in files:
        try:
            text = Path(f).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        out.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return out


def save_chat_tokenizer(path: Path, *, generation_marks: bool = True, vocab: int = 1200) -> Any:
    """A byte-level BPE tokenizer (``vocab`` tokens) trained here on :func:`training_text`, with
    the special tokens of :data:`CHAT_SPECIAL`, one per role (``<|user|>``, ...), a BOS added to
    plain text (as Llama's tokenizer does) and :func:`chat_template`; saved with
    ``save_pretrained`` in ``path`` and returned (a ``PreTrainedTokenizerFast``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = CHAT_SPECIAL + [f"<|{r}|>" for r in CHAT_ROLES]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(training_text(), trainer=trainer)
    bos = tk.token_to_id("<|bos|>")
    tk.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=special[3:],
    )
    fast.chat_template = chat_template(generation_marks)
    fast.save_pretrained(path)
    return fast


def write_manifest(cache_dir: Path, manifest: dict[str, Any]) -> None:
    """Store a manifest edited on purpose by a test and re-seal it (its ``manifest_checksum``,
    docs/FORMAT.md §1), as ``target-sft cache verify --reseal`` does for a user's edit."""
    from target_sft import _core

    (Path(cache_dir) / "manifest.json").write_text(json.dumps(manifest, indent=2))
    _core.reseal_manifest(str(cache_dir))


def reseal_shard(raw: bytearray) -> None:
    """Recompute a version-2 shard's ``checksums`` tensor (§7) over its current bytes, as a
    writer that wrote these (wrong) tables would have: what is left to catch the damage are the
    structural checks behind the checksums."""
    import struct

    import xxhash

    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    names = header["__metadata__"]["checksums"].split(",")
    sums = [xxhash.xxh3_64_intdigest(bytes(raw[: 8 + n]))]
    for region in names[1:]:
        b, e = header[region]["data_offsets"]
        sums.append(xxhash.xxh3_64_intdigest(bytes(raw[8 + n + b : 8 + n + e])))
    b, e = header["checksums"]["data_offsets"]
    raw[8 + n + b : 8 + n + e] = np.array(sums, dtype="<u8").tobytes()


def cpu_training_args(tmp_path: Path, **overrides: Any) -> Any:
    """``TrainingArguments`` for a small CPU Trainer run in a test: output under ``tmp_path/out``,
    no reports, checkpoints, progress bars or DataLoader workers, seed 0; ``overrides`` win."""
    from transformers import TrainingArguments

    base: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    return TrainingArguments(**{**base, **overrides})
