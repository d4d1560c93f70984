"""The ``target-sft`` command line.

Verbs (one function each, below):

* ``target-sft cache inspect DIR`` — what a cache holds (manifest, sizes, a sample record).
* ``target-sft cache verify DIR`` — check every shard checksum and decode every record; exit 1
  on the first problem, with what and where.
* ``target-sft cache build --teacher M --data F.jsonl --out DIR`` — run a teacher over a dataset
  and cache its top-k (:func:`target_sft.build.build_teacher_cache`; resumable, torchrun-aware).
* ``target-sft plot --cache DIR --model CKPT --out DIR`` — the paper's figures for a cache and a
  student checkpoint (:func:`target_sft.report.write_report`; ``docs/REPORT.md``).
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
    from target_sft.build import JsonlDataset, build_teacher_cache, load_tokenizer

    tok = load_tokenizer(args.teacher, args.tokenizer)
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
        rebuild_changed=args.rebuild_changed,
    )
    if result.stats.rank == 0:
        i = result.info
        print(
            f"OK: {args.out}: {i.records:,} records, {i.supervised_tokens:,} supervised tokens, "
            f"{i.bytes_per_token:.1f} bytes/token, {len(i.shards)} shard(s)"
        )
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """Write the report (Figures 3 and 4, the rescue/filter HTML, an index) for a cache and a
    student checkpoint."""
    from target_sft.cache import TeacherCache
    from target_sft.report import DEFAULT_PRESETS, parse_preset_spec, write_report

    def fail(msg: str) -> int:
        print(f"target-sft: error: {msg}", file=sys.stderr)
        return 1

    if not Path(args.cache).is_dir():
        return fail(f"--cache {args.cache}: no such directory")
    if not Path(args.model).exists():
        return fail(f"--model {args.model}: no such checkpoint directory")
    if args.tokenizer and not Path(args.tokenizer).exists():
        return fail(f"--tokenizer {args.tokenizer}: no such directory")
    presets = args.presets or list(DEFAULT_PRESETS)
    try:
        from target_sft.losses import PRESETS

        for spec in presets:
            name, _ = parse_preset_spec(spec)
            if name not in PRESETS:
                return fail(f"--presets: unknown preset {spec!r}; choose from {sorted(PRESETS)}")
    except ValueError as e:
        return fail(f"--presets: {e}")
    histories = None
    if args.histories:
        try:
            histories = json.loads(Path(args.histories).read_text())
        except (OSError, ValueError) as e:
            return fail(f"--histories {args.histories}: {e}")
    table = None
    if args.table:
        try:
            table = Path(args.table).read_text()
        except OSError as e:
            return fail(f"--table {args.table}: {e}")
    cache = TeacherCache(args.cache)  # a CacheError (not a cache, …) is reported by main()
    from target_sft.build import load_teacher

    try:
        model = load_teacher(args.model, dtype=args.dtype, device=args.device)
    except (OSError, ValueError) as e:
        return fail(f"--model {args.model}: cannot load a causal LM from it: {e}")
    t0 = time.perf_counter()
    try:
        paths = write_report(
            args.out,
            cache=cache,
            model=model,
            tokenizer=args.tokenizer,  # None: the model directory's tokenizer, if any
            histories=histories,
            table_markdown=table,
            max_records=args.records,
            presets=presets,
            batch_size=args.batch_size,
            device=args.device,
            html_records=args.html_records,
            bins=args.bins,
            scale=args.scale,
            progress=not args.quiet,
        )
    except (OSError, ValueError) as e:
        return fail(str(e))
    print(f"OK: report in {args.out} ({time.perf_counter() - t0:.1f} s)")
    for name, path in paths.items():
        print(f"  {name:16s} {path}")
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
    bld.add_argument(
        "--rebuild-changed",
        action="store_true",
        help="on resume, recompute the cached records whose sample changed (other token ids or "
        "labels under the same key) instead of stopping with an error",
    )
    bld.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    bld.set_defaults(func=cmd_build)

    plot = sub.add_parser(
        "plot",
        help="the paper's figures for a cache and a student checkpoint (docs/REPORT.md)",
        description="Write Figure 3 (induced targets per loss), Figure 4 (P(p_T | p_θ) on the "
        "observed tokens), the Appendix G rescue/filter HTML, optional training curves and an "
        "index.html/README.md into --out.",
    )
    plot.add_argument("--cache", required=True, help="teacher cache directory")
    plot.add_argument("--model", required=True, help="student checkpoint directory")
    plot.add_argument("--tokenizer", help="tokenizer directory (default: the model's, if any)")
    plot.add_argument("--out", required=True, help="output directory")
    plot.add_argument("--records", type=int, default=256, help="records for the student pass")
    plot.add_argument(
        "--presets",
        nargs="+",
        metavar="SPEC",
        help="Figure 3's losses: NAME or NAME:key=value,... (default: a set of Table 5 rows)",
    )
    plot.add_argument("--html-records", type=int, default=3, help="trajectories in the HTML")
    plot.add_argument("--bins", type=int, default=20, help="Figure 4 bins per axis")
    plot.add_argument("--scale", choices=["linear", "log"], default="linear")
    plot.add_argument("--histories", help='JSON file {"method": [[loss per step] per seed]}')
    plot.add_argument("--table", help="a Markdown results table to include")
    plot.add_argument("--batch-size", type=int, default=4, help="records per forward pass")
    plot.add_argument("--device", help="e.g. cuda:0 or cpu (default: GPU if available)")
    plot.add_argument("--dtype", help="bfloat16, float16 or float32 (default: bf16 on GPU)")
    plot.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    plot.set_defaults(func=cmd_plot)

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
