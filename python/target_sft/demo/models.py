"""The demo's models: a word-level tokenizer for the task, tiny Llama teachers and students,
plain cross-entropy pre-training, and exact-match evaluation by greedy decoding."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from target_sft.demo.task import BOS, EOS, N_SPECIAL, PAD, SORT, SortTask

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<sort>", "<unused4>", "<unused5>", "<unused6>", "<unk>"]


def make_tokenizer(task: SortTask) -> Any:
    """A word-level ``PreTrainedTokenizerFast``: the special tokens, then ``n0`` … ``n{M-1}``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    assert (PAD, BOS, EOS, SORT) == (0, 1, 2, 3) and len(SPECIAL_TOKENS) == N_SPECIAL
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"n{v}": N_SPECIAL + v for v in range(task.max_number)})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def make_model(task: SortTask, *, hidden: int, layers: int, seed: int) -> Any:
    """A tiny random Llama for the task (tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=task.vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    return LlamaForCausalLM(cfg)


def pretrain(
    model: Any,
    samples: list[dict],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    log: Callable[[str], None] | None = None,
) -> list[float]:
    """Plain cross-entropy training on ``samples`` (equal lengths); returns the loss per step."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([s["input_ids"] for s in samples])
    labels = torch.tensor([s["labels"] for s in samples])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        i = torch.randint(0, len(samples), (batch_size,), generator=gen)
        loss = model(input_ids=ids[i], labels=labels[i]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log is not None and (step + 1) % max(1, steps // 4) == 0:
            log(
                f"step {step + 1}/{steps}: loss {np.mean(losses[-50:]):.3f} ({time.perf_counter() - t0:.0f} s)"
            )
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model: Any, task: SortTask, prompts: np.ndarray, answers: np.ndarray) -> float:
    """Exact-match accuracy of greedy decoding (the whole sorted list and ``</s>``)."""
    model.eval()
    x = torch.from_numpy(prompts)
    for _ in range(answers.shape[1]):
        nxt = model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)
        x = torch.cat([x, nxt], dim=1)
    out = x[:, prompts.shape[1] :].numpy()
    return float((out == answers).all(axis=1).mean())


def save(model: Any, tokenizer: Any, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
