"""Build a teacher cache from a causal LM: :func:`build_teacher_cache`.

One call, on one device or on every rank of a ``torchrun`` job::

    build_teacher_cache("Qwen/Qwen2.5-1.5B-Instruct", dataset, "cache/", top_k=64)

How it works (docs/BUILD.md has the details):

* **Plan.** The dataset is cut into *windows* of ``window`` consecutive samples. Window ``w`` belongs
  to rank ``w % world_size``. Inside a window, samples are sorted by length and packed greedily
  into batches of at most ``batch_tokens`` padded tokens. The plan depends only on the dataset, so
  a record is computed from the same batch whatever the world size and however often the build
  was interrupted.
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
* **Finish.** All ranks report success or their error to each other (``torch.distributed`` on a
  gloo group); if every rank succeeded, rank 0 merges the per-rank manifests into
  ``manifest.json`` (marked complete). If any rank failed, every rank raises
  :class:`BuildError` naming the failed ranks; re-running resumes.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from target_sft import _core
from target_sft.cache import IGNORE_INDEX, CacheInfo, CacheWriter, _check_wait, merge_manifests
from target_sft.errors import BuildError, CacheInputError
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
            f"({self.records_skipped:,} already cached), {self.tokens:,} tokens "
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


def _weights_hash(model: Any) -> str:
    """A cheap fingerprint of the weights: name, shape, dtype and 64 values of each tensor."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            flat = p.detach().reshape(-1)
            n = flat.numel()
            idx = torch.linspace(0, max(n - 1, 0), steps=min(n, 64), device=flat.device).long()
            sample = flat[idx].float().cpu().numpy().tobytes()
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:".encode())
            h.update(sample)
    return h.hexdigest()


