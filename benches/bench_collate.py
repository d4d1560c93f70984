"""Benchmark of the data path: building Target-SFT batches from a compact-codec cache.

Measured in one run, on the same batches (default: 16 samples x 2048 tokens, ~60% supervised,
K = 64, Qwen-shaped synthetic teacher data from ``target_sft.testing.synthetic``):

1. the Rust builder (``target_sft.build_batch``), 1 thread: supervised tokens/s/core, into
   reused output buffers (the builder itself) and into fresh arrays (what a collator returns:
   17 MB of new memory per batch, page faults included), padded and packed;
2. a pure numpy + zstandard collator of the same format (the vectorised decoder below, checked to
   build identical batches), 1 thread: the ratio;
3. the builder with 2 threads: the 1 -> 2 thread speed-up (wall time, and CPU time per batch,
   which shows the parallel overhead even when other processes share the cores);
4. ``DataLoader(num_workers=2)`` with ``TargetSFTCollator`` vs the same collator called
   in-process with 2 threads, both in steady state;
5. mosaicml-streaming: the same records stored as MDS (raw numpy columns, no compression), read
   through ``StreamingDataset`` and collated with numpy into the same layout (skipped with a
   message if ``streaming`` is not installed).

The Rust configurations take turns within each round and the best of ``--repeats`` rounds is
kept. Usage: ``python benches/bench_collate.py [--records 128] [--length 2048] [--batch 16]
[--repeats 7] [--out bench-out/collate]``. Prints a Markdown table; writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from target_sft import (
    CacheSample,
    CacheWriter,
    TargetSFTCollator,
    TeacherCache,
    TeacherCacheDataset,
    build_batch,
)
from target_sft.testing import synthetic

IGNORE = -100
K = 64


# --------------------------------------------------------------------------- numpy baseline
class NumpyShard:
    """A shard read with numpy alone (docs/FORMAT.md §2): header JSON, tensors as views."""

    def __init__(self, path: Path) -> None:
        self.buf = np.memmap(path, np.uint8, mode="r")
        n = int(self.buf[:8].view("<u8")[0])
        header = json.loads(bytes(self.buf[8 : 8 + n]))
        meta = header.pop("__metadata__")
        base = 8 + n
        dtypes = {"U8": "<u1", "U32": "<u4", "U64": "<u8", "F32": "<f4"}

        def tensor(name: str) -> np.ndarray:
            t = header[name]
            a, b = t["data_offsets"]
            return self.buf[base + a : base + b].view(dtypes[t["dtype"]]).reshape(t["shape"])

        self.index = np.asarray(tensor("record_index"))
        self.payload = tensor("payload")
        self.levels = np.asarray(tensor("codebook"), np.float32)
        self.id_table = np.asarray(tensor("id_table"), np.int64)
        self.k = int(meta["top_k"])
        self.vocab = int(meta["vocab_size"])
        assert meta["codec"] == "compact", "the numpy baseline decodes the compact codec"


def _varint(b: np.ndarray, pos: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        x = int(b[pos])
        pos += 1
        v |= (x & 0x7F) << shift
        if x < 0x80:
            return v, pos
        shift += 7


def _varints(b: np.ndarray) -> np.ndarray:
    """All the varints of a byte array, vectorised."""
    if b.size == 0 or (b < 0x80).all():
        return b.astype(np.int64)
    last = b < 0x80
    group = np.concatenate([[0], np.cumsum(last)[:-1]])
    starts = np.flatnonzero(np.concatenate([[True], last[:-1]]))
    shift = 7 * (np.arange(b.size) - starts[group])
    out = np.zeros(int(last.sum()), np.int64)
    np.add.at(out, group, (b & 0x7F).astype(np.int64) << shift)
    return out


def _numbers(sym: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """A (symbols, extra bits) number stream (FORMAT.md §5.3), vectorised."""
    v = sym.astype(np.int64)
    big = sym >= 192
    if not big.any():
        return v
    nextra = sym[big].astype(np.int64) - 193
    offs = np.concatenate([[0], np.cumsum(nextra)[:-1]])
    bitarr = np.unpackbits(bits, bitorder="little").astype(np.int64)
    extra = np.zeros(nextra.size, np.int64)
    for i in range(int(nextra.max(initial=0))):
        m = nextra > i
        extra[m] |= bitarr[offs[m] + i] << i
    v[big] = ((np.int64(1) << nextra) | extra) + 191
    return v


def numpy_decode(shard: NumpyShard, i: int, dctx: zstandard.ZstdDecompressor) -> dict[str, Any]:
    """Decode record ``i`` of a compact shard with numpy (rows vectorised across the record)."""
    off, length, _, _, _ = (int(x) for x in shard.index[i])
    raw = np.frombuffer(dctx.decompress(shard.payload[off : off + length]), np.uint8)
    t_len, pos = _varint(raw, 0)
    s_len, pos = _varint(raw, pos)
    planes = raw[pos : pos + 4 * t_len].reshape(4, t_len)
    pos += 4 * t_len
    input_ids = np.ascontiguousarray(planes.T).view("<u4").reshape(-1).astype(np.int32)
    nm = (t_len + 7) // 8
    mask = np.unpackbits(raw[pos : pos + nm], bitorder="little")[:t_len].astype(bool)
    pos += nm
    labels = np.where(mask, input_ids, IGNORE).astype(np.int32)
    n_exc, pos = _varint(raw, pos)
    for _ in range(n_exc):
        t, pos = _varint(raw, pos)
        labels[t] = int(raw[pos : pos + 4].view("<u4")[0])
        pos += 4
    rows = np.flatnonzero(labels[1:] != IGNORE) + 1
    k, s = shard.k, s_len
    full = raw[pos] & 1
    pos += 1
    streams = []
    for _ in range(11):
        n, pos = _varint(raw, pos)
        streams.append(raw[pos : pos + n])
        pos += n
    nvalid_b, row_flags, share, r_sym, r_bits, v_sym, v_bits, l_sym, l_bits, _label_rank, exact = (
        streams
    )
    nvalid = np.full(s, k, np.int64) if full else _varints(nvalid_b)
    label_in = row_flags.astype(np.int64)
    row_labels = labels[rows].astype(np.int64)
    # shared entries: the set bits of each row's mask over the previous row's entries
    prev_n = np.concatenate([[0], nvalid[:-1]])
    nbytes = (prev_n + 7) // 8
    bits = np.unpackbits(share, bitorder="little")
    bit_row = np.repeat(np.arange(s), 8 * nbytes)
    bit_j = np.arange(bits.size) - np.repeat(
        np.concatenate([[0], np.cumsum(8 * nbytes)[:-1]]), 8 * nbytes
    )
    set_ = bits.astype(bool)
    sh_row, sh_j = bit_row[set_], bit_j[set_]
    shared = np.bincount(sh_row, minlength=s)
    n_new = nvalid - label_in - shared
    # global entry numbering in decoded order: [label][shared...][new...] per row
    start = np.concatenate([[0], np.cumsum(nvalid)[:-1]])
    total = int(nvalid.sum())
    ids = np.full(total, -1, np.int64)
    src = np.full(total, -1, np.int64)
    lab_rows = np.flatnonzero(label_in)
    ids[start[lab_rows]] = row_labels[lab_rows]
    sh_rank_in_row = np.arange(sh_row.size) - np.concatenate([[0], np.cumsum(shared)[:-1]])[sh_row]
    sh_slot = start[sh_row] + label_in[sh_row] + sh_rank_in_row
    src[sh_slot] = start[sh_row - 1] + sh_j
    new_row = np.repeat(np.arange(s), n_new)
    g = _numbers(r_sym, r_bits)
    cs = np.cumsum(g + 1)
    seg0 = np.concatenate([[0], np.cumsum(n_new)[:-1]])
    base = np.where(seg0 > 0, cs[np.maximum(seg0 - 1, 0)], 0)
    rank = cs - base[new_row] - 1
    m = shard.id_table.size
    new_ids = np.where(rank < m, shard.id_table[np.minimum(rank, m - 1)], rank - m)
    new_slot = (
        start[new_row]
        + label_in[new_row]
        + shared[new_row]
        + (np.arange(new_row.size) - seg0[new_row])
    )
    ids[new_slot] = new_ids
    # shared ids point into the previous row: resolve the chains by pointer jumping
    todo = np.flatnonzero(src >= 0)
    while todo.size:
        s_ = src[todo]
        ss = src[s_]
        done = ss < 0
        ids[todo[done]] = ids[s_[done]]
        src[todo[done]] = -1
        src[todo[~done]] = ss[~done]
        todo = todo[~done]
    # values: the label's codebook index, then each other entry's code L - q; escapes are read
    # from exact_values in decoding order (per row: the label's, then the entries')
    levels = shard.levels
    big_l = levels.size
    q = _numbers(l_sym, l_bits)
    codes = _numbers(v_sym, v_bits)
    other = nvalid - label_in
    slots = 1 + other
    comb_start = np.concatenate([[0], np.cumsum(slots)[:-1]])
    esc = np.zeros(int(slots.sum()), bool)
    esc[comb_start] = q == big_l
    entry_row = np.repeat(np.arange(s), other)
    ent_idx = np.arange(entry_row.size) - np.concatenate([[0], np.cumsum(other)[:-1]])[entry_row]
    esc[comb_start[entry_row] + 1 + ent_idx] = codes == 0
    ex = exact.view("<f4")
    ex_at = np.cumsum(esc) - 1
    label_lp = np.where(q < big_l, levels[np.minimum(q, big_l - 1)], 0).astype(np.float32)
    label_lp[q == big_l] = ex[ex_at[comb_start[q == big_l]]]
    vals = levels[np.clip(big_l - codes, 0, big_l - 1)].astype(np.float32)
    zero = codes == 0
    vals[zero] = ex[ex_at[(comb_start[entry_row] + 1 + ent_idx)[zero]]]
    lps = np.empty(total, np.float32)
    lps[start[lab_rows]] = label_lp[lab_rows]
    lps[start[entry_row] + label_in[entry_row] + ent_idx] = vals
    # [S, k] rows with -1 / -inf padding
    entry_of = np.repeat(np.arange(s), nvalid)
    col = np.arange(total) - start[entry_of]
    topk_ids = np.full((s, k), -1, np.int32)
    topk_lps = np.full((s, k), -np.inf, np.float32)
    topk_ids[entry_of, col] = ids
    topk_lps[entry_of, col] = lps
    return {
        "input_ids": input_ids,
        "labels": labels,
        "rows": rows,
        "topk_ids": topk_ids,
        "topk_logprobs": topk_lps,
        "label_logprobs": label_lp,
    }


#: The numpy and MDS baselines build the K-column teacher layout; every path here is measured on
#: that same layout so that all of them build the same batch (the library's default since
#: 2026-11-29 adds the label as column K + 1: ``label_in_support=True``, docs/DATA.md).
LABEL_IN_SUPPORT = False


def numpy_collate(recs: list[dict[str, Any]], k: int) -> dict[str, np.ndarray]:
    """The padded layout of docs/DATA.md from decoded records, with numpy."""
    b = len(recs)
    length = max(r["input_ids"].size for r in recs)
    input_ids = np.zeros((b, length), np.int64)
    labels = np.full((b, length), IGNORE, np.int64)
    mask = np.zeros((b, length), np.int64)
    tids = np.full((b, length, k), -1, np.int32)
    tlps = np.full((b, length, k), -np.inf, np.float32)
    for i, r in enumerate(recs):
        n = r["input_ids"].size
        input_ids[i, :n] = r["input_ids"]
        labels[i, 1:n] = r["labels"][1:]
        mask[i, :n] = 1
        tids[i, r["rows"]] = r["topk_ids"]
        tlps[i, r["rows"]] = r["topk_logprobs"]
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "teacher_ids": tids,
        "teacher_logprobs": tlps,
    }


class NumpyCollator:
    """A numpy + zstandard collator over the same cache files (compact codec, one thread)."""

    def __init__(self, cache_dir: Path) -> None:
        manifest = json.loads((cache_dir / "manifest.json").read_text())
        self.shards = [NumpyShard(cache_dir / s["file"]) for s in manifest["shards"]]
        self.starts = np.cumsum([0] + [s["records"] for s in manifest["shards"]])
        self.dctx = zstandard.ZstdDecompressor()
        self.k = int(manifest["top_k"])

    def __call__(self, positions: list[int]) -> dict[str, np.ndarray]:
        recs = []
        for p in positions:
            s = int(np.searchsorted(self.starts, p, side="right") - 1)
            recs.append(numpy_decode(self.shards[s], p - int(self.starts[s]), self.dctx))
        return numpy_collate(recs, self.k)


# --------------------------------------------------------------------------- MDS reference
def mds_setup(records: list[Any], out: Path) -> Any:
    """Write the records as MDS (mosaicml-streaming), uncompressed numpy columns."""
    from streaming import MDSWriter, StreamingDataset

    path = out / "mds"
    if path.exists():
        shutil.rmtree(path)
    columns = {
        "input_ids": "ndarray:int32",
        "labels": "ndarray:int32",
        "topk_ids": "ndarray:int32",
        "topk_logprobs": "ndarray:float32",
        "label_logprobs": "ndarray:float32",
        "label_ranks": "ndarray:int32",
    }
    with MDSWriter(out=str(path), columns=columns, size_limit="256mb") as w:
        for r in records:
            w.write({c: getattr(r, c) for c in columns})
    cache = out / "mds-local"
    if cache.exists():
        shutil.rmtree(cache)
    ds = StreamingDataset(local=str(path), shuffle=False, batch_size=1)
    size = sum(f.stat().st_size for f in path.glob("*.mds"))
    return ds, size


def mds_collate(ds: Any, positions: list[int], k: int) -> dict[str, np.ndarray]:
    recs = []
    for p in positions:
        s = ds[p]
        labels = s["labels"]
        rows = np.flatnonzero(labels[1:] != IGNORE) + 1
        recs.append(
            {
                "input_ids": s["input_ids"],
                "labels": labels,
                "rows": rows,
                "topk_ids": s["topk_ids"],
                "topk_logprobs": s["topk_logprobs"],
            }
        )
    return numpy_collate(recs, k)


# --------------------------------------------------------------------------- timing helpers
def best_of(fn: Any, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def interleaved(fns: dict[str, Any], repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Best wall time and best process CPU time of each function over ``repeats`` rounds, the
    functions taking turns within a round (so that load from other processes on a shared machine
    hits all of them alike)."""
    wall = dict.fromkeys(fns, float("inf"))
    cpu = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[name] = min(wall[name], time.perf_counter() - t0)
            cpu[name] = min(cpu[name], time.process_time() - c0)
    return wall, cpu


