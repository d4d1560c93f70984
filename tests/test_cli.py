"""The target-sft command line, run as a real subprocess through the installed console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from target_sft import CacheWriter

SCRIPT = Path(sys.executable).parent / "target-sft"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


@pytest.fixture
def cache(tmp_path, records):
    with CacheWriter(
        tmp_path / "c", top_k=8, vocab_size=1000, teacher={"name": "tiny"}, tokenizer="tok-1"
    ) as w:
        for r in records:
            w.add(**r)
    return tmp_path / "c"


def test_inspect(cache, records):
    p = run("cache", "inspect", str(cache), "--shards")
    assert p.returncode == 0, p.stderr
    assert "records        12" in p.stdout
    assert '"name": "tiny"' in p.stdout and '"fingerprint": "tok-1"' in p.stdout
    assert "shard-000000.safetensors" in p.stdout
    assert f"key={records[0]['key']!r}" in p.stdout
    j = run("cache", "inspect", str(cache), "--json")
    assert json.loads(j.stdout)["num_records"] == 12


def test_verify_ok_and_corrupt(cache):
    p = run("cache", "verify", "-q", str(cache))
    assert p.returncode == 0 and "OK: 12 records in 1 shard(s) verified" in p.stdout
    shard = cache / "shard-000000.safetensors"
    b = bytearray(shard.read_bytes())
    b[-10] ^= 0xFF
    shard.write_bytes(bytes(b))
    p = run("cache", "verify", "-q", str(cache))
    assert p.returncode == 1
    assert "target-sft: error:" in p.stderr and "shard-000000.safetensors" in p.stderr


def test_errors_exit_nonzero(tmp_path):
    p = run("cache", "inspect", str(tmp_path))
    assert p.returncode == 1 and "not a target-sft cache" in p.stderr
    assert run("cache").returncode == 2
