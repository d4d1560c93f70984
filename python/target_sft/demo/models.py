"""The demo's models: a word-level tokenizer for the task, tiny Llama students and teachers,
plain cross-entropy pre-training, the recipe's optimiser and schedule, and the evaluation
(Average@k of answers sampled at temperature 1.0, and greedy accuracy)."""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
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


def optimizer_and_schedule(
    params: Any, *, lr: float, steps: int, warmup: float = 0.1, weight_decay: float = 0.0
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The paper's recipe (App. A, Table 3): AdamW, linear warm-up over the first ``warmup``
    share of the ``steps``, then cosine decay to 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    n_warm = max(1, round(warmup * steps))

    def factor(step: int) -> float:  # multiplier of lr before optimizer step ``step + 1``
        if step < n_warm:
            return (step + 1) / n_warm
        t = (step - n_warm) / max(1, steps - n_warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


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
    """Plain cross-entropy training on ``samples`` (equal lengths, drawn with replacement);
    returns the loss per step. Warm-up + cosine schedule (:func:`optimizer_and_schedule`)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([s["input_ids"] for s in samples])
    labels = torch.tensor([s["labels"] for s in samples])
    opt, sched = optimizer_and_schedule(model.parameters(), lr=lr, steps=steps)
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
                f"  step {step + 1}/{steps}: loss {np.mean(losses[-50:]):.3f} "
                f"({time.perf_counter() - t0:.0f} s)"
            )
    model.eval()
    return losses


@torch.no_grad()
def generate(
    model: Any,
    prompts: np.ndarray,
    n_tokens: int,
    *,
    samples: int = 1,
    temperature: float | None = 1.0,
    seed: int = 0,
    chunk: int = 4096,
) -> np.ndarray:
    """Answers ``[len(prompts), samples, n_tokens]``: each prompt repeated ``samples`` times and
    decoded ``n_tokens`` steps with the KV cache (logits of the last position only), in batches of
    ``chunk`` rows (all prompts have the same length). ``temperature=None``: greedy (then
    ``samples`` must be 1)."""
    if temperature is None and samples != 1:
        raise ValueError("greedy decoding is deterministic: samples must be 1")
    model.eval()
    # transformers 5.x renames ``past_key_values`` to ``cache`` (argument and output field)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    gen = torch.Generator().manual_seed(seed)
    rows = torch.from_numpy(np.repeat(prompts, samples, axis=0))
    out = torch.empty((rows.shape[0], n_tokens), dtype=torch.long)
    for a in range(0, rows.shape[0], chunk):
        x = rows[a : a + chunk]
        past = None
        for t in range(n_tokens):
            r = model(input_ids=x, use_cache=True, logits_to_keep=1, **{key: past})
            past = getattr(r, key)
            logits = r.logits[:, -1].float()
            if temperature is None:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen)
            out[a : a + chunk, t] = nxt[:, 0]
            x = nxt
    return out.view(prompts.shape[0], samples, n_tokens).numpy()


@dataclass(frozen=True)
class Evaluation:
    """Accuracy of one model on a prompt set: ``average_at_k`` — the mean over prompts and ``k``
    answers sampled at temperature 1.0 of "the answer is right" (the paper's Average@k);
    ``greedy`` — the share of prompts whose greedy answer is right; ``slip_like`` — the share of
    the sampled answers that hold the right numbers and ``</s>`` but out of bucket order (the
    kind of error a slip is; the other wrong answers miss or repeat a number or ``</s>``)."""

    average_at_k: float
    greedy: float
    slip_like: float
    k: int
    prompts: int


def evaluate(model: Any, task: SortTask, prompts: np.ndarray, *, k: int, seed: int) -> Evaluation:
    """Average@k (temperature 1.0) and greedy accuracy on ``prompts`` (:meth:`SortTask.check`)."""
    n = task.answer_length
    sampled = generate(model, prompts, n, samples=k, temperature=1.0, seed=seed)
    parts = task.check_parts(np.repeat(prompts, k, axis=0), sampled.reshape(-1, n))
    ok = parts["numbers"] & parts["ordered"] & parts["eos"]
    greedy = generate(model, prompts, n, temperature=None)[:, 0]
    return Evaluation(
        average_at_k=float(ok.mean()),
        greedy=float(task.check(prompts, greedy).mean()),
        slip_like=float((parts["numbers"] & parts["eos"] & ~parts["ordered"]).mean()),
        k=k,
        prompts=len(prompts),
    )


def save(model: Any, tokenizer: Any, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