def same(a: dict[str, Any], b: dict[str, Any]) -> None:
    for name in b:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=128)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="bench-out/collate")
    ap.add_argument("--skip-mds", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    print(f"generating {args.records} records of {args.length} tokens ...", flush=True)
    records = synthetic.generate_list(
        args.records, mean_length=args.length, length_sigma=0.0, prompt_fraction=0.4, seed=0
    )
    cache_dir = out / "cache"
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    with CacheWriter(
        cache_dir, top_k=K, vocab_size=synthetic.QWEN_VOCAB_SIZE, codec="compact"
    ) as w:
        for r in records:
            w.add(**r.as_kwargs())
    cache = TeacherCache(cache_dir)
    # a reference cache (role "reference") of the same records, for the two-cache batch
    ref_dir = out / "reference"
    if ref_dir.exists():
        shutil.rmtree(ref_dir)
    with CacheWriter(
        ref_dir, top_k=K, vocab_size=synthetic.QWEN_VOCAB_SIZE, codec="compact", role="reference"
    ) as w:
        for r in records:
            w.add(**r.as_kwargs())
    ref_cache = TeacherCache(ref_dir)
    n_tok = sum(r.num_tokens for r in records)
    n_sup = sum(r.num_supervised for r in records)
    batches = [
        list(range(i, min(i + args.batch, len(records))))
        for i in range(0, len(records), args.batch)
    ]
    items = [[CacheSample(cache, p) for p in b] for b in batches]
    items_ref = [
        [CacheSample(cache, p, reference=CacheSample(ref_cache, p)) for p in b] for b in batches
    ]
    print(
        f"{len(records)} records, {n_tok} tokens, {n_sup} supervised ({n_sup / n_tok:.1%}), "
        f"{len(batches)} batches of {args.batch}; cache {cache.info.bytes_per_token:.1f} B/token",
        flush=True,
    )
    res: dict[str, Any] = {"records": len(records), "tokens": n_tok, "supervised": n_sup}

    # correctness first: every path builds the same batch
    npc = NumpyCollator(cache_dir)
    ref = build_batch(items[0], threads=1, label_in_support=LABEL_IN_SUPPORT)
    same(ref, npc(batches[0]))  # the names of the numpy baseline (build_batch adds sequence_ids)

    # 1.-3. the Rust builder: 1 and 2 threads, reused buffers and fresh arrays, padded and packed
    with_label = build_batch(items[0], threads=1, label_in_support=True)
    for name in ("teacher_ids", "teacher_logprobs"):  # the default layout: K columns + the label
        np.testing.assert_array_equal(with_label[name][..., :-1], ref[name], err_msg=name)
    # the two-cache batch: the same records as reference, so its tensors equal the teacher's
    two = build_batch(items_ref[0], threads=1, label_in_support=True)
    for name in ("ids", "logprobs"):
        np.testing.assert_array_equal(two[f"reference_{name}"], with_label[f"teacher_{name}"])
    shapes = build_batch(items[0], threads=1, label_in_support=LABEL_IN_SUPPORT)
    bufs = {k: np.empty(v.size, v.dtype) for k, v in shapes.items()}

    def rust(threads: int, reuse: bool, *, batches_of: Any = None, **kw: Any) -> Any:
        def run() -> None:
            keep = None
            for it in items if batches_of is None else batches_of:
                # hold the previous batch, like a training step would
                keep = build_batch(
                    it,
                    threads=threads,
                    out=bufs if reuse else None,
                    **{"label_in_support": LABEL_IN_SUPPORT, **kw},
                )
            del keep

        return run

    packed = {"packing": True, "max_length": 2 * args.length}
    wall, cpu = interleaved(
        {
            "rust_1t_reuse": rust(1, True),
            "rust_2t_reuse": rust(2, True),
            "rust_1t_fresh": rust(1, False),
            "rust_2t_fresh": rust(2, False),
            "rust_1t_packed_fresh": rust(1, False, **packed),
            # the library's default layout: the label as teacher column K + 1
            "rust_1t_label_fresh": rust(1, False, label_in_support=True),
            # and a reference cache beside the teacher (SFT+KL, ASFT, iw-SFT)
            "rust_1t_label_ref_fresh": rust(1, False, batches_of=items_ref, label_in_support=True),
        },
        args.repeats,
    )
    t = dict(wall)
    # 2. numpy + zstandard (slow: fewer rounds)
    t["numpy_1t"] = best_of(lambda: [npc(b) for b in batches], max(1, args.repeats // 3))

    # 4. DataLoader with n workers (1 decode thread each) vs the same collator in-process with
    #    n threads, n = 1 and 2 (with 2 workers, 3 processes share the 2 cores)
    import resource

    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    ds = TeacherCacheDataset(cache)
    epochs = 3

    collators = {
        "slots": TargetSFTCollator(cache, pad_token_id=0, label_in_support=LABEL_IN_SUPPORT),
        # ordinary memory: torch copies every batch into new shared memory when sending it
        "fresh": TargetSFTCollator(
            cache, pad_token_id=0, shared_memory_slots=0, label_in_support=LABEL_IN_SUPPORT
        ),
    }

    def loader(workers: int, n_epochs: int, skip: int, kind: str = "slots") -> tuple[float, int]:
        """Seconds for the batches after the first ``skip`` (start-up excluded), and their count."""
        dl = DataLoader(
            ds,
            batch_sampler=batches * n_epochs,
            num_workers=workers,
            collate_fn=collators[kind],
            prefetch_factor=4,
            multiprocessing_context="fork",
        )
        it = iter(dl)
        for _ in range(skip):
            next(it)
        t0 = time.perf_counter()
        n = 0
        for b in it:
            b["labels"].ne(IGNORE).sum()  # touch the batch like a consumer would
            n += 1
        dt = time.perf_counter() - t0
        del it, dl
        return dt, n

    def cpu_used() -> float:
        a = resource.getrusage(resource.RUSAGE_SELF)
        c = resource.getrusage(resource.RUSAGE_CHILDREN)  # workers, once joined
        return a.ru_utime + a.ru_stime + c.ru_utime + c.ru_stime

    def in_process(threads: int) -> float:
        collate = TargetSFTCollator(
            cache, pad_token_id=0, threads=threads, label_in_support=LABEL_IN_SUPPORT
        )
        t0 = time.perf_counter()
        for _ in range(epochs):
            for it in items:
                b = collate(it)
                b["labels"].ne(IGNORE).sum()
        return (time.perf_counter() - t0) / (epochs * len(batches))

    def loader_cpu(workers: int, kind: str) -> float:
        """CPU seconds per batch in steady state, every process: the difference of two runs."""
        c0 = cpu_used()
        loader(workers, 1, skip=0, kind=kind)
        c1 = cpu_used()
        loader(workers, 1 + epochs, skip=0, kind=kind)
        c2 = cpu_used()
        return ((c2 - c1) - (c1 - c0)) / (epochs * len(batches))

    rounds = max(1, args.repeats // 2)
    for n in (1, 2):
        dl_s = dl_cpu = bare_s = bare_cpu = float("inf")
        for _ in range(rounds):
            dt, cnt = loader(n, epochs + 1, skip=2)
            dl_s = min(dl_s, dt / cnt)
            dl_cpu = min(dl_cpu, loader_cpu(n, "slots"))
            c0 = time.process_time()
            bare_s = min(bare_s, in_process(n))
            bare_cpu = min(bare_cpu, (time.process_time() - c0) / (epochs * len(batches)))
        t[f"dataloader_{n}w"] = dl_s * len(batches)
        cpu[f"dataloader_{n}w"] = dl_cpu * len(batches)
        t[f"collator_{n}t"] = bare_s * len(batches)
        cpu[f"collator_{n}t"] = bare_cpu * len(batches)
    for kind in ("fresh",):
        dl_s = dl_cpu = float("inf")
        for _ in range(rounds):
            dt, cnt = loader(1, epochs + 1, skip=2, kind=kind)
            dl_s = min(dl_s, dt / cnt)
            dl_cpu = min(dl_cpu, loader_cpu(1, kind))
        t[f"dataloader_1w_{kind}"] = dl_s * len(batches)
        cpu[f"dataloader_1w_{kind}"] = dl_cpu * len(batches)

    # 5. MDS
    mds_note = ""
    if args.skip_mds:
        mds_note = "skipped (--skip-mds)"
    else:
        try:
            ds_mds, mds_bytes = mds_setup(records, out)
        except ImportError:
            mds_note = (
                "skipped: mosaicml-streaming is not installed (pip install mosaicml-streaming)"
            )
        else:
            # MDS holds the original records (compact reorders entries and quantises values)
            orig = [
                {
                    "input_ids": records[p].input_ids,
                    "labels": records[p].labels,
                    "rows": np.flatnonzero(records[p].labels[1:] != IGNORE) + 1,
                    "topk_ids": records[p].topk_ids,
                    "topk_logprobs": records[p].topk_logprobs,
                }
                for p in batches[0]
            ]
            same(mds_collate(ds_mds, batches[0], K), numpy_collate(orig, K))
            t["mds_1t"] = best_of(
                lambda: [mds_collate(ds_mds, b, K) for b in batches], args.repeats
            )
            res["mds_bytes_per_token"] = mds_bytes / n_sup
    if mds_note:
        print(mds_note)

    res["seconds"] = t
    res["cpu_seconds"] = cpu
    rate = {k: n_sup / v for k, v in t.items()}
    res["supervised_per_s"] = rate
    nb = len(batches)
    rows = [
        ("Rust builder, 1 thread, reused output buffers", "rust_1t_reuse"),
        ("Rust builder, 1 thread, fresh arrays", "rust_1t_fresh"),
        ("Rust builder, 1 thread, fresh arrays, packed (rows of 2L)", "rust_1t_packed_fresh"),
        ("Rust builder, 1 thread, fresh arrays, label in support (K + 1)", "rust_1t_label_fresh"),
        (
            "Rust builder, 1 thread, fresh arrays, K + 1, teacher + reference caches",
            "rust_1t_label_ref_fresh",
        ),
        ("Rust builder, 2 threads, reused output buffers", "rust_2t_reuse"),
        ("Rust builder, 2 threads, fresh arrays", "rust_2t_fresh"),
        ("TargetSFTCollator in-process, 1 thread", "collator_1t"),
        ("DataLoader, 1 worker, TargetSFTCollator (steady state)", "dataloader_1w"),
        (
            "  same, shared_memory_slots=0 (torch copies each batch to new shm)",
            "dataloader_1w_fresh",
        ),
        ("TargetSFTCollator in-process, 2 threads", "collator_2t"),
        ("DataLoader, 2 workers x 1 thread, TargetSFTCollator (steady state)", "dataloader_2w"),
        ("numpy + zstandard collator, 1 thread", "numpy_1t"),
        ("MDS (mosaicml-streaming, raw columns) + numpy collate, 1 thread", "mds_1t"),
    ]
    print()
    print("| path | ms/batch | CPU ms/batch | supervised tok/s | × numpy |")
    print("|---|---:|---:|---:|---:|")
    for label, key in rows:
        if key in t:
            c = f"{1e3 * cpu[key] / nb:.2f}" if key in cpu else "–"
            print(
                f"| {label} | {1e3 * t[key] / nb:.2f} | {c} | {rate[key]:,.0f} | "
                f"{t['numpy_1t'] / t[key]:.1f}× |"
            )
    print()
    print(f"bytes per supervised token: compact cache {cache.info.bytes_per_token:.1f}", end="")
    if "mds_bytes_per_token" in res:
        print(f", MDS {res['mds_bytes_per_token']:.1f}")
    else:
        print()
    for kind in ("reuse", "fresh"):
        print(
            f"1 -> 2 threads ({kind}): wall {t[f'rust_1t_{kind}'] / t[f'rust_2t_{kind}']:.2f}×, "
            f"CPU time per batch {cpu[f'rust_2t_{kind}'] / cpu[f'rust_1t_{kind}']:.2f}× "
            "(parallel overhead)"
        )
    for n in (1, 2):
        print(
            f"DataLoader with {n} worker(s) vs the same collator in-process with {n} thread(s): "
            f"{t[f'dataloader_{n}w'] / t[f'collator_{n}t']:.2f}× the time per batch, "
            f"{cpu[f'dataloader_{n}w'] / cpu[f'collator_{n}t']:.2f}× the CPU time (all processes)"
        )
    print(f"load average at the end: {os.getloadavg()}")
    res["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "load": os.getloadavg(),
    }
    (out / "results.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
