"""Build a teacher cache from a causal LM: :func:`build_teacher_cache`.

One call, on one device or on every rank of a ``torchrun`` job::

    build_teacher_cache("Qwen/Qwen2.5-1.5B-Instruct", dataset, "cache/", top_k=64)

How it works (docs/BUILD.md has the details):

* **Plan.** Every rank reads the whole dataset once before the teacher loads (each sample is
  checked, its length and hashes kept). The dataset is cut into *windows* of ``window``
  consecutive samples; inside a window, samples are sorted by length and packed greedily into
  batches of at most ``batch_tokens`` padded tokens. The batches are dealt to the ranks, largest
  first, to the least loaded rank. The batches depend only on the dataset, so a record is
  computed from the same batch whatever the world size and however often the build was
  interrupted (except for a dataset with fewer batches than ranks, see :func:`_plan`).
* **Teacher.** Each batch runs under ``torch.inference_mode``. Only the logits of supervised
  positions are formed when the model supports it (Hugging Face ``logits_to_keep`` with a boolean
  mask). Log-softmax in float32 at the requested temperature, top-k, the label's log-prob and rank
  are computed on the device, in row chunks (no ``N × V`` float32 buffer for the whole batch).
  Results go to pinned host memory without blocking; while the next batch runs, the previous one is
  handed to the Rust writer, which encodes and writes on its own threads.
* **Resume.** Each rank writes its own shards (``rank00001-of-00002-000000.safetensors``) and its
  own manifest (``manifest.rank00001-of-00002.json``) through an append-mode
  :class:`~target_sft.cache.CacheWriter`: committed shards are kept, and a re-run skips every
  batch whose records are all present and recomputes the others (with the same composition).
  Before the teacher runs, every sample whose key is cached is compared with its record (token
  hash and labels); a difference is an error unless ``rebuild_changed`` drops those records.
* **Finish.** All ranks report success or their error to each other (``torch.distributed`` on a
  gloo group); if every rank succeeded, rank 0 merges the per-rank manifests into
  ``manifest.json`` (marked complete). If any rank failed, every rank raises
  :class:`BuildError` naming the failed ranks; re-running resumes.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from target_sft import _core
from target_sft.cache import IGNORE_INDEX, CacheInfo, CacheWriter, merge_manifests
from target_sft.checks import check_wait
from target_sft.errors import BuildError, CacheInputError, CacheMismatchError
from target_sft.fingerprint import tokenizer_fingerprint  # re-exported: the builder's name
from target_sft.sft_data import JsonlDataset, SFTSource, Truncation, prepare_row, tokenize_sft

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "BuildError",
    "BuildResult",
    "BuildStats",
    "JsonlDataset",
    "build_teacher_cache",
    "load_teacher",
    "load_tokenizer",
    "plan_batches",
    "teacher_fingerprint",
    "tokenize_prompt_response",
    "tokenizer_fingerprint",
]

_RANK_MANIFEST = re.compile(r"^manifest\.rank(\d{5})-of-(\d{5})\.json$")


@dataclass
class BuildStats:
    """What one rank did (returned on :attr:`BuildResult.stats`, printed at the end)."""

    rank: int = 0
    world_size: int = 1
    records_added: int = 0
    records_skipped: int = 0
    records_replaced: int = 0  # dropped because their data changed (rebuild_changed=True)
    tokens: int = 0
    supervised: int = 0
    batches: int = 0
    seconds: float = 0.0
    teacher_seconds: float = 0.0  # forward + log-softmax/top-k on the device

    @property
    def overhead_fraction(self) -> float:
        """Fraction of wall time not spent in the teacher (the pipeline's cost)."""
        return 1.0 - self.teacher_seconds / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        tps = self.supervised / self.seconds if self.seconds > 0 else 0.0
        return (
            f"rank {self.rank}/{self.world_size}: {self.records_added:,} records added "
            f"({self.records_skipped:,} already cached"
            + (f", {self.records_replaced:,} replaced" if self.records_replaced else "")
            + f"), {self.tokens:,} tokens "
            f"({self.supervised:,} supervised) in {self.batches:,} batches, {self.seconds:.1f} s "
            f"({tps:,.0f} supervised tok/s); teacher {self.teacher_seconds:.1f} s, "
            f"other {100 * self.overhead_fraction:.1f}%"
        )


@dataclass
class BuildResult:
    """The cache (its :class:`CacheInfo`, read after the merge) and this rank's statistics."""

    info: CacheInfo
    stats: BuildStats
    all_stats: list[BuildStats] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Distributed context


@dataclass
class _Dist:
    rank: int
    world: int
    local_rank: int
    group: Any = None  # a gloo process group (None when world == 1)
    owns_default: bool = False

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def close(self) -> None:
        if self.owns_default:
            import torch.distributed as dist

            dist.destroy_process_group()


def _dist_context(rank: int | None, world_size: int | None, timeout: timedelta) -> _Dist:
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    env_rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        import torch.distributed as dist

        initialised = dist.is_available() and dist.is_initialized()
    except ImportError:  # pragma: no cover - torch without distributed
        initialised = False
    if initialised:
        r, w = dist.get_rank(), dist.get_world_size()
        if (rank is not None and rank != r) or (world_size is not None and world_size != w):
            raise CacheInputError(
                f"rank={rank}, world_size={world_size} were given but torch.distributed says "
                f"rank {r} of {w}; leave them unset under torchrun"
            )
        if w == 1:
            return _Dist(0, 1, local_rank)
        # A gloo group for the small control messages, whatever the main backend (NCCL).
        group = dist.new_group(backend="gloo", timeout=timeout)
        return _Dist(r, w, local_rank, group)
    r = env_rank if rank is None else rank
    w = env_world if world_size is None else world_size
    if not (0 <= r < w):
        raise CacheInputError(f"rank {r} is not in [0, world_size = {w})")
    if w == 1:
        return _Dist(0, 1, local_rank)
    if "MASTER_ADDR" not in os.environ:
        raise CacheInputError(
            f"world_size = {w} but torch.distributed is not initialised and MASTER_ADDR is not "
            "set; launch with torchrun (it sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)"
        )
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=r, world_size=w, timeout=timeout)
    return _Dist(r, w, local_rank, dist.group.WORLD, owns_default=True)


