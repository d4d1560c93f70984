"""The main job: ``target-sft demo --quick`` end to end in a real subprocess (base and teacher
pre-trained from scratch, caches built, every method trained through the streaming dataset and the
collator with the paper's recipe, Average@k evaluation, statistics, report), and its parts: the
task's data and checker, the statistics (exact values), the schedule and the decoding."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from target_sft import TeacherCache
from target_sft.demo.models import generate, make_model, optimizer_and_schedule
from target_sft.demo.run import (
    DATA_SEEDS,
    METHODS,
    PRETRAIN_SAMPLES,
    REFERENCE,
    DemoConfig,
    results_rows,
)
from target_sft.demo.stats import paired_difference, summarize, t_cdf, t_quantile
from target_sft.demo.task import BOS, EOS, IGNORE_INDEX, N_SPECIAL, SORT, SortTask


# ------------------------------------------------------------------------------------- the task
def test_canonical_samples_are_sorted_and_right():
    task = SortTask(max_number=1000, length=5, bucket_width=100)
    assert task.vocab_size == 1008 and task.seq_length == 13 and task.answer_length == 6
    clean = task.samples(300, seed=1)
    ids = np.array([s["input_ids"] for s in clean])
    nums = ids[:, 1:6] - N_SPECIAL
    assert (ids[:, 0] == BOS).all() and (ids[:, 6] == SORT).all() and (ids[:, -1] == EOS).all()
    assert all(len(set(r)) == 5 for r in nums.tolist()) and nums.min() >= 0 and nums.max() < 1000
    np.testing.assert_array_equal(ids[:, 7:12] - N_SPECIAL, np.sort(nums, axis=1))
    for s in clean:
        assert s["labels"][:7] == [IGNORE_INDEX] * 7 and s["labels"][7:] == s["input_ids"][7:]
    assert task.check(ids[:, :7], ids[:, 7:]).all()
    assert task.samples(3, seed=5) == task.samples(3, seed=5)


def test_demonstrations_shuffle_ties_and_slips_are_exactly_the_wrong_answers():
    task = SortTask()
    noisy = task.samples(3000, seed=3, noise=0.4, ties="shuffle")
    clean = task.samples(3000, seed=3, noise=0.0, ties="shuffle")
    ids = np.array([s["input_ids"] for s in noisy])
    flags = np.array([s["noisy"] for s in noisy])
    # a slip is drawn for 40%; a sample whose numbers share one bucket cannot slip
    assert 0.36 < flags.mean() < 0.44
    np.testing.assert_array_equal(task.check(ids[:, :7], ids[:, 7:]), ~flags)
    cids = np.array([s["input_ids"] for s in clean])
    assert task.check(cids[:, :7], cids[:, 7:]).all()
    # the same prompts; answers differ exactly where a slip was made (one neighbour swap)
    np.testing.assert_array_equal(ids[:, :7], cids[:, :7])
    diff = (ids[:, 7:12] != cids[:, 7:12]).sum(axis=1)
    np.testing.assert_array_equal(diff, np.where(flags, 2, 0))
    # ties: "unique" is one number per bucket; among prompts with ties some answers are unsorted
    b = (ids[:, 1:6] - N_SPECIAL) // 100
    unique = np.array([s["unique"] for s in noisy])
    np.testing.assert_array_equal(unique, [len(set(r)) == 5 for r in b.tolist()])
    unsorted = (np.diff(cids[:, 7:12], axis=1) < 0).any(axis=1)
    assert not unsorted[unique].any() and 0.3 < unsorted[~unique].mean() < 0.8


def test_prompt_sets_are_disjoint():
    """Test, validation, demonstrations and both pre-training sets share no prompt (as a set of
    numbers) at the default and full sizes."""
    cfg = DemoConfig()
    task = SortTask(cfg.max_number, cfg.length, cfg.bucket_width)
    sizes = {**PRETRAIN_SAMPLES, "demos": cfg.demos, "test": cfg.test_prompts,
             "validation": cfg.val_prompts}  # fmt: skip
    sets = {}
    for name, seed in DATA_SEEDS.items():
        nums = task.numbers(np.random.default_rng(seed), sizes[name])
        sets[name] = {frozenset(r) for r in nums.tolist()}
    np.testing.assert_array_equal(
        task.prompts(4, DATA_SEEDS["test"])[:, 1:6] - N_SPECIAL,
        task.numbers(np.random.default_rng(DATA_SEEDS["test"]), 4),
    )
    names = sorted(sets)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not sets[a] & sets[b], (a, b)


def test_check_rejects_missing_duplicate_misordered_and_unterminated_answers():
    task = SortTask(max_number=1000, length=3, bucket_width=100)
    p = np.array([[BOS, N_SPECIAL + 150, N_SPECIAL + 120, N_SPECIAL + 300, SORT]])
    n = lambda *v: [N_SPECIAL + x for x in v]  # noqa: E731
    cases = {
        (*n(120, 150, 300), EOS): True,
        (*n(150, 120, 300), EOS): True,  # a tie in any order
        (*n(150, 300, 120), EOS): False,  # bucket order broken
        (*n(120, 120, 300), EOS): False,  # duplicate, 150 missing
        (*n(120, 150, 301), EOS): False,  # not the prompt's number
        (*n(120, 150, 300), SORT): False,  # no </s>
    }
    for out, ok in cases.items():
        assert bool(task.check(p, np.array([out]))[0]) is ok, out
    parts = task.check_parts(p, np.array([(*n(150, 300, 120), EOS)]))
    assert (parts["numbers"][0], parts["ordered"][0], parts["eos"][0]) == (True, False, True)
    with pytest.raises(ValueError, match="outputs must be"):
        task.check(p, np.zeros((1, 3), dtype=np.int64))


# ------------------------------------------------------------------------------------ statistics
# reference quantiles: mpmath (30 digits), inverting 1 − I_{ν/(ν+t²)}(ν/2, 1/2) / 2
@pytest.mark.parametrize(
    ("p", "df", "expected"),
    [
        (0.975, 1, 12.706204736174693),
        (0.975, 2, 4.3026527297494618),
        (0.95, 3, 2.3533634348018229),
        (0.975, 4, 2.7764451051977935),
        (0.975, 9, 2.262157162798205),
        (0.975, 30, 2.0422724563012379),
        (0.995, 5, 4.0321429835552272),
    ],
)
def test_t_quantile_matches_the_tables(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-9)
    assert t_quantile(1 - p, df) == pytest.approx(-expected, abs=1e-9)
    assert t_cdf(expected, df) == pytest.approx(p, abs=1e-12)


def test_t_cdf_closed_forms_and_errors():
    assert t_cdf(0.0, 7) == 0.5 and t_cdf(math.inf, 3) == 1.0 and t_cdf(-math.inf, 3) == 0.0
    assert t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-15)  # Cauchy
    assert t_cdf(2.0, 2) == pytest.approx(0.5 + 0.5 * 2 / math.sqrt(6), abs=1e-15)
    assert t_cdf(-1.5, 6) == pytest.approx(1 - t_cdf(1.5, 6), abs=1e-15)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="df"):
            t_cdf(1.0, bad)
    with pytest.raises(ValueError, match="p must be"):
        t_quantile(1.0, 3)


def test_summary_and_paired_difference_exact_values():
    s = summarize([0.5, 0.7, 0.6])
    assert s.mean == pytest.approx(0.6) and s.std == pytest.approx(0.1) and s.n == 3
    assert summarize([0.25]).std is None
    d = paired_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    half = 4.3026527297494618 / math.sqrt(3)
    assert (d.mean, d.std, d.n) == (2.0, 1.0, 3)
    assert d.low == pytest.approx(2 - half) and d.high == pytest.approx(2 + half)
    assert not d.resolved  # [-0.484, 4.484] contains 0
    d = paired_difference({0: 0.6, 1: 0.7, 2: 0.8, 3: 0.7}, {0: 0.5, 1: 0.5, 2: 0.6, 3: 0.6})
    # differences 0.1, 0.2, 0.2, 0.1: mean 0.15, std 0.057735, t(0.975, 3) = 3.182446
    assert d.mean == pytest.approx(0.15) and d.std == pytest.approx(0.0577350269)
    assert d.half_width == pytest.approx(3.1824463052837084 * 0.0577350269 / 2, abs=1e-9)
    assert d.resolved and d.low > 0
    with pytest.raises(ValueError, match="paired seeds differ"):
        paired_difference({0: 1.0, 1: 2.0}, {0: 1.0, 2: 2.0})
    with pytest.raises(ValueError, match="at least 2"):
        paired_difference([1.0], [0.0])


def test_results_rows_pair_every_method_with_sft_on_the_same_seeds():
    cfg = DemoConfig(seeds=3)
    ev = lambda *v: [  # noqa: E731
        {"seed": i, "average_at_k": a, "greedy": a, "slip_like": a / 10} for i, a in enumerate(v)
    ]
    evals = {"Base": ev(0.2), REFERENCE: ev(0.5, 0.6, 0.7), "SFT (p)": ev(0.6, 0.8, 0.7)}
    rows = {r["label"]: r for r in results_rows(evals, cfg)}
    assert rows["Base"]["vs_sft"] is None and rows[REFERENCE]["vs_sft"] is None
    assert rows["Base"]["group"] == "base" and rows["SFT (p)"]["group"] == "main"
    d = rows["SFT (p)"]["vs_sft"]
    assert d["mean"] == pytest.approx(0.1) and d["n"] == 3
    assert d["high"] - d["mean"] == pytest.approx(4.3026527297494618 * 0.1 / math.sqrt(3))
    assert d["resolved"] is False
    assert rows[REFERENCE]["average_at_k"]["mean"] == pytest.approx(0.6)
    assert rows[REFERENCE]["slip_like"]["mean"] == pytest.approx(0.06)


# ------------------------------------------------------------------------ recipe and decoding
def test_schedule_is_linear_warmup_then_cosine_to_zero():
    p = torch.nn.Parameter(torch.zeros(1))
    opt, sched = optimizer_and_schedule([p], lr=1.0, steps=20, warmup=0.1)
    assert isinstance(opt, torch.optim.AdamW)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:2] == [0.5, 1.0]  # 2 warm-up steps
    expected = [0.5 * (1 + math.cos(math.pi * (s - 2) / 18)) for s in range(2, 20)]
    assert lrs[2:] == pytest.approx(expected)
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 17 / 18)))


def test_cached_decoding_matches_recomputing_the_sequence():
    task = SortTask(max_number=50, length=4, bucket_width=10)
    model = make_model(task, hidden=32, layers=2, seed=0).eval()
    prompts = task.prompts(6, seed=1)
    greedy = generate(model, prompts, task.answer_length, temperature=None)[:, 0]
    x = torch.from_numpy(prompts)
    with torch.no_grad():
        for _ in range(task.answer_length):
            x = torch.cat([x, model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    np.testing.assert_array_equal(greedy, x[:, prompts.shape[1] :].numpy())
    a = generate(model, prompts, 3, samples=5, seed=4, chunk=7)
    assert a.shape == (6, 5, 3)
    np.testing.assert_array_equal(a, generate(model, prompts, 3, samples=5, seed=4, chunk=7))
    with pytest.raises(ValueError, match="samples must be 1"):
        generate(model, prompts, 3, samples=2, temperature=None)


# -------------------------------------------------------------------------------- end to end
def test_quick_demo_end_to_end(tmp_path):
    exe = Path(sys.executable).with_name("target-sft")
    r = subprocess.run(
        [str(exe), "demo", "--quick", "--out", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "demo"
    res = json.loads((out / "results.json").read_text())
    cfg = res["config"]
    assert cfg["name"] == "quick" and res["k"] == cfg["k"] and res["steps"] == cfg["epochs"] * 16
    assert set(res["evaluations"]) == {m.label for m in METHODS}
    rows = {r["label"]: r for r in res["rows"]}
    for m in METHODS:
        es = res["evaluations"][m.label]
        assert [e["seed"] for e in es] == ([0] if m.preset is None else [0, 1, 2])
        for e in es:
            assert 0.0 <= e["average_at_k"] <= 1.0 and 0.0 <= e["greedy"] <= 1.0
            assert 0.0 <= e["slip_like"] <= 1.0 - e["average_at_k"]
        row = rows[m.label]
        assert row["average_at_k"]["mean"] == pytest.approx(
            np.mean([e["average_at_k"] for e in es])
        )
        if m.preset is None or m.label == REFERENCE:
            assert row["vs_sft"] is None
        else:  # the paired difference is recomputed from the per-seed values
            d = paired_difference(
                [e["average_at_k"] for e in es],
                [e["average_at_k"] for e in res["evaluations"][REFERENCE]],
            )
            assert row["vs_sft"]["mean"] == pytest.approx(d.mean)
            assert row["vs_sft"]["low"] == pytest.approx(d.low)
            assert row["vs_sft"]["resolved"] == d.resolved
    assert 0.0 < res["teacher"]["greedy"] <= 1.0 and res["lr"] == cfg["lr"]
    assert res["lr_sweep"] is None
    table = (out / "table.md").read_text()
    for m in METHODS:
        assert f"| {m.label} |" in table and f"| {m.label} |" in r.stdout
    for phase in ("base pre-training", "teacher training", "teacher caches", "evaluation",
                  "train SFT", "report", "total"):  # fmt: skip
        assert phase in r.stdout and phase in res["seconds"], phase
    for name in ("noisy", "clean"):
        cache = TeacherCache(out / f"cache-{name}")
        assert len(cache) == cfg["demos"] and cache.info.complete
        assert cache.info.top_k == 64 and cache.info.vocab_size == 1008
        assert cache.verify() == len(cache)
    report = out / "report"
    for name in ("index.html", "README.md", "loss_curves.png"):
        assert (report / name).exists(), name
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert len(pngs) >= 3 and all(
        (report / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs
    )
    index = (report / "index.html").read_text()
    assert "base student (before fine-tuning)" in index and "TARGET-SFT" in index
    assert "rescue" in index.lower()
    for d in ("teacher", "base"):
        assert (out / d / "config.json").exists() and (out / d / "tokenizer.json").exists()
