"""Stream a teacher cache to every rank and DataLoader worker of a (multi-node) training job.

:class:`StreamingTeacherDataset` (``dataset.py``) is the public entry point; the package follows
the seams of the design in ``docs/STREAMING.md``, one concept per module:

* ``order.py`` — the sample order of an epoch (splitmix64 shard order, Feistel block shuffle);
* ``partition.py`` — the rank × DataLoader-worker partition and the (rank, world size) a
  process iterates as;
* ``store.py`` — the node-local shard store of a remote cache (download, verify, commit, pin,
  evict under a size limit; ``flock`` files between the processes of a node);
* ``manifest.py`` — fetching a remote cache's manifest (parsed and validated by the native core);
* ``keyindex.py`` — matching a teacher's records to another cache's by key (the native lookup;
  for a remote cache, ranged reads of its shards' key tables, parsed and verified natively);
* ``reference.py`` — the reference cache that follows the teacher (``reference=``): opened,
  checked (role, tokenizer, keys) and matched once;
* ``dataset.py`` — :class:`StreamingTeacherDataset`: iteration, epochs, ``state_dict`` / resume.
"""

from __future__ import annotations

from target_sft.streaming.dataset import STATE_FORMAT as STATE_FORMAT
from target_sft.streaming.dataset import STATE_VERSION as STATE_VERSION
from target_sft.streaming.dataset import StreamingTeacherDataset

__all__ = ["StreamingTeacherDataset"]
