"""Every Rust error kind reaches Python as its own class of the ``CacheError`` family.

``rust/core/src/error.rs`` defines the kinds; ``err()`` in ``rust/python/src/lib.rs`` is the one
place that maps them to the classes of :mod:`target_sft.errors`. Each case below triggers one kind
through the public Python API on real files (a corrupt shard, a newer format version, a missing
key, a held lock, an I/O failure, ...) and checks the exact class and a fragment of the Rust
message, so that an error raised by a Python-side check cannot stand in for it. A completeness
test parses both Rust files: a new kind without a case here, or a kind mapped to another class,
fails.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from conftest import make_record
from target_sft import CacheWriter, TeacherCache, errors
from target_sft.errors import (
    CacheCorruptionError,
    CacheError,
    CacheFormatError,
    CacheInputError,
    CacheIOError,
    CacheKeyError,
    CacheLockedError,
    CacheMismatchError,
    CacheVersionError,
)

ROOT = Path(__file__).resolve().parents[2]

#: ErrorKind variant -> the class err() must raise.
EXPECTED = {
    "Input": CacheInputError,
    "Format": CacheFormatError,
    "Version": CacheVersionError,
    "Corruption": CacheCorruptionError,
    "KeyNotFound": CacheKeyError,
    "Mismatch": CacheMismatchError,
    "Io": CacheIOError,
    "Locked": CacheLockedError,
}


def _cache(path: Path, n: int = 4) -> list[dict]:
    """A small complete cache (exact codec, one shard) at ``path``; returns its records."""
    rng = np.random.default_rng(5)
    recs = [make_record(i, rng) for i in range(n)]
    with CacheWriter(path, top_k=8, vocab_size=1000, codec="exact", threads=1) as w:
        for r in recs:
            w.add(**r)
    return recs


def _edit_manifest(path: Path, edit: Callable[[dict], None]) -> None:
    """Edit the manifest's JSON by hand, without re-sealing it."""
    m = path / "manifest.json"
    data = json.loads(m.read_text())
    edit(data)
    m.write_text(json.dumps(data, indent=2))


# ---- one trigger per kind (several for some), each: (kind, message fragment, action) ----------


def input_duplicate_key(tmp: Path) -> None:
    rec = make_record(0, np.random.default_rng(0))
    with CacheWriter(tmp / "c", top_k=8, vocab_size=1000, codec="exact", threads=1) as w:
        w.add(**rec)
        w.add(**rec)


def input_unknown_codec(tmp: Path) -> None:
    CacheWriter(tmp / "c", top_k=8, vocab_size=1000, codec="zip")  # type: ignore[arg-type]


def format_not_a_cache(tmp: Path) -> None:
    (tmp / "c").mkdir()
    TeacherCache(tmp / "c")


