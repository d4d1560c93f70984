"""The ``target-sft`` command line.

Verbs (one function each, below):

* ``target-sft cache inspect DIR`` — what a cache holds (manifest, sizes, a sample record;
  ``--stats`` what its top-k kept and its codec cost; ``--tokenizer TOK`` the sample as text).
* ``target-sft cache verify DIR`` — check every shard checksum and decode every record; exit 1
  on the first problem, with what and where.
* ``target-sft cache build --teacher M --data F.jsonl --out DIR`` — run a teacher over a dataset
  (JSONL, Parquet, a ``save_to_disk`` directory; any row format of
  :func:`target_sft.tokenize_sft`) and cache its top-k
  (:func:`target_sft.builder.build_teacher_cache`; resumable, torchrun-aware).
* ``target-sft plot --cache DIR --model CKPT --out DIR`` — the paper's figures for a cache and a
  student checkpoint (:func:`target_sft.report.write_report`; ``docs/REPORT.md``).
* ``target-sft demo [--quick|--full]`` — the main job, end to end (:mod:`target_sft.demo.run`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from target_sft import __version__
from target_sft.errors import CacheError, CacheInputError

if TYPE_CHECKING:
    from target_sft.cache import CacheInfo, CacheRecord


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def stats_text(info: CacheInfo) -> list[str]:
    """The ``--stats`` lines of ``target-sft cache inspect``: the manifest's fidelity statistics
    (:class:`~target_sft.cache.FidelityStats`; informational, docs/FORMAT.md §Statistics)."""
    st = info.stats
    if st is None:
        return [
            "statistics     none recorded (shards written before target-sft recorded them, or "
            "adopted after a crash)"
        ]
    cover = (
        "all"
        if st.rows == info.supervised_tokens
        else f"{st.rows:,} of {info.supervised_tokens:,}: shards written before the "
        "statistics existed, or adopted after a crash, have none"
    )
    lines = [
        f"statistics     over the supervised rows ({cover})",
        f"  kept mass    mean {st.kept_mass_mean:.4f}, p10 in [{st.kept_mass_p10:.2f}, "
        f"{st.kept_mass_p10 + 0.01:.2f}), min {st.kept_mass_min:.4f} "
        f"(teacher probability held by the top-{info.top_k})",
        f"  label rate   {100 * st.label_in_topk_rate:.2f}% of rows have their label in the "
        f"top-{info.top_k}",
    ]
    if st.entropy_mean is None:
        lines.append("  entropy      not recorded (records added without entropy=...)")
    else:
        part = "" if st.entropy_rows == st.rows else f" (over {st.entropy_rows:,} rows)"
        lines.append(
            f"  entropy      mean {st.entropy_mean:.4f} nats (teacher, full vocabulary){part}"
        )
    if st.codec_kl_mean is None:
        lines.append(f"  codec KL     0 ({info.codec} codec: log-probs stored bit for bit)")
    else:
        lines.append(
            f"  codec KL     mean {st.codec_kl_mean:.3g}, max {st.codec_kl_max:.3g} nats per row "
            "(exact vs decoded top-k, renormalised)"
        )
        lines += shard_kl_lines(info)
    return lines


def shard_kl_lines(info: CacheInfo, show: int = 8) -> list[str]:
    """The compact codec's budget and the codec KL each shard achieved (docs/FORMAT.md §5.1)."""
    budget = info.codec_params.get("max_mean_kl")
    if "sqrt_steps" not in info.codec_params:
        what = "none: one fixed codebook (a cache of format version 1-2)"
    elif budget is None:
        what = "none: one fixed codebook"
    else:
        what = f"max_mean_kl {budget:.3g} nats per row, every record within it"
    lines = [f"  KL budget    {what}"]
    per = [
        (s["file"], s["stats"]["codec_kl_sum"] / s["stats"]["codec_kl_rows"])
        for s in info.shards
        if s.get("stats") and s["stats"].get("codec_kl_rows")
    ]
    if not per:
        return lines
    kls = np.array([kl for _, kl in per])
    lines.append(
        f"  per shard    mean codec KL of {len(per)} shard(s): min {kls.min():.3g}, "
        f"median {float(np.median(kls)):.3g}, max {kls.max():.3g}"
    )
    lines += [f"    {name}  {kl:.3g}" for name, kl in per[:show]]
    if len(per) > show:
        lines.append(f"    ... {len(per) - show} more")
    return lines


