"""Three families of teacher top-k data for the codec benchmark and the cache tests.

A codec tuned on one data generator can look better than it is. The benchmark
(``benches/bench_codec.py``) and the reference-reader test (``tests/cache/test_families.py``)
therefore measure it on three families whose rows are shaped differently, each returned as
:class:`~target_sft.testing.synthetic.SyntheticRecord` objects (the cache writer's ``add``
arguments):

``synthetic``
    :func:`target_sft.testing.synthetic.generate_list`: the project's own generator of a
    Qwen-shaped teacher on reasoning traces (vocabulary 151,936, 81% of rows with top-1 p > 0.9).
    The compact codec's parameters were tuned on it.
``text-lm``
    A real language model's conditional distributions: a small causal LM (a tiny Llama, BPE
    tokenizer of a few thousand tokens, both trained here by :func:`train_text_lm`) on real
    prose found on the machine (:func:`real_text`: the Debian ``copyright`` files and the common
    licenses, else the Python standard library's docstrings), read on *held-out* documents at
    temperature 1. Rows come from a softmax, not from a parametric model: their tails, the ids
    that neighbouring positions share and the label's rank are whatever the LM produces. Its
    vocabulary is small (every id fits the compact codec's id table), its head is as peaked as
    the LM learned to be on boilerplate-heavy legal text.
``flat-256k``
    The same LM on the same held-out text, read at temperature 2 (as knowledge distillation
    caches often are, T = 2), with its token ids spread over a vocabulary of 262,144 (Gemma 3's
    size; Gemma 2 has 256,000) by a fixed random injection. The rows are flat (high entropy,
    top-1 p mostly well below 0.5: the shape of a teacher cached at T > 1, or of a base model on
    open-ended text) and the ids are wide (a random id costs 18 bits, not 12). The injection keeps
    the LM's id statistics (how often ids recur, which ids neighbours share); only their values
    change.

Nothing here is imported by the runtime package. ``text-lm`` and ``flat-256k`` need ``torch``,
``transformers`` and ``tokenizers``; they are imported inside the functions that use them.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import sysconfig
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from target_sft.testing.synthetic import (
    IGNORE_INDEX,
    QWEN_VOCAB_SIZE,
    SyntheticRecord,
    generate_list,
)

__all__ = [
    "DEFAULT_LM_OPTIONS",
    "FAMILIES",
    "FLAT_VOCAB_SIZE",
    "Family",
    "TextLM",
    "dump_text_lm",
    "family_stats",
    "load_family",
    "load_text_lm",
    "real_text",
    "save_text_lm",
    "stdlib_docstrings",
    "train_text_lm",
]

FAMILIES = ("synthetic", "text-lm", "flat-256k")
"""The family names, in benchmark order."""

FLAT_VOCAB_SIZE = 262_144
"""Vocabulary of the ``flat-256k`` family (Gemma 3's embedding rows)."""

FLAT_TEMPERATURE = 2.0
"""Temperature of the ``flat-256k`` family's rows."""

_EOT = "<|endoftext|>"

DEFAULT_LM_OPTIONS: dict[str, Any] = {
    "vocab_size": 4096,
    "context": 256,
    "batch": 8,
    "steps": 3000,
    "max_seconds": 600.0,
    "threads": 1,
}
""":func:`train_text_lm` settings of the ``text-lm`` / ``flat-256k`` families (at most 10 minutes)."""

TEXT_LIMIT_BYTES = 4_000_000
"""Text the families' LM is trained and evaluated on (:func:`real_text`'s ``limit_bytes``)."""


# --- text ---------------------------------------------------------------------------------------


def _take(docs: Iterable[tuple[str, str]], limit_bytes: int) -> list[tuple[str, str]]:
    """The ``(name, text)`` documents of at least 200 characters, in order, until their text
    reaches ``limit_bytes`` in all."""
    out: list[tuple[str, str]] = []
    total = 0
    for name, text in docs:
        if len(text) < 200:
            continue
        out.append((name, text))
        total += len(text)
        if total >= limit_bytes:
            break
    return out


def _stdlib_documents() -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        rel = path.relative_to(root)
        if any(part.startswith("test") for part in rel.parts):  # test suites: not prose
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docs = [
            d
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
            and (d := ast.get_docstring(node))
        ]
        yield str(rel), "\n\n".join(docs)


def _licence_documents() -> Iterator[tuple[str, str]]:
    paths = sorted(Path("/usr/share/doc").glob("*/copyright")) + sorted(
        Path("/usr/share/common-licenses").glob("*")
    )
    for p in paths:
        try:
            yield str(p), p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue


def stdlib_docstrings(limit_bytes: int = 4_000_000) -> list[tuple[str, str]]:
    """Docstrings of the Python standard library's modules, one document per module.

    Present wherever Python runs, so tests can rely on it. Returns ``(name, text)`` pairs sorted
    by name, at most ``limit_bytes`` of text in all.
    """
    return _take(_stdlib_documents(), limit_bytes)


def real_text(limit_bytes: int = 16_000_000) -> list[tuple[str, str]]:
    """Real prose found on this machine, as ``(name, text)`` documents sorted by name.

    The Debian ``/usr/share/doc/*/copyright`` files and ``/usr/share/common-licenses/*``
    (licences, notices, authors: English legal prose with much shared boilerplate); where the
    machine has none, the Python standard library's docstrings (:func:`stdlib_docstrings`).
    """
    return _take(_licence_documents(), limit_bytes) or stdlib_docstrings(limit_bytes)


def split_documents(
    docs: Sequence[tuple[str, str]], held_out_every: int = 10
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(train, held_out)``: every ``held_out_every``-th document (by name) is held out."""
    ordered = sorted(docs)
    held = [d for i, d in enumerate(ordered) if i % held_out_every == held_out_every - 1]
    train = [d for i, d in enumerate(ordered) if i % held_out_every != held_out_every - 1]
    return train, held


# --- the language model ---------------------------------------------------------------------------


@dataclass
class TextLM:
    """A tokenizer and a causal LM trained by :func:`train_text_lm`.

    Attributes:
        tokenizer: a ``tokenizers.Tokenizer`` (byte-level BPE).
        model: a ``transformers.LlamaForCausalLM`` in eval mode.
        info: how it was trained (corpus size, steps, final loss, seconds, held-out loss).
    """

    tokenizer: Any
    model: Any
    info: dict[str, Any]

    @property
    def vocab_size(self) -> int:
        """Rows of the model's output layer (the teacher's vocabulary)."""
        return int(self.model.config.vocab_size)

    @property
    def context(self) -> int:
        """Longest sequence the model was trained on."""
        return int(self.info["context"])

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` (int64)."""
        return np.asarray(self.tokenizer.encode(text).ids, dtype=np.int64)


def _token_stream(tok: Any, docs: Iterable[tuple[str, str]]) -> np.ndarray:
    eot = tok.token_to_id(_EOT)
    parts: list[np.ndarray] = []
    for _, text in docs:
        parts.append(np.asarray(tok.encode(text).ids, dtype=np.int64))
        parts.append(np.array([eot], dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def train_text_lm(
    train_docs: Sequence[tuple[str, str]],
    *,
    vocab_size: int = 4096,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    context: int = 256,
    batch: int = 16,
    steps: int = 1500,
    max_seconds: float | None = None,
    lr: float = 3e-3,
    seed: int = 0,
    threads: int | None = None,
    eval_docs: Sequence[tuple[str, str]] = (),
    log_every: int = 0,
) -> TextLM:
    """Train a byte-level BPE tokenizer and a tiny Llama on ``train_docs`` (CPU, seconds to minutes).

    Training samples random windows of ``context + 1`` tokens from the concatenated documents,
    AdamW with a linear warm-up (5% of the steps) and a cosine decay to 10% of ``lr``. With
    ``max_seconds`` training stops after that much time (tokenizer included) and the schedule
    follows the larger of the step and time fractions; ``info["steps"]`` says how many ran. The
    defaults have ≈ 0.95M parameters (embeddings tied); a step takes ≈ 0.3–0.5 s on one busy core.
    ``eval_docs`` (held out) give ``info["eval_loss"]`` (mean next-token loss in nats on up to 32
    windows).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    if threads is not None:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[_EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((text for _, text in train_docs), trainer=trainer)
    stream = _token_stream(tok, train_docs)
    if stream.size < context + 2:
        raise ValueError(f"train_text_lm: {stream.size} tokens of text, need > {context + 1}")

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=context,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warm:
            return lr * (step + 1) / warm
        frac = (step - warm) / max(1, steps - warm)
        if max_seconds is not None:
            frac = max(frac, (time.perf_counter() - t0) / max_seconds)
        return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0))))

    rng = np.random.default_rng(seed)
    data = torch.from_numpy(stream)
    loss_val = float("nan")
    done = 0
    model.train()
    for step in range(steps):
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        starts = torch.from_numpy(rng.integers(0, stream.size - context - 1, batch))
        idx = starts[:, None] + torch.arange(context + 1)[None, :]
        window = data[idx]
        out = model(input_ids=window[:, :-1], labels=window[:, :-1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_val = float(out.loss.detach())
        done = step + 1
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"  step {step:5d}  loss {loss_val:.3f}  {time.perf_counter() - t0:.0f}s")
    model.eval()
    info: dict[str, Any] = {
        "vocab_size": tok.get_vocab_size(),
        "hidden": hidden,
        "layers": layers,
        "heads": heads,
        "context": context,
        "batch": batch,
        "steps": done,
        "max_steps": steps,
        "max_seconds": max_seconds,
        "lr": lr,
        "seed": seed,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_documents": len(train_docs),
        "train_tokens": int(stream.size),
        "final_train_loss": loss_val,
        "train_seconds": time.perf_counter() - t0,
    }
    lm = TextLM(tok, model, info)
    if eval_docs:
        info["eval_loss"] = _eval_loss(lm, eval_docs)
    return lm


def _eval_loss(lm: TextLM, docs: Sequence[tuple[str, str]], windows: int = 32) -> float:
    import torch

    stream = _token_stream(lm.tokenizer, docs)
    n = lm.context
    losses = []
    with torch.no_grad():
        for i in range(min(windows, stream.size // (n + 1))):
            w = torch.from_numpy(stream[i * n : i * n + n][None, :])
            losses.append(float(lm.model(input_ids=w, labels=w).loss))
    return float(np.mean(losses)) if losses else float("nan")


def save_text_lm(lm: TextLM, path: str | os.PathLike[str]) -> None:
    """Save the tokenizer, the model and ``info`` under directory ``path``."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    lm.tokenizer.save(str(p / "tokenizer.json"))
    lm.model.save_pretrained(p / "model")
    (p / "info.json").write_text(json.dumps(lm.info, indent=2))


def load_text_lm(path: str | os.PathLike[str]) -> TextLM:
    """Load what :func:`save_text_lm` saved."""
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    p = Path(path)
    model = LlamaForCausalLM.from_pretrained(p / "model")
    model.eval()
    tok = Tokenizer.from_file(str(p / "tokenizer.json"))
    return TextLM(tok, model, json.loads((p / "info.json").read_text()))


# --- top-k dumps ----------------------------------------------------------------------------------


def dump_text_lm(
    lm: TextLM,
    docs: Sequence[tuple[str, str]],
    num_records: int,
    *,
    length: int | None = None,
    top_k: int = 64,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    prompt_fraction: float = 0.3,
    seed: int = 0,
) -> list[SyntheticRecord]:
    """Top-k rows of ``lm`` on windows of ``docs``, as a real teacher's cache builder makes them.

    Record ``i`` is a window of ``length`` tokens (the model's context by default) at a random
    offset of a random document (documents shorter than the window are skipped); its first
    ``prompt_fraction`` of positions (at least position 0) are unsupervised. Each supervised
    position ``t`` gets the top-k of ``log_softmax(logits[t - 1] / temperature)`` over the full
    vocabulary (float32, sorted descending), the label's log-prob and its rank (its top-k column
    when it is in the top-k, else the number of strictly larger entries, at least ``top_k``).

    ``vocab_size``: when larger than the LM's vocabulary, every id (tokens, labels, top-k) is
    mapped through a fixed random injection into ``[0, vocab_size)`` (seeded by ``seed``).
    """
    import torch

    n = lm.context if length is None else int(length)
    if not 2 <= n <= lm.context:
        raise ValueError(f"dump_text_lm: length must be in [2, {lm.context}], got {n}")
    v_lm = lm.vocab_size
    if not 1 <= top_k <= v_lm:
        raise ValueError(f"dump_text_lm: top_k must be in [1, {v_lm}], got {top_k}")
    v_out = v_lm if vocab_size is None else int(vocab_size)
    if v_out < v_lm:
        raise ValueError(f"dump_text_lm: vocab_size {v_out} < the LM's {v_lm}")
    rng = np.random.default_rng(seed)
    id_map = np.arange(v_lm, dtype=np.int64)
    if v_out > v_lm:
        id_map = rng.choice(v_out, size=v_lm, replace=False).astype(np.int64)
    streams = [s for s in (lm.encode(text) for _, text in docs) if s.size >= n]
    if not streams:
        raise ValueError(f"dump_text_lm: no document holds {n} tokens")
    out: list[SyntheticRecord] = []
    with torch.no_grad():
        for key in range(num_records):
            s = streams[int(rng.integers(len(streams)))]
            start = int(rng.integers(0, s.size - n + 1))
            ids = s[start : start + n]
            logits = lm.model(input_ids=torch.from_numpy(ids[None, :])).logits[0].float()
            lp_all = torch.log_softmax(logits / temperature, dim=-1)
            prompt = max(1, min(n - 1, round(prompt_fraction * n)))
            pos = np.arange(prompt, n)  # supervised positions t; their rows are logits[t - 1]
            rows = lp_all[torch.from_numpy(pos - 1)]
            top_lp, top_ids = torch.topk(rows, top_k, dim=-1, sorted=True)
            top_lp_np = top_lp.numpy().astype(np.float32)
            top_ids_np = top_ids.numpy().astype(np.int64)
            lab = ids[pos]
            lab_t = torch.from_numpy(lab)
            label_lp = rows.gather(1, lab_t[:, None])[:, 0].numpy().astype(np.float32)
            greater = (rows > torch.from_numpy(label_lp)[:, None]).sum(dim=1).numpy()
            hit = top_ids_np == lab[:, None]
            in_top = hit.any(axis=1)
            col = hit.argmax(axis=1)
            ranks = np.where(in_top, col, np.maximum(greater, top_k)).astype(np.int32)
            r_in = np.flatnonzero(in_top)
            label_lp[r_in] = top_lp_np[r_in, col[r_in]]
            labels = np.full(n, IGNORE_INDEX, dtype=np.int64)
            labels[pos] = id_map[lab]
            out.append(
                SyntheticRecord(
                    key=key,
                    input_ids=id_map[ids].astype(np.int32),
                    labels=labels.astype(np.int32),
                    topk_ids=id_map[top_ids_np].astype(np.int32),
                    topk_logprobs=top_lp_np,
                    label_logprobs=label_lp,
                    label_ranks=ranks,
                )
            )
    return out


# --- the families, cached -------------------------------------------------------------------------


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _save_records(path: Path, recs: Sequence[SyntheticRecord]) -> None:
    arrays: dict[str, np.ndarray] = {
        "keys": np.array([r.key for r in recs], dtype=np.int64),
        "t_off": np.cumsum([0] + [r.num_tokens for r in recs]).astype(np.int64),
        "s_off": np.cumsum([0] + [r.num_supervised for r in recs]).astype(np.int64),
    }
    for f in ("input_ids", "labels", "topk_ids", "topk_logprobs", "label_logprobs", "label_ranks"):
        arrays[f] = np.concatenate([getattr(r, f) for r in recs])
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def _load_records(path: Path) -> list[SyntheticRecord]:
    with np.load(path) as npz:
        z = {name: npz[name] for name in npz.files}  # each npz[name] access re-reads the file
    t_off, s_off = z["t_off"], z["s_off"]
    out = []
    for i, key in enumerate(z["keys"].tolist()):
        a, b, c, d = t_off[i], t_off[i + 1], s_off[i], s_off[i + 1]
        out.append(
            SyntheticRecord(
                key=int(key),
                input_ids=z["input_ids"][a:b],
                labels=z["labels"][a:b],
                topk_ids=z["topk_ids"][c:d],
                topk_logprobs=z["topk_logprobs"][c:d],
                label_logprobs=z["label_logprobs"][c:d],
                label_ranks=z["label_ranks"][c:d],
            )
        )
    return out


@dataclass
class Family:
    """One family's records and what they are.

    Attributes:
        name: one of :data:`FAMILIES`.
        vocab_size: the teacher's vocabulary (the cache writer's ``vocab_size``).
        records: the records (the writer's ``add`` arguments).
        info: how they were made (the LM's training settings and losses for the LM families).
    """

    name: str
    vocab_size: int
    records: list[SyntheticRecord]
    info: dict[str, Any]


def load_family(
    family: str,
    num_records: int,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    top_k: int = 64,
    seed: int = 0,
    synthetic_length: int = 1024,
    lm_options: dict[str, Any] | None = None,
    log: bool = False,
) -> Family:
    """``num_records`` records of ``family`` (one of :data:`FAMILIES`).

    ``synthetic``: ``generate_list(num_records, mean_length=synthetic_length, top_k=top_k,
    seed=seed)`` (vocabulary 151,936). ``text-lm`` / ``flat-256k``: the LM of
    :func:`train_text_lm` (settings ``lm_options``, :data:`DEFAULT_LM_OPTIONS` by default)
    trained on :func:`real_text` (``TEXT_LIMIT_BYTES``) minus every 10th document, dumped by
    :func:`dump_text_lm` on the held-out tenth (windows of the LM's context). With ``cache_dir``
    the trained LM and the dumps are stored there (keyed by their settings) and reused; without,
    the LM is trained on each call.
    """
    if family == "synthetic":
        recs = generate_list(num_records, mean_length=synthetic_length, top_k=top_k, seed=seed)
        info = {"generator": "target_sft.testing.synthetic", "mean_length": synthetic_length}
        return Family(family, QWEN_VOCAB_SIZE, recs, info)
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    opts = dict(DEFAULT_LM_OPTIONS if lm_options is None else lm_options)
    docs = real_text(TEXT_LIMIT_BYTES)
    train, held = split_documents(docs)
    lm_key = _digest({"opts": opts, "docs": [name for name, _ in docs], "v": 1})
    flat = family == "flat-256k"
    dump_opts = {
        "num_records": num_records,
        "top_k": top_k,
        "seed": seed,
        "temperature": FLAT_TEMPERATURE if flat else 1.0,
        "vocab_size": FLAT_VOCAB_SIZE if flat else None,
    }
    lm_dir = Path(cache_dir) / f"text-lm-{lm_key}" if cache_dir is not None else None
    dump_path = lm_dir / f"dump-{family}-{_digest(dump_opts)}.npz" if lm_dir else None
    if lm_dir is not None and dump_path is not None and dump_path.exists():
        info = json.loads((lm_dir / "info.json").read_text())
        recs = _load_records(dump_path)
    else:
        if lm_dir is not None and (lm_dir / "info.json").exists():
            lm = load_text_lm(lm_dir)
        else:
            if log:
                n_chars = sum(len(t) for _, t in train)
                print(f"training the text LM on {len(train)} documents ({n_chars:,} chars)...")
            lm = train_text_lm(train, eval_docs=held, log_every=100 if log else 0, **opts)
            if lm_dir is not None:
                save_text_lm(lm, lm_dir)
        info = lm.info
        recs = dump_text_lm(
            lm,
            held,
            num_records,
            top_k=top_k,
            temperature=dump_opts["temperature"],
            vocab_size=dump_opts["vocab_size"],
            seed=seed,
        )
        if dump_path is not None:
            _save_records(dump_path, recs)
    info = {**info, "held_out_documents": len(held), "temperature": dump_opts["temperature"]}
    return Family(family, FLAT_VOCAB_SIZE if flat else int(info["vocab_size"]), recs, info)


def family_stats(records: Iterable[SyntheticRecord]) -> dict[str, float]:
    """Shape of a family's rows: how peaked they are and how much the top-k holds.

    ``median_top1_p`` / ``mean_top1_p`` (top-1 probability), ``frac_top1_ge_0.8``,
    ``mean_topk_mass`` (probability mass inside the top-k), ``mean_entropy`` (nats, of the
    renormalised top-k), ``frac_label_in_topk``, ``distinct_topk_ids``, ``rows``, ``tokens``.
    """
    recs = list(records)
    lp = np.concatenate([r.topk_logprobs for r in recs]).astype(np.float64)
    ranks = np.concatenate([r.label_ranks for r in recs])
    k = lp.shape[1]
    p1 = np.exp(lp[:, 0])
    p = np.exp(lp)
    mass = p.sum(axis=1)
    q = p / mass[:, None]
    ent = -(q * np.log(np.maximum(q, 1e-300))).sum(axis=1)
    return {
        "rows": float(lp.shape[0]),
        "tokens": float(sum(r.num_tokens for r in recs)),
        "median_top1_p": float(np.median(p1)),
        "mean_top1_p": float(np.mean(p1)),
        "frac_top1_ge_0.8": float(np.mean(p1 >= 0.8)),
        "mean_topk_mass": float(np.mean(mass)),
        "mean_entropy": float(np.mean(ent)),
        "frac_label_in_topk": float(np.mean(ranks < k)),
        "distinct_topk_ids": float(
            np.unique(np.concatenate([r.topk_ids.ravel() for r in recs])).size
        ),
    }
