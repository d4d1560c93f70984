"""``target-sft demo``: a small replication of the paper's comparison, end to end on CPU.

1. **Task** (:mod:`target_sft.demo.task`): order five numbers from 0..999 by their hundreds; numbers
   of one hundred may come in any order (non-unique answers), answers are checkable.
2. **Base and teacher**: a tiny Llama pre-trained from scratch on the canonical (fully sorted)
   answers for a few steps — the base, which already solves part of the task — and the same base
   trained further on fresh canonical data — the teacher (the paper's "instruct" model of the same
   base): stronger, not perfect.
3. **Demonstrations**: ties in an arbitrary order, and a share with a slip (two neighbours of
   different hundreds swapped). **Cache**: :func:`target_sft.build_teacher_cache` (top-64 of a
   1,008-token vocabulary).
4. **Training** with the paper's recipe scaled down (AdamW, 10% linear warm-up then cosine decay,
   one learning rate for every method chosen on a validation split, a fixed number of epochs, the
   same data order for every method of a seed), exactly as a user wires it:
   ``StreamingTeacherDataset`` → ``DataLoader`` (a worker process) with ``TargetSFTCollator`` → a
   Q-target loss preset; SFT / SFT (p) / Distill / TARGET-SFT from the same base, plus a control
   (SFT on the demonstrations without slips) and, in ``--full``, Table 6's ablations.
5. **Evaluation**: Average@k of answers sampled at temperature 1.0 and greedy accuracy on held-out
   test prompts; mean ± std over seeds and the paired difference to SFT with a 95% t-interval
   (:mod:`target_sft.demo.stats`); a report folder (figures computed with the base student).

``docs/DEMO.md`` explains the design and carries the measured results.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from target_sft.demo.stats import paired_difference, summarize
from target_sft.demo.task import PAD, SortTask

REFERENCE = "SFT"  #: the method every paired difference is taken against
#: data seeds of each prompt set (and its size where fixed); the sets share no prompt
#: (tests/app/test_demo.py checks it for the default and full sizes)
DATA_SEEDS = {"base": 2, "teacher": 1, "demos": 3, "test": 7, "validation": 8}
PRETRAIN_SAMPLES = {"base": 20_000, "teacher": 40_000}


@dataclass(frozen=True)
class Method:
    """One row of the table: a loss preset (``None``: the base, not fine-tuned) with its keyword
    arguments, whether it reads the teacher's cached distribution, and which demonstrations it
    trains on (``"noisy"``: the demonstrations with slips; ``"clean"``: the same without)."""

    label: str
    preset: str | None
    kwargs: dict[str, Any] = field(default_factory=dict)
    teacher: bool = False
    data: str = "noisy"
    group: str = "main"  # "main" | "control" | "ablation"


BASE = Method("Base", None)
MAIN = [
    Method("SFT", "sft"),
    Method("SFT (p)", "dft"),
    Method("Distill (c = 0.8)", "hybrid_kd", {"lam": 0.8}, teacher=True),  # the paper's c
    Method("TARGET-SFT (η = 0.5)", "target_sft", {"eta": 0.5}, teacher=True),
]
CONTROL = Method("SFT, clean demonstrations (control)", "sft", data="clean", group="control")
#: Table 6 (App. E): teacher intensity η, Distill's c, and a constant branch c instead of 1 − γ_t
ABLATIONS = [
    *(
        Method(f"Distill (c = {c})", "hybrid_kd", {"lam": c}, teacher=True, group="ablation")
        for c in (0.2, 0.5, 1.0)
    ),
    *(
        Method(f"TARGET-SFT (η = {e})", "target_sft", {"eta": e}, teacher=True, group="ablation")
        for e in (0.2, 1.0)
    ),
    *(
        Method(
            f"constant branch (c = {c}, η = 0.5)",
            "target_sft_constant",
            {"c": c, "eta": 0.5},
            teacher=True,
            group="ablation",
        )
        for c in (0.2, 0.5, 1.0)
    ),
]
#: the rows of the default and quick runs
METHODS = [BASE, *MAIN, CONTROL]
#: the order of Table 6's rows in the full run's ablation table
ABLATION_ORDER = [
    "Distill (c = 0.2)",
    "Distill (c = 0.5)",
    "Distill (c = 0.8)",
    "Distill (c = 1.0)",
    "TARGET-SFT (η = 0.2)",
    "TARGET-SFT (η = 0.5)",
    "TARGET-SFT (η = 1.0)",
    "constant branch (c = 0.2, η = 0.5)",
    "constant branch (c = 0.5, η = 0.5)",
    "constant branch (c = 1.0, η = 0.5)",
]

#: The learning rate every method uses, chosen once by the rule of ``DemoConfig.lr_grid`` on the
#: validation split (``target-sft demo --lr-sweep``, default configuration, seed 0; the sweep's
#: numbers are in docs/DEMO.md).
CHOSEN_LR = 3e-3


@dataclass
class DemoConfig:
    """Everything a run depends on. The learning-rate rule: with a non-empty ``lr_grid`` the run
    first fine-tunes SFT, SFT (p), Distill and TARGET-SFT (seed 0) with every value of the grid
    and takes the value with the highest mean validation Average@k over those four methods; it
    then uses that one value for every method and seed. Without a grid it uses ``lr``."""

    name: str = "default"
    length: int = 5
    max_number: int = 1000
    bucket_width: int = 100
    noise: float = 0.4  # share of demonstrations with a slip
    hidden: int = 64
    layers: int = 2
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 64
    base_steps: int = 500  # the base's pre-training
    teacher_steps: int = 1500  # the teacher: the base trained this many steps further
    demos: int = 4000
    epochs: int = 3
    batch_size: int = 64
    lr: float = CHOSEN_LR
    warmup: float = 0.1
    weight_decay: float = 0.0
    lr_grid: tuple[float, ...] = ()
    seeds: int = 3
    k: int = 8  # Average@k on the test prompts
    test_prompts: int = 500
    val_prompts: int = 300
    val_k: int = 4
    ablations: bool = False
    top_k: int = 64

    @classmethod
    def quick(cls) -> DemoConfig:
        """The test suite's run (well under 2 minutes on 2 cores): less pre-training, fewer
        demonstrations, Average@4 on 200 prompts."""
        return cls(name="quick", base_steps=400, teacher_steps=300, demos=1000, epochs=2, k=4,
                   test_prompts=200, val_prompts=100)  # fmt: skip

    @classmethod
    def full(cls) -> DemoConfig:
        """The paper's evaluation (Average@16), five seeds, Table 6's ablations, and the
        learning-rate sweep re-run."""
        return cls(name="full", seeds=5, k=16, ablations=True, lr_grid=(3e-4, 1e-3, 3e-3))

    def methods(self) -> list[Method]:
        return [*METHODS, *(ABLATIONS if self.ablations else [])]

    @property
    def steps(self) -> int:
        """Optimizer steps of one fine-tuning run: ``epochs`` × batches per epoch."""
        return self.epochs * math.ceil(self.demos / self.batch_size)


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


@dataclass
class Run:
    """One fine-tuning run: the model, and per optimizer step its own objective and the label
    NLL (mean −log p(label) over the batch's supervised tokens, from the same logits)."""

    model: Any
    objective: list[float]
    label_nll: list[float]
    wait_s: float
    tokens: int


def finetune(
    base: Any, cache_dir: Path, method: Method, seed: int, cfg: DemoConfig, lr: float
) -> Run:
    """Fine-tune a copy of ``base`` on the cached demonstrations with ``cfg``'s recipe."""
    import torch
    from torch.utils.data import DataLoader

    from target_sft import StreamingTeacherDataset, TargetSFTCollator
    from target_sft.demo.models import optimizer_and_schedule
    from target_sft.losses import get_preset

    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    if method.preset is None:
        return Run(model.eval(), [], [], 0.0, 0)
    loss_fn = get_preset(method.preset, **method.kwargs)
    # The same seed gives the same order of the same records (the clean and noisy caches hold the
    # same prompts in the same order), so every method of a seed sees the same batches.
    ds = StreamingTeacherDataset(cache_dir, shuffle=True, seed=seed, batch_size=cfg.batch_size)
    if len(ds) != cfg.demos:
        raise RuntimeError(f"{cache_dir} holds {len(ds)} records, the config {cfg.demos}")
    loader = DataLoader(
        ds,
        batch_size=cfg.batch_size,
        num_workers=1,
        persistent_workers=True,  # the worker moves to the next epoch by itself
        collate_fn=TargetSFTCollator(pad_token_id=PAD),
    )
    opt, sched = optimizer_and_schedule(
        model.parameters(), lr=lr, steps=cfg.steps, warmup=cfg.warmup,
        weight_decay=cfg.weight_decay,
    )  # fmt: skip
    model.train()
    run = Run(model, [], [], 0.0, 0)
    for _ in range(cfg.epochs):
        t = time.perf_counter()
        for batch in loader:
            run.wait_s += time.perf_counter() - t
            labels = batch["labels"]
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            extra = (
                {"teacher_ids": batch["teacher_ids"], "teacher_logprobs": batch["teacher_logprobs"]}
                if method.teacher
                else {}
            )
            loss = loss_fn(logits, labels, **extra)
            with torch.no_grad():  # the common scale: label NLL from the same logits
                tgt = labels[:, 1:]
                mask = tgt != -100
                lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                nll = -lp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)[mask].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run.objective.append(loss.item())
            run.label_nll.append(nll.item())
            run.tokens += int(mask.sum())
            t = time.perf_counter()
    del loader
    if len(run.objective) != cfg.steps:
        raise RuntimeError(f"{method.label}: {len(run.objective)} steps, expected {cfg.steps}")
    model.eval()
    return run


