"""Test and benchmark helpers; never imported by the runtime package.

``import target_sft`` does not import this subpackage: it exists for the test suite, the benchmarks
and users who want realistic data without a teacher model.

* :mod:`target_sft.testing.synthetic`: synthetic teacher top-k data that looks like a real LLM
  teacher on reasoning traces (docs/SYNTHETIC_DATA.md).
* :mod:`target_sft.testing.families`: the codec benchmark's three data families (the synthetic
  generator, a small LM trained here on real text, and its flat 256k-vocabulary variant); imported
  on its own (it needs torch, transformers and tokenizers for the LM families).
"""

from __future__ import annotations

from target_sft.testing.synthetic import (
    IGNORE_INDEX,
    QWEN_VOCAB_SIZE,
    SyntheticRecord,
    generate_list,
    generate_records,
    stats,
)

__all__ = [
    "IGNORE_INDEX",
    "QWEN_VOCAB_SIZE",
    "SyntheticRecord",
    "generate_list",
    "generate_records",
    "stats",
]
