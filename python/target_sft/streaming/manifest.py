"""The manifest of a remote cache: fetched once through fsspec, then parsed and validated by the
native core with exactly the checks of a local open (``_core.parse_manifest``; docs/FORMAT.md
§1): its seal, format and version, required fields, shard entries (plain file names,
non-negative counts, ``xxh3-128:`` checksums) and totals. Nothing is validated here."""

from __future__ import annotations

import errno
import json
from typing import Any

from target_sft import _core
from target_sft.errors import CacheFormatError, CacheInputError, CacheIOError

__all__ = ["MANIFEST_NAME", "fetch_manifest"]

MANIFEST_NAME = "manifest.json"


def fetch_manifest(url: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """The parsed, validated manifest of the remote cache at ``url`` (any fsspec URL).

    Raises:
        CacheInputError: fsspec or xxhash is not installed.
        CacheFormatError: no manifest there, or not a target-sft manifest (missing fields, a
            shard entry that is not valid, ...).
        CacheVersionError: written by a newer target-sft.
        CacheCorruptionError: not JSON, its ``manifest_checksum`` fails, or its totals differ
            from the sums over its shards.
        CacheIOError: the fetch failed (network, permissions).
    """
    try:
        import fsspec
        import xxhash  # noqa: F401  (verifies downloads)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise CacheInputError(
            f"reading {url} needs fsspec and xxhash: pip install 'target-sft[remote]' ({e})"
        ) from e
    shown = f"{url.rstrip('/')}/{MANIFEST_NAME}"
    try:
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
        raw = fs.cat_file(f"{root.rstrip('/')}/{MANIFEST_NAME}")
    except FileNotFoundError as e:
        raise CacheFormatError(f"{shown} does not exist: {url} is not a target-sft cache") from e
    except Exception as e:
        raise CacheIOError(errno.EIO, f"cannot fetch {shown}: {type(e).__name__}: {e}") from e
    parsed: dict[str, Any] = json.loads(_core.parse_manifest(bytes(raw), shown))
    if "role" not in parsed:  # a field the native parser may not carry; the raw text is sealed
        role = json.loads(bytes(raw)).get("role")
        if role is not None:
            parsed["role"] = role
    return parsed
