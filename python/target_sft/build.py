"""The cache builder's documented path: ``from target_sft.build import build_teacher_cache, ...``.

The builder lives in the package :mod:`target_sft.builder` (a folder named ``build/`` is where
packaging tools and common ignore lists put build output); this module hands on its public names.
"""

from target_sft.builder import (
    BuildError,
    BuildResult,
    BuildStats,
    JsonlDataset,
    build_teacher_cache,
    load_teacher,
    load_tokenizer,
    plan_batches,
    teacher_fingerprint,
    tokenize_prompt_response,
    tokenizer_fingerprint,
)

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
