"""Teachers and tokenizers: loading them (:func:`load_teacher`, :func:`load_tokenizer`) and the
teacher's identity in a cache's manifest (:func:`teacher_fingerprint`, a hash of every weight).

The cache builder, the report and the CLI load models through here. A tokenizer's identity (its
fingerprint and the checks against a cache) lives in :mod:`target_sft.fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from target_sft import _core
from target_sft.errors import CacheInputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["load_teacher", "load_tokenizer", "teacher_fingerprint"]


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


_HASH_CHUNK = 64 << 20  # bytes of a tensor hashed at once (part of the weights_hash definition)


def _tensor_digest(t: torch.Tensor) -> str:
    """XXH3-128 digests of a tensor's bytes in 64 MiB chunks (copied to the host one chunk at a
    time), joined: every value counts."""
    import torch

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
    """A causal LM in eval mode (for :func:`~target_sft.build_teacher_cache` and the report): a
    model object or a callable is used as it is; a path or hub name is loaded with
    ``AutoModelForCausalLM`` (bfloat16 on a GPU, float32 on CPU unless ``dtype`` says otherwise)
    onto ``device`` (GPU ``local_rank`` of this node, else the CPU)."""
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