class Timer:
    """Wall time per phase, printed at the end ("where the time went")."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def table(self, total: float) -> list[list[str]]:
        rows = [[k, f"{v:.1f}", f"{100 * v / total:.0f}%"] for k, v in self.seconds.items()]
        rest = total - sum(self.seconds.values())
        rows.append(["other (start-up, data, tables)", f"{rest:.1f}", f"{100 * rest / total:.0f}%"])
        rows.append(["total", f"{total:.1f}", "100%"])
        return rows


def run_demo(out: Path, cfg: DemoConfig, *, report: bool = True) -> dict[str, Any]:
    """Run the demo into ``out``; returns the results (also written to ``out/results.json``)."""
    import torch

    from target_sft import TeacherCache, build_teacher_cache
    from target_sft.demo.models import evaluate, make_model, make_tokenizer, pretrain, save

    t_start = time.perf_counter()
    timer = Timer()
    out.mkdir(parents=True, exist_ok=True)
    # Tiny models: one thread is fastest (and leaves the other core to the DataLoader worker).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    task = SortTask(max_number=cfg.max_number, length=cfg.length, bucket_width=cfg.bucket_width)
    tok = make_tokenizer(task)
    test = task.prompts(cfg.test_prompts, seed=DATA_SEEDS["test"])
    val = task.prompts(cfg.val_prompts, seed=DATA_SEEDS["validation"])
    _log(
        f"{cfg.name} run. Task: order {cfg.length} distinct numbers from 0..{cfg.max_number - 1} "
        f"by n // {cfg.bucket_width} (ties in any order; vocabulary {task.vocab_size}); "
        f"{cfg.demos} demonstrations, ties in arbitrary order, {cfg.noise:.0%} drawn for a slip"
    )
    _log(
        f"recipe: AdamW, {cfg.warmup:.0%} linear warm-up + cosine decay, batch {cfg.batch_size}, "
        f"{cfg.epochs} epochs = {cfg.steps} steps, one learning rate for every method "
        + (
            f"(chosen now on {cfg.val_prompts} validation prompts: the best mean validation "
            f"Average@{cfg.val_k} of SFT, SFT (p), Distill, TARGET-SFT at seed 0 over "
            f"{list(cfg.lr_grid)})"
            if cfg.lr_grid
            else f"= {cfg.lr:g} (chosen by the validation sweep recorded in docs/DEMO.md)"
        )
    )
    _log(
        f"evaluation: Average@{cfg.k} (temperature 1.0) and greedy accuracy on {cfg.test_prompts} "
        f"test prompts; {cfg.seeds} seeds"
    )

    t0 = time.perf_counter()
    _log(f"pre-training the base from scratch ({cfg.base_steps} steps, canonical answers)")
    base = make_model(task, hidden=cfg.hidden, layers=cfg.layers, seed=1)
    pretrain(base, task.samples(PRETRAIN_SAMPLES["base"], seed=DATA_SEEDS["base"]), steps=cfg.base_steps,
             batch_size=cfg.pretrain_batch, lr=cfg.pretrain_lr, seed=1, log=_log)  # fmt: skip
    save(base, tok, out / "base")
    timer.add("base pre-training", time.perf_counter() - t0)

    t0 = time.perf_counter()
    _log(f"training the teacher: the base, {cfg.teacher_steps} steps further on fresh data")
    teacher = copy.deepcopy(base)
    pretrain(teacher, task.samples(PRETRAIN_SAMPLES["teacher"], seed=DATA_SEEDS["teacher"]), steps=cfg.teacher_steps,
             batch_size=cfg.pretrain_batch, lr=cfg.pretrain_lr, seed=0, log=_log)  # fmt: skip
    save(teacher, tok, out / "teacher")
    timer.add("teacher training", time.perf_counter() - t0)

    t0 = time.perf_counter()
    teacher_eval = evaluate(teacher, task, test, k=cfg.k, seed=12345)
    timer.add("evaluation", time.perf_counter() - t0)
    _log(
        f"teacher: Average@{cfg.k} {teacher_eval.average_at_k:.1%}, greedy {teacher_eval.greedy:.1%}"
    )

    t0 = time.perf_counter()
    caches: dict[str, Path] = {}
    demo_sets = {
        "noisy": task.samples(cfg.demos, seed=DATA_SEEDS["demos"], noise=cfg.noise, ties="shuffle"),
        "clean": task.samples(cfg.demos, seed=DATA_SEEDS["demos"], noise=0.0, ties="shuffle"),
    }
    built_stats = {}
    for name, demos in demo_sets.items():
        caches[name] = out / f"cache-{name}"
        shutil.rmtree(caches[name], ignore_errors=True)
        built = build_teacher_cache(
            out / "teacher",
            [{k: d[k] for k in ("id", "input_ids", "labels")} for d in demos],
            caches[name],
            top_k=cfg.top_k,
            progress=False,
        )
        built_stats[name] = built.stats.summary()
    timer.add("teacher caches", time.perf_counter() - t0)
    noisy = demo_sets["noisy"]
    slips = sum(d["noisy"] for d in noisy)
    ties = sum(not d["unique"] for d in noisy)
    info = TeacherCache(caches["noisy"]).info
    _log(
        f"caches: {info.records:,} records each, top-{info.top_k}; {slips} demonstrations "
        f"({slips / len(noisy):.0%}) have a slip, {ties} ({ties / len(noisy):.0%}) have ties"
    )

    lr, sweep = cfg.lr, None
    if cfg.lr_grid:
        t0 = time.perf_counter()
        lr, sweep = lr_sweep(base, caches, task, val, cfg)
        timer.add("learning-rate sweep", time.perf_counter() - t0)
    _log(f"learning rate for every method: {lr:g}")

    evals: dict[str, list[dict[str, float]]] = {}
    objective: dict[str, list[list[float]]] = {}
    label_nll: dict[str, list[list[float]]] = {}
    wait_s, tokens_seen = 0.0, 0
    for m in cfg.methods():
        seeds = [0] if m.preset is None else list(range(cfg.seeds))
        for seed in seeds:
            t0 = time.perf_counter()
            run = finetune(base, caches[m.data], m, seed, cfg, lr)
            t1 = time.perf_counter()
            if m.preset is not None:
                timer.add(f"train {m.label}", t1 - t0)
            ev = evaluate(run.model, task, test, k=cfg.k, seed=1000 + seed)
            timer.add("evaluation", time.perf_counter() - t1)
            evals.setdefault(m.label, []).append(
                {
                    "seed": seed,
                    "average_at_k": ev.average_at_k,
                    "greedy": ev.greedy,
                    "slip_like": ev.slip_like,
                }
            )
            if run.objective:
                objective.setdefault(m.label, []).append(run.objective)
                label_nll.setdefault(m.label, []).append(run.label_nll)
            wait_s += run.wait_s
            tokens_seen += run.tokens
            _log(
                f"{m.label:<36} seed {seed}: Average@{cfg.k} {ev.average_at_k:6.1%}, greedy "
                f"{ev.greedy:6.1%}, slip-like {ev.slip_like:5.1%} ({t1 - t0:.0f} s + "
                f"{time.perf_counter() - t1:.0f} s eval)"
            )

    rows = results_rows(evals, cfg)
    main_table = format_table(
        [r for r in rows if r["group"] in ("base", "main", "control")], teacher_eval, cfg
    )
    ablation_table = (
        format_table(
            sorted(
                (r for r in rows if r["label"] in ABLATION_ORDER),
                key=lambda r: ABLATION_ORDER.index(r["label"]),
            ),
            None,
            cfg,
        )
        if cfg.ablations
        else None
    )
    print()
    print(main_table.markdown())
    if ablation_table is not None:
        print()
        print(ablation_table.markdown())
    data_path = (
        f"data path: {tokens_seen:,} supervised tokens through StreamingTeacherDataset -> "
        f"DataLoader (1 worker) -> TargetSFTCollator; the training loops waited {wait_s:.1f} s "
        "in total for batches (worker start-up included)"
    )
    print()
    print(data_path)

    summary: dict[str, Any] = {
        "config": asdict(cfg),
        "lr": lr,
        "lr_sweep": sweep,
        "steps": cfg.steps,
        "k": cfg.k,
        "teacher": asdict(teacher_eval),
        "evaluations": evals,
        "rows": rows,
        "demonstrations": {"count": len(noisy), "slips": slips, "with_ties": ties},
        "cache": {
            "records": info.records,
            "supervised_tokens": info.supervised_tokens,
            "bytes_per_token": info.bytes_per_token,
            "top_k": info.top_k,
            "vocab_size": info.vocab_size,
        },
        "build_stats": built_stats,
    }
    tables = [main_table] + ([ablation_table] if ablation_table is not None else [])
    if report:
        t0 = time.perf_counter()
        _write_report(out, caches["noisy"], base, tok, objective, label_nll, tables, cfg, lr)
        timer.add("report", time.perf_counter() - t0)
    total = time.perf_counter() - t_start
    timing = timer.table(total)
    summary["seconds"] = {r[0]: float(r[1]) for r in timing}
    print()
    print("where the time went (seconds):")
    for name, secs, share in timing:
        print(f"  {name:<48} {secs:>8} {share:>5}")
    md = "\n\n".join(t.markdown() for t in tables)
    timing_md = "\n".join(
        ["| phase | seconds | share |", "|---|---:|---:|"]
        + [f"| {a} | {b} | {c} |" for a, b, c in timing]
    )
    (out / "results.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    (out / "table.md").write_text(f"{md}\n\n{data_path}\n\n{timing_md}\n")
    _log(f"done in {total:.0f} s; everything is in {out}")
    torch.set_num_threads(threads)
    return summary


def lr_sweep(
    base: Any, caches: dict[str, Path], task: SortTask, val: np.ndarray, cfg: DemoConfig
) -> tuple[float, dict[str, Any]]:
    """The learning-rate rule (see :class:`DemoConfig`): every grid value, SFT, SFT (p), Distill
    and TARGET-SFT at seed 0, validation Average@``val_k``; the best mean wins (ties: the
    smaller learning rate)."""
    from target_sft.demo.models import evaluate

    scores: dict[str, dict[str, float]] = {}
    for lr in cfg.lr_grid:
        per = {}
        for m in MAIN:
            run = finetune(base, caches[m.data], m, 0, cfg, lr)
            per[m.label] = evaluate(run.model, task, val, k=cfg.val_k, seed=99).average_at_k
        scores[f"{lr:g}"] = per
        _log(
            f"lr sweep {lr:g}: mean validation Average@{cfg.val_k} "
            f"{np.mean(list(per.values())):.1%} ("
            + ", ".join(f"{k} {v:.1%}" for k, v in per.items())
            + ")"
        )
    best = max(cfg.lr_grid, key=lambda v: (float(np.mean(list(scores[f"{v:g}"].values()))), -v))
    return best, {"grid": list(cfg.lr_grid), "validation_average_at_k": scores, "chosen": best}


def results_rows(evals: dict[str, list[dict[str, float]]], cfg: DemoConfig) -> list[dict[str, Any]]:
    """Per method: mean ± std of Average@k and greedy accuracy over seeds, and the paired
    difference of Average@k to SFT (same seeds) with its 95% t-interval."""
    groups = {m.label: ("base" if m.preset is None else m.group) for m in cfg.methods()}
    ref = {int(e["seed"]): e["average_at_k"] for e in evals.get(REFERENCE, [])}
    rows = []
    for label, es in evals.items():
        avg = summarize([e["average_at_k"] for e in es])
        gr = summarize([e["greedy"] for e in es])
        slip = summarize([e["slip_like"] for e in es])
        row: dict[str, Any] = {
            "label": label,
            "group": groups[label],
            "seeds": avg.n,
            "average_at_k": asdict(avg),
            "greedy": asdict(gr),
            "slip_like": asdict(slip),
            "vs_sft": None,
        }
        mine = {int(e["seed"]): e["average_at_k"] for e in es}
        if label != REFERENCE and len(mine) >= 2 and set(mine) == set(ref):
            d = paired_difference(mine, ref)
            row["vs_sft"] = {**asdict(d), "resolved": d.resolved}
        rows.append(row)
    return rows


def _pm(s: dict[str, Any]) -> str:
    """``mean ± std`` in percent (``mean`` alone for one seed)."""
    m = 100 * s["mean"]
    return f"{m:.1f}" if s["std"] is None else f"{m:.1f} ± {100 * s['std']:.1f}"


def _diff(d: dict[str, Any] | None) -> tuple[str, str]:
    if d is None:
        return "—", "—"
    cell = f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
    return cell, "resolved" if d["resolved"] else "unresolved"


def format_table(rows: Sequence[dict[str, Any]], teacher: Any, cfg: DemoConfig) -> Any:
    """A :class:`~target_sft.report.ReportTable` of ``rows`` (:func:`results_rows`), plus the
    teacher when given."""
    from target_sft.report import ReportTable

    cols = [
        "method",
        f"Average@{cfg.k}, % (mean ± std)",
        "greedy, % (mean ± std)",
        "slip-like samples, %",
        f"Δ Average@{cfg.k} vs SFT [95% CI]",
        "vs SFT",
        "seeds",
    ]
    body = []
    for r in rows:
        cell, verdict = _diff(r["vs_sft"])
        body.append(
            [
                r["label"],
                _pm(r["average_at_k"]),
                _pm(r["greedy"]),
                f"{100 * r['slip_like']['mean']:.1f}",
                cell,
                verdict,
                str(r["seeds"]),
            ]
        )
    if teacher is not None:
        avg, greedy = f"{100 * teacher.average_at_k:.1f}", f"{100 * teacher.greedy:.1f}"
        slip = f"{100 * teacher.slip_like:.1f}"
        body.append(["(teacher)", avg, greedy, slip, "—", "—", "1"])
    title = (
        f"Demo ({cfg.name} run): Average@{cfg.k} at temperature 1.0 and greedy accuracy on "
        f"{cfg.test_prompts} test prompts"
        if teacher is not None
        else f"Table 6 ablations ({cfg.name} run): Average@{cfg.k} on {cfg.test_prompts} test prompts"
    )
    caption = (
        f"Mean ± std over seeds; slip-like: sampled answers with the right numbers and </s> "
        f"but out of order (mean); Δ: paired difference to SFT over the same seeds with a 95% "
        f"t-interval, 'resolved' when it excludes 0. {cfg.epochs} epochs over {cfg.demos} "
        f"demonstrations ({cfg.noise:.0%} drawn for a slip), one learning rate for all methods."
    )
    return ReportTable(title=title, columns=cols, rows=body, caption=caption)


def _write_report(
    out: Path,
    cache_dir: Path,
    base: Any,
    tok: Any,
    objective: dict[str, list[list[float]]],
    label_nll: dict[str, list[list[float]]],
    tables: list[Any],
    cfg: DemoConfig,
    lr: float,
) -> None:
    """The report folder: Figure 3, and Figure 4 and the rescue/filter view computed with the
    BASE student on the noisy demonstrations (App. F reads them as where the base lacks
    confidence), the tables, and the loss curves of every method on one common scale."""
    from target_sft import TeacherCache
    from target_sft.report import write_report

    notes = [
        "Figure 4 and the rescue/filter view use the base student (before fine-tuning) on the "
        "demonstrations with slips, as the paper's Appendix F reads them: where the base lacks "
        "confidence and the teacher does or does not support the observed token.",
        "Loss curves: the label NLL (mean -log p(label) over the batch's supervised tokens, from "
        "the training logits) is one scale for every method; each method's own objective is "
        "shown beside it (objectives are not comparable across methods).",
        f"Recipe: AdamW, {cfg.warmup:.0%} warm-up then cosine decay, learning rate {lr:g} for "
        f"every method, {cfg.epochs} epochs ({cfg.steps} steps of {cfg.batch_size}).",
    ]
    paths = write_report(
        out / "report",
        cache=TeacherCache(cache_dir),
        model=base,
        model_label="base student (before fine-tuning)",
        tokenizer=tok,
        loss_panels={
            "label NLL (nats), every method": label_nll,
            "each method's own objective": objective,
        },
        tables=tables,
        notes=notes,
        title="target-sft demo: order-by-hundreds with imperfect demonstrations",
    )
    _log(f"report: {paths['index']}")


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - the CLI calls run_demo
    out = Path(argv[0]) if argv else Path("demo-out")
    run_demo(out, DemoConfig.quick())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
