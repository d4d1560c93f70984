"""The teacher on the device: a batch of items padded into arrays (:func:`collate`), its forward
pass and the row-chunked log-softmax / top-k / label log-prob and rank / entropy
(:class:`TeacherRunner`), results copied to pinned host memory without blocking
(:class:`PendingBatch`)."""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from target_sft.builder.inputs import Item, Scan
from target_sft.cache import IGNORE_INDEX
from target_sft.errors import CacheInputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["Batch", "PendingBatch", "TeacherRunner", "check_ids_fit", "collate"]


@dataclass
class Batch:
    items: list[Item]
    input_ids: np.ndarray  # int64 [B, T]
    attention_mask: np.ndarray  # int64 [B, T]
    keep: np.ndarray  # bool [B, T]: positions whose logits predict a supervised label
    targets: np.ndarray  # int64 [n]: the labels of those rows, in row order
    counts: list[int]  # rows per item

    @property
    def n_rows(self) -> int:
        return int(self.targets.shape[0])

    def where(self, row: int) -> str:
        acc = 0
        for it, c in zip(self.items, self.counts, strict=False):
            if row < acc + c:
                return f"dataset item {it.index} (key {it.key!r})"
            acc += c
        return "a dataset item"  # pragma: no cover


def collate(items: list[Item], pad_id: int, padding_side: str) -> Batch:
    t = max(len(it.input_ids) for it in items)
    b = len(items)
    ids = np.full((b, t), pad_id, dtype=np.int64)
    mask = np.zeros((b, t), dtype=np.int64)
    keep = np.zeros((b, t), dtype=bool)
    targets: list[np.ndarray] = []
    counts: list[int] = []
    for r, it in enumerate(items):
        n = len(it.input_ids)
        off = t - n if padding_side == "left" else 0
        ids[r, off : off + n] = it.input_ids
        mask[r, off : off + n] = 1
        sup = it.labels[1:] != IGNORE_INDEX  # row for label t sits at position t - 1
        keep[r, off : off + n - 1] = sup
        targets.append(it.labels[1:][sup])
        counts.append(int(sup.sum()))
    tg = np.concatenate(targets).astype(np.int64) if targets else np.zeros(0, np.int64)
    return Batch(items, ids, mask, keep, tg, counts)


@dataclass
class PendingBatch:
    batch: Batch
    ids: Any
    lp: Any
    lab: Any
    rank: Any
    cpu_seconds: float | None  # the synchronous (CPU) time of the teacher step
    start: Any = None  # CUDA events around it otherwise
    end: Any = None
    entropy: Any = None  # [n] float32: each row's full-vocabulary teacher entropy (statistics)

    def teacher_seconds(self) -> float:
        """Seconds the teacher step took; waits for the device (so the host arrays are ready)."""
        if self.cpu_seconds is not None:
            return self.cpu_seconds
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1000.0


