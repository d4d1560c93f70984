"""``target-sft demo``: the whole system, end to end, on CPU in minutes.

1. **Task** (:mod:`target_sft.demo.task`): sort lists of numbers; demonstrations carry slips.
2. **Teacher**: a tiny Llama trained from scratch on clean data; **student base**: the same shape
   trained for less (it knows the task worse than the teacher).
3. **Cache**: :func:`target_sft.build_teacher_cache` over the noisy demonstrations (top-64 of a
   1,008-token vocabulary).
4. **Training**, exactly as a user wires it: ``StreamingTeacherDataset`` → ``DataLoader`` (a worker
   process) with ``TargetSFTCollator`` → a Q-target loss, for Base / SFT / SFT(p) / Distill /
   TARGET-SFT over several seeds, from the same base.
5. **Results**: exact-match accuracy (mean ± std over seeds) like the paper's Table 1, cache and
   data-path statistics, and a report folder with the paper's figures.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from target_sft.demo.task import PAD, SortTask


@dataclass
class Method:
    label: str
    preset: str | None  # None: no fine-tuning (the base model)
    kwargs: dict[str, Any] = field(default_factory=dict)
    teacher: bool = False


METHODS = [
    Method("Base", None),
    Method("SFT", "sft"),
    Method("SFT (p)", "dft"),
    Method("Distill (c = 0.8)", "hybrid_kd", {"lam": 0.8}, teacher=True),  # the paper's c
    Method("TARGET-SFT (η = 0.5)", "target_sft", {"eta": 0.5}, teacher=True),
]


@dataclass
class DemoConfig:
    length: int = 5
    max_number: int = 1000
    noise: float = 0.4  # share of demonstrations with a slip
    hidden: int = 64
    layers: int = 2
    teacher_steps: int = 3000
    base_steps: int = 500
    pretrain_samples: int = 20_000
    demos: int = 4000
    finetune_steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    seeds: int = 3
    eval_prompts: int = 1000

    @classmethod
    def quick(cls) -> DemoConfig:
        """About 2 minutes on 2 cores."""
        return cls(teacher_steps=1200, base_steps=300, demos=2000, finetune_steps=80,
                   eval_prompts=400)  # fmt: skip


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def finetune(
    base_dir: Path,
    cache_dir: Path,
    method: Method,
    seed: int,
    cfg: DemoConfig,
) -> tuple[Any, list[float], float, int]:
    """Fine-tune the base on the cached demonstrations; returns (model, losses, seconds spent
    waiting for batches, supervised tokens seen)."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    from target_sft import StreamingTeacherDataset, TargetSFTCollator
    from target_sft.losses import get_preset

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if method.preset is None:
        return model.eval(), [], 0.0, 0
    loss_fn = get_preset(method.preset, **method.kwargs)
    ds = StreamingTeacherDataset(cache_dir, shuffle=True, seed=seed, batch_size=cfg.batch_size)
    loader = DataLoader(
        ds,
        batch_size=cfg.batch_size,
        num_workers=1,
        persistent_workers=True,
        collate_fn=TargetSFTCollator(pad_token_id=PAD),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    model.train()
    losses: list[float] = []
    wait, tokens, epoch = 0.0, 0, 0
    while len(losses) < cfg.finetune_steps:
        ds.set_epoch(epoch)
        t = time.perf_counter()
        for batch in loader:
            wait += time.perf_counter() - t
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            extra = (
                {"teacher_ids": batch["teacher_ids"], "teacher_logprobs": batch["teacher_logprobs"]}
                if method.teacher
                else {}
            )
            loss = loss_fn(logits, batch["labels"], **extra)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            tokens += int((batch["labels"] != -100).sum())
            if len(losses) >= cfg.finetune_steps:
                break
            t = time.perf_counter()
        epoch += 1
    del loader
    return model.eval(), losses, wait, tokens


def run_demo(out: Path, cfg: DemoConfig, *, report: bool = True) -> dict[str, Any]:
    """Run the demo into ``out``; returns the results (also written to ``out/results.json``)."""
    import torch

    from target_sft import TeacherCache, build_teacher_cache
    from target_sft.demo.models import accuracy, make_model, make_tokenizer, pretrain, save

    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    # Tiny models: one thread is fastest (and leaves the other core to the DataLoader worker).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    task = SortTask(max_number=cfg.max_number, length=cfg.length)
    tok = make_tokenizer(task)
    prompts, answers = task.prompts(cfg.eval_prompts, seed=7)
    _log(
        f"task: sort {cfg.length} distinct numbers from 0..{cfg.max_number - 1} "
        f"(vocabulary {task.vocab_size}); {cfg.demos} demonstrations, {cfg.noise:.0%} with a slip"
    )

    clean = task.samples(cfg.pretrain_samples, seed=1)
    _log(f"training the teacher from scratch ({cfg.teacher_steps} steps)")
    t0 = time.perf_counter()
    teacher = make_model(task, hidden=cfg.hidden, layers=cfg.layers, seed=0)
    pretrain(teacher, clean, steps=cfg.teacher_steps, batch_size=64, lr=3e-3, seed=0, log=_log)
    teacher_acc = accuracy(teacher, task, prompts, answers)
    save(teacher, tok, out / "teacher")
    _log(f"teacher: {teacher_acc:.1%} exact match ({time.perf_counter() - t0:.0f} s)")

    _log(f"training the student base ({cfg.base_steps} steps: it knows the task less well)")
    base = make_model(task, hidden=cfg.hidden, layers=cfg.layers, seed=1)
    pretrain(base, task.samples(cfg.pretrain_samples, seed=2), steps=cfg.base_steps,
             batch_size=64, lr=3e-3, seed=1)  # fmt: skip
    save(base, tok, out / "base")

    demos = task.samples(cfg.demos, seed=3, noise=cfg.noise)
    cache_dir = out / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    _log("building the teacher cache (build_teacher_cache, top-64)")
    t0 = time.perf_counter()
    built = build_teacher_cache(
        out / "teacher",
        [{k: d[k] for k in ("id", "input_ids", "labels")} for d in demos],
        cache_dir,
        top_k=64,
        progress=False,
    )
    build_s = time.perf_counter() - t0
    info = TeacherCache(cache_dir).info
    collate_tps = collate_throughput(cache_dir, cfg.batch_size)

    results: dict[str, list[float]] = {}
    histories: dict[str, list[list[float]]] = {}
    wait_s, tokens_seen, student = 0.0, 0, None
    for m in METHODS:
        seeds = [0] if m.preset is None else list(range(cfg.seeds))
        for seed in seeds:
            t0 = time.perf_counter()
            model, losses, wait, tokens = finetune(out / "base", cache_dir, m, seed, cfg)
            acc = accuracy(model, task, prompts, answers)
            results.setdefault(m.label, []).append(acc)
            if losses:
                histories.setdefault(m.label, []).append(losses)
            wait_s += wait
            tokens_seen += tokens
            if m.preset == "target_sft" and seed == 0:
                student = model
            _log(f"{m.label:<22} seed {seed}: {acc:.1%} ({time.perf_counter() - t0:.0f} s)")

    table = format_table(results, teacher_acc)
    stats = (
        f"cache: {info.records:,} records, {info.tokens:,} tokens ({info.supervised_tokens:,} "
        f"supervised), {info.bytes_per_token:.1f} bytes/supervised token, {len(info.shards)} "
        f"shard(s); built in {build_s:.1f} s ({info.supervised_tokens / build_s:,.0f} supervised "
        f"tok/s, teacher included)\n"
        f"collate: {collate_tps:,.0f} supervised tok/s (TargetSFTCollator, batches of "
        f"{cfg.batch_size}, one thread); training loops waited {wait_s:.1f} s in total for "
        f"batches ({tokens_seen:,} supervised tokens, worker start-up included)"
    )
    print()
    print(table)
    print()
    print(stats)
    summary = {
        "config": asdict(cfg),
        "teacher_accuracy": teacher_acc,
        "accuracy": results,
        "cache": {
            "records": info.records,
            "supervised_tokens": info.supervised_tokens,
            "bytes_per_token": info.bytes_per_token,
            "build_seconds": build_s,
        },
        "collate_tokens_per_second": collate_tps,
        "seconds": time.perf_counter() - t_start,
        "build_stats": built.stats.summary(),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "table.md").write_text(table + "\n\n" + stats + "\n")
    if report:
        _write_report(out, cache_dir, student, tok, histories, table)
    _log(f"done in {time.perf_counter() - t_start:.0f} s; everything is in {out}")
    torch.set_num_threads(threads)
    return summary


def _write_report(out: Path, cache_dir: Path, student: Any, tok: Any, histories, table) -> None:
    """The report folder: Figure 3, Figure 4 and the rescue/filter view for the TARGET-SFT
    student (seed 0) on the cached demonstrations, and the loss curves of every method."""
    from target_sft import TeacherCache
    from target_sft.report import write_report

    paths = write_report(
        out / "report",
        cache=TeacherCache(cache_dir),
        model=student,
        tokenizer=tok,
        histories=histories,
        table_markdown=table,
        title="target-sft demo: TARGET-SFT student on the sorting demonstrations",
    )
    _log(f"report: {paths['index']}")


def collate_throughput(cache_dir: Path, batch_size: int) -> float:
    """Supervised tokens per second of ``TargetSFTCollator`` over the whole cache (one thread)."""
    from target_sft import TargetSFTCollator, TeacherCache, TeacherCacheDataset

    ds = TeacherCacheDataset(TeacherCache(cache_dir))
    collate = TargetSFTCollator(pad_token_id=PAD, threads=1)
    best = float("inf")
    sup = 0
    for _ in range(3):
        t0 = time.perf_counter()
        sup = 0
        for a in range(0, len(ds), batch_size):
            b = collate([ds[i] for i in range(a, min(len(ds), a + batch_size))])
            sup += int((b["labels"] != -100).sum())
        best = min(best, time.perf_counter() - t0)
    return sup / best


def format_table(results: dict[str, list[float]], teacher_acc: float) -> str:
    """The Table-1-like summary: exact-match accuracy, mean ± std over seeds."""
    rows = ["| method | exact match (mean ± std) | seeds |", "|---|---:|---:|"]
    for label, accs in results.items():
        a = np.asarray(accs) * 100
        spread = f" ± {a.std(ddof=1):.1f}" if len(a) > 1 else ""
        rows.append(f"| {label} | {a.mean():.1f}{spread} | {len(a)} |")
    rows.append(f"| *(teacher)* | {teacher_acc * 100:.1f} | 1 |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - the CLI calls run_demo
    out = Path(argv[0]) if argv else Path("demo-out")
    run_demo(out, DemoConfig.quick())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
