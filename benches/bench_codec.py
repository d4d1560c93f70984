"""Codec benchmark: bytes per supervised token, KL of the decoded top-k, encode and decode speed,
on three families of teacher data (:mod:`target_sft.testing.families`):

* ``synthetic``: the project's Qwen-shaped generator (docs/SYNTHETIC_DATA.md; the compact codec
  was tuned on it);
* ``text-lm``: top-64 dumps of a small causal LM trained here on real text found on the machine,
  on held-out documents (trained once, then cached under ``benches/.data``, gitignored);
* ``flat-256k``: the same LM at temperature 2, ids spread over a 262,144-token vocabulary.

Stores, measured per family in the same run on the same records:

* ``exact`` and ``compact``: this project's cache (``CacheWriter`` / ``TeacherCache``);
  ``compact`` with its default fidelity budget (``max_mean_kl=1e-4``: every record's mean codec
  KL per row within it, docs/FORMAT.md §5.1);
* ``compact-fixed``: the compact codec with the fixed parameters it had before the budget
  (``sqrt_step`` 2.5e-3, ``tail_step`` 2.5: format version 2's default), and
  ``compact@fixed-KL``: the budget set to the mean KL ``compact-fixed`` reached on the same
  records, so the two compare at equal KL;
* ``fp16+zstd``: the common practice: each record's arrays (ids, tokens, labels, ranks as int32,
  log-probs as float16) concatenated and compressed as one zstd frame (level ``--zstd-level``, 3 by
  default, the cache writer's default too) with an offsets table; decode = decompress, view, and
  convert the log-probs back to float32;
* ``numpy-memmap``: uncompressed int32 + float32 memmaps with an offsets table; decode = slicing
  and copying one record's arrays;
* ``python-ref``: the pure-Python reference decoder of our format (``tests/cache/reference_reader.py``,
  written from docs/FORMAT.md alone), on the first ``--ref-records`` records only.

bytes/tok = total bytes written (shards, tables, index; for the baselines, arrays + offsets) per
supervised token. KL = KL(teacher top-k ‖ decoded top-k), both renormalised over the row, per row.
Throughput is per core: encode uses one encoder thread and divides the supervised tokens by the
process CPU time of the whole write (validation, encoding, committing, Python included); decode
uses one thread: ``dec`` reads every record as a Python ``CacheRecord`` (``records_at``), ``batch
dec`` (our caches only) decodes them through the native batch builder in batches of 16 records,
the path a training DataLoader takes (``build_batch``). ``B/tok, frames one stream`` (our caches
only): the same cache with each record's frame recompressed as one zstd-3 stream, as the writer
did before it started a zstd block per stream: the same run's baseline for the block cuts. Timings are the best of ``--repeats`` runs (the machine may be shared). Run
``python benches/bench_codec.py --help`` for options.
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
import zstandard

from target_sft import CacheWriter, TeacherCache, build_batch
from target_sft.testing.families import FAMILIES, family_stats, load_family

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "benches" / ".data"
STORES = ("numpy-memmap", "fp16+zstd", "exact", "compact-fixed", "compact@fixed-KL", "compact")
FIXED = {"max_mean_kl": None, "compact_sqrt_step": 2.5e-3, "compact_tail_step": 2.5}


def _sort_rows(ids: np.ndarray, lps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    o = np.argsort(ids, axis=1, kind="stable")
    return np.take_along_axis(ids, o, axis=1), np.take_along_axis(lps, o, axis=1)


def kl_rows(orig_ids, orig_lps, dec_ids, dec_lps) -> np.ndarray:
    """KL(P || Q) per row, P/Q = original/decoded top-k renormalised over the valid entries.

    Rows are compared as sets of ids (the compact codec stores them in another order); the ids
    must round-trip exactly."""
    oi, ol = _sort_rows(orig_ids, orig_lps.astype(np.float64))
    di, dl = _sort_rows(dec_ids, dec_lps.astype(np.float64))
    assert np.array_equal(oi, di), "ids must round-trip"
    valid = oi >= 0
    ol = np.where(valid, ol, -np.inf)
    dl = np.where(valid, dl, -np.inf)
    p = ol - np.logaddexp.reduce(ol, axis=1, keepdims=True)
    q = dl - np.logaddexp.reduce(dl, axis=1, keepdims=True)
    pe = np.exp(p)
    with np.errstate(invalid="ignore"):
        terms = np.where(pe > 0, pe * (p - q), 0.0)
    return terms.sum(axis=1)


def write_cache(
    path: Path, recs, vocab: int, codec: str, threads: int, **kw
) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    with CacheWriter(
        path, top_k=recs[0].topk_ids.shape[1], vocab_size=vocab, codec=codec, threads=threads, **kw
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


def encode_fp16_zstd(recs, level: int) -> tuple[list[bytes], float]:
    """Each record as one zstd frame: int32 tokens, labels, top-k ids, label ranks; float16
    top-k and label log-probs. Returns the frames and the process CPU seconds."""
    c0 = time.process_time()
    cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
    frames = []
    for r in recs:
        raw = b"".join(
            (
                r.input_ids.astype(np.int32).tobytes(),
                r.labels.astype(np.int32).tobytes(),
                r.topk_ids.astype(np.int32).tobytes(),
                r.topk_logprobs.astype(np.float16).tobytes(),
                r.label_logprobs.astype(np.float16).tobytes(),
                r.label_ranks.astype(np.int32).tobytes(),
            )
        )
        frames.append(cctx.compress(raw))
    return frames, time.process_time() - c0


def decode_fp16_zstd(frames: list[bytes], shapes: list[tuple[int, int, int]]) -> tuple[list, float]:
    """Decode every frame into float32/int32 arrays; returns them and the wall seconds."""
    dctx = zstandard.ZstdDecompressor()
    out = []
    t0 = time.perf_counter()
    for f, (t, s, k) in zip(frames, shapes, strict=True):
        buf = dctx.decompress(f)
        o = 0
        toks = np.frombuffer(buf, np.int32, t, o).copy()
        o += 4 * t
        labels = np.frombuffer(buf, np.int32, t, o).copy()
        o += 4 * t
        ids = np.frombuffer(buf, np.int32, s * k, o).reshape(s, k).copy()
        o += 4 * s * k
        lps = np.frombuffer(buf, np.float16, s * k, o).reshape(s, k).astype(np.float32)
        o += 2 * s * k
        llp = np.frombuffer(buf, np.float16, s, o).astype(np.float32)
        o += 2 * s
        ranks = np.frombuffer(buf, np.int32, s, o).copy()
        out.append((toks, labels, ids, lps, llp, ranks))
    return out, time.perf_counter() - t0


def bench_family(fam, args, ref, tmp: Path) -> dict:
    recs, vocab = fam.records, fam.vocab_size
    sup = sum(r.label_logprobs.size for r in recs)
    res: dict = {}

    mm_bytes = write_memmap(tmp / "memmap", recs)
    mm_s = min(read_memmap(tmp / "memmap", len(recs)) for _ in range(args.repeats))
    res["numpy-memmap"] = {
        "bytes_per_token": mm_bytes / sup,
        "kl_mean": 0.0,
        "kl_p99": 0.0,
        "kl_max": 0.0,
        "decode_tok_s_per_core": sup / mm_s,
    }

    enc = [encode_fp16_zstd(recs, args.zstd_level) for _ in range(args.repeats)]
    frames, enc_cpu = enc[0][0], min(e[1] for e in enc)
    shapes = [(r.input_ids.size, *r.topk_ids.shape) for r in recs]
    dec_runs = [decode_fp16_zstd(frames, shapes) for _ in range(args.repeats)]
    dec, dec_s = dec_runs[0][0], min(d[1] for d in dec_runs)
    kl = np.concatenate(
        [kl_rows(r.topk_ids, r.topk_logprobs, d[2], d[3]) for r, d in zip(recs, dec, strict=True)]
    )
    res["fp16+zstd"] = {
        "bytes_per_token": (sum(len(f) for f in frames) + 8 * (len(frames) + 1)) / sup,
        "kl_mean": float(kl.mean()),
        "kl_p99": float(np.quantile(kl, 0.99)),
        "kl_max": float(kl.max()),
        "encode_tok_s_per_core": sup / enc_cpu,
        "decode_tok_s_per_core": sup / dec_s,
    }

    for store in STORES[2:]:
        codec = "exact" if store == "exact" else "compact"
        kw: dict = {}
        if store == "compact-fixed":
            kw = FIXED
        elif store == "compact@fixed-KL":
            kw = {"max_mean_kl": res["compact-fixed"]["kl_mean"]}
        path = tmp / store
        runs = []
        for _ in range(args.repeats):
            shutil.rmtree(path, ignore_errors=True)
            runs.append(write_cache(path, recs, vocab, codec, threads=1, **kw))
        wall, cpu = min(runs, key=lambda x: x[1])
        cache = TeacherCache(path)
        n = len(cache)
        dec_s = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            dec = cache.records_at(range(n), threads=1)
            dec_s = min(dec_s, time.perf_counter() - t0)
        # the training path: batches of 16 records decoded by the native batch builder straight
        # into the batch arrays (no per-record Python objects)
        keys = [r.key for r in recs]
        batch_s = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for i in range(0, len(keys), 16):
                build_batch(keys[i : i + 16], cache=cache, threads=1)
            batch_s = min(batch_s, time.perf_counter() - t0)
        kl = np.concatenate(
            [
                kl_rows(r.topk_ids, r.topk_logprobs, d.topk_ids, d.topk_logprobs)
                for r, d in zip(recs, dec, strict=True)
            ]
        )
        # The reference reader on the first --ref-records records (it is slow: a reference).
        shards = ref.open_shards(path)[1]
        # Same run, same records: each frame recompressed as one zstd-3 stream (the writer's
        # frames before it cut them into a block per stream): what the block cuts save.
        one = zstandard.ZstdCompressor(level=3, write_checksum=True, write_content_size=True)
        framed = unsplit = 0
        for sh in shards:
            for i in range(len(sh)):
                framed += int(sh.record_index[i, 1])
                unsplit += len(one.compress(sh.frame(i)))
        t0 = time.perf_counter()
        ref_sup = 0
        for i in range(min(args.ref_records, len(shards[0]))):
            ref_sup += shards[0].record(i)["label_logprobs"].size
        ref_s = time.perf_counter() - t0
        res[store] = {
            "bytes_per_token": cache.info.bytes / sup,
            "bytes_per_token_one_stream": (cache.info.bytes - framed + unsplit) / sup,
            "kl_mean": float(kl.mean()),
            "kl_p99": float(np.quantile(kl, 0.99)),
            "kl_max": float(kl.max()),
            "encode_tok_s_per_core": sup / cpu,
            "encode_wall_s": wall,
            "decode_tok_s_per_core": sup / dec_s,
            "decode_batch_tok_s_per_core": sup / batch_s,
            "python_ref_decode_tok_s": ref_sup / ref_s if ref_s > 0 else float("nan"),
        }
        shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(tmp / "memmap", ignore_errors=True)
    return res


def print_family(name: str, res: dict) -> None:
    mm, fz = res["numpy-memmap"], res["fp16+zstd"]
    print(
        f"\n[{name}]\n{'store':<18}{'bytes/tok':>10}{'mean KL':>10}{'p99 KL':>9}{'max KL':>9}"
        f"{'enc tok/s/core':>16}{'dec tok/s/core':>16}{'bytes vs fp16+zstd':>20}"
        f"{'dec vs memmap':>15}{'dec vs py-ref':>15}{'batch dec tok/s/core':>22}"
        f"{'B/tok, frames one stream':>26}"
    )
    for store in STORES:
        r = res[store]
        enc = r.get("encode_tok_s_per_core")
        enc_s = f"{enc:,.0f}" if enc else "-"
        refv = r.get("python_ref_decode_tok_s")
        ref_s = f"{r['decode_tok_s_per_core'] / refv:,.1f}x" if refv else "-"
        print(
            f"{store:<18}{r['bytes_per_token']:>10.1f}{r['kl_mean']:>10.2e}{r['kl_p99']:>9.1e}"
            f"{r['kl_max']:>9.1e}{enc_s:>16}"
            f"{r['decode_tok_s_per_core']:>16,.0f}"
            f"{r['bytes_per_token'] / fz['bytes_per_token']:>19.2f}x"
            f"{r['decode_tok_s_per_core'] / mm['decode_tok_s_per_core']:>14.2f}x"
            f"{ref_s:>15}"
            + (
                f"{r['decode_batch_tok_s_per_core']:>22,.0f}"
                if "decode_batch_tok_s_per_core" in r
                else f"{'-':>22}"
            )
            + (
                f"{r['bytes_per_token_one_stream']:>26.1f}"
                if "bytes_per_token_one_stream" in r
                else f"{'-':>26}"
            )
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--families", default=",".join(FAMILIES), help=f"comma-separated subset of {FAMILIES}"
    )
    ap.add_argument("--records", type=int, default=200, help="synthetic records")
    ap.add_argument("--mean-length", type=int, default=1024, help="synthetic mean length")
    ap.add_argument(
        "--lm-records", type=int, default=400, help="records of each LM family (256 tokens each)"
    )
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--zstd-level", type=int, default=3, help="zstd level of the fp16+zstd store")
    ap.add_argument(
        "--ref-records", type=int, default=2, help="records decoded by the slow python-ref baseline"
    )
    ap.add_argument("--repeats", type=int, default=3, help="timings are the best of this many runs")
    ap.add_argument("--data-dir", default=str(DATA), help="where the trained LM and dumps are kept")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    names = [f for f in args.families.split(",") if f]
    for f in names:
        if f not in FAMILIES:
            ap.error(f"unknown family {f!r}; choose from {FAMILIES}")

    sys.path.insert(0, str(ROOT / "tests" / "cache"))
    import reference_reader as ref

    results: dict = {"zstd_level": args.zstd_level, "families": {}}
    tmp = Path(tempfile.mkdtemp(prefix="tsft-bench-"))
    try:
        for name in names:
            t0 = time.perf_counter()
            fam = load_family(
                name,
                args.records if name == "synthetic" else args.lm_records,
                cache_dir=args.data_dir,
                top_k=args.top_k,
                seed=args.seed,
                synthetic_length=args.mean_length,
                log=True,
            )
            load_s = time.perf_counter() - t0
            st = family_stats(fam.records)
            sup = int(st["rows"])
            print(
                f"\n== {name}: {len(fam.records)} records, {int(st['tokens']):,} tokens, {sup:,} "
                f"supervised, k={args.top_k}, V={fam.vocab_size:,} (loaded in {load_s:.1f} s)"
            )
            print("shape:", json.dumps({k: round(v, 4) for k, v in st.items()}))
            if name != "synthetic":
                print("LM:", json.dumps(fam.info))
            res = bench_family(fam, args, ref, tmp)
            print_family(name, res)
            results["families"][name] = {
                "records": len(fam.records),
                "vocab": fam.vocab_size,
                "shape": st,
                "info": fam.info,
                "stores": res,
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print("\nsummary (compact vs fp16+zstd, same records):")
    for name, fr in results["families"].items():
        c, f = fr["stores"]["compact"], fr["stores"]["fp16+zstd"]
        x, e = fr["stores"]["compact-fixed"], fr["stores"]["compact@fixed-KL"]
        print(
            f"  {name:<10} at the fixed codec's KL {x['kl_mean']:.2e}: budget "
            f"{e['bytes_per_token']:.1f} B/tok (KL {e['kl_mean']:.2e}) vs fixed "
            f"{x['bytes_per_token']:.1f} B/tok ({e['bytes_per_token'] / x['bytes_per_token']:.3f}x)"
        )
        print(
            f"  {name:<10} median top-1 {fr['shape']['median_top1_p']:.3f}, top-64 mass "
            f"{fr['shape']['mean_topk_mass']:.3f}: compact {c['bytes_per_token']:.1f} B/tok at "
            f"mean KL {c['kl_mean']:.2e} vs fp16+zstd {f['bytes_per_token']:.1f} B/tok at "
            f"{f['kl_mean']:.2e} ({c['bytes_per_token'] / f['bytes_per_token']:.2f}x the bytes); "
            f"encode {c['encode_tok_s_per_core']:,.0f}/s/core, decode "
            f"{c['decode_tok_s_per_core']:,.0f}/s/core"
        )
    print(
        f"\nmachine: {platform.machine()} {platform.processor() or ''}, python {platform.python_version()}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