class TeacherRunner:
    """Runs the teacher on one batch and returns host arrays (asynchronously on CUDA)."""

    def __init__(self, model: Any, top_k: int, temperature: float, chunk_bytes: int) -> None:
        import torch

        self.model = model
        self.top_k = top_k
        self.temperature = temperature
        self.chunk_bytes = chunk_bytes
        self.callable_only = not isinstance(model, torch.nn.Module) or not hasattr(model, "config")
        params = None if self.callable_only else next(iter(model.parameters()), None)
        self.device = params.device if params is not None else torch.device("cpu")
        fwd = model.forward if hasattr(model, "forward") else model
        try:
            sig = inspect.signature(fwd).parameters
        except (TypeError, ValueError):  # pragma: no cover - builtins
            sig = {}
        has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.values())
        self.pass_mask = "attention_mask" in sig or has_var_kw
        self.pass_positions = "position_ids" in sig
        self.keep_mask = "logits_to_keep" in sig and supports_mask_keep()
        self.pass_use_cache = "use_cache" in sig
        self.vocab_size: int | None = None  # logits per position (from the first forward)
        self.input_vocab = input_vocab(model)  # rows of the input embedding, when known

    def output_vocab(self) -> int:
        """Logits per position: from the forward passes so far, else the output embedding or
        ``config.vocab_size``, else a one-token probe (for a writer opened before any batch with
        a supervised position)."""
        import torch

        if self.vocab_size is None:
            emb = None if self.callable_only else self.model.get_output_embeddings()
            rows = getattr(emb, "weight", None)
            cfg = getattr(self.model, "config", None)
            if rows is not None and rows.dim() == 2:
                self.vocab_size = int(rows.shape[0])
            elif getattr(cfg, "vocab_size", None):
                self.vocab_size = int(cfg.vocab_size)
            else:
                with torch.inference_mode():
                    out = self.model(torch.zeros((1, 1), dtype=torch.long, device=self.device))
                logits = getattr(out, "logits", out)
                if isinstance(logits, (tuple, list)):
                    logits = logits[0]
                self.vocab_size = int(logits.shape[-1])
        return self.vocab_size

    def check_inputs(self, items: Sequence[Item]) -> None:
        """Every input id below the teacher's input vocabulary (an id past it would fail inside
        the embedding without naming the sample)."""
        v = self.input_vocab
        if v is None:
            return
        for it in items:
            if len(it.input_ids) and int(it.input_ids.max()) >= v:
                t = int(np.argmax(it.input_ids >= v))
                raise CacheInputError(
                    f"dataset item {it.index} (key {it.key!r}): input_ids[{t}] = "
                    f"{int(it.input_ids[t])} is outside the teacher's vocabulary (its input "
                    f"embedding has {v} rows); was the data tokenized for another model?"
                )

    def _logits(
        self, ids: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor, batch: Batch
    ) -> torch.Tensor:
        """Logits ``[n, V]`` of the batch's supervised rows, in row order. Nothing here waits
        for the device (sizes come from the host), so the host can work while it runs."""
        import torch

        kwargs: dict[str, Any] = {}
        if self.pass_mask:
            kwargs["attention_mask"] = mask
        if self.pass_positions:
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_(min=0)
        if self.pass_use_cache:
            kwargs["use_cache"] = False
        if self.keep_mask:
            kwargs["logits_to_keep"] = keep
        out = self.model(ids, **kwargs)
        logits = getattr(out, "logits", out)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        n = batch.n_rows
        if logits.dim() == 2 and logits.shape[0] == n:
            return logits
        if logits.dim() == 3 and logits.shape[:2] == keep.shape:
            flat = torch.from_numpy(np.flatnonzero(batch.keep)).to(logits.device)
            return logits.reshape(-1, logits.shape[-1]).index_select(0, flat)
        raise CacheInputError(
            f"the teacher returned logits of shape {tuple(logits.shape)} for input_ids of shape "
            f"{tuple(ids.shape)}; expected [batch, length, vocab]"
        )

    def submit(self, batch: Batch) -> PendingBatch:
        """Enqueue the forward pass and the top-k of one batch; returns before the results are
        on the host when the device is a GPU."""
        import torch

        dev = self.device
        t0 = time.perf_counter()
        ids = torch.from_numpy(batch.input_ids).to(dev, non_blocking=True)
        mask = torch.from_numpy(batch.attention_mask).to(dev, non_blocking=True)
        keep = torch.from_numpy(batch.keep).to(dev, non_blocking=True)
        targets = torch.from_numpy(batch.targets).to(dev, non_blocking=True)
        n, k = batch.n_rows, self.top_k
        pin = dev.type == "cuda"
        out_lp = torch.empty((n, k), dtype=torch.float32, pin_memory=pin)
        out_ids = torch.empty((n, k), dtype=torch.int32, pin_memory=pin)
        out_lab = torch.empty((n,), dtype=torch.float32, pin_memory=pin)
        out_rank = torch.empty((n,), dtype=torch.int32, pin_memory=pin)
        out_ent = torch.empty((n,), dtype=torch.float32, pin_memory=pin)
        start = end = None
        if pin:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        self.check_inputs(batch.items)
        with torch.inference_mode():
            if n:
                logits = self._logits(ids, mask, keep, batch)
                v = int(logits.shape[-1])
                if self.vocab_size is None:
                    self.vocab_size = v
                elif v != self.vocab_size:
                    raise CacheInputError(
                        f"the teacher returned {v} logits per position for {batch.where(0)} "
                        f"but {self.vocab_size} before (or in its output embedding)"
                    )
                if int(batch.targets.max(initial=0)) >= v:
                    bad = int(np.argmax(batch.targets >= v))
                    raise CacheInputError(
                        f"{batch.where(bad)}: label {int(batch.targets[bad])} is outside the "
                        f"teacher's vocabulary of {v} logits"
                    )
                if k > v:
                    raise CacheInputError(f"top_k = {k} is larger than the vocabulary ({v})")
                rows = max(1, self.chunk_bytes // (4 * v))
                for a in range(0, n, rows):
                    b = min(n, a + rows)
                    z = logits[a:b].float()
                    if self.temperature != 1.0:
                        z = z / self.temperature
                    lp = torch.log_softmax(z, dim=-1)
                    vals, idx = lp.topk(k, dim=-1, sorted=True)
                    lab = lp.gather(1, targets[a:b, None].long())
                    rank = (lp > lab).sum(-1)
                    # full-vocabulary entropy -Σ p·log p, for the manifest's statistics only
                    # (-inf log-probs clamped so that 0·log 0 counts 0); a row-wise dot product
                    # keeps the temporaries at one chunk
                    lp.clamp_(min=torch.finfo(lp.dtype).min)
                    ent = -(lp.exp().unsqueeze(1) @ lp.unsqueeze(2)).reshape(-1)
                    out_lp[a:b].copy_(vals, non_blocking=pin)
                    out_ids[a:b].copy_(idx.int(), non_blocking=pin)
                    out_lab[a:b].copy_(lab[:, 0], non_blocking=pin)
                    out_rank[a:b].copy_(rank.int(), non_blocking=pin)
                    out_ent[a:b].copy_(ent, non_blocking=pin)
        if pin:
            end.record()
            return PendingBatch(
                batch, out_ids, out_lp, out_lab, out_rank, None, start, end, out_ent
            )
        return PendingBatch(
            batch, out_ids, out_lp, out_lab, out_rank, time.perf_counter() - t0, entropy=out_ent
        )


def input_vocab(model: Any) -> int | None:
    """Rows of a model's input embedding (else ``config.vocab_size``); None for a callable."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        emb = None
    w = getattr(emb, "weight", None)
    if w is not None and getattr(w, "dim", lambda: 0)() == 2:
        return int(w.shape[0])
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(v) if v else None


def supports_mask_keep() -> bool:
    try:
        from transformers import modeling_utils
    except ImportError:  # pragma: no cover
        return False
    return hasattr(modeling_utils, "slice_logits_to_keep")


def check_ids_fit(scan: Scan, runner: TeacherRunner) -> None:
    """Every sample's input ids below the teacher's input vocabulary (before any forward)."""
    v = runner.input_vocab
    if v is None or not len(scan) or int(scan.max_id.max()) < v:
        return
    i = int(np.argmax(scan.max_id >= v))
    raise CacheInputError(
        f"dataset item {i} (key {scan.keys[i]!r}): input_ids[{int(scan.max_id_at[i])}] = "
        f"{int(scan.max_id[i])} is outside the teacher's vocabulary (its input embedding has {v} "
        "rows); was the data tokenized for another model?"
    )
