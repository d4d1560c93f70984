"""The manifest's ``role`` (docs/FORMAT.md §1): written by the writer, ``"teacher"`` when absent
(older caches), checked by the native reader, kept on append, shown by ``cache inspect``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import xxhash

from build_helpers import write_manifest
from target_sft import (
    CacheFormatError,
    CacheInputError,
    CacheMismatchError,
    CacheWriter,
    TeacherCache,
)
from target_sft.cli import build_parser, inspect_text

DATA = Path(__file__).parent.parent / "data"


def write(path, records, **kw):
    with CacheWriter(path, top_k=8, vocab_size=1000, **kw) as w:
        for r in records:
            w.add(**r)
    return TeacherCache(path)


def test_the_writer_records_the_role(tmp_path, records):
    t = write(tmp_path / "t", records)
    r = write(tmp_path / "r", records, role="reference")
    assert (t.role, t.info.role) == ("teacher", "teacher")
    assert (r.role, r.info.role) == ("reference", "reference")
    m = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert m["role"] == "reference" and m["format_version"] == 3
    assert "role           reference" in inspect_text(tmp_path / "r", sample=False)
    assert "role           teacher" in inspect_text(tmp_path / "t", sample=False)


def test_absent_role_is_teacher_and_a_bad_one_is_refused(tmp_path, records):
    write(tmp_path / "c", records, role="reference")
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    del m["role"]
    write_manifest(tmp_path / "c", m)
    assert TeacherCache(tmp_path / "c").role == "teacher"
    for bad in ("Reference", 3, None):
        m["role"] = bad
        write_manifest_unchecked(tmp_path / "c", m)
        with pytest.raises(CacheFormatError, match=f'"role" is {json.dumps(bad)}, expected'):
            TeacherCache(tmp_path / "c")


def write_manifest_unchecked(cache_dir: Path, manifest: dict) -> None:
    """Store ``manifest`` sealed (docs/FORMAT.md §1: XXH3-64 of the bytes before the seal) but
    not validated, as a writer that got a field wrong would."""
    body = json.dumps({k: v for k, v in manifest.items() if k != "manifest_checksum"}, indent=2)
    head = body[: body.rindex("}")].rstrip() + ",\n  "
    seal = xxhash.xxh3_64_hexdigest(head.encode())
    (cache_dir / "manifest.json").write_text(f'{head}"manifest_checksum": "xxh3-64:{seal}"\n}}\n')


def test_version_1_caches_hold_teachers(tmp_path):
    for codec in ("exact", "compact"):
        shutil.copytree(DATA / "v1" / codec, tmp_path / codec)
        with pytest.warns(UserWarning):
            assert TeacherCache(tmp_path / codec).role == "teacher"


def test_an_append_keeps_the_role(tmp_path, records):
    write(tmp_path / "c", records[:6], role="reference")
    with pytest.raises(CacheMismatchError, match=r'role = "reference" vs "teacher"'):
        CacheWriter(tmp_path / "c", top_k=8, vocab_size=1000, mode="append")
    with CacheWriter(
        tmp_path / "c", top_k=8, vocab_size=1000, mode="append", role="reference"
    ) as w:
        for r in records[6:]:
            w.add(**r)
    assert TeacherCache(tmp_path / "c").role == "reference"


def test_a_bad_role_argument_is_refused(tmp_path):
    with pytest.raises(CacheInputError, match="role must be 'teacher' or 'reference', got 'ref'"):
        CacheWriter(tmp_path / "c", top_k=8, vocab_size=1000, role="ref")
    args = build_parser().parse_args(
        ["cache", "build", "--teacher", "t", "--data", "d", "--out", "o", "--role", "reference"]
    )
    assert args.role == "reference"
    assert (
        build_parser()
        .parse_args(["cache", "build", "--teacher", "t", "--data", "d", "--out", "o"])
        .role
        == "teacher"
    )
