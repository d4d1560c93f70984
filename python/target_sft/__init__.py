"""target-sft: Q-target supervised fine-tuning at scale.

The parts, each one import away:

* the teacher cache (``CacheWriter``, ``TeacherCache``; Rust core in ``target_sft._core``),
* building one from a teacher model (``build_teacher_cache``; needs torch and transformers) from
  SFT rows in any common format (``tokenize_sft``: chat messages, prompt/completion, text, tokens),
* the Q-target loss library (``target_sft_loss``, ``QTargetLoss``, ``induced_target``; pure PyTorch),
* a Hugging Face ``Trainer`` that trains with it (``TargetSFTTrainer``, :mod:`target_sft.hf`;
  its run config ``TargetSFTConfig``, :mod:`target_sft.config`), and
  TRL's ``SFTTrainer`` (``TargetSFTSFTTrainer``, :mod:`target_sft.trl`),
* the command line (``target-sft``, :mod:`target_sft.cli`).

Names are imported lazily, so ``import target_sft`` is cheap and the loss library never needs the
native module (nor the cache needs torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    # cache
    "CacheWriter": "target_sft.cache",
    "TeacherCache": "target_sft.cache",
    "CacheRecord": "target_sft.cache",
    "CacheInfo": "target_sft.cache",
    "CacheSample": "target_sft.cache",
    # building a cache from a teacher
    "build_teacher_cache": "target_sft.builder",
    "BuildResult": "target_sft.builder",
    "tokenize_sft": "target_sft.sft_data",
    # streaming
    "StreamingTeacherDataset": "target_sft.streaming",
    # batches
    "build_batch": "target_sft.collate",
    "TargetSFTCollator": "target_sft.collate",
    "TeacherCacheDataset": "target_sft.cache",
    "KeySplit": "target_sft.cache",
    "split_by_key": "target_sft.cache",
    # errors
    "BuildError": "target_sft.errors",
    "CacheError": "target_sft.errors",
    "CacheInputError": "target_sft.errors",
    "CacheFormatError": "target_sft.errors",
    "CacheVersionError": "target_sft.errors",
    "CacheCorruptionError": "target_sft.errors",
    "CacheKeyError": "target_sft.errors",
    "CacheMismatchError": "target_sft.errors",
    "CacheIOError": "target_sft.errors",
    "CacheLockedError": "target_sft.errors",
    # losses
    "target_sft_loss": "target_sft.losses",
    "QTargetLoss": "target_sft.losses",
    "induced_target": "target_sft.losses",
    "fused_linear_target_sft_loss": "target_sft.losses",
    # report
    "write_report": "target_sft.report",
    # Hugging Face Trainer (imports transformers)
    "TargetSFTTrainer": "target_sft.hf",
    "TargetSFTConfig": "target_sft.config",
    "TargetSFTTRLConfig": "target_sft.config",  # imports trl
    # Proximal SFT's old policy, recorded by the trainer (imports transformers)
    "OldPolicyStore": "target_sft.old_policy",
    "OldPolicyCallback": "target_sft.old_policy",
    # TRL SFTTrainer (imports trl)
    "TargetSFTSFTTrainer": "target_sft.trl",
}

__all__ = [
    "BuildError",
    "BuildResult",
    "CacheCorruptionError",
    "CacheError",
    "CacheFormatError",
    "CacheIOError",
    "CacheInfo",
    "CacheInputError",
    "CacheKeyError",
    "CacheLockedError",
    "CacheMismatchError",
    "CacheRecord",
    "CacheSample",
    "CacheVersionError",
    "CacheWriter",
    "KeySplit",
    "OldPolicyCallback",
    "OldPolicyStore",
    "QTargetLoss",
    "StreamingTeacherDataset",
    "TargetSFTCollator",
    "TargetSFTConfig",
    "TargetSFTSFTTrainer",
    "TargetSFTTRLConfig",
    "TargetSFTTrainer",
    "TeacherCache",
    "TeacherCacheDataset",
    "__version__",
    "build_batch",
    "build_teacher_cache",
    "fused_linear_target_sft_loss",
    "induced_target",
    "split_by_key",
    "target_sft_loss",
    "tokenize_sft",
    "write_report",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'target_sft' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from target_sft.builder import BuildResult, build_teacher_cache
    from target_sft.cache import (
        CacheInfo,
        CacheRecord,
        CacheSample,
        CacheWriter,
        KeySplit,
        TeacherCache,
        TeacherCacheDataset,
        split_by_key,
    )
    from target_sft.collate import TargetSFTCollator, build_batch
    from target_sft.config import TargetSFTConfig, TargetSFTTRLConfig
    from target_sft.errors import (
        BuildError,
        CacheCorruptionError,
        CacheError,
        CacheFormatError,
        CacheInputError,
        CacheIOError,
        CacheKeyError,
        CacheMismatchError,
        CacheVersionError,
    )
    from target_sft.hf import TargetSFTTrainer
    from target_sft.losses import (
        QTargetLoss,
        fused_linear_target_sft_loss,
        induced_target,
        target_sft_loss,
    )
    from target_sft.old_policy import OldPolicyCallback, OldPolicyStore
    from target_sft.report import write_report
    from target_sft.sft_data import tokenize_sft
    from target_sft.streaming import StreamingTeacherDataset
    from target_sft.trl import TargetSFTSFTTrainer