# ---------------------------------------------------------------------------------------------
# Teacher


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


_HASH_CHUNK = 64 << 20  # bytes of a tensor hashed at once (part of the weights_hash definition)


def _tensor_digest(t: torch.Tensor) -> str:
    """XXH3-128 digests of a tensor's bytes in 64 MiB chunks (copied to the host one chunk at a
    time), joined: every value counts."""
    import torch

    from target_sft import _core

    if t.is_meta:  # offloaded to disk: no values in memory
        raise CacheInputError(
            "the teacher has weights on the meta device (offloaded); load it fully so that its "
            "weights can be fingerprinted"
        )
    flat = t.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    raw = flat.view(torch.uint8) if flat.numel() else flat.to(torch.uint8)
    parts = []
    for a in range(0, max(raw.numel(), 1), _HASH_CHUNK):
        parts.append(_core.xxh3_128(raw[a : a + _HASH_CHUNK].cpu().numpy()))
    return ",".join(parts)


def _weights_hash(model: Any) -> str:
    """A fingerprint of the weights' content: name, shape, dtype and every byte of each tensor
    of the state dict (tied tensors hashed once). Independent of where the weights were loaded
    from (path spelling, mount, file sharding or format)."""
    h = hashlib.sha256()
    done: dict[tuple[Any, ...], str] = {}
    for name, p in sorted(model.state_dict().items()):
        ident = (p.device, p.data_ptr(), p.dtype, tuple(p.shape), tuple(p.stride()))
        if ident not in done or p.data_ptr() == 0:
            done[ident] = _tensor_digest(p)
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{done[ident]};".encode())
    return h.hexdigest()


def teacher_fingerprint(model: Any) -> dict[str, Any]:
    """The manifest's ``teacher`` entry: ``architecture``, ``config_hash``, ``dtype`` and
    ``weights_hash`` (a hash of every weight) identify the teacher; ``name`` (the path or hub
    name it was loaded from) and ``revision`` are informational. Two builds agree on it exactly
    when they use the same weights in the same dtype, wherever the files were read from
    (docs/FORMAT.md §1). A plain callable is identified by its qualified name."""
    config = getattr(model, "config", None)
    if config is None:  # a plain callable
        name = getattr(model, "__qualname__", type(model).__qualname__)
        return {"name": f"{getattr(model, '__module__', '?')}.{name}", "kind": "callable"}
    cfg = config.to_dict()
    stable = {
        k: v
        for k, v in cfg.items()
        if not k.startswith("_") and k not in ("transformers_version", "torch_dtype", "dtype")
    }
    params = next(iter(model.parameters()), None)
    return {
        "name": str(getattr(config, "_name_or_path", "") or type(model).__name__),
        "revision": getattr(config, "_commit_hash", None),
        "architecture": type(model).__name__,
        "config_hash": _sha256_json(stable)[:32],
        "dtype": str(params.dtype).removeprefix("torch.") if params is not None else None,
        "weights_hash": _weights_hash(model)[:32],
    }


def _default_device(local_rank: int) -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return "cpu"


def _resolve_dtype(dtype: Any, device: str) -> Any:
    import torch

    if dtype is None or dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, str):
        try:
            return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
                dtype, getattr(torch, dtype)
            )
        except AttributeError:
            raise CacheInputError(f"dtype {dtype!r} is not a torch dtype") from None
    return dtype


def load_teacher(
    teacher: Any, *, dtype: Any = None, device: str | None = None, local_rank: int = 0
) -> Any:
    """A causal LM ready for :func:`build_teacher_cache`: a model object is used as it is; a
    path or hub name is loaded with ``AutoModelForCausalLM`` (bfloat16 on a GPU, float32 on CPU
    unless ``dtype`` says otherwise) onto ``device`` (this rank's GPU, else the CPU)."""
    if not isinstance(teacher, (str, os.PathLike)):
        if not callable(teacher):
            raise CacheInputError(
                f"teacher must be a transformers model, a model directory or hub name, or a "
                f"callable returning logits; got {type(teacher).__name__}"
            )
        if hasattr(teacher, "eval"):
            teacher.eval()
        return teacher
    from transformers import AutoModelForCausalLM

    dev = device or _default_device(local_rank)
    dt = _resolve_dtype(dtype, dev)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=dt)
    except TypeError:  # transformers < 4.56 calls it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(str(teacher), torch_dtype=dt)
    return model.to(dev).eval()


