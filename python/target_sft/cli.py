"""The ``target-sft`` command line.

Verbs (one function each, below):

* ``target-sft cache inspect DIR`` — what a cache holds (manifest, sizes, a sample record).
* ``target-sft cache verify DIR`` — check every shard checksum and decode every record; exit 1
  on the first problem, with what and where.
* ``target-sft cache build --teacher M --data F.jsonl --out DIR`` — run a teacher over a dataset
  and cache its top-k (:func:`target_sft.build.build_teacher_cache`; resumable, torchrun-aware).
* ``target-sft demo [--quick]`` — the main job, end to end (:mod:`target_sft.demo.run`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from target_sft import __version__
from target_sft.errors import CacheError


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def inspect_text(path: str | Path, *, shards: bool = False, sample: bool = True) -> str:
    """The report printed by ``target-sft cache inspect``."""
    from target_sft.cache import TeacherCache

    cache = TeacherCache(path)
    i = cache.info
    lines = [
        f"cache          {i.path}",
        f"format         version {i.format_version}, {'complete' if i.complete else 'INCOMPLETE (writer still running or died; append to finish)'}",
        f"codec          {i.codec} {json.dumps(i.codec_params, sort_keys=True)}",
        f"top_k          {i.top_k}",
        f"vocab_size     {i.vocab_size}",
        f"temperature    {i.temperature:g}",
        f"teacher        {json.dumps(i.teacher, sort_keys=True)}",
        f"tokenizer      {json.dumps(i.tokenizer, sort_keys=True)}",
        f"records        {i.records:,}",
        f"tokens         {i.tokens:,} ({i.supervised_tokens:,} supervised)",
        f"size           {_human(i.bytes)} in {len(i.shards)} shard(s)",
        f"bytes/token    {i.bytes_per_token:.1f} per supervised token",
        f"created_by     {i.created_by}",
    ]
    if shards:
        lines.append("shards:")
        for s in i.shards:
            lines.append(
                f"  {s['file']}  records={s['records']:,}  supervised={s['supervised']:,}  "
                f"bytes={s['bytes']:,}  {s['checksum']}"
            )
    if sample and len(cache):
        rec = cache.record_at(0)
        lines.append(
            f"first record   key={rec.key!r} tokens={rec.n_tokens} supervised={rec.n_supervised}"
        )
        if rec.n_supervised:
            t = int(rec.supervised_positions[0])
            order = np.argsort(-rec.topk_logprobs[0], kind="stable")[:5]  # rows need not be sorted
            top = ", ".join(
                f"{int(rec.topk_ids[0][j])}:{float(rec.topk_logprobs[0][j]):.3f}" for j in order
            )
            lines.append(
                f"  row 0 (t={t}, label={int(rec.labels[t])}, label logprob={float(rec.label_logprobs[0]):.3f}, "
                f"rank={int(rec.label_ranks[0])}): top-5 id:logprob {top}"
            )
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.json:
        from target_sft.cache import TeacherCache

        print(json.dumps(json.loads(TeacherCache(args.path)._c.manifest_json()), indent=2))
    else:
        print(inspect_text(args.path, shards=args.shards))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from target_sft.cache import TeacherCache

    cache = TeacherCache(args.path)
    total = cache.info.records
    t0 = time.perf_counter()
    with tqdm(total=total, unit="rec", desc="verify", disable=args.quiet or None) as bar:
        n = cache.verify(lambda _shard, records: bar.update(records))
    dt = time.perf_counter() - t0
    print(
        f"OK: {n:,} records in {len(cache.info.shards)} shard(s) verified "
        f"({cache.info.supervised_tokens:,} supervised tokens, {dt:.2f} s)"
    )
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    """Build a cache from a teacher and a JSONL file (under torchrun: on every rank)."""
    from target_sft.build import JsonlDataset, _load_tokenizer, build_teacher_cache

    tok = _load_tokenizer(args.teacher, args.tokenizer)
    result = build_teacher_cache(
        args.teacher,
        JsonlDataset(args.data, tok),
        args.out,
        top_k=args.top_k,
        temperature=args.temperature,
        codec=args.codec,
        batch_tokens=args.batch_tokens,
        max_batch_size=args.max_batch_size,
        window=args.window,
        tokenizer=tok,
        dtype=args.dtype,
        device=args.device,
        shard_size=args.shard_size,
        progress=not args.quiet,
    )
    if result.stats.rank == 0:
        i = result.info
        print(
            f"OK: {args.out}: {i.records:,} records, {i.supervised_tokens:,} supervised tokens, "
            f"{i.bytes_per_token:.1f} bytes/token, {len(i.shards)} shard(s)"
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: teacher, cache, streaming, five training methods, table and report."""
    from target_sft.demo.run import DemoConfig, run_demo

    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    if args.seeds is not None:
        cfg.seeds = args.seeds
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="target-sft-demo-"))
    run_demo(out, cfg, report=not args.no_report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="target-sft", description="Q-target SFT: teacher cache tools.")
    p.add_argument("--version", action="version", version=f"target-sft {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    cache = sub.add_parser("cache", help="build, inspect or verify a teacher cache")
    csub = cache.add_subparsers(dest="verb", required=True)
    ins = csub.add_parser("inspect", help="print what a cache holds")
    ins.add_argument("path", help="cache directory")
    ins.add_argument("--shards", action="store_true", help="list every shard")
    ins.add_argument("--json", action="store_true", help="print the manifest as JSON")
    ins.set_defaults(func=cmd_inspect)
    ver = csub.add_parser(
        "verify", help="check every checksum and frame; exit 1 on the first problem"
    )
    ver.add_argument("path", help="cache directory")
    ver.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ver.set_defaults(func=cmd_verify)

    bld = csub.add_parser(
        "build",
        help="cache a teacher's top-k log-probs for a JSONL dataset (resumable; torchrun-aware)",
        description="Run a Hugging Face causal LM over a JSONL file (input_ids/labels, or "
        "prompt/response text and a tokenizer) and cache its top-k log-probs. Re-running the "
        "same command resumes an interrupted build. Under torchrun (--no-python target-sft ...) "
        "every rank builds its share and rank 0 writes the manifest.",
    )
    bld.add_argument("--teacher", required=True, help="model directory or hub name")
    bld.add_argument("--data", required=True, help="JSONL file")
    bld.add_argument("--out", required=True, help="cache directory")
    bld.add_argument("--top-k", type=int, default=64)
    bld.add_argument("--temperature", type=float, default=1.0)
    bld.add_argument("--codec", choices=["compact", "exact"], default="compact")
    bld.add_argument("--batch-tokens", type=int, default=16_384, help="padded tokens per batch")
    bld.add_argument("--max-batch-size", type=int, default=256)
    bld.add_argument("--window", type=int, default=4096, help="samples per planning window")
    bld.add_argument("--tokenizer", help="tokenizer directory (default: the teacher's)")
    bld.add_argument("--dtype", help="bfloat16, float16 or float32 (default: bf16 on GPU)")
    bld.add_argument("--device", help="e.g. cuda:0 or cpu (default: this rank's GPU, else CPU)")
    bld.add_argument("--shard-size", default="256MiB")
    bld.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    bld.set_defaults(func=cmd_build)

    demo = sub.add_parser(
        "demo",
        help="the main job: train a teacher, cache it, fine-tune a student five ways, report",
        description="End to end on CPU: a sorting task with imperfect demonstrations, a teacher "
        "trained from scratch, its top-64 cache (build_teacher_cache), and Base / SFT / SFT(p) / "
        "Distill / TARGET-SFT fine-tuning through StreamingTeacherDataset + TargetSFTCollator, "
        "with a results table and a report folder (the paper's figures).",
    )
    demo.add_argument("--quick", action="store_true", help="a smaller run (about 2 minutes)")
    demo.add_argument("--out", help="output directory (default: a new temporary directory)")
    demo.add_argument("--seeds", type=int, help="seeds per method (default 3)")
    demo.add_argument("--no-report", action="store_true", help="skip the report folder")
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CacheError as e:
        print(f"target-sft: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # pragma: no cover - interactive
        print("target-sft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
