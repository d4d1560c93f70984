"""The target-sft command line, run as a real subprocess through the installed console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from build_helpers import write_manifest
from target_sft import CacheWriter, TeacherCache

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


def _kept_mass(recs: list[dict]) -> np.ndarray:
    """Each row's teacher mass in its top-k, in float64, from the records as written."""
    return np.concatenate(
        [
            np.where(r["topk_ids"] >= 0, np.exp(r["topk_logprobs"].astype(np.float64)), 0).sum(1)
            for r in recs
        ]
    )


def test_inspect_stats(tmp_path, records):
    """--stats prints the manifest's statistics; the figures equal a float64 reference of the
    records written (tests/cache/test_stats.py checks every field to full precision)."""
    ent = [np.full(r["label_logprobs"].size, 1.25) for r in records]
    with CacheWriter(tmp_path / "c", top_k=8, vocab_size=1000) as w:
        for r, e in zip(records, ent, strict=True):
            w.add(**r, entropy=e)
    mass = _kept_mass(records)
    inside = sum(
        int(r["labels"][t] in r["topk_ids"][j])
        for r in records
        for j, t in enumerate(np.flatnonzero(r["labels"][1:] != -100) + 1)
    )
    p = run("cache", "inspect", str(tmp_path / "c"), "--stats")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "statistics     over the supervised rows (all)" in out
    p10 = np.floor(np.sort(mass)[int(np.ceil(0.1 * mass.size)) - 1] * 100) / 100
    assert (
        f"kept mass    mean {mass.mean():.4f}, p10 in [{p10:.2f}, {p10 + 0.01:.2f}), "
        f"min {mass.min():.4f} (teacher probability held by the top-8)"
    ) in out
    assert f"label rate   {100 * inside / mass.size:.2f}% of rows" in out
    assert "entropy      mean 1.2500 nats (teacher, full vocabulary)" in out
    st = TeacherCache(tmp_path / "c").info.stats
    assert f"codec KL     mean {st.codec_kl_mean:.3g}, max {st.codec_kl_max:.3g} nats" in out
    assert 0 < st.codec_kl_mean <= 1e-4  # the default budget
    assert "KL budget    max_mean_kl 0.0001 nats per row, every record within it" in out
    # the KL each shard achieved, from its own statistics
    info = TeacherCache(tmp_path / "c").info
    (shard,) = info.shards
    kl = shard["stats"]["codec_kl_sum"] / shard["stats"]["codec_kl_rows"]
    assert "per shard    mean codec KL of 1 shard(s): " in out
    assert f"    {shard['file']}  {kl:.3g}" in out
    # without --stats: no statistics section
    assert "statistics" not in run("cache", "inspect", str(tmp_path / "c")).stdout


def test_inspect_stats_exact_codec_without_entropy_and_old_caches(tmp_path, records):
    with CacheWriter(tmp_path / "e", top_k=8, vocab_size=1000, codec="exact") as w:
        for r in records:
            w.add(**r)
    out = run("cache", "inspect", str(tmp_path / "e"), "--stats").stdout
    assert "entropy      not recorded" in out
    assert "codec KL     0 (exact codec: log-probs stored bit for bit)" in out
    # a cache written before statistics existed: reported as such, not as zeros
    m = json.loads((tmp_path / "e" / "manifest.json").read_text())
    del m["stats"]
    for s in m["shards"]:
        del s["stats"]
    write_manifest(tmp_path / "e", m)
    p = run("cache", "inspect", str(tmp_path / "e"), "--stats")
    assert p.returncode == 0, p.stderr
    assert "statistics     none recorded" in p.stdout and "kept mass" not in p.stdout


@pytest.fixture
def chat_cache(tmp_path):
    """A two-turn chat record (user, assistant, user, assistant) over a word-level tokenizer
    trained here, with the assistant turns supervised; the manifest records the tokenizer."""
    from transformers import AutoTokenizer

    from build_helpers import save_tiny_tokenizer
    from target_sft.build import tokenizer_fingerprint

    tok_dir = tmp_path / "tok"
    save_tiny_tokenizer(tok_dir, 50)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    # <user> w10 w11 <assistant> w12 w13 </s> <user> w14 <assistant> w16 </s>
    ids = np.array([4, 10, 11, 5, 12, 13, 2, 4, 14, 5, 16, 2], np.int32)
    labels = ids.copy()
    labels[:4] = -100
    labels[7:10] = -100
    s = int((labels[1:] != -100).sum())
    topk = np.tile(np.arange(20, 28, dtype=np.int32), (s, 1))
    with CacheWriter(
        tmp_path / "c", top_k=8, vocab_size=50, tokenizer=tokenizer_fingerprint(tok)
    ) as w:
        w.add(
            "chat-1",
            ids,
            labels,
            topk,
            np.full((s, 8), -2.5, np.float32),
            np.full(s, -5.0, np.float32),
            np.full(s, 9, np.int32),
        )
    return tmp_path / "c", tok_dir


def test_inspect_tokenizer_decodes_prompt_and_response(chat_cache):
    cache, tok_dir = chat_cache
    p = run("cache", "inspect", str(cache), "--tokenizer", str(tok_dir))
    assert p.returncode == 0, p.stderr
    assert "[prompt] = unsupervised context, [response] = supervised labels" in p.stdout
    runs = [line.strip() for line in p.stdout.splitlines() if " t=" in line]
    assert runs == [
        '[prompt]   t=0..3  "<user> w10 w11 <assistant>"',
        '[response] t=4..6  "w12 w13 </s>"',
        '[prompt]   t=7..9  "<user> w14 <assistant>"',
        '[response] t=10..11  "w16 </s>"',
    ]


def test_inspect_tokenizer_refuses_another_tokenizer(chat_cache, tmp_path):
    from build_helpers import save_tiny_tokenizer

    cache, _ = chat_cache
    other = tmp_path / "other"
    save_tiny_tokenizer(other, 60)  # another vocabulary: another fingerprint
    p = run("cache", "inspect", str(cache), "--tokenizer", str(other))
    assert p.returncode == 1 and "[response]" not in p.stdout
    assert f"--tokenizer {other}: tokenizer mismatch: the cache {cache}" in p.stderr
    assert "Use the tokenizer the cache was built with" in p.stderr
    p = run("cache", "inspect", str(cache), "--record", "5")
    assert p.returncode == 1 and "--record 5 is outside [0, 1)" in p.stderr


def test_help_says_what_each_option_is_for_and_its_default():
    from target_sft.cli import build_parser

    parser = build_parser()
    subs = {}
    for a in parser._subparsers._group_actions:
        subs.update(a.choices)
    cache_subs = {}
    for a in subs["cache"]._subparsers._group_actions:
        cache_subs.update(a.choices)
    checked = {
        "cache inspect": cache_subs["inspect"],
        "cache verify": cache_subs["verify"],
        "plot": subs["plot"],
        "demo": subs["demo"],
    }
    for name, sp in checked.items():
        for act in sp._actions:
            assert act.help, f"{name} {act.option_strings or act.dest} has no help"
    p = run("plot", "--help")
    assert p.returncode == 0
    flat = " ".join(p.stdout.split())
    for s in (
        "records for the student pass (default: 256)",
        "(default: linear)",
        "Figure 4 bins per axis (default: 20)",
    ):
        assert s in flat, s
    assert "(default: None)" not in flat and "(default: False)" not in flat
    flat = " ".join(run("cache", "inspect", "--help").stdout.split())
    assert "(default: 0)" in flat and "--stats" in flat and "--tokenizer DIR" in flat
