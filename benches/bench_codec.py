"""Codec benchmark: bytes per supervised token, KL of the decoded top-k, encode and decode speed.

Data: :mod:`target_sft.testing.synthetic` (Qwen-shaped teacher output, see docs/SYNTHETIC_DATA.md).
Baselines, measured in the same run on the same records:

* ``numpy-memmap``: the records stored uncompressed (int32 ids, float32 log-probs, raw tokens) in
  numpy memmaps with an offsets table; "decode" = slicing and copying the arrays of a record.
* ``python-ref``: the pure-Python reference decoder of our format (zstandard + numpy,
  ``tests/cache/reference_reader.py``, written from docs/FORMAT.md alone).

Throughput is per core: encode uses one encoder thread and divides the supervised tokens by the
process CPU time of the whole write (validation, encoding, committing, Python included); decode
uses one thread. Timings are the best of ``--repeats`` runs (the machine may be shared). Run ``python benches/bench_codec.py --help`` for options.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from target_sft import CacheWriter, TeacherCache
from target_sft.testing.synthetic import generate_list, stats

ROOT = Path(__file__).resolve().parent.parent


def kl_rows(orig_ids, orig_lps, dec_ids, dec_lps) -> np.ndarray:
    """KL(P || Q) per row, P/Q = original/decoded top-k renormalised over the valid entries."""
    out = np.empty(orig_ids.shape[0])
    for r in range(orig_ids.shape[0]):
        m = orig_ids[r] >= 0
        oi, ol = orig_ids[r][m], orig_lps[r][m].astype(np.float64)
        md = dec_ids[r] >= 0
        di, dl = dec_ids[r][md], dec_lps[r][md].astype(np.float64)
        o, d = np.argsort(oi), np.argsort(di)
        assert np.array_equal(oi[o], di[d]), "ids must round-trip"
        p = ol[o] - np.logaddexp.reduce(ol[o])
        q = dl[d] - np.logaddexp.reduce(dl[d])
        pe = np.exp(p)
        out[r] = float(np.sum(pe * (p - q), where=pe > 0))
    return out


def write_cache(path: Path, recs, codec: str, threads: int) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    with CacheWriter(
        path, top_k=recs[0].topk_ids.shape[1], vocab_size=VOCAB, codec=codec, threads=threads
    ) as w:
        for r in recs:
            w.add(
                r.key,
                r.input_ids,
                r.labels,
                r.topk_ids,
                r.topk_logprobs,
                r.label_logprobs,
                r.label_ranks,
            )
    return time.perf_counter() - t0, time.process_time() - c0


def write_memmap(path: Path, recs) -> int:
    path.mkdir(parents=True)
    arrays = {
        "tokens": np.concatenate([r.input_ids for r in recs]),
        "labels": np.concatenate([r.labels for r in recs]),
        "topk_ids": np.concatenate([r.topk_ids for r in recs]),
        "topk_logprobs": np.concatenate([r.topk_logprobs for r in recs]),
        "label_logprobs": np.concatenate([r.label_logprobs for r in recs]),
        "label_ranks": np.concatenate([r.label_ranks for r in recs]),
        "tok_off": np.cumsum([0] + [r.input_ids.size for r in recs]).astype(np.int64),
        "row_off": np.cumsum([0] + [r.label_logprobs.size for r in recs]).astype(np.int64),
    }
    total = 0
    for name, a in arrays.items():
        mm = np.lib.format.open_memmap(
            path / f"{name}.npy", mode="w+", dtype=a.dtype, shape=a.shape
        )
        mm[...] = a
        mm.flush()
        total += (path / f"{name}.npy").stat().st_size
    return total


def read_memmap(path: Path, n: int) -> float:
    mm = {p.stem: np.load(p, mmap_mode="r") for p in path.glob("*.npy")}
    t0 = time.perf_counter()
    for i in range(n):
        a, b = mm["tok_off"][i], mm["tok_off"][i + 1]
        c, d = mm["row_off"][i], mm["row_off"][i + 1]
        for name in ("tokens", "labels"):
            np.array(mm[name][a:b])
        for name in ("topk_ids", "topk_logprobs", "label_logprobs", "label_ranks"):
            np.array(mm[name][c:d])
    return time.perf_counter() - t0


def main() -> None:
    global VOCAB
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--records", type=int, default=200)
    ap.add_argument("--mean-length", type=int, default=1024)
    ap.add_argument("--vocab-size", type=int, default=151_936)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--ref-records", type=int, default=8, help="records decoded by the slow python-ref baseline"
    )
    ap.add_argument("--repeats", type=int, default=3, help="timings are the best of this many runs")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    VOCAB = args.vocab_size

    t0 = time.perf_counter()
    recs = generate_list(
        args.records,
        vocab_size=args.vocab_size,
        top_k=args.top_k,
        mean_length=args.mean_length,
        seed=args.seed,
    )
    gen_s = time.perf_counter() - t0
    st = stats(recs)
    sup = sum(r.label_logprobs.size for r in recs)
    print(
        f"data: {args.records} records, {sum(r.input_ids.size for r in recs):,} tokens, {sup:,} supervised, "
        f"k={args.top_k}, V={args.vocab_size} (generated in {gen_s:.1f} s)"
    )
    print(
        "data stats:",
        json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in st.items()}),
    )

    sys.path.insert(0, str(ROOT / "tests" / "cache"))
    import reference_reader as ref

    tmp = Path(tempfile.mkdtemp(prefix="tsft-bench-"))
    results: dict = {
        "records": args.records,
        "supervised_tokens": sup,
        "top_k": args.top_k,
        "vocab": args.vocab_size,
    }
    try:
        mm_bytes = write_memmap(tmp / "memmap", recs)
        mm_s = min(read_memmap(tmp / "memmap", len(recs)) for _ in range(args.repeats))
        results["numpy-memmap"] = {"bytes_per_token": mm_bytes / sup, "decode_tok_s": sup / mm_s}
        for codec in ("exact", "compact"):
            path = tmp / codec
            runs = []
            for _ in range(args.repeats):
                shutil.rmtree(path, ignore_errors=True)
                runs.append(write_cache(path, recs, codec, threads=1))
            wall, cpu = min(runs, key=lambda x: x[1])
            cache = TeacherCache(path)
            n = len(cache)
            dec_s = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                dec = cache.records_at(range(n), threads=1)
                dec_s = min(dec_s, time.perf_counter() - t0)
            kl = np.concatenate(
                [
                    kl_rows(r.topk_ids, r.topk_logprobs, d.topk_ids, d.topk_logprobs)
                    for r, d in zip(recs, dec, strict=True)
                ]
            )
            m = args.ref_records
            t0 = time.perf_counter()
            ref_recs = (
                ref.read_cache(path, limit=m)
                if "limit" in ref.read_cache.__code__.co_varnames
                else ref.read_cache(path)[:m]
            )
            ref_s = time.perf_counter() - t0
            ref_sup = sum(r["label_logprobs"].size for r in ref_recs)
            results[codec] = {
                "bytes_per_token": cache.info.bytes / sup,
                "kl_mean": float(kl.mean()),
                "kl_p99": float(np.quantile(kl, 0.99)),
                "kl_max": float(kl.max()),
                "encode_tok_s_per_core": sup / cpu,
                "encode_wall_s": wall,
                "decode_tok_s_per_core": sup / dec_s,
                "python_ref_decode_tok_s": ref_sup / ref_s,
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    mm = results["numpy-memmap"]
    print(
        f"\n{'store':<14}{'bytes/tok':>10}{'mean KL':>11}{'p99 KL':>10}{'max KL':>10}{'enc tok/s/core':>16}{'dec tok/s/core':>16}{'dec vs memmap':>15}{'dec vs py-ref':>15}"
    )
    print(
        f"{'numpy-memmap':<14}{mm['bytes_per_token']:>10.1f}{'0':>11}{'0':>10}{'0':>10}{'-':>16}{mm['decode_tok_s']:>16,.0f}{'1.00x':>15}{'-':>15}"
    )
    for codec in ("exact", "compact"):
        r = results[codec]
        print(
            f"{codec:<14}{r['bytes_per_token']:>10.1f}{r['kl_mean']:>11.2e}{r['kl_p99']:>10.1e}{r['kl_max']:>10.1e}"
            f"{r['encode_tok_s_per_core']:>16,.0f}{r['decode_tok_s_per_core']:>16,.0f}"
            f"{r['decode_tok_s_per_core'] / mm['decode_tok_s']:>14.2f}x{r['decode_tok_s_per_core'] / r['python_ref_decode_tok_s']:>14.1f}x"
        )
    print(
        f"\nmachine: {platform.machine()} {platform.processor() or ''}, python {platform.python_version()}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


VOCAB = 0

if __name__ == "__main__":
    main()
