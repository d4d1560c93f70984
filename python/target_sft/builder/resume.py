"""A build directory: each rank's files (:func:`rank_files`), what a new run may resume
(:func:`check_directory`), and which cached records still match the dataset
(:func:`resume_state`)."""

from __future__ import annotations

import re
from pathlib import Path

from target_sft import _core
from target_sft.builder.inputs import Scan
from target_sft.errors import CacheInputError, CacheMismatchError

__all__ = ["check_directory", "rank_files", "resume_state"]


_RANK_MANIFEST = re.compile(r"^manifest\.rank(\d{5})-of-(\d{5})\.json$")


def rank_files(rank: int, world: int) -> tuple[str, str]:
    tag = f"rank{rank:05d}-of-{world:05d}"
    return tag, f"manifest.{tag}.json"


def check_directory(path: Path, world: int) -> None:
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


def resume_state(
    out: Path, world: int, rank: int, scan: Scan, rebuild_changed: bool
) -> tuple[set[int | str], list[int | str], int]:
    """Compare the dataset with what every rank's part of ``out`` holds: returns the keys that
    stay cached, the keys this rank's part must drop (their data changed and
    ``rebuild_changed``) and how many changed in all. A changed sample is an error otherwise.

    A sample has changed when its key is cached but its token ids (``token_hash``) or its labels
    (a hash of the cached labels, decoded from each record's tokens section) differ."""
    names = [rank_files(r, world)[1] for r in range(world)]
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
