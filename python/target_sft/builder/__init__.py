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
  interrupted (except for a dataset with fewer batches than ranks, see
  :func:`~target_sft.builder.plan.plan_ranks`).
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

The rooms: :mod:`.run` (the entry point, the options, one rank's steps), :mod:`.inputs` (the
dataset read as items, the planning pass), :mod:`.plan` (batches and their ranks),
:mod:`.teacher` (the device top-k runner), :mod:`.resume` (a build directory's per-rank files and
what they still hold), :mod:`.dist` (the ranks). Loading the teacher and the tokenizer, and the
teacher's fingerprint, live in :mod:`target_sft.models`. What this package exports (``__all__``)
is its API; the names inside its modules are the builder's own.
"""

from target_sft.builder.inputs import tokenize_prompt_response
from target_sft.builder.plan import plan_batches
from target_sft.builder.run import BuildResult, BuildStats, build_teacher_cache
from target_sft.errors import BuildError
from target_sft.fingerprint import tokenizer_fingerprint
from target_sft.models import load_teacher, load_tokenizer, teacher_fingerprint
from target_sft.sft_data import JsonlDataset

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