def teacher_fingerprint(model: Any) -> dict[str, Any]:
    """The manifest's ``teacher`` entry: name/path, revision, config hash, dtype, weights hash.

    Two caches agree on it exactly when they were built by the same weights in the same dtype."""
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


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """The manifest's ``tokenizer`` entry: name, size, and a hash of the vocabulary, the special
    tokens, the chat template and (fast tokenizers) the whole tokenizer definition."""
    if tokenizer is None:
        return {}
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    vocab = tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    h.update(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True).encode())
    h.update(str(getattr(tokenizer, "chat_template", None) or "").encode())
    return {
        "name": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        "class": type(tokenizer).__name__,
        "size": len(tokenizer),
        "fingerprint": h.hexdigest()[:32],
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
        self.vocab_size: int | None = None

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
        start = end = None
        if pin:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        with torch.inference_mode():
            if n:
                logits = self._logits(ids, mask, keep, batch)
                v = int(logits.shape[-1])
                if self.vocab_size is None:
                    self.vocab_size = v
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
                    out_lp[a:b].copy_(vals, non_blocking=pin)
                    out_ids[a:b].copy_(idx.int(), non_blocking=pin)
                    out_lab[a:b].copy_(lab[:, 0], non_blocking=pin)
                    out_rank[a:b].copy_(rank.int(), non_blocking=pin)
        if pin:
            end.record()
            return _Pending(batch, out_ids, out_lp, out_lab, out_rank, None, start, end)
        return _Pending(batch, out_ids, out_lp, out_lab, out_rank, time.perf_counter() - t0)


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


def _windows(
    dataset: Any, window: int, rank: int, world: int, id_field: str | None
) -> Iterator[list[_Item]]:
    """This rank's windows (window ``w`` of ``window`` consecutive items goes to rank
    ``w % world``). Sized datasets are indexed directly; iterables are walked. An
    :class:`SFTSource` makes the items (tokenisation, keys, row locations)."""
    source = dataset if isinstance(dataset, SFTSource) else None
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        n = len(dataset)
        for w in range(rank, math.ceil(n / window), world):
            lo, hi = w * window, min(n, (w + 1) * window)
            yield [_make_item(i, dataset[i], id_field, source) for i in range(lo, hi)]
        return
    buf: list[_Item] = []
    for i, obj in enumerate(dataset):
        if (i // window) % world == rank:
            buf.append(_make_item(i, obj, id_field, source))
            if len(buf) == window:
                yield buf
                buf = []
    if buf:
        yield buf


def _rank_share(dataset: Any, window: int, rank: int, world: int) -> int | None:
    if not hasattr(dataset, "__len__"):
        return None
    n = len(dataset)
    return sum(min(n, (w + 1) * window) - w * window for w in range(rank, -(-n // window), world))


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
        path: the cache directory. If it holds an unfinished build, the build resumes.
        top_k, temperature, codec: what is cached (see :class:`~target_sft.cache.CacheWriter`).
        batch_tokens: padded tokens per teacher batch; ``max_batch_size`` caps samples per batch.
        window: samples per planning window (sorted by length inside; also the unit of work
            given to a rank).
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
        wait: when another live process writes this rank's files in ``path`` (another build, or
            a :class:`~target_sft.cache.CacheWriter` of ``manifest.json``): ``False`` raises
            :class:`CacheLockedError` when the rank starts, naming it; ``True`` waits; a
            number waits at most that many seconds (docs/FORMAT.md §6).

    Returns:
        :class:`BuildResult` with the merged cache's :class:`CacheInfo` and this rank's stats.

    Raises:
        CacheInputError: bad input (a duplicate key, a row in no known format, a turn without
            content, ...), naming the row (``path:line`` for JSONL) and the field; raised
            before the teacher loads.
        CacheMismatchError: ``path`` holds a build with other settings (names the field).
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
    error: BaseException | None = None
    try:
        _check_directory(out, dist.world)
        # The data first (the tokenizer is cheap, a teacher takes minutes to load): every rank
        # checks every row's key and schema and tokenises the first rows.
        tok = load_tokenizer(teacher, tokenizer)
        dataset = SFTSource(
            dataset, tok, id_field=id_field, max_length=max_length, truncation=truncation
        )
        dataset.check()
        model = load_teacher(teacher, dtype=dtype, device=device, local_rank=dist.local_rank)
        teacher_fp = teacher_fingerprint(model)
        tok_fp = tokenizer_fingerprint(tok)
        if pad_token_id is None:
            pad_token_id = getattr(tok, "pad_token_id", None) or 0
        runner = _Runner(model, top_k, float(temperature), chunk_bytes)
        _run_rank(
            runner,
            dataset,
            out,
            dist,
            stats,
            top_k=top_k,
            temperature=float(temperature),
            codec=codec,
            batch_tokens=batch_tokens,
            max_batch_size=max_batch_size,
            window=window,
            id_field=id_field,
            padding_side=padding_side,
            pad_id=int(pad_token_id),
            teacher_fp=teacher_fp,
            tok_fp=tok_fp,
            shard_size=shard_size,
            writer_threads=writer_threads,
            progress=progress,
            on_batch=on_batch,
            wait=wait,
        )
    except BaseException as e:  # report to the other ranks before raising
        error = e
    try:
        reports = dist.all_gather(
            None if error is None else f"{type(error).__name__}: {error}".splitlines()[0]
        )
        all_stats = dist.all_gather(stats)
        failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
        if error is not None:
            raise error
        if failed:
            raise BuildError(
                "the build failed on "
                + "; ".join(f"rank {r}: {msg}" for r, msg in failed)
                + f". Committed shards are kept in {out}; run the same command again to resume."
            )
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


def _run_rank(
    runner: _Runner,
    dataset: Any,
    out: Path,
    dist: _Dist,
    stats: BuildStats,
    *,
    top_k: int,
    temperature: float,
    codec: str,
    batch_tokens: int,
    max_batch_size: int,
    window: int,
    id_field: str | None,
    padding_side: str,
    pad_id: int,
    teacher_fp: dict[str, Any],
    tok_fp: dict[str, Any],
    shard_size: int | str,
    writer_threads: int,
    progress: bool | None,
    on_batch: Callable[[BuildStats], None] | None,
    wait: bool | float = False,
) -> None:
    from tqdm.auto import tqdm

    prefix, manifest_name = _rank_files(dist.rank, dist.world)
    # refuse (or wait) now if another live writer owns this rank's files; the writer takes the
    # same locks for good when it opens
    _core.check_writer_locks(str(out), prefix, manifest_name, _check_wait(wait))
    writer: CacheWriter | None = None
    existing = out / manifest_name

    def open_writer(vocab_size: int) -> CacheWriter:
        return CacheWriter(
            out,
            top_k=top_k,
            vocab_size=vocab_size,
            codec=codec,  # type: ignore[arg-type]
            temperature=temperature,
            tokenizer=tok_fp,
            teacher=teacher_fp,
            mode="append",
            shard_size=shard_size,
            threads=writer_threads,
            shard_prefix=prefix,
            manifest_name=manifest_name,
            wait=wait,
        )

    if existing.exists() or any(out.glob(f"{prefix}-*.safetensors")):
        vocab = json.loads(existing.read_text())["vocab_size"] if existing.exists() else None
        if vocab is None:  # shards but no manifest yet: peek at a shard's metadata
            from safetensors import safe_open

            first = sorted(out.glob(f"{prefix}-*.safetensors"))[0]
            with safe_open(str(first), "np") as f:
                vocab = int(f.metadata()["vocab_size"])
        writer = open_writer(vocab)

    bar = tqdm(
        total=_rank_share(dataset, window, dist.rank, dist.world),
        unit="rec",
        desc=f"teacher cache (rank {dist.rank}/{dist.world})"
        if dist.world > 1
        else "teacher cache",
        disable=not _show_progress(progress, dist),
        dynamic_ncols=True,
    )
    t_start = time.perf_counter()
    last_postfix = 0.0
    pending: _Pending | None = None

    def finish(p: _Pending) -> None:
        nonlocal writer, last_postfix
        stats.teacher_seconds += p.teacher_seconds()
        if writer is None:
            writer = open_writer(int(runner.vocab_size or 0))
        ids, lp, lab, rk = (x.numpy() for x in (p.ids, p.lp, p.lab, p.rank))
        row = 0
        for it, c in zip(p.batch.items, p.batch.counts, strict=False):
            if it.key not in writer:
                writer.add(
                    it.key,
                    it.input_ids,
                    it.labels,
                    ids[row : row + c],
                    lp[row : row + c],
                    lab[row : row + c],
                    rk[row : row + c],
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
            bpt = _bytes_per_token(out, manifest_name)
            bar.set_postfix(
                tok_s=f"{stats.supervised / max(stats.seconds, 1e-9):,.0f}",
                B_tok="-" if bpt is None else f"{bpt:.1f}",
            )
        if on_batch is not None:
            on_batch(stats)

    try:
        for items in _windows(dataset, window, dist.rank, dist.world, id_field):
            for idx in plan_batches(
                [len(it.input_ids) for it in items], batch_tokens, max_batch_size
            ):
                batch_items = [items[i] for i in idx]
                if writer is not None and all(it.key in writer for it in batch_items):
                    stats.records_skipped += len(batch_items)
                    bar.update(len(batch_items))
                    continue
                submitted = runner.submit(_collate(batch_items, pad_id, padding_side))
                if pending is not None:
                    finish(pending)
                pending = submitted
        if pending is not None:
            finish(pending)
            pending = None
        if writer is None:  # nothing to do on this rank (or an empty dataset)
            writer = open_writer(int(runner.vocab_size or _guess_vocab(runner)))
        writer.close(complete=True)
    except BaseException:
        if writer is not None and not writer.closed:
            try:
                writer.close(complete=False)
            except Exception:
                pass  # the original exception is the one to report
        raise
    finally:
        stats.seconds = time.perf_counter() - t_start
        bar.close()


def _guess_vocab(runner: _Runner) -> int:
    cfg = getattr(runner.model, "config", None)
    v = getattr(cfg, "vocab_size", None) if cfg is not None else None
    if v is None:
        raise CacheInputError(
            "this rank had no sample to run and the teacher has no config.vocab_size; give it "
            "at least one sample"
        )
    return int(v)


# ---------------------------------------------------------------------------------------------
# Prompt/response text (kept for callers of the first version; see target_sft.sft_data)


def tokenize_prompt_response(tokenizer: Any, prompt: str, response: str) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` for one prompt/response pair: :func:`tokenize_sft` of
    ``{"prompt": prompt, "response": response}`` (with a chat template, a user turn and an
    assistant turn; without one, plain-text prompt/completion)."""
    return tokenize_sft({"prompt": prompt, "response": response}, tokenizer)
