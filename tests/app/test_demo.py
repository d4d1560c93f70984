"""The main job: ``target-sft demo --quick`` end to end in a real subprocess (teacher trained
from scratch, cache built, five methods trained through the streaming dataset and the collator,
table, report), and the demo task's data."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from target_sft import TeacherCache
from target_sft.demo.run import METHODS, format_table
from target_sft.demo.task import BOS, EOS, IGNORE_INDEX, N_SPECIAL, SORT, SortTask


def test_task_samples_are_sorted_demonstrations_with_the_asked_share_of_slips():
    task = SortTask(max_number=1000, length=5)
    assert task.vocab_size == 1008 and task.seq_length == 13
    clean = task.samples(500, seed=1)
    for s in clean:
        ids = np.asarray(s["input_ids"])
        nums = ids[1:6] - N_SPECIAL
        assert ids[0] == BOS and ids[6] == SORT and ids[-1] == EOS
        assert len(set(nums.tolist())) == 5 and nums.min() >= 0 and nums.max() < 1000
        np.testing.assert_array_equal(ids[7:12] - N_SPECIAL, np.sort(nums))
        assert s["labels"][:7] == [IGNORE_INDEX] * 7 and s["labels"][7:] == s["input_ids"][7:]
    noisy = task.samples(2000, seed=2, noise=0.4)
    flags = np.array([s["noisy"] for s in noisy])
    assert abs(flags.mean() - 0.4) < 0.04
    for s in noisy:
        ans = np.asarray(s["input_ids"][7:12])
        swaps = int((np.diff(ans) < 0).sum())
        assert swaps == (1 if s["noisy"] else 0)  # exactly one neighbouring swap per slip
    assert task.samples(3, seed=5) == task.samples(3, seed=5)
    prompts, answers = task.prompts(4, seed=9)
    assert prompts.shape == (4, 7) and answers.shape == (4, 6)
    assert np.all(np.diff(answers[:, :5], axis=1) > 0) and np.all(answers[:, 5] == EOS)


def test_table_reports_mean_and_std_over_seeds():
    table = format_table({"Base": [0.25], "SFT": [0.5, 0.7, 0.6]}, teacher_acc=0.9)
    assert "| Base | 25.0 | 1 |" in table
    assert "| SFT | 60.0 ± 10.0 | 3 |" in table
    assert "| *(teacher)* | 90.0 | 1 |" in table


def test_quick_demo_end_to_end(tmp_path):
    exe = Path(sys.executable).with_name("target-sft")
    t0 = time.perf_counter()
    r = subprocess.run(
        [str(exe), "demo", "--quick", "--out", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "demo"
    res = json.loads((out / "results.json").read_text())
    assert set(res["accuracy"]) == {m.label for m in METHODS}
    for m in METHODS:
        accs = res["accuracy"][m.label]
        assert len(accs) == (1 if m.preset is None else 3)
        assert all(0.0 <= a <= 1.0 for a in accs)
    assert 0.0 < res["teacher_accuracy"] <= 1.0
    table = (out / "table.md").read_text()
    for m in METHODS:
        assert f"| {m.label} |" in table and f"| {m.label} |" in r.stdout
    cache = TeacherCache(out / "cache")
    assert len(cache) == res["config"]["demos"] and cache.info.complete
    assert cache.info.top_k == 64 and cache.info.vocab_size == 1008
    assert cache.verify() == len(cache)
    assert res["cache"]["bytes_per_token"] == cache.info.bytes_per_token
    report = out / "report"
    for name in ("index.html", "README.md"):
        assert (report / name).exists(), name
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert len(pngs) >= 3 and all(
        (report / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs
    )
    assert "rescue" in next(report.glob("*.html")).read_text().lower()
    for d in ("teacher", "base"):
        assert (out / d / "config.json").exists() and (out / d / "tokenizer.json").exists()
    print(f"demo --quick took {elapsed:.0f} s")
