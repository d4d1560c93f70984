"""Open cost of the region checksums (format version 2, docs/FORMAT.md §7) on one large shard.

Builds one compact shard of about ``--gib`` GiB in a temporary directory (synthetic Qwen-shaped
records, :mod:`target_sft.testing.synthetic`, written repeatedly under new keys until the payload is large
enough), then measures, each in a fresh process so that nothing is cached in the reader:

* ``open``: ``TeacherCache(path)`` plus the first record read (the shard is opened, mapped and,
  with the checks, its header and tables hashed, on first use);
* ``first batch``: ``TeacherCache(path)`` plus a collated batch of ``--batch`` samples at random
  positions (what a DataLoader worker does first).

Baseline in the same run, on the same file: the shard with its checks switched off by patching its
header in place (the ``checksums`` tensor renamed and ``format_version`` set to ``"1"``: a
version-1 shard, which target-sft opens without region checks; same length, so nothing moves).
The two variants alternate, ``--repeats`` times each; medians are reported. The page cache is warm
for both (the file was just written); the checks read only the header and tables (a few bytes per
record), never the payload. The temporary directory is removed at the end, also on failure.

    python benches/bench_open.py [--gib 1.0] [--repeats 7] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import sys, time, warnings, json
warnings.simplefilter("ignore")
t0 = time.perf_counter()
from target_sft import TeacherCache, TargetSFTCollator
from target_sft.collate import CacheSample
t_import = time.perf_counter() - t0
path, what, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.perf_counter()
c = TeacherCache(path)
if what == "open":
    c.record_at(0)
else:
    n = len(c)
    pos = [(i * 7919) % n for i in range(batch)]
    TargetSFTCollator(c, pad_token_id=0, return_tensors="np", threads=1)(
        [CacheSample(c, p) for p in pos])
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def _write(path: Path, recs: list, n: int, shard_size: str) -> int:
    """Write ``n`` records (``recs`` cycled, keys ``0..n-1``) into one compact shard; its size."""
    from target_sft import CacheWriter

    with CacheWriter(path, top_k=64, vocab_size=151_936, shard_size=shard_size, threads=2) as w:
        for i in range(n):
            kw = recs[i % len(recs)].as_kwargs()
            kw["key"] = i
            w.add(**kw)
    assert w.info is not None and len(w.info.shards) == 1
    return int(w.info.shards[0]["bytes"])


def build(path: Path, gib: float) -> dict:
    """One shard of about ``gib`` GiB: the encoded size of 64 synthetic records is measured on a
    small cache first, then the records are written again and again under new keys."""
    from target_sft.testing.synthetic import generate_list

    recs = generate_list(64, mean_length=512, seed=0)
    with tempfile.TemporaryDirectory(prefix="tsft-bench-open-probe-") as d:
        per_record = _write(Path(d) / "p", recs, len(recs), "1GiB") / len(recs)
    n = max(len(recs), int(gib * (1 << 30) / per_record))
    t0 = time.perf_counter()
    size = _write(path, recs, n, "64GiB")
    return {"records": n, "bytes": size, "write_s": time.perf_counter() - t0}


def tables_bytes(shard: Path) -> tuple[int, int]:
    """(header bytes, bytes of the checksummed tables) of a shard."""
    with open(shard, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    names = header["__metadata__"]["checksums"].split(",")[1:]
    return 8 + n, sum(header[t]["data_offsets"][1] - header[t]["data_offsets"][0] for t in names)


def switch_checks(shard: Path, on: bool) -> None:
    """Make the shard a version-1 shard without checks (``on=False``) or restore it, in place:
    the ``checksums`` tensor is renamed ``checksumz`` and ``format_version`` "2" becomes "1"."""
    with open(shard, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        head = f.read(n)
        pairs = [
            (b'"checksums":{"data_offsets"', b'"checksumz":{"data_offsets"'),
            (b'"format_version":"2"', b'"format_version":"1"'),
        ]
        for a, b in pairs:
            old, new = (b, a) if on else (a, b)
            if head.count(new) == 1:
                continue  # already switched
            assert head.count(old) == 1, (old, head[:200])
            head = head.replace(old, new)
        f.seek(8)
        f.write(head)


def run_child(path: Path, what: str, batch: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), what, str(batch)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="shard size to build (GiB)")
    ap.add_argument("--repeats", type=int, default=7, help="runs per variant and measurement")
    ap.add_argument("--batch", type=int, default=8, help="samples in the first batch")
    args = ap.parse_args()
    # a kill (SIGTERM) unwinds too, so the temporary directory and its shard never outlive us
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="tsft-bench-open-") as d:
        path = Path(d) / "c"
        built = build(path, args.gib)
        (shard,) = path.glob("*.safetensors")
        head, tables = tables_bytes(shard)
        print(
            f"shard: {built['bytes'] / (1 << 30):.2f} GiB, {built['records']:,} records, header "
            f"{head:,} B, checksummed tables {tables:,} B (written in {built['write_s']:.0f} s)"
        )
        res: dict[str, dict[str, list[float]]] = {
            w: {"checked": [], "unchecked": []} for w in ("open", "batch")
        }
        for _ in range(args.repeats):
            for variant in ("checked", "unchecked"):
                switch_checks(shard, on=variant == "checked")
                for what in ("open", "batch"):
                    res[what][variant].append(run_child(path, what, args.batch))
        switch_checks(shard, on=True)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(f"{'':22} {'checked (v2)':>14} {'unchecked':>14} {'ratio':>7}")
    out = {"shard_bytes": built["bytes"], "records": built["records"], "tables_bytes": tables}
    for what, label in (("open", "open + first record"), ("batch", f"first batch ({args.batch})")):
        c, u = (statistics.median(res[what][v]) for v in ("checked", "unchecked"))
        print(f"{label:22} {c * 1e3:11.2f} ms {u * 1e3:11.2f} ms {c / u:7.3f}")
        out[what] = {"checked_ms": c * 1e3, "unchecked_ms": u * 1e3, "ratio": c / u}
        out[what + "_all"] = {v: [round(x * 1e3, 3) for x in res[what][v]] for v in res[what]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