def _load_inspect_tokenizer(path: str | Path, info: CacheInfo) -> Any:
    """The tokenizer of ``inspect --tokenizer``; refused when the cache records another one."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise CacheInputError(
            f"--tokenizer {path}: decoding needs transformers (pip install 'target-sft[hf]')"
        ) from None

    from target_sft.fingerprint import TokenizerCheck

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise CacheInputError(f"--tokenizer {path}: cannot load a tokenizer from it: {e}") from e
    TokenizerCheck(tok, what=f"--tokenizer {path}").check(info)
    return tok


def decoded_record_text(rec: CacheRecord, tok: Any) -> list[str]:
    """A record as text, split into its runs of unsupervised positions (the prompt: context the
    teacher saw, not trained on) and supervised positions (the response: the labels trained on,
    one cached top-k row each)."""
    sup = np.zeros(rec.n_tokens, bool)
    sup[rec.supervised_positions] = True
    n_vocab = len(tok)
    if int(rec.input_ids.max()) >= n_vocab:
        raise CacheInputError(
            f"record {rec.key!r} holds token id {int(rec.input_ids.max())}, outside the "
            f"tokenizer's {n_vocab} tokens; it is not the tokenizer the cache was built with"
        )
    lines = ["  [prompt] = unsupervised context, [response] = supervised labels (trained on)"]
    t = 0
    while t < rec.n_tokens:
        end = t
        while end < rec.n_tokens and sup[end] == sup[t]:
            end += 1
        ids = (rec.labels if sup[t] else rec.input_ids)[t:end]
        text = tok.decode([int(x) for x in ids], skip_special_tokens=False)
        name = "[response]" if sup[t] else "[prompt]  "
        lines.append(f"  {name} t={t}..{end - 1}  {json.dumps(text, ensure_ascii=False)}")
        t = end
    differ = int(np.count_nonzero(sup & (rec.labels != rec.input_ids)))
    if differ:
        lines.append(f"  ({differ} supervised label(s) differ from input_ids; shown: the labels)")
    return lines


def inspect_text(
    path: str | Path,
    *,
    shards: bool = False,
    sample: bool = True,
    stats: bool = False,
    tokenizer: str | Path | None = None,
    record: int = 0,
) -> str:
    """The report printed by ``target-sft cache inspect``: the manifest; with ``shards`` every
    shard; with ``stats`` the fidelity statistics; with ``sample`` the record at position
    ``record`` (its first row's top-5), decoded as text by ``tokenizer`` (a directory) if given."""
    from target_sft.cache import TeacherCache

    cache = TeacherCache(path)
    i = cache.info
    lines = [
        f"cache          {i.path}",
        f"format         version {i.format_version}, {'complete' if i.complete else 'INCOMPLETE (writer still running or died; append to finish)'}",
        f"codec          {i.codec} {json.dumps(i.codec_params, sort_keys=True)}",
        f"role           {i.role}",
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
    if stats:
        lines.extend(stats_text(i))
    if sample and len(cache):
        if not 0 <= record < len(cache):
            raise CacheInputError(f"--record {record} is outside [0, {len(cache)})")
        rec = cache.record_at(record)
        lines.append(
            f"record {record:<7d} key={rec.key!r} tokens={rec.n_tokens} supervised={rec.n_supervised}"
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
        if tokenizer is not None:
            lines.extend(decoded_record_text(rec, _load_inspect_tokenizer(tokenizer, i)))
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.json:
        from target_sft.cache import TeacherCache

        print(json.dumps(json.loads(TeacherCache(args.path)._c.manifest_json()), indent=2))
    else:
        print(
            inspect_text(
                args.path,
                shards=args.shards,
                stats=args.stats,
                tokenizer=args.tokenizer,
                record=args.record,
            )
        )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from target_sft import _core
    from target_sft.cache import TeacherCache

    if args.reseal:
        # a deliberate edit of manifest.json: accept its content, then verify every shard
        # against it as usual (docs/FORMAT.md §1)
        _core.reseal_manifest(str(args.path))
        print(f"resealed {Path(args.path) / 'manifest.json'} (its manifest_checksum)")
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
    """Build a cache from a teacher and a dataset file (under torchrun: on every rank)."""
    from target_sft.builder import build_teacher_cache
    from target_sft.sft_data import open_dataset

    result = build_teacher_cache(
        args.teacher,
        open_dataset(args.data),
        args.out,
        top_k=args.top_k,
        temperature=args.temperature,
        codec=args.codec,
        batch_tokens=args.batch_tokens,
        max_batch_size=args.max_batch_size,
        window=args.window,
        tokenizer=args.tokenizer,
        id_field=None if args.id_field.lower() == "none" else args.id_field,
        max_length=args.max_length,
        truncation=args.truncation,
        dtype=args.dtype,
        device=args.device,
        shard_size=args.shard_size,
        progress=not args.quiet,
        rebuild_changed=args.rebuild_changed,
        role=args.role,
        **({} if args.max_mean_kl is None else {"max_mean_kl": args.max_mean_kl}),
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
    from target_sft.models import load_teacher, load_tokenizer
    from target_sft.report import check_tokenizer, token_decoder

    # the tokenizer check before the (possibly long) model load; the vocabulary is checked
    # against the loaded model by write_report
    try:
        tokenizer = load_tokenizer(args.model, args.tokenizer)  # None: ids are shown as [id]
    except (OSError, ValueError) as e:
        return fail(f"--tokenizer {args.tokenizer or args.model}: cannot load a tokenizer: {e}")
    try:
        check_tokenizer(tokenizer, cache, "target-sft plot", args.allow_tokenizer_mismatch)
    except ValueError as e:
        return fail(f"{e} (--allow-tokenizer-mismatch to continue)")
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
            tokenizer=token_decoder(tokenizer),  # checked above
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
            allow_tokenizer_mismatch=args.allow_tokenizer_mismatch,
        )
    except (OSError, ValueError) as e:
        return fail(str(e))
    print(f"OK: report in {args.out} ({time.perf_counter() - t0:.1f} s)")
    for name, path in paths.items():
        print(f"  {name:16s} {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: base, teacher, cache, the paper's recipe and evaluation, table and report."""
    from target_sft.demo.run import DemoConfig, run_demo

    cfg = DemoConfig.quick() if args.quick else DemoConfig.full() if args.full else DemoConfig()
    if args.seeds is not None:
        if args.seeds < 1:
            print(
                f"target-sft: error: demo: --seeds must be >= 1, got {args.seeds}", file=sys.stderr
            )
            return 2
        cfg.seeds = args.seeds
    if args.lr_sweep:
        cfg.lr_grid = DemoConfig.full().lr_grid
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="target-sft-demo-"))
    run_demo(out, cfg, report=not args.no_report)
    return 0


class _DefaultsFormatter(argparse.HelpFormatter):
    """``--help`` shows each option's default, except where there is none to show (``None``,
    flags off by default) or where the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" not in text
            and action.default is not None
            and action.default is not False
            and action.default != argparse.SUPPRESS
            and action.option_strings
        ):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="target-sft", description="Q-target SFT: teacher cache tools.")
    p.add_argument("--version", action="version", version=f"target-sft {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    cache = sub.add_parser("cache", help="build, inspect or verify a teacher cache")
    csub = cache.add_subparsers(dest="verb", required=True)
    fmt = _DefaultsFormatter
    ins = csub.add_parser(
        "inspect",
        help="print what a cache holds",
        description="Print a cache's manifest (settings, teacher, tokenizer, sizes) and a sample "
        "record; read from the manifest and one record, so it is instant on any cache size.",
        formatter_class=fmt,
    )
    ins.add_argument("path", help="cache directory")
    ins.add_argument("--shards", action="store_true", help="list every shard")
    ins.add_argument(
        "--stats",
        action="store_true",
        help="what the top-k kept (teacher mass: mean, p10, min; label-in-top-k rate), the "
        "teacher's mean entropy and the compact codec's KL, from the manifest",
    )
    ins.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="decode the sample record as text with this tokenizer (transformers "
        "AutoTokenizer), split into prompt (unsupervised) and response (supervised) runs; "
        "refused if its fingerprint differs from the cache's",
    )
    ins.add_argument(
        "--record",
        type=int,
        default=0,
        help="position of the sample record in the cache (shard order)",
    )
    ins.add_argument(
        "--json", action="store_true", help="print the manifest as JSON instead (exact values)"
    )
    ins.set_defaults(func=cmd_inspect)
    ver = csub.add_parser(
        "verify",
        help="check every checksum and frame; exit 1 on the first problem",
        description="Check every shard's size and checksum and decode every record; on the "
        "first problem print what and where and exit 1.",
        formatter_class=fmt,
    )
    ver.add_argument("path", help="cache directory")
    ver.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ver.add_argument(
        "--reseal",
        action="store_true",
        help="first re-seal manifest.json after a deliberate hand edit: accept its current "
        "content and rewrite its manifest_checksum (every other check still applies)",
    )
    ver.set_defaults(func=cmd_verify)

    bld = csub.add_parser(
        "build",
        help="cache a teacher's top-k log-probs for a dataset (resumable; torchrun-aware)",
        formatter_class=_DefaultsFormatter,
        description="Run a Hugging Face causal LM over a dataset and cache its top-k log-probs. "
        "Rows: input_ids (+ labels), chat messages, prompt/completion, prompt/response or text "
        "(tokenised with the tokenizer's chat template, assistant turns supervised; "
        "docs/BUILD.md). Keys and row formats are checked before the teacher loads. Re-running "
        "the same command resumes an interrupted build. Under torchrun (--no-python target-sft "
        "...) every rank builds its share and rank 0 writes the manifest.",
    )
    bld.add_argument("--teacher", required=True, help="model directory or hub name")
    bld.add_argument(
        "--data",
        required=True,
        help="a .jsonl file, a .parquet file, or a directory saved with datasets' save_to_disk",
    )
    bld.add_argument("--out", required=True, help="cache directory (an unfinished one resumes)")
    bld.add_argument("--top-k", type=int, default=64, help="teacher tokens kept per position")
    bld.add_argument(
        "--role",
        choices=["teacher", "reference"],
        default="teacher",
        help="what the model is to training (recorded in the manifest): the teacher, or a "
        "frozen reference (e.g. the student's base) for TargetSFTCollator(reference=...)",
    )
    bld.add_argument(
        "--temperature", type=float, default=1.0, help="softmax temperature of the teacher"
    )
    bld.add_argument(
        "--codec",
        choices=["compact", "exact"],
        default="compact",
        help="compact: quantised log-probs (smaller); exact: float32",
    )
    bld.add_argument(
        "--max-mean-kl",
        type=float,
        default=None,
        help="compact: the fidelity budget, mean KL(exact || decoded) per row in nats that "
        "every record stays within (default 1e-4)",
    )
    bld.add_argument("--batch-tokens", type=int, default=16_384, help="padded tokens per batch")
    bld.add_argument("--max-batch-size", type=int, default=256, help="samples per batch at most")
    bld.add_argument("--window", type=int, default=4096, help="samples per planning window")
    bld.add_argument("--tokenizer", help="tokenizer directory or hub name (default: the teacher's)")
    bld.add_argument(
        "--id-field",
        default="id",
        help="row field holding the record key (must be unique; rows without it are keyed by "
        "their index); 'none' keys every record by its sample index",
    )
    bld.add_argument(
        "--max-length",
        type=int,
        help="keep at most this many tokens per row (default: no limit)",
    )
    bld.add_argument(
        "--truncation",
        choices=["keep_start", "keep_end"],
        default="keep_start",
        help="which end of a row longer than --max-length is kept",
    )
    bld.add_argument("--dtype", help="bfloat16, float16 or float32 (default: bf16 on GPU)")
    bld.add_argument("--device", help="e.g. cuda:0 or cpu (default: this rank's GPU, else CPU)")
    bld.add_argument("--shard-size", default="256MiB", help="payload bytes per shard file")
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
        formatter_class=fmt,
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
    plot.add_argument(
        "--scale", choices=["linear", "log"], default="linear", help="Figure 4's colour scale"
    )
    plot.add_argument("--histories", help='JSON file {"method": [[loss per step] per seed]}')
    plot.add_argument("--table", help="a Markdown results table to include")
    plot.add_argument("--batch-size", type=int, default=4, help="records per forward pass")
    plot.add_argument("--device", help="e.g. cuda:0 or cpu (default: GPU if available)")
    plot.add_argument("--dtype", help="bfloat16, float16 or float32 (default: bf16 on GPU)")
    plot.add_argument(
        "--allow-tokenizer-mismatch",
        action="store_true",
        help="warn instead of failing when the tokenizer (--tokenizer or the model's) is not the "
        "one the cache was built with, or the model's vocabulary is smaller than the cache's",
    )
    plot.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    plot.set_defaults(func=cmd_plot)

    demo = sub.add_parser(
        "demo",
        help="the main job: a small replication of the paper's comparison, end to end on CPU",
        description="End to end on CPU: a task with non-unique, noisy demonstrations (order five "
        "numbers by their hundreds), a base and a stronger teacher pre-trained from scratch, the "
        "top-64 teacher cache (build_teacher_cache), and SFT / SFT (p) / Distill / TARGET-SFT "
        "plus a clean-data SFT control fine-tuned with the paper's recipe through "
        "StreamingTeacherDataset + TargetSFTCollator; Average@k and greedy accuracy over seeds "
        "with paired 95% intervals to SFT, and a report folder. docs/DEMO.md explains it.",
        formatter_class=fmt,
    )
    size = demo.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a small run (1–2 minutes)")
    size.add_argument(
        "--full",
        action="store_true",
        help="Average@16, 5 seeds, Table 6 ablations, the learning-rate sweep (20–30 minutes)",
    )
    demo.add_argument("--out", help="output directory (default: a new temporary directory)")
    demo.add_argument("--seeds", type=int, help="seeds per method (default 3; --full: 5)")
    demo.add_argument(
        "--lr-sweep",
        action="store_true",
        help="re-run the learning-rate sweep on the validation split (--full always does)",
    )
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
