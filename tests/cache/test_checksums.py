"""Format version 2 (docs/FORMAT.md §7, §8): every region a reader uses is checksummed and checked
before its first use, and the manifest is sealed. A read after a flipped byte anywhere in a shard or
the manifest is identical to the original or a CacheCorruptionError/CacheFormatError naming the
file and the region, never different data; version-1 caches still read.

The exhaustive campaign (every byte of two-shard caches of both codecs, through the core reader and
the batch builder) is the Rust test rust/core/tests/flips.rs; this file flips a sample through the
Python API (TeacherCache, the collator) in one process: every byte of the manifest and of each
shard's header and tables, and a stride through the payloads.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from build_helpers import write_manifest
from conftest import make_record
from target_sft import (
    CacheCorruptionError,
    CacheError,
    CacheFormatError,
    CacheWriter,
    TargetSFTCollator,
    TeacherCache,
)
from target_sft.cli import main as cli_main
from target_sft.collate import CacheSample

FIELDS = ("input_ids", "labels", "topk_ids", "topk_logprobs", "label_logprobs", "label_ranks")
V1_CACHES = Path(__file__).resolve().parents[1] / "data" / "v1"
PAYLOAD_STRIDE = 5


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint32) if a.dtype == np.float32 else a


def read_everything(path: Path, keys: list, ids: list[np.ndarray]) -> dict:
    """Every record by position, by key (with its tokens) and through the collator."""
    c = TeacherCache(path)
    out: dict = {"keys": list(c)}
    out["by_position"] = [
        [r.key, *(_bits(getattr(r, f)).tobytes() for f in FIELDS)]
        for r in c.records_at(range(len(c)))
    ]
    out["by_key"] = [
        [_bits(getattr(c.get(k, input_ids=t), f)).tobytes() for f in FIELDS]
        for k, t in zip(keys, ids, strict=True)
    ]
    batch = TargetSFTCollator(c, pad_token_id=0, label_in_support=True, return_tensors="np")(
        [CacheSample(c, i) for i in range(len(c))]
    )
    out["batch"] = {k: _bits(np.asarray(v)).tobytes() for k, v in batch.items()}
    return out


def write_small(path: Path, codec: str) -> tuple[list, list[np.ndarray]]:
    rng = np.random.default_rng(17)
    recs = [make_record(i if i % 2 else f"doc-{i}", rng) for i in range(4)]
    size = 1500 if codec == "exact" else 500
    with CacheWriter(
        path, top_k=8, vocab_size=1000, codec=codec, shard_size=size, prior_records=2, threads=1
    ) as w:
        for r in recs:
            w.add(**r)
    assert len(w.info.shards) == 2
    return [r["key"] for r in recs], [r["input_ids"] for r in recs]


def offsets_to_flip(data: bytes, is_shard: bool) -> list[int]:
    """Every byte of a manifest; every byte of a shard's header and tables, a stride through
    its payload (frames carry their own zstd checksum, and Rust flips every byte of them)."""
    if not is_shard:
        return list(range(len(data)))
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    begin = 8 + n + header["payload"]["data_offsets"][0]
    return list(range(begin)) + list(range(begin, len(data), PAYLOAD_STRIDE))


@pytest.mark.parametrize("codec", ["exact", "compact"])
def test_flipped_bytes_read_identically_or_raise_naming_file_and_region(codec, tmp_path):
    path = tmp_path / "c"
    keys, ids = write_small(path, codec)
    want = read_everything(path, keys, ids)
    counts = {"flipped": 0, "identical": 0, "detected": 0}
    regions: dict[str, int] = {}
    for f in sorted(path.iterdir()):
        orig = f.read_bytes()
        for at in offsets_to_flip(orig, f.suffix == ".safetensors"):
            mask = (0x01, 0x04, 0x10, 0x40, 0x80, 0xFF)[at % 6]
            f.write_bytes(orig[:at] + bytes([orig[at] ^ mask]) + orig[at + 1 :])
            counts["flipped"] += 1
            try:
                got = read_everything(path, keys, ids)
            except (CacheCorruptionError, CacheFormatError) as e:
                msg = str(e)
                assert f.name in msg, (f.name, at, msg)
                region = next((w for w in REGION_WORDS if w in msg), None)
                assert region is not None, (f.name, at, msg)
                regions[region] = regions.get(region, 0) + 1
                counts["detected"] += 1
            else:
                assert got == want, f"{f.name} byte {at} ^ {mask:#x} changed what a reader reads"
                counts["identical"] += 1
        f.write_bytes(orig)
    print(codec, counts, regions)
    assert counts["identical"] + counts["detected"] == counts["flipped"]
    assert counts["detected"] > 0.9 * counts["flipped"]
    assert read_everything(path, keys, ids) == want


# What an error of a flipped byte says about where it is: a checksummed region (§7), or the
# structural check that caught it first (the header JSON, a zstd frame, a record's fields).
REGION_WORDS = (
    "region ",
    "header",
    "__metadata__",
    "tensor",
    "zstd",
    "frame",
    "record",
    "manifest",
    "not valid JSON",
    "format_version",
)


def test_hand_edited_manifest_is_refused_until_resealed(tmp_path, capsys):
    path = tmp_path / "c"
    write_small(path, "exact")
    m = json.loads((path / "manifest.json").read_text())
    m["teacher"] = {"name": "edited"}
    (path / "manifest.json").write_text(json.dumps(m, indent=2))
    with pytest.raises(CacheCorruptionError, match=r"manifest\.json: region manifest body") as e:
        TeacherCache(path)
    assert "target-sft cache verify --reseal" in str(e.value)
    assert cli_main(["cache", "verify", "--reseal", "-q", str(path)]) == 0
    assert "resealed" in capsys.readouterr().out
    assert TeacherCache(path).info.teacher == {"name": "edited"}
    # the reseal accepts the manifest's content, not a damaged shard
    shard = path / m["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x00")
    write_manifest(path, m)
    with pytest.raises(CacheError):
        TeacherCache(path).verify()


@pytest.mark.parametrize("codec", ["exact", "compact"])
def test_version1_caches_still_read_with_one_warning(codec, tmp_path):
    """Caches written by format version 1 (tests/data/v1, written by target-sft before the
    checksums with these records) read as before; a warning says their tables are unchecked."""
    rng = np.random.default_rng(99)
    recs = [make_record(i if i % 2 else f"doc-{i}", rng) for i in range(4)]
    path = tmp_path / "c"
    shutil.copytree(V1_CACHES / codec, path)
    assert json.loads((path / "manifest.json").read_text())["format_version"] == 1
    with pytest.warns(UserWarning, match="format-version-1 cache"):
        c = TeacherCache(path)
    assert c.info.format_version == 1 and len(c) == 4
    for r in recs:
        got = c.get(r["key"], input_ids=r["input_ids"])
        assert np.array_equal(got.input_ids, r["input_ids"])
        assert np.array_equal(got.topk_ids, r["topk_ids"]) or codec == "compact"
        assert np.array_equal(got.label_ranks, r["label_ranks"])
    assert c.verify() == 4
    # appending writes version-2 shards (the fixed codebook kept: §5.1) and a sealed version-3
    # manifest; the old shards stay
    settings = {"teacher": {"name": "t"}, "tokenizer": "tok"}  # as the fixture was written
    if codec == "compact":
        # the fixed codebook is kept, and the default budget is said not to apply (§5.1)
        with pytest.warns(UserWarning, match="max_mean_kl=0.0001 is not applied"):
            w = CacheWriter(path, top_k=8, vocab_size=1000, codec=codec, mode="append", **settings)
    else:
        w = CacheWriter(path, top_k=8, vocab_size=1000, codec=codec, mode="append", **settings)
    with w:
        w.add(**make_record("new", rng))
    m = json.loads((path / "manifest.json").read_text())
    assert m["format_version"] == 3 and m["manifest_checksum"].startswith("xxh3-64:")
    assert ("sqrt_step" in m["codec_params"]) == (codec == "compact")  # the fixed codebook kept
    c = TeacherCache(path)
    assert len(c) == 5 and c.verify() == 5