def format_other_manifest(tmp: Path) -> None:
    (tmp / "c").mkdir()
    (tmp / "c" / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    TeacherCache(tmp / "c")


def version_newer_manifest(tmp: Path) -> None:
    _cache(tmp / "c")
    _edit_manifest(tmp / "c", lambda m: m.update(format_version=99))
    TeacherCache(tmp / "c")


def corruption_manifest_not_json(tmp: Path) -> None:
    _cache(tmp / "c")
    m = tmp / "c" / "manifest.json"
    m.write_bytes(m.read_bytes()[:-40])
    TeacherCache(tmp / "c")


def corruption_shard_byte_flip(tmp: Path) -> None:
    _cache(tmp / "c")
    (shard,) = (tmp / "c").glob("*.safetensors")
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x40  # inside the last record's frame
    shard.write_bytes(bytes(data))
    TeacherCache(tmp / "c").verify()


def key_missing(tmp: Path) -> None:
    _cache(tmp / "c")
    TeacherCache(tmp / "c")["no-such-key"]


def mismatch_other_tokens(tmp: Path) -> None:
    recs = _cache(tmp / "c")
    TeacherCache(tmp / "c").get(1, recs[1]["input_ids"][::-1].copy())


def mismatch_append_other_settings(tmp: Path) -> None:
    _cache(tmp / "c")
    CacheWriter(tmp / "c", top_k=4, vocab_size=1000, codec="exact", mode="append")


def io_parent_is_a_file(tmp: Path) -> None:
    (tmp / "file").write_text("not a directory")
    CacheWriter(tmp / "file" / "c", top_k=8, vocab_size=1000)


def io_manifest_is_a_directory(tmp: Path) -> None:
    (tmp / "c" / "manifest.json").mkdir(parents=True)
    TeacherCache(tmp / "c")


def locked_by_another_writer(tmp: Path) -> None:
    with CacheWriter(tmp / "c", top_k=8, vocab_size=1000, threads=1):
        CacheWriter(tmp / "c", top_k=8, vocab_size=1000, threads=1, mode="append")


CASES = [
    ("Input", "duplicate key 0", input_duplicate_key),
    ("Input", 'unknown codec "zip"', input_unknown_codec),
    ("Format", "it is not a target-sft cache", format_not_a_cache),
    ("Format", "is not a target-sft cache manifest", format_other_manifest),
    ("Version", "cache format version 99, newer than the version", version_newer_manifest),
    ("Corruption", "is not valid JSON", corruption_manifest_not_json),
    ("Corruption", "checksum", corruption_shard_byte_flip),
    ("KeyNotFound", 'key "no-such-key" is not in the cache at', key_missing),
    ("Mismatch", "differ from the ids the cache at", mismatch_other_tokens),
    ("Mismatch", "top_k", mismatch_append_other_settings),
    ("Io", "cannot create", io_parent_is_a_file),
    ("Io", "cannot read", io_manifest_is_a_directory),
    ("Locked", "is held by", locked_by_another_writer),
]


@pytest.mark.parametrize(("kind", "fragment", "action"), CASES, ids=[c[2].__name__ for c in CASES])
def test_error_kind_reaches_its_python_class(
    kind: str, fragment: str, action: Callable[[Path], None], tmp_path: Path
) -> None:
    with pytest.raises(CacheError) as e:
        action(tmp_path)
    assert type(e.value) is EXPECTED[kind], f"{kind}: {type(e.value).__name__}: {e.value}"
    assert fragment in str(e.value), str(e.value)
    # raised inside the native module: the innermost Python frame is a call into it, not a
    # `raise` of a Python-side check
    innermost = e.traceback[-1]
    assert "target_sft" in str(innermost.path), innermost
    assert not str(innermost.statement).lstrip().startswith("raise"), innermost


def _variants(source: str, enum: str) -> list[str]:
    body = re.search(rf"pub enum {enum} \{{(.*?)\n\}}", source, re.S)
    assert body, f"enum {enum} not found"
    code = "\n".join(ln for ln in body.group(1).splitlines() if not ln.strip().startswith("//"))
    return re.findall(r"^\s*(\w+),", code, re.M)


def test_every_kind_is_mapped_and_tested() -> None:
    kinds = _variants((ROOT / "rust/core/src/error.rs").read_text(), "ErrorKind")
    assert kinds, "no ErrorKind variants parsed"
    lib = (ROOT / "rust/python/src/lib.rs").read_text()
    body = re.search(r"fn err\(e: core::Error\) -> PyErr \{(.*?)\n\}", lib, re.S)
    assert body, "err() not found in rust/python/src/lib.rs"
    mapping = dict(re.findall(r'ErrorKind::(\w+) => "(\w+)"', body.group(1)))
    assert set(mapping) == set(kinds), "err() must map every ErrorKind"
    assert {k: getattr(errors, v) for k, v in mapping.items()} == EXPECTED
    assert {c[0] for c in CASES} == set(kinds), "every ErrorKind needs a case in CASES"
