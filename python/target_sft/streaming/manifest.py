"""The manifest of a remote cache: fetched once through fsspec and parsed and validated by the
native core (the same checks as a local open, docs/FORMAT.md §1)."""

from __future__ import annotations

import errno
import json
from typing import Any

from target_sft import _core
from target_sft.errors import (
    CacheCorruptionError,
    CacheFormatError,
    CacheInputError,
    CacheIOError,
    CacheVersionError,
)
from target_sft.streaming.store import checksum_hex

__all__ = ["MANIFEST_NAME", "fetch_manifest"]

MANIFEST_NAME = "manifest.json"
_MANIFEST = MANIFEST_NAME
_CACHE_FORMAT = "target-sft-cache"
_FORMAT_VERSION = _core.FORMAT_VERSION


def fetch_manifest(url: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    try:
        import fsspec
        import xxhash  # noqa: F401  (verifies downloads)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise CacheInputError(
            f"reading {url} needs fsspec and xxhash: pip install 'target-sft[remote]' ({e})"
        ) from e
    shown = f"{url.rstrip('/')}/{_MANIFEST}"
    try:
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
        raw = fs.cat_file(f"{root.rstrip('/')}/{_MANIFEST}")
    except FileNotFoundError as e:
        raise CacheFormatError(f"{shown} does not exist: {url} is not a target-sft cache") from e
    except Exception as e:
        raise CacheIOError(errno.EIO, f"cannot fetch {shown}: {type(e).__name__}: {e}") from e
    try:
        m = json.loads(raw)
    except ValueError as e:
        raise CacheCorruptionError(f"{shown} is not valid JSON ({e})") from e
    if not isinstance(m, dict) or m.get("format") != _CACHE_FORMAT:
        raise CacheFormatError(f"{shown} is not a target-sft cache manifest")
    v = m.get("format_version")
    if not isinstance(v, int) or v < 1:
        raise CacheFormatError(f"{shown} has no valid format_version")
    if v > _FORMAT_VERSION:
        raise CacheVersionError(
            f"{shown} was written with cache format version {v}, newer than the version "
            f"{_FORMAT_VERSION} this target-sft reads; upgrade target-sft"
        )
    top = (
        *("codec", "codec_params", "top_k", "vocab_size", "temperature", "tokenizer", "teacher"),
        *("complete", "num_records", "num_tokens", "num_supervised"),
    )
    missing = [k for k in (*top, "shards") if k not in m]
    if missing or not isinstance(m["shards"], list):
        raise CacheFormatError(f"{shown} lacks the manifest fields {missing or ['shards']}")
    for s in m["shards"]:
        f = str(s.get("file", "")) if isinstance(s, dict) else ""
        if not f or "/" in f or "\\" in f or f.startswith("."):
            raise CacheFormatError(f"{shown}: shard file name {f!r} is not a plain file name")
        for k in ("records", "bytes", "tokens", "supervised"):
            if not isinstance(s.get(k), int) or s[k] < 0:
                raise CacheFormatError(f"{shown}: shard {f!r} has no valid {k!r}")
        checksum_hex(s, shown)
    _core.check_manifest(raw, shown)  # its manifest_checksum and the rest, as a local open
    return m