def load_tokenizer(teacher: Any, tokenizer: Any = None) -> Any:
    """``tokenizer`` itself, or loaded from it when it is a path; else the teacher's own
    (its directory or hub name, or a model's local ``_name_or_path``); ``None`` when there is none
    (the manifest then records no tokenizer)."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    source = tokenizer
    if source is None:
        if isinstance(teacher, (str, os.PathLike)):
            source = teacher
        else:
            cfg = getattr(teacher, "config", None)
            path = getattr(cfg, "_name_or_path", None) if cfg is not None else None
            source = path if path and Path(path).is_dir() else None
    if source is None:
        return None
    from transformers import AutoTokenizer

    if tokenizer is not None:
        return AutoTokenizer.from_pretrained(str(source))
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        names = {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"}
        if not any((Path(source) / n).exists() for n in names):
            return None  # a model directory without a tokenizer: the manifest records none
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except Exception:  # the teacher's tokenizer is optional when not asked for
        return None


class _Runner:
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
        self.keep_mask = "logits_to_keep" in sig and _supports_mask_keep()
        self.pass_use_cache = "use_cache" in sig
        self.vocab_size: int | None = None  # logits per position (from the first forward)
        self.input_vocab = _input_vocab(model)  # rows of the input embedding, when known

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

    def check_inputs(self, items: Sequence[_Item]) -> None:
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
        self, ids: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor, batch: _Batch
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

    def submit(self, batch: _Batch) -> _Pending:
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
            return _Pending(batch, out_ids, out_lp, out_lab, out_rank, None, start, end, out_ent)
        return _Pending(
            batch, out_ids, out_lp, out_lab, out_rank, time.perf_counter() - t0, entropy=out_ent
        )


def _input_vocab(model: Any) -> int | None:
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


def _supports_mask_keep() -> bool:
    try:
        from transformers import modeling_utils
    except ImportError:  # pragma: no cover
        return False
    return hasattr(modeling_utils, "slice_logits_to_keep")


# ---------------------------------------------------------------------------------------------
# Data: items, windows, batches


@dataclass
class _Item:
    index: int
    key: int | str
    input_ids: np.ndarray  # int32 [T]
    labels: np.ndarray  # int32 [T]

    @property
    def n_rows(self) -> int:
        return int(np.count_nonzero(self.labels[1:] != IGNORE_INDEX))


def _make_item(
    index: int, obj: Any, id_field: str | None, source: SFTSource | None = None
) -> _Item:
    """The item of row ``index``: its key, tokens and labels as ``source`` (the build's input)
    makes them (:func:`target_sft.sft_data.prepare_row`: any row format, checked, naming the
    row); without a source, pre-tokenised rows keyed by ``id_field``."""
    if source is not None:
        return _Item(index, *source.prepare(index, obj))
    return _Item(index, *prepare_row(index, obj, id_field=id_field))


def _hash_ids(a: np.ndarray) -> int:
    """XXH3-64 of int32 ids (the records' ``token_hash``, FORMAT.md §7)."""
    from target_sft import _core

    return int(_core.token_hash(a))


@dataclass
class _Scan:
    """What the planning pass learnt about every sample (no token ids kept, except for a
    dataset that can be iterated only once)."""

    keys: list[int | str]
    lengths: np.ndarray  # int64 [N]
    n_supervised: np.ndarray  # int64 [N]: rows (labels[t] != -100, t >= 1)
    token_hash: np.ndarray  # uint64 [N]
    labels_hash: np.ndarray  # uint64 [N]
    max_id: np.ndarray  # int64 [N]: the largest input id
    max_id_at: np.ndarray  # int64 [N]: its first position
    items: list[_Item] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def digest(self) -> str:
        """SHA-256 of every sample's key, token hash and labels hash, in order: what every rank
        must agree on (each plans the whole dataset and takes its own share of the plan)."""
        h = hashlib.sha256(json.dumps(self.keys).encode())
        h.update(self.token_hash.tobytes())
        h.update(self.labels_hash.tobytes())
        return h.hexdigest()

    def check_same(self, it: _Item) -> None:
        """An item read again for the teacher pass is the one that was planned."""
        i = it.index
        if (
            i >= len(self.keys)
            or it.key != self.keys[i]
            or _hash_ids(it.input_ids) != int(self.token_hash[i])
            or _hash_ids(it.labels) != int(self.labels_hash[i])
        ):
            raise CacheInputError(
                f"dataset item {i} (key {it.key!r}) differs between two passes over the dataset "
                "(planning, then the teacher); the dataset must yield the same samples each time "
                "it is iterated (no shuffling or random augmentation)"
            )


def _source(dataset: Any) -> SFTSource | None:
    return dataset if isinstance(dataset, SFTSource) else None


def _iter_items(dataset: Any, id_field: str | None) -> Iterator[_Item]:
    source = _source(dataset)
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        for i in range(len(dataset)):
            yield _make_item(i, dataset[i], id_field, source)
    else:
        for i, obj in enumerate(dataset):
            yield _make_item(i, obj, id_field, source)


def _scan(dataset: Any, id_field: str | None) -> _Scan:
    """The planning pass: every sample is read and checked once, before the teacher loads."""
    once = not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")) and (
        iter(dataset) is dataset
    )
    keys: list[int | str] = []
    cols: list[list[int]] = [[], [], [], [], [], []]
    kept: list[_Item] | None = [] if once else None
    for it in _iter_items(dataset, id_field):
        keys.append(it.key)
        top = int(np.argmax(it.input_ids))
        for c, v in zip(
            cols,
            (
                len(it.input_ids),
                it.n_rows,
                _hash_ids(it.input_ids),
                _hash_ids(it.labels),
                int(it.input_ids[top]),
                top,
            ),
            strict=True,
        ):
            c.append(v)
        if kept is not None:
            kept.append(it)
    ln, ns, th, lh, mx, at = cols
    scan = _Scan(
        keys,
        np.asarray(ln, np.int64),
        np.asarray(ns, np.int64),
        np.asarray(th, np.uint64),
        np.asarray(lh, np.uint64),
        np.asarray(mx, np.int64),
        np.asarray(at, np.int64),
        kept,
    )
    if len(scan) and not scan.n_supervised.any():
        raise CacheInputError(
            f"none of the {len(scan):,} samples has a supervised position (a label other than "
            "-100 at a position t >= 1): there is nothing to cache. Check the labels (the "
            "prompt/assistant masking) of the dataset"
        )
    return scan


def _check_ids_fit(scan: _Scan, runner: _Runner) -> None:
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


def _plan(
    lengths: np.ndarray, window: int, batch_tokens: int, max_batch_size: int, world: int
) -> list[list[list[int]]]:
    """Each rank's batches (global sample indices), in the order it runs them.

    Batches are planned per window of ``window`` consecutive samples (:func:`plan_batches`),
    independently of the world size. They are then dealt to ranks window by window, largest
    (padded tokens) first, each to the rank with the fewest padded tokens so far (ties: the lower
    rank), so every rank gets work as soon as there are at least ``world_size`` batches.
    Exception for tiny datasets: when the whole plan has fewer batches than ranks but at least as
    many samples, the batches with the most samples are halved until every rank can get one (the
    batch composition, hence the float noise of the records, then depends on the world size)."""
    n = len(lengths)
    windows: list[list[list[int]]] = []
    for lo in range(0, n, window):
        part = lengths[lo : lo + window].tolist()
        windows.append(
            [[lo + i for i in b] for b in plan_batches(part, batch_tokens, max_batch_size)]
        )
    total = sum(len(w) for w in windows)
    while world > total and n >= world:
        w, b = max(
            ((w, b) for w in range(len(windows)) for b in range(len(windows[w]))),
            key=lambda wb: (len(windows[wb[0]][wb[1]]), -wb[0], -wb[1]),
        )
        big = windows[w][b]
        windows[w][b : b + 1] = [big[: len(big) // 2], big[len(big) // 2 :]]
        total += 1
    load = [0] * world
    out: list[list[list[int]]] = [[] for _ in range(world)]
    for batches in windows:
        padded = [len(b) * int(max(lengths[i] for i in b)) for b in batches]
        owner = [0] * len(batches)
        for j in sorted(range(len(batches)), key=lambda j: (-padded[j], j)):
            r = min(range(world), key=lambda r: (load[r], r))
            owner[j] = r
            load[r] += padded[j]
        for j, b in enumerate(batches):  # each rank runs its batches in plan order
            out[owner[j]].append(b)
    return out


def _batches_of(
    dataset: Any, scan: _Scan, batches: list[list[int]], id_field: str | None
) -> Iterator[list[_Item]]:
    """The items of ``batches`` (this rank's), read again from the dataset and checked against
    the planning pass. Sized datasets are indexed directly; iterables are walked once."""
    if scan.items is not None:
        for b in batches:
            yield [scan.items[i] for i in b]
        return
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        for b in batches:
            items = [_make_item(i, dataset[i], id_field, _source(dataset)) for i in b]
            for it in items:
                scan.check_same(it)
            yield items
        return
    mine = {i for b in batches for i in b}
    got: dict[int, _Item] = {}
    nb = 0
    for i, obj in enumerate(dataset):
        if i in mine:
            it = _make_item(i, obj, id_field, _source(dataset))
            scan.check_same(it)
            got[i] = it
        # the batches of a window are complete once its last sample is read
        while nb < len(batches) and max(batches[nb]) <= i:
            yield [got.pop(i) for i in batches[nb]]
            nb += 1
    if nb < len(batches):
        raise CacheInputError(
            f"the dataset yielded fewer samples on its second pass than on the first "
            f"({len(scan):,}); it must yield the same samples each time it is iterated"
        )


def plan_batches(lengths: Sequence[int], batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Group sample indices into batches: sorted by length (ties by index), filled greedily while
    ``batch size × longest length <= batch_tokens`` and ``batch size <= max_batch_size``. A sample
    longer than ``batch_tokens`` gets a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and ((len(cur) + 1) * lengths[i] > batch_tokens or len(cur) >= max_batch_size):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


@dataclass
class _Batch:
    items: list[_Item]
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


def _collate(items: list[_Item], pad_id: int, padding_side: str) -> _Batch:
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
    return _Batch(items, ids, mask, keep, tg, counts)


@dataclass
class _Pending:
    batch: _Batch
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


# ---------------------------------------------------------------------------------------------
# The build


def _rank_files(rank: int, world: int) -> tuple[str, str]:
    tag = f"rank{rank:05d}-of-{world:05d}"
    return tag, f"manifest.{tag}.json"


def _check_directory(path: Path, world: int) -> None:
    if not path.exists():
        return
    if not path.is_dir():
        raise CacheInputError(f"{path} exists and is not a directory")
    parts = [m for m in (_RANK_MANIFEST.match(p.name) for p in path.iterdir()) if m]
    worlds = sorted({int(m.group(2)) for m in parts})
    if worlds and worlds != [world]:
        raise CacheInputError(
            f"{path} holds a build started with world_size = {worlds[0]}; resume it with "
            f"{worlds[0]} rank(s) (this run has {world}), or build into a new directory"
        )
    if not parts and (path / "manifest.json").exists():
        raise CacheInputError(
            f"{path} holds a cache that build_teacher_cache did not write (no per-rank "
            "manifests); build into a new directory"
        )


def build_teacher_cache(
    teacher: Any,
    dataset: Iterable[Any] | Sequence[Any] | str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    top_k: int = 64,
    temperature: float = 1.0,
    codec: Literal["compact", "exact"] = "compact",
    batch_tokens: int = 16_384,
    max_batch_size: int = 256,
    window: int = 4096,
    tokenizer: Any = None,
    dtype: Any = None,
    device: str | None = None,
    id_field: str | None = "id",
    max_length: int | None = None,
    truncation: Truncation = "keep_start",
    padding_side: Literal["right", "left"] = "right",
    pad_token_id: int | None = None,
    shard_size: int | str = "256MiB",
    writer_threads: int = 0,
    chunk_bytes: int = 1 << 30,
    progress: bool | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    dist_timeout: timedelta = timedelta(hours=12),
    on_batch: Callable[[BuildStats], None] | None = None,
    rebuild_changed: bool = False,
    wait: bool | float = False,
) -> BuildResult:
    """Cache a teacher's top-``k`` log-probs for every sample of ``dataset`` in ``path``.

    Args:
        teacher: a ``transformers`` causal LM, a model directory or hub name (loaded with
            ``AutoModelForCausalLM``), or any callable ``f(input_ids, attention_mask=...)``
            returning logits ``[B, T, V]`` (or an object with ``.logits``).
        dataset: rows in any format of :func:`~target_sft.tokenize_sft` (``input_ids`` and
            optionally ``labels``, ``messages``, ``prompt``/``completion``,
            ``prompt``/``response``, ``text``): a list or any sequence or iterable of dicts, a
            ``datasets.Dataset`` or ``IterableDataset``, a generator (read into memory first),
            or a ``.jsonl``/``.parquet`` path or ``save_to_disk`` directory. Every row's key and
            schema are checked, and the first rows tokenised, before the teacher loads
            (:class:`~target_sft.sft_data.SFTSource`).
        path: the cache directory. If it holds a build, the build resumes: samples whose key
            is cached are skipped when their token ids and labels equal the cached record's,
            and are an error (:class:`CacheMismatchError`) when they differ.
        top_k, temperature, codec: what is cached (see :class:`~target_sft.cache.CacheWriter`).
        batch_tokens: padded tokens per teacher batch; ``max_batch_size`` caps samples per batch.
        window: samples per planning window (sorted by length inside); its batches are dealt
            to the ranks.
        tokenizer: tokenises text rows and is recorded in the manifest (fingerprint); a path
            or object, loaded from the teacher's directory when not given.
        id_field: the row field holding the record key (an int or a str; rows without it are
            keyed by their sample index). Keys must be unique: a duplicate is an error naming
            both samples. ``None`` keys every record by its sample index.
        max_length, truncation: keep at most ``max_length`` tokens per row, the first
            (``"keep_start"``) or the last (``"keep_end"``).
        dtype, device: for a teacher given by path (default: bfloat16 on this rank's GPU, float32
            on CPU).
        padding_side: where batches are padded (``position_ids`` are passed so both agree).
        chunk_bytes: largest float32 ``rows × vocab`` block formed at once on the device.
        progress: show a tqdm bar (default: on rank 0 when stderr is a terminal or in notebooks).
        rank, world_size: override ``torch.distributed`` / ``RANK``/``WORLD_SIZE``.
        on_batch: called after every batch handed to the writer (for monitoring and tests).
        rebuild_changed: on resume, drop the cached records whose sample changed (other token
            ids or labels under the same key) and compute them again, instead of raising.
        wait: when another live process writes this rank's files in ``path`` (another build, or
            a :class:`~target_sft.cache.CacheWriter` of ``manifest.json``): ``False`` raises
            :class:`CacheLockedError` once the data is checked (before the teacher loads),
            naming it; ``True`` waits; a number waits at most that many seconds
            (docs/FORMAT.md §6).

    Returns:
        :class:`BuildResult` with the merged cache's :class:`CacheInfo` and this rank's stats.

    Raises:
        CacheInputError: bad input (a duplicate key, a row in no known format, a turn without
            content, ...), naming the row (``path:line`` for JSONL) and the field; raised
            before the teacher loads.
        CacheMismatchError: ``path`` holds a build with other settings (names the field), or
            records whose sample changed (names them; see ``rebuild_changed``).
        BuildError: another rank failed (every rank raises; re-run to resume).
    """
    if top_k < 1:
        raise CacheInputError(f"top_k = {top_k} must be at least 1")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise CacheInputError(f"temperature = {temperature} must be a positive number")
    if batch_tokens < 1 or max_batch_size < 1 or window < 1:
        raise CacheInputError("batch_tokens, max_batch_size and window must be positive")
    if padding_side not in ("right", "left"):
        raise CacheInputError(f'padding_side must be "right" or "left", got {padding_side!r}')
    out = Path(path)
    dist = _dist_context(rank, world_size, dist_timeout)
    stats = BuildStats(rank=dist.rank, world_size=dist.world)
    job = _RankBuild(
        teacher=teacher,
        tokenizer=tokenizer,
        dataset=dataset,
        out=out,
        dist=dist,
        stats=stats,
        top_k=top_k,
        temperature=float(temperature),
        codec=codec,
        batch_tokens=batch_tokens,
        max_batch_size=max_batch_size,
        window=window,
        dtype=dtype,
        device=device,
        id_field=id_field,
        max_length=max_length,
        truncation=truncation,
        padding_side=padding_side,
        pad_token_id=pad_token_id,
        shard_size=shard_size,
        writer_threads=writer_threads,
        chunk_bytes=chunk_bytes,
        progress=progress,
        on_batch=on_batch,
        rebuild_changed=rebuild_changed,
        wait=wait,
    )
    error: BaseException | None = None
    # Every rank runs the same steps and meets the others between them (the resume check reads
    # every rank's part, so all writers must have opened theirs first; records dropped for a
    # rebuild must be gone from every part before any rank writes their replacements).
    steps = (job.prepare, job.check, job.drop, job.run)
    for i, step in enumerate(steps):
        if error is None:
            try:
                step()
            except BaseException as e:  # report to the other ranks before raising
                error = e
        if i < len(steps) - 1:
            error = _sync(dist, error, out)
    if error is not None:
        job.abort()
    try:
        error = _sync(dist, error, out)
        all_stats = dist.all_gather(stats)
        if error is not None:
            raise error
        if dist.rank == 0:
            parts = [_rank_files(r, dist.world)[1] for r in range(dist.world)]
            info = merge_manifests(out, parts, complete=True, wait=wait)
        dist.barrier()
        if dist.rank != 0:
            info = CacheInfo.from_manifest(out, json.loads((out / "manifest.json").read_text()))
        if dist.rank == 0 and _show_progress(progress, dist):
            for s in all_stats:
                print(s.summary(), file=sys.stderr)
            print(
                f"cache {out}: {info.records:,} records, {info.supervised_tokens:,} supervised "
                f"tokens, {info.bytes_per_token:.1f} bytes/token, {len(info.shards)} shards",
                file=sys.stderr,
            )
        return BuildResult(info, stats, all_stats)
    finally:
        dist.close()


def _show_progress(progress: bool | None, dist: _Dist) -> bool:
    if progress is None:
        return dist.rank == 0 and sys.stderr.isatty()
    return bool(progress) and dist.rank == 0


def _bytes_per_token(out: Path, manifest_name: str) -> float | None:
    try:
        m = json.loads((out / manifest_name).read_text())
    except (OSError, ValueError):
        return None
    sup = m.get("num_supervised", 0)
    return sum(s["bytes"] for s in m.get("shards", [])) / sup if sup else None


def _sync(dist: _Dist, error: BaseException | None, out: Path) -> BaseException | None:
    """Tell every rank whether this one failed (all ranks call it at the same points). Returns
    this rank's error, or a :class:`BuildError` naming the failed ranks when another failed."""
    if dist.world == 1:
        return error
    reports = dist.all_gather(
        None if error is None else f"{type(error).__name__}: {error}".splitlines()[0]
    )
    failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
    if error is not None or not failed:
        return error
    return BuildError(
        "the build failed on "
        + "; ".join(f"rank {r}: {msg}" for r, msg in failed)
        + f". Committed shards are kept in {out}; run the same command again to resume."
    )


def _check_ranks_agree(dist: _Dist, scan: _Scan) -> None:
    """Every rank read the same dataset (each takes its share of a plan of the whole): a rank
    given other data (another file, another order, a per-rank shuffle) would write records of
    samples no other rank planned and leave others out."""
    seen = dist.all_gather((len(scan), scan.digest()))
    differ = [r for r, d in enumerate(seen) if d != seen[0]]
    if differ:
        raise CacheInputError(
            "the ranks read different datasets: "
            + "; ".join(
                f"rank {r}: {n:,} samples, digest {d[:12]}" for r, (n, d) in enumerate(seen)
            )
            + ". Every rank must be given the same samples in the same order (the same file, no "
            "per-rank sharding or shuffling: the build deals the work to the ranks itself)"
        )


def _resume_state(
    out: Path, world: int, rank: int, scan: _Scan, rebuild_changed: bool
) -> tuple[set[int | str], list[int | str], int]:
    """Compare the dataset with what every rank's part of ``out`` holds: returns the keys that
    stay cached, the keys this rank's part must drop (their data changed and
    ``rebuild_changed``) and how many changed in all. A changed sample is an error otherwise.

    A sample has changed when its key is cached but its token ids (``token_hash``) or its labels
    (a hash of the cached labels, decoded from each record's tokens section) differ."""
    from target_sft import _core

    names = [_rank_files(r, world)[1] for r in range(world)]
    if not any((out / n).exists() for n in names):
        return set(), [], 0
    keys, th, lh, ns, part = _core.scan_parts(str(out), names)
    index = {k: i for i, k in enumerate(scan.keys)}
    changed: list[tuple[int | str, int, str]] = []
    mine: list[int | str] = []
    for j, k in enumerate(keys):
        i = index.get(k)
        if i is None:
            continue  # a record of a sample that is not in this dataset: kept
        if th[j] != scan.token_hash[i]:
            what = "other token ids"
        elif lh[j] != scan.labels_hash[i]:
            what = (
                f"the same token ids but other labels ({int(scan.n_supervised[i])} supervised "
                f"positions, {int(ns[j])} cached)"
            )
        else:
            continue
        changed.append((k, i, what))
        if int(part[j]) == rank:
            mine.append(k)
    if changed and not rebuild_changed:
        n_tok = sum(w == "other token ids" for _, _, w in changed)
        first = "; ".join(f"key {k!r} (dataset item {i}: {w})" for k, i, w in changed[:5])
        raise CacheMismatchError(
            f"{len(changed):,} sample(s) of the dataset differ from the records cached under their "
            f"keys in {out} ({n_tok:,} with other token ids, {len(changed) - n_tok:,} with other "
            f"labels only); first: {first}. The cache was built from other data: build into a "
            "new directory (another path / --out), or pass rebuild_changed=True (CLI "
            "--rebuild-changed) to drop those records and compute them again"
        )
    return set(keys) - {k for k, _, _ in changed}, mine, len(changed)


class _RankBuild:
    """One rank's share of a build, in steps that every rank runs in the same order:
    :meth:`prepare` (read and plan the dataset, load the teacher, reopen this rank's part),
    :meth:`check` (compare the dataset with every part), :meth:`drop` (remove changed records
    from this rank's part, for a rebuild), :meth:`run` (the teacher and the writer)."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)
        self.writer: CacheWriter | None = None
        self.cached: set[int | str] = set()
        self.drops: list[int | str] = []
        self.n_changed = 0
        self.prefix, self.manifest_name = _rank_files(self.dist.rank, self.dist.world)

    def open_writer(self, vocab_size: int) -> CacheWriter:
        self.writer = CacheWriter(
            self.out,
            top_k=self.top_k,
            vocab_size=vocab_size,
            codec=self.codec,
            temperature=self.temperature,
            tokenizer=self.tok_fp,
            teacher=self.teacher_fp,
            mode="append",
            shard_size=self.shard_size,
            threads=self.writer_threads,
            shard_prefix=self.prefix,
            manifest_name=self.manifest_name,
            wait=self.wait,
        )
        return self.writer

    def prepare(self) -> None:
        out, dist = self.out, self.dist
        _check_directory(out, dist.world)
        tok = load_tokenizer(self.teacher, self.tokenizer)
        # The data first (the tokenizer is cheap, a teacher takes minutes to load): every rank
        # checks every row's key and schema, then tokenises every row for the plan (which deals
        # batches to ranks by their size) and the resume check.
        self.dataset = SFTSource(
            self.dataset,
            tok,
            id_field=self.id_field,
            max_length=self.max_length,
            truncation=self.truncation,
        )
        self.dataset.check()
        self.scan = _scan(self.dataset, self.id_field)
        plan = _plan(
            self.scan.lengths, self.window, self.batch_tokens, self.max_batch_size, dist.world
        )
        self.batches = plan[dist.rank]
        # refuse (or wait) before the teacher loads if another live writer owns this rank's
        # files; the writer takes the same locks for good when it opens
        _core.check_writer_locks(str(out), self.prefix, self.manifest_name, check_wait(self.wait))
        model = load_teacher(
            self.teacher, dtype=self.dtype, device=self.device, local_rank=dist.local_rank
        )
        self.runner = _Runner(model, self.top_k, self.temperature, self.chunk_bytes)
        _check_ids_fit(self.scan, self.runner)
        self.teacher_fp = teacher_fingerprint(model)
        self.tok_fp = tokenizer_fingerprint(tok)
        pad = self.pad_token_id
        self.pad_id = int(pad if pad is not None else getattr(tok, "pad_token_id", None) or 0)
        existing = out / self.manifest_name
        shards = sorted(out.glob(f"{self.prefix}-*.safetensors"))
        if existing.exists() or shards:  # reopen this rank's part (settings checked there)
            if self.teacher_fp.get("kind") == "callable":
                warnings.warn(
                    f"{out}: resuming a build whose teacher is a plain callable "
                    f"({self.teacher_fp.get('name')}): it has no weights or config to fingerprint, "
                    "so nothing checks that it is the same teacher as before; pass a "
                    "transformers model (identified by its weights) to have it checked",
                    stacklevel=2,
                )
            vocab = json.loads(existing.read_text())["vocab_size"] if existing.exists() else None
            if vocab is None:  # shards but no manifest yet: peek at a shard's metadata
                from safetensors import safe_open

                with safe_open(str(shards[0]), "np") as f:
                    vocab = int(f.metadata()["vocab_size"])
            self.open_writer(vocab)

    def check(self) -> None:
        _check_ranks_agree(self.dist, self.scan)
        self.cached, self.drops, self.n_changed = _resume_state(
            self.out, self.dist.world, self.dist.rank, self.scan, self.rebuild_changed
        )

    def drop(self) -> None:
        if not self.drops:
            return
        assert self.writer is not None  # this rank's part holds them
        # The merged manifest lists the shards about to be replaced: remove it first, so that no
        # reader ever sees a manifest naming a deleted file (the merge writes it again).
        (self.out / "manifest.json").unlink(missing_ok=True)
        self.stats.records_replaced = self.writer.drop(self.drops)

    def abort(self) -> None:
        if self.writer is not None and not self.writer.closed:
            try:
                self.writer.close(complete=False)
            except Exception:
                pass  # the original exception is the one to report

    def run(self) -> None:
        from tqdm.auto import tqdm

        runner, stats, out, dist = self.runner, self.stats, self.out, self.dist
        cached = self.cached
        bar = tqdm(
            total=sum(len(b) for b in self.batches),
            unit="rec",
            desc=f"teacher cache (rank {dist.rank}/{dist.world})"
            if dist.world > 1
            else "teacher cache",
            disable=not _show_progress(self.progress, dist),
            dynamic_ncols=True,
        )
        t_start = time.perf_counter()
        last_postfix = 0.0
        pending: _Pending | None = None

        def done(key: int | str) -> bool:
            return key in cached or (self.writer is not None and key in self.writer)

        def finish(p: _Pending) -> None:
            nonlocal last_postfix
            stats.teacher_seconds += p.teacher_seconds()
            writer = self.writer or self.open_writer(runner.output_vocab())
            ids, lp, lab, rk = (x.numpy() for x in (p.ids, p.lp, p.lab, p.rank))
            ent = None if p.entropy is None else p.entropy.numpy()
            row = 0
            for it, c in zip(p.batch.items, p.batch.counts, strict=False):
                if not done(it.key):
                    writer.add(
                        it.key,
                        it.input_ids,
                        it.labels,
                        ids[row : row + c],
                        lp[row : row + c],
                        lab[row : row + c],
                        rk[row : row + c],
                        entropy=None if ent is None else ent[row : row + c],
                    )
                    stats.records_added += 1
                    stats.tokens += len(it.input_ids)
                    stats.supervised += c
                else:
                    stats.records_skipped += 1
                row += c
            stats.batches += 1
            stats.seconds = time.perf_counter() - t_start
            bar.update(len(p.batch.items))
            now = time.perf_counter()
            if now - last_postfix > 2.0:
                last_postfix = now
                bpt = _bytes_per_token(out, self.manifest_name)
                bar.set_postfix(
                    tok_s=f"{stats.supervised / max(stats.seconds, 1e-9):,.0f}",
                    B_tok="-" if bpt is None else f"{bpt:.1f}",
                )
            if self.on_batch is not None:
                self.on_batch(stats)

        try:
            for batch_items in _batches_of(self.dataset, self.scan, self.batches, self.id_field):
                if all(done(it.key) for it in batch_items):
                    stats.records_skipped += len(batch_items)
                    bar.update(len(batch_items))
                    continue
                submitted = runner.submit(_collate(batch_items, self.pad_id, self.padding_side))
                if pending is not None:
                    finish(pending)
                pending = submitted
            if pending is not None:
                finish(pending)
                pending = None
            # a rank with nothing to do still writes its (empty) part
            writer = self.writer or self.open_writer(runner.output_vocab())
            writer.close(complete=True)
        finally:
            stats.seconds = time.perf_counter() - t_start
            bar.close()


# ---------------------------------------------------------------------------------------------
# Prompt/response text (kept for callers of the first version; see target_sft.sft_data)


def tokenize_prompt_response(tokenizer: Any, prompt: str, response: str) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` for one prompt/response pair: :func:`tokenize_sft` of
    ``{"prompt": prompt, "response": response}`` (with a chat template, a user turn and an
    assistant turn; without one, plain-text prompt/completion)."""
    return tokenize_sft({"prompt": prompt, "response": response}, tokenizer)
