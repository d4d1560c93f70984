"""The report (target_sft.report) and the `target-sft plot` verb: Figure 3's numbers, the student
pass against a hand computation, Figure 4's matrix, the rescue/filter HTML, loss curves, the
whole report and the CLI."""

from __future__ import annotations

import html
import json
import re
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

import target_sft
from target_sft import CacheWriter, TeacherCache, build_teacher_cache
from target_sft import report as R
from target_sft.losses import get_preset, induced_target_curve

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: shared helpers
from build_helpers import make_samples, reference_logprobs, save_tiny_llama

SCRIPT = Path(sys.executable).parent / "target-sft"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# ---------------------------------------------------------------------------------------------
# fixtures: a tiny random Llama (its own teacher) and an exact cache of a few samples


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("student") / "llama", seed=3)


@pytest.fixture(scope="module")
def model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return make_samples(9, seed=5)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, samples) -> Path:
    out = tmp_path_factory.mktemp("cache") / "c"
    build_teacher_cache(str(model_dir), samples, out, top_k=8, codec="exact", progress=False)
    return out


# ---------------------------------------------------------------------------------------------
# Figure 3


def test_figure3_numbers_and_png(tmp_path: Path) -> None:
    p_y = np.linspace(0.01, 0.99, 25)
    teacher = np.array([0.3, 0.5] + [0.2 / 6] * 6)
    res = R.plot_induced_targets(
        tmp_path / "f3.png",
        ("sft", "dft", "target_sft:eta=1.0", "kd", "label_smoothing", "eaft"),
        p_y=p_y,
        teacher=teacher,
        figsize=(6.0, 3.0),
        dpi=50,
    )
    assert png_size(res.path) == (300, 150)
    np.testing.assert_allclose(res.p_y, p_y)
    p_k = (1 - p_y) / 7
    np.testing.assert_allclose(res.p_other, p_k, rtol=1e-12)
    q, o = res.q_y, res.q_other
    assert list(q) == ["SFT", "DFT (= p-loss)", "TARGET-SFT (η=1)", "KD", "Label smoothing", "EAFT"]
    # SFT: δ_y for every p_y
    np.testing.assert_allclose(q["SFT"], 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(o["SFT"], 0.0, rtol=0, atol=1e-12)
    # DFT = p-loss, Appendix D Eq. 16
    np.testing.assert_allclose(q["DFT (= p-loss)"], 2 * p_y - p_y**2, atol=1e-12)
    np.testing.assert_allclose(o["DFT (= p-loss)"], (1 - p_y) * p_k, atol=1e-12)
    # TARGET-SFT η = 1: Q = p δ_y + (1 − p) π_T
    np.testing.assert_allclose(q["TARGET-SFT (η=1)"], p_y + (1 - p_y) * 0.3, atol=1e-12)
    np.testing.assert_allclose(o["TARGET-SFT (η=1)"], (1 - p_y) * 0.5, atol=1e-12)
    # KD: Q = π_T; label smoothing ε = 0.1: (1 − ε) δ_y + ε/V
    np.testing.assert_allclose(q["KD"], 0.3, atol=1e-12)
    np.testing.assert_allclose(o["KD"], 0.5, atol=1e-12)
    np.testing.assert_allclose(q["Label smoothing"], 0.9 + 0.1 / 8, atol=1e-12)
    np.testing.assert_allclose(o["Label smoothing"], 0.1 / 8, atol=1e-12)
    # anything else: exactly induced_target_curve's values
    curve = induced_target_curve(
        get_preset("eaft"), torch.as_tensor(p_y), vocab_size=8, label=0, other=1
    )
    np.testing.assert_array_equal(q["EAFT"], curve.q_y.numpy())
    np.testing.assert_array_equal(o["EAFT"], curve.q_other.numpy())


def test_figure3_iw_sft_draws(tmp_path: Path) -> None:
    """iw-SFT is documented in Figure 3 (π_ref = the current model: weight 1, so Q = δ_y); it
    used to crash because its per-sequence weight had no sequence structure on [M, V] logits."""
    p_y = np.array([0.05, 0.4, 0.9])
    res = R.plot_induced_targets(tmp_path / "iw.png", ("iw_sft",), p_y=p_y, figsize=(4, 3), dpi=40)
    np.testing.assert_allclose(res.q_y["iw-SFT"], 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.q_other["iw-SFT"], 0.0, rtol=0, atol=1e-12)


DOCS = Path(__file__).resolve().parents[2] / "docs" / "REPORT.md"


def documented_figure3_presets() -> list[str]:
    """The preset names of docs/REPORT.md's Figure-3 preset table (rows ``| `name` | …``)."""
    text = DOCS.read_text(encoding="utf-8")
    section = text.split("## Figure 3")[1].split("\n## ")[0]
    return re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M)


def figure3_closed_form(name: str, kw: dict, p: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Q [M, V] of each preset on Figure 3's setup, written from Table 5 (label 0; ``p`` the model
    rows, ``t`` the teacher; the figure's neutral inputs: CFT weight 0.5, π_old = π_ref = π_θ)."""
    py = p[:, :1]
    delta = np.zeros_like(p)
    delta[:, 0] = 1.0

    def mix(gamma, residual):  # γ δ_y + (1 − γ) π̃
        return gamma * delta + (1.0 - gamma) * residual

    def guided(eta):
        g = p ** (1.0 - eta) * t[None, :] ** eta
        return g / g.sum(-1, keepdims=True)

    if name in ("sft", "iw_sft", "proximal_sft"):  # iw weight 1; PSFT ratio 1 ≤ 1 + ε: γ = 1
        return delta
    if name == "dft":
        return mix(py, p)
    if name == "beyond_log":
        return mix(py ** kw.get("alpha", 1.0), p)
    if name == "profit":
        return mix((py > kw.get("tau", 0.1)).astype(float), p)
    if name == "eaft":  # k = 20 capped at V
        h = -(p * np.log(p)).sum(-1, keepdims=True) / np.log(p.shape[1])
        return mix(h, p)
    if name == "cft":
        return mix(0.5, p)
    if name == "label_smoothing":
        return mix(0.9, np.full_like(p, 1.0 / p.shape[1]))
    if name == "sft_kl":  # scale 1 + λ: Q = p − (1 + λ)(p − Q5) = δ + λ π_T − λ p
        return delta + 0.1 * t[None, :] - 0.1 * p
    if name == "asft":  # scale p + λ: Q = p δ + λ π_T + (1 − p − λ) p
        return py * delta + 0.1 * t[None, :] + (1.0 - py - 0.1) * p
    if name == "gem":  # δ_y + sg[π_θ] − q_β
        q = p ** (1.0 / 0.7)
        return delta + p - q / q.sum(-1, keepdims=True)
    if name == "kd":
        return np.broadcast_to(t, p.shape)
    if name == "hybrid_kd":
        return mix(0.2, t[None, :])
    if name == "target_sft":
        return mix(py, guided(kw.get("eta", 0.5)))
    if name == "target_sft_constant":
        return mix(1.0 - kw.get("c", 0.5), guided(kw.get("eta", 0.5)))
    raise AssertionError(f"no closed form for Figure 3's preset {name!r}: add one")


def test_figure3_draws_every_preset(tmp_path: Path) -> None:
    """Every preset docs/REPORT.md lists (= every PRESETS entry), every DEFAULT_PRESETS spec and
    a few parameter variants, in one figure: each line equals its Table-5 closed form and
    induced_target on the figure's inputs."""
    from target_sft import losses as L

    documented = documented_figure3_presets()
    assert sorted(documented) == sorted(L.PRESETS), "docs/REPORT.md's Figure-3 table is stale"
    text = DOCS.read_text(encoding="utf-8")
    assert all(spec in text for spec in R.DEFAULT_PRESETS)
    specs = list(dict.fromkeys([*R.DEFAULT_PRESETS, *documented, "target_sft:eta=0",
                                "target_sft_constant:c=0.2", "target_sft_constant:c=1.0,eta=1.0",
                                "profit:tau=0.5"]))  # fmt: skip
    p_y = np.array([0.02, 0.3, 0.55, 0.97])
    res = R.plot_induced_targets(tmp_path / "all.png", specs, p_y=p_y, figsize=(5, 3), dpi=40)
    assert png_size(res.path) == (200, 120)
    assert sorted(res.specs.values()) == sorted(specs)

    v = len(R.DEFAULT_TEACHER)
    t = np.asarray(R.DEFAULT_TEACHER)
    p = np.empty((len(p_y), v))
    p[:, 0] = p_y
    p[:, 1:] = ((1.0 - p_y) / (v - 1))[:, None]
    sweep = torch.as_tensor(p_y)
    inputs = R.figure3_inputs(sweep)
    for label, spec in res.specs.items():
        name, kw = R.parse_preset_spec(spec)
        want = figure3_closed_form(name, kw, p, t)
        np.testing.assert_allclose(res.q_y[label], want[:, 0], rtol=0, atol=1e-12, err_msg=spec)
        np.testing.assert_allclose(res.q_other[label], want[:, 1], rtol=0, atol=1e-12, err_msg=spec)
        # the same numbers as Eq. 6 on the figure's inputs
        loss = get_preset(name, **kw)
        teacher = {}
        source = loss.residual.source  # the teacher's or, for SFT+KL / ASFT, the reference's
        if source is not None:
            teacher = {
                f"{source}_ids": torch.arange(v).expand(len(p_y), -1),
                f"{source}_logprobs": torch.log(torch.as_tensor(t)).expand(len(p_y), -1),
            }
        q = L.induced_target(
            loss, torch.log(torch.as_tensor(p)), torch.zeros(len(p_y), dtype=torch.long),
            **teacher, **inputs,
        )  # fmt: skip
        np.testing.assert_allclose(res.q_y[label], q[:, 0].numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(res.q_other[label], q[:, 1].numpy(), rtol=0, atol=1e-12)


def test_figure3_refuses_a_preset_it_cannot_draw(tmp_path: Path, monkeypatch) -> None:
    """A loss that needs something the figure does not supply is refused by name, with the cause;
    an unknown preset or parameter is refused before anything is drawn."""
    from target_sft import losses as L

    class NeedsRewards(L.Trust):
        def __call__(self, ctx):
            raise ValueError("NeedsRewards needs rewards, which was not given")

    class RewardSFT(L.QTargetLoss):
        def __init__(self, **kwargs) -> None:
            super().__init__(gamma=NeedsRewards(), residual="self", **kwargs)

    monkeypatch.setitem(L.PRESETS, "reward_sft", RewardSFT)
    with pytest.raises(
        ValueError,
        match=r"cannot draw preset 'reward_sft' \(RewardSFT\): .*needs rewards.*gives every "
        r"loss only token_weights, old_logprobs, reference_label_logprobs, sequence_ids, "
        r"sequence_weights",
    ):
        R.plot_induced_targets(tmp_path / "x.png", ["sft", "reward_sft"], p_y=[0.5])
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        R.plot_induced_targets(tmp_path / "x.png", ["nope"], p_y=[0.5])
    with pytest.raises(TypeError, match="CFT got an unexpected keyword argument 'weight'"):
        R.plot_induced_targets(tmp_path / "x.png", ["cft:weight=0.3"], p_y=[0.5])
    with pytest.raises(ValueError, match=r"p_y must be a non-empty sweep of values strictly"):
        R.plot_induced_targets(tmp_path / "x.png", ["sft"], p_y=[0.5, 1.0])
    res = R.plot_induced_targets(tmp_path / "c.png", ["cft"], p_y=[0.5], token_weight=0.25)
    np.testing.assert_allclose(res.q_y["CFT"], [0.25 + 0.75 * 0.5], atol=1e-12)


def test_preset_specs() -> None:
    assert R.parse_preset_spec("target-sft:eta=0.5") == ("target_sft", {"eta": 0.5})
    assert R.parse_preset_spec("profit:tau=0.2,inclusive=true") == (
        "profit",
        {"tau": 0.2, "inclusive": True},
    )
    assert R.parse_preset_spec("eaft:k=4") == ("eaft", {"k": 4})
    with pytest.raises(ValueError, match="bad preset spec"):
        R.parse_preset_spec("dft:alpha")


# ---------------------------------------------------------------------------------------------
# observed-token statistics


def test_observed_token_stats_hand_computation(model, cache_dir: Path, samples) -> None:
    cache = TeacherCache(cache_dir)
    by_id = {s["id"]: s for s in samples}
    keys = [s["id"] for s in samples]  # includes a length-1 sample and an unsupervised one
    st = R.observed_token_stats(cache, model, keys, max_records=None, batch_size=3)
    assert st.keys == keys
    assert len(st) == sum(cache[k].n_supervised for k in keys) > 0
    for r, k in enumerate(keys):
        pos, lp = reference_logprobs(model, by_id[k])  # float64 log-softmax of rows t − 1
        labels = np.asarray(by_id[k]["labels"])[pos]
        want = np.exp(lp[np.arange(len(pos)), labels])
        sl = st.for_record(r)
        np.testing.assert_array_equal(st.position[sl], pos)
        np.testing.assert_array_equal(st.label[sl], labels)
        np.testing.assert_array_equal(st.record[sl], r)
        np.testing.assert_allclose(st.p_student[sl], want, rtol=2e-6, atol=0)
        # the teacher side is the cache's label log-prob, exactly
        np.testing.assert_array_equal(
            st.p_teacher[sl], np.exp(cache[k].label_logprobs.astype(np.float64))
        )
    # the model is its own teacher here: an aligned student pass reproduces the cache
    np.testing.assert_allclose(st.p_student, st.p_teacher, rtol=1e-5)
    # default selection: the first max_records records in cache order; batch size is irrelevant
    st2 = R.observed_token_stats(cache_dir, model, max_records=4, batch_size=1)
    assert st2.keys == [cache.key_at(i) for i in range(4)]
    for r, k in enumerate(st2.keys):
        np.testing.assert_allclose(
            st2.p_student[st2.for_record(r)], st.p_student[st.for_record(keys.index(k))], rtol=2e-6
        )


def test_observed_token_stats_callable_model(tmp_path: Path, records) -> None:
    with CacheWriter(tmp_path / "c", top_k=8, vocab_size=1000) as w:
        for r in records[:3]:
            w.add(**r)

    def uniform(input_ids, attention_mask):  # a "model": logits 0 over 1000 tokens
        return torch.zeros(*input_ids.shape, 1000)

    st = R.observed_token_stats(tmp_path / "c", uniform, batch_size=2)
    np.testing.assert_allclose(st.p_student, 1e-3, rtol=1e-12)
    assert len(st) == sum(int((r["labels"][1:] != -100).sum()) for r in records[:3])

    def small(input_ids, attention_mask):
        return torch.zeros(*input_ids.shape, 10)

    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        R.observed_token_stats(tmp_path / "c", small)


# ---------------------------------------------------------------------------------------------
# Figure 4


def test_figure4_matrix_exact_counts(tmp_path: Path) -> None:
    ps = [0.1, 0.1, 0.1, 0.6, 0.9, 1.0, 0.0, 0.25]
    pt = [0.9, 0.8, 0.1, 0.3, 1.0, 0.99, 0.5, 0.5]
    res = R.plot_teacher_given_student(tmp_path / "f4.png", ps, pt, bins=4, dpi=40)
    assert png_size(res.path) == (280, 240)
    want = np.zeros((4, 4), np.int64)  # [teacher bin, student bin]; bins of width 0.25
    for s, t in [(0, 3), (0, 3), (0, 0), (2, 1), (3, 3), (3, 3), (0, 2), (1, 2)]:
        want[t, s] += 1
    np.testing.assert_array_equal(res.counts, want)
    np.testing.assert_allclose(res.matrix[:, 0], [0.25, 0, 0.25, 0.5])
    np.testing.assert_allclose(res.matrix[:, 1], [0, 0, 1, 0])
    np.testing.assert_allclose(res.matrix.sum(0), 1.0)
    assert res.quadrants == {"Q1": 4, "Q2": 1, "Q3": 2, "Q4": 1}
    assert res.n_tokens == 8


def test_figure4_columns_sum_to_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ps, pt = rng.beta(0.3, 0.3, 500), rng.beta(0.5, 0.2, 500)
    ps[:3] = [1e-9, 0.0, 1.0]  # below the log range and the edges: first / last bin
    for scale in ("linear", "log"):
        res = R.plot_teacher_given_student(tmp_path / f"{scale}.png", ps, pt, 12, scale=scale)
        assert res.counts.sum() == 500
        col = res.counts.sum(0)
        np.testing.assert_allclose(res.matrix.sum(0)[col > 0], 1.0, rtol=1e-12)
        np.testing.assert_array_equal(res.matrix[:, col == 0], 0.0)
    assert res.student_edges[0] == pytest.approx(1e-4) and res.student_edges[-1] == 1.0
    assert res.counts[:, 0].sum() >= 2 and res.counts[:, -1].sum() >= 1


# ---------------------------------------------------------------------------------------------
# Appendix G: rescue / filter


def test_classify_tokens_thresholds() -> None:
    ps = np.array([0.1, 0.2, 0.9, 0.45, 0.1, 0.5])
    pt = np.array([0.9, 0.1, 0.05, 0.2, 0.5, 0.9])
    assert R.classify_tokens(ps, pt).tolist() == [
        "rescue",
        "filter",
        "other",
        "filter",
        "rescue",
        "other",
    ]
    cats = R.classify_tokens(ps, pt, student_low=0.3, teacher_high=0.7, teacher_low=0.15)
    assert cats.tolist() == ["rescue", "filter", "other", "other", "other", "other"]
    with pytest.raises(ValueError):
        R.classify_tokens(ps, pt, teacher_high=0.2, teacher_low=0.3)


def crafted_cache(path: Path) -> tuple[TeacherCache, R.ObservedTokenStats, dict[int, str]]:
    """Two records whose student/teacher probabilities are chosen by hand."""
    words = {i: f"w{i}" for i in range(50)}
    words[13] = "<script>alert('x')</script>"
    words[14] = 'a "quoted" & <b>bold</b>'
    words[15] = "</span><i>top</i>"
    specs = {
        "r0": ([1, 2, 13, 5, 14, 7], [-100, -100, 13, 5, 14, 7], [0.9, 0.1, 0.6, 0.2]),
        "r1": ([3, 4, 8, 9], [-100, 4, 8, 9], [0.05, 0.99, 0.3]),
    }
    p_student = {"r0": [0.1, 0.2, 0.9, 0.45], "r1": [0.3, 0.01, 0.6]}
    with CacheWriter(path, top_k=3, vocab_size=50, codec="exact") as w:
        for key, (ids, labels, pt) in specs.items():
            s = len(pt)
            # the teacher's top-3 never holds the label here (rank 3 = just outside)
            topk = np.array([[21, 15, 22]] * s, np.int32)
            lps = np.log(np.array([[0.3, 0.5, 0.1]] * s, np.float32))
            lab_lp = np.log(np.array(pt, np.float32))
            w.add(key, ids, labels, topk, lps, lab_lp, np.full(s, 3, np.int32))
    cache = TeacherCache(path)
    recs = [cache[k] for k in specs]
    stats = R.ObservedTokenStats.from_arrays(list(specs), [p_student[k] for k in specs], recs)
    return cache, stats, words


def test_rescue_filter_html(tmp_path: Path) -> None:
    cache, stats, words = crafted_cache(tmp_path / "c")
    view = R.rescue_filter_html(tmp_path / "g.html", cache, None, words.get, stats=stats)
    text = view.path.read_text(encoding="utf-8")
    assert view.keys == ["r0", "r1"]
    assert view.categories == {
        "r0": ["rescue", "filter", "other", "filter"],
        "r1": ["filter", "rescue", "other"],
    }
    assert view.counts == {"rescue": 2, "filter": 3, "other": 2}
    # self-contained and escaped
    assert "<script" not in text and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert "&quot;quoted&quot; &amp; &lt;b&gt;bold&lt;/b&gt;" in text
    assert not re.search(r"(src|href)=|https?://|<link|@import", text)
    assert text.startswith("<!DOCTYPE html>") and "<style>" in text
    # every trajectory's tokens, in order, with their categories and numbers
    sections = re.findall(r'<section class="traj" data-key="(\w+)">(.*?)</section>', text, re.S)
    assert [k for k, _ in sections] == ["r0", "r1"]
    span = re.compile(r'<span class="tok (\w+)"([^>]*)>(.*?)</span>', re.S)
    import html as _html

    for (key, body), ids in zip(sections, ([1, 2, 13, 5, 14, 7], [3, 4, 8, 9]), strict=True):
        toks = span.findall(body)
        assert [_html.unescape(t) for _, _, t in toks] == [words[i] for i in ids]
        cats = [c for c, _, _ in toks if c != "ctx"]
        assert cats == view.categories[key]
    first = span.findall(sections[0][1])[2]  # r0, position 2: p_θ 0.1, p_T 0.9, rescue
    assert 'data-p-student="0.1"' in first[1] and 'data-p-teacher="0.9"' in first[1]
    tip = _html.unescape(re.search(r'title="([^"]*)"', first[1]).group(1))
    assert "p_θ(y) = 0.1000" in tip and "p_T(y) = 0.9000" in tip
    assert "teacher top-3: '</span><i>top</i>' 0.500, 'w21' 0.300, 'w22' 0.100" in tip
    assert "&lt;/span&gt;&lt;i&gt;top&lt;/i&gt;" in first[1]
    assert "Rescue · 1</b> &nbsp; <b>Filter · 2</b>" in sections[0][1]
    # other thresholds change the categories; a record without stats and no model is an error
    view2 = R.rescue_filter_html(
        tmp_path / "g2.html", cache, None, None, ["r1"], stats=stats, student_low=0.02
    )
    assert view2.categories == {"r1": ["other", "rescue", "other"]}
    assert "[4]" in view2.path.read_text()
    with pytest.raises(ValueError, match="no student probabilities"):
        R.rescue_filter_html(tmp_path / "g3.html", cache, None, None, ["r0"])


# ---------------------------------------------------------------------------------------------
# loss curves and the whole report


def test_loss_curves(tmp_path: Path) -> None:
    res = R.plot_loss_curves(
        tmp_path / "l.png",
        {"a": [[1.0, 2.0, 3.0], [3.0, 4.0, 5.0, 6.0]], "b": [1.0, 2.0]},
        figsize=(4.0, 3.0),
        dpi=50,
    )
    assert png_size(res.path) == (200, 150)
    np.testing.assert_allclose(res.mean["a"], [2, 3, 4])
    np.testing.assert_allclose(res.std["a"], [np.sqrt(2)] * 3)
    np.testing.assert_allclose(res.mean["b"], [1, 2])
    np.testing.assert_allclose(res.std["b"], [0, 0])
    np.testing.assert_allclose(res.steps["a"], [1, 2, 3])
    assert res.seeds == {"a": 2, "b": 1}


def test_write_report(tmp_path: Path, model, cache_dir: Path) -> None:
    assert target_sft.write_report is R.write_report
    paths = R.write_report(
        tmp_path / "rep",
        cache=cache_dir,
        model=model,
        histories={"SFT": [[3.0, 2.0, 1.0], [3.2, 2.1, 1.1]], "TARGET-SFT": [[3.0, 1.5, 0.9]]},
        table_markdown="| method | acc |\n|---|---|\n| <SFT> | 1.0 |",
        max_records=6,
        presets=("sft", "dft", "target_sft:eta=0.5"),
        html_records=2,
    )
    assert set(paths) == {
        "figure3",
        "figure4",
        "rescue_filter",
        "observed_tokens",
        "loss_curves",
        "readme",
        "index",
    }
    for p in paths.values():
        assert p.is_file() and p.stat().st_size > 0
    index = paths["index"].read_text()
    readme = paths["readme"].read_text()
    for name in ("figure3", "figure4", "rescue_filter", "observed_tokens", "loss_curves"):
        assert f'href="{paths[name].name}"' in index and f"({paths[name].name})" in readme
    assert "| <SFT> | 1.0 |" in readme and "&lt;SFT&gt;" in index
    data = np.load(paths["observed_tokens"])
    np.testing.assert_allclose(data["p_student"], data["p_teacher"], rtol=1e-5)  # own teacher
    assert int(data["offsets"][-1]) == data["p_student"].size
    html_text = paths["rescue_filter"].read_text()
    assert html_text.count('<section class="traj"') == 2
    assert re.search(r">w\d+</span>", html_text)  # decoded by the model directory's tokenizer


class _TextOf(HTMLParser):
    """The text a browser shows of an HTML page (no tags, no <style>/<title>, entities decoded)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        self._skip += tag in ("style", "script", "title")

    def handle_endtag(self, tag: str) -> None:
        self._skip -= tag in ("style", "script", "title")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_text(page: str) -> str:
    parser = _TextOf()
    parser.feed(page)
    return "".join(parser.parts)


def test_report_table_markdown_and_html() -> None:
    t = R.ReportTable(
        "Accuracy <k=16>",
        ["method", "acc | %"],
        [("**SFT**", "25.2 ± 1.0"), ("<b>x</b> & `a*b`", "*(teacher)*")],
        caption="mean over 3 seeds",
        align=["left", "right"],
    )
    assert t.columns == ("method", "acc | %") and isinstance(t.rows[0], tuple)
    assert t.markdown() == (
        "**Accuracy <k=16>**\n\n"
        "| method | acc \\| % |\n"
        "|---|---:|\n"
        "| **SFT** | 25.2 ± 1.0 |\n"
        "| <b>x</b> & `a*b` | *(teacher)* |\n\n"
        "mean over 3 seeds"
    )
    assert t.html() == (
        "<table><caption><strong>Accuracy &lt;k=16&gt;</strong><br>"
        '<span class="caption">mean over 3 seeds</span></caption>'
        '<thead><tr><th>method</th><th style="text-align:right">acc | %</th></tr></thead><tbody>'
        '<tr><td><strong>SFT</strong></td><td style="text-align:right">25.2 ± 1.0</td></tr>'
        "<tr><td>&lt;b&gt;x&lt;/b&gt; &amp; <code>a*b</code></td>"
        '<td style="text-align:right"><em>(teacher)</em></td></tr></tbody></table>'
    )
    # what markdown() writes reads back as the same table; no title, no caption: just the table
    assert R.ReportTable.from_markdown(t.markdown()) == t
    bare = R.ReportTable("", ["a"], [["1"]])
    assert bare.markdown() == "| a |\n|---|\n| 1 |"
    assert (
        bare.html()
        == "<table><thead><tr><th>a</th></tr></thead><tbody><tr><td>1</td></tr></tbody></table>"
    )
    assert R.ReportTable.from_markdown(bare.markdown(), title="T") == R.ReportTable(
        "T", ["a"], [["1"]]
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"rows": [["a"]]}, ValueError, "row 0 has 1 cells for the 2 columns"),
        ({"rows": [["a", 1.5]]}, TypeError, "row 0, column 1: 1.5 is a float, not a str"),
        ({"rows": [["a", "b\nc"]]}, ValueError, "row 0, column 1: 'b\\\\nc' has a line break"),
        ({"rows": "ab"}, TypeError, "rows must be a sequence of rows"),
        ({"columns": "ab"}, TypeError, "columns must be a sequence of str"),
        ({"columns": []}, ValueError, "no columns"),
        ({"align": ["left"]}, ValueError, "align must give one of"),
        ({"title": "a\nb"}, ValueError, "the title must be one line"),
    ],
)
def test_report_table_errors(kwargs: dict, error: type, message: str) -> None:
    args = {"title": "T", "columns": ["m", "v"], "rows": [["a", "b"]]} | kwargs
    with pytest.raises(error, match=message):
        R.ReportTable(**args)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("| a | b |\n| 1 | 2 |", "second line must be the separator"),
        ("| a | b |\n|---|\n| 1 | 2 |", "2 header cells but 1 in its separator"),
        ("| a | b |\n|---|---|\n| 1 | 2 | 3 |", "has 3 cells, its table's header 2"),
        ("no table here", "no pipe table"),
        ("| a |\n|---|\n| 1 |\n\none\n\ntwo", "more than one table and one caption"),
    ],
)
def test_report_table_from_markdown_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        R.ReportTable.from_markdown(text)


def capture_figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """Record every figure the report saves, by file name (the Figure object drawn)."""
    figs: dict[str, object] = {}
    save = R._save

    def spy(fig, path, dpi):
        figs[Path(path).name] = fig
        return save(fig, path, dpi)

    monkeypatch.setattr(R, "_save", spy)
    return figs


def test_loss_panels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figs = capture_figures(monkeypatch)
    panels = {
        "label NLL (nats), every method": {
            "SFT": [[3.0, 2.0, 1.0, 0.5], [4.0, 2.0, 0.0]],  # truncated to 3 steps
            "TARGET-SFT": [[2.0, 1.0]],  # one seed: no band
        },
        "each method's own objective": {"TARGET-SFT": [[5.0, 4.0, 3.0]], "SFT": [[1.0, 1.0]]},
        "empty": {"SFT": []},
    }
    out = R.plot_loss_panels(panels, tmp_path / "p.png", dpi=20)
    assert out == tmp_path / "p.png" and png_size(out) == (390, 96)  # (6.5·3 × 4.8) in · 20 dpi
    fig = figs["p.png"]
    assert [ax.get_title() for ax in fig.axes] == list(panels)
    a0, a1, a2 = fig.axes
    assert all(ax.get_xlabel() == "optimizer step" for ax in fig.axes)
    sft, target = a0.get_lines()
    assert (sft.get_label(), target.get_label()) == ("SFT (n=2)", "TARGET-SFT (n=1)")
    np.testing.assert_allclose(sft.get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(sft.get_ydata(), [3.5, 2.0, 0.5])
    np.testing.assert_allclose(target.get_ydata(), [2.0, 1.0])
    # the band is the seeds' min–max (not ± std): one shaded area, for SFT only
    (band,) = a0.collections
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(0.0) and ys.max() == pytest.approx(4.0)
    # a method keeps its colour in every panel
    colour = {ln.get_label().split(" (")[0]: ln.get_color() for ln in a1.get_lines()}
    assert colour == {"SFT": sft.get_color(), "TARGET-SFT": target.get_color()}
    assert sft.get_color() != target.get_color()
    assert a2.get_lines() == [] and a2.texts[0].get_text() == "no data"
    with pytest.raises(ValueError, match="non-empty mapping"):
        R.plot_loss_panels({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="panel 'p' must map method -> seed curves"):
        R.plot_loss_panels({"p": [[1.0]]}, tmp_path / "x.png")
    # plot_loss_curves draws through the same routine, with a ± 1 std band
    res = R.plot_loss_curves(tmp_path / "c.png", {"SFT": [[3.0, 2.0], [5.0, 2.0]]}, dpi=20)
    ys = figs["c.png"].axes[0].collections[0].get_paths()[0].vertices[:, 1]
    assert ys.max() == pytest.approx(4.0 + np.sqrt(2)) and res.std["SFT"][0] == pytest.approx(
        np.sqrt(2)
    )


def test_write_report_tables_notes_panels(
    tmp_path: Path, model, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figs = capture_figures(monkeypatch)
    label = "base student (before fine-tuning)"
    tables = [
        R.ReportTable(
            "Accuracy", ["method", "acc"], [["<SFT>", "**25.2**"], ["TARGET-SFT", "30.6"]]
        ),
        R.ReportTable(
            "Δ to SFT", ["method", "95% interval"], [["a | b", "[-1.0, 2.0]"]], caption="paired, t"
        ),
    ]
    notes = ["SFT (p) is <not> resolved & **bold** & `code`", "second note"]
    panels = {
        "label NLL": {"SFT": [[2.0, 1.0], [3.0, 1.0]]},
        "own objective": {"SFT": [[1.0, 0.5]]},
    }
    table_md = (
        "**Old table**\n\n| method | acc |\n|---|---:|\n| *(teacher)* | 84.9 |\n\n"
        "Text with **bold**.\n\n## Seeds\n\n- seed `0`\n- seed 1\n\n**Lone bold**\n\nlast"
    )
    paths = R.write_report(
        tmp_path / "rep", cache=cache_dir, model=model, tables=tables, notes=notes,
        loss_panels=panels, model_label=label, table_markdown=table_md, max_records=4,
        presets=("sft",), html_records=1, title="demo <report>",
    )  # fmt: skip
    page = paths["index"].read_text(encoding="utf-8")
    text = html_text(page)
    for raw in ("|---", "**", '{"', "`", "*("):  # no Markdown, no JSON in what is shown
        assert raw not in text, raw
    assert "<SFT>" not in page and "<not>" not in page  # escaped
    assert page.count("<table>") == 3
    assert tables[0].html() in page and tables[1].html() in page
    assert "<td>&lt;SFT&gt;</td><td><strong>25.2</strong></td>" in page
    assert "<caption><strong>Old table</strong></caption>" in page
    assert '<td style="text-align:right">84.9</td>' in page and "<em>(teacher)</em>" in page
    assert (
        "<p>Text with <strong>bold</strong>.</p><h4>Seeds</h4>"
        "<ul><li>seed <code>0</code></li><li>seed 1</li></ul>"
        "<p><strong>Lone bold</strong></p><p>last</p><table>" in page
    )
    assert (
        '<p class="note">SFT (p) is &lt;not&gt; resolved &amp; <strong>bold</strong> &amp; '
        "<code>code</code></p>" in page
    )
    assert "SFT (p) is <not> resolved & bold & code" in text
    assert page.index("Old table") < page.index("Accuracy") < page.index("second note")
    # the summary: a definition list; the cache's teacher description a nested one, not JSON
    info = TeacherCache(cache_dir).info
    assert info.teacher  # the test means something
    readme = paths["readme"].read_text(encoding="utf-8")
    for k, v in info.teacher.items():
        shown = v if isinstance(v, str) else json.dumps(v)  # None: null
        assert f"<dt>{k}</dt><dd><code>{html.escape(shown)}</code></dd>" in page
        assert f"{k}: `{shown}`" in readme
    assert f"<dt>{label}</dt>" in page and f"Figure 4 — P(p_T | p_θ), {label}" in text
    # Figure 4's and the rescue/filter page's titles name the model
    n = np.load(paths["observed_tokens"])["p_student"].size
    title = figs["figure4_teacher_given_student.png"].axes[0].get_title()
    want = f"Figure 4 · P(p_T | p_θ) on {n:,} observed tokens of the {label}"
    # wrapped to fit the figure (lines of at most 60 characters), words unchanged
    assert title.replace("\n", " ") == want and max(map(len, title.split("\n"))) <= 60
    assert label in html_text(paths["rescue_filter"].read_text(encoding="utf-8"))
    # the loss panels: one axis per panel
    assert [ax.get_title() for ax in figs["loss_curves.png"].axes] == ["label NLL", "own objective"]
    # the README: the same content as Markdown
    assert table_md in readme and tables[0].markdown() in readme and tables[1].markdown() in readme
    assert notes[0] in readme and f"- {label}: `" in readme


def test_write_report_argument_errors(tmp_path: Path, cache_dir: Path) -> None:
    """Checked before anything is loaded or written (model=None would fail later)."""
    w = lambda **kw: R.write_report(tmp_path / "r", cache=cache_dir, model=None, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"histories .* or loss_panels .*, not both"):
        w(histories={"a": [1.0]}, loss_panels={"p": {"a": [1.0]}})
    with pytest.raises(ValueError, match="model_label must be a non-empty str"):
        w(model_label=" ")
    with pytest.raises(TypeError, match=r"sequences .*, not one"):
        w(notes="one note")
    with pytest.raises(TypeError, match="tables holds a str, not a ReportTable"):
        w(tables=["| a |"])
    with pytest.raises(ValueError, match=r"table_markdown: .* second line must be the separator"):
        w(table_markdown="intro\n\n| a | b |\n| 1 | 2 |")
    assert not (tmp_path / "r").exists()


def test_import_is_lazy() -> None:
    code = (
        "import sys, target_sft, target_sft.report; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'matplotlib'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_plot(tmp_path: Path, model_dir: Path, cache_dir: Path) -> None:
    hist = tmp_path / "h.json"
    hist.write_text('{"SFT": [[2.0, 1.0], [2.5, 1.5]]}')
    p = subprocess.run(
        [
            str(SCRIPT), "plot", "--cache", str(cache_dir), "--model", str(model_dir),
            "--out", str(tmp_path / "out"), "--records", "5", "--presets", "sft", "dft",
            "target_sft:eta=0.5", "--histories", str(hist), "-q",
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "OK: report in" in p.stdout
    for f in (
        "figure3_induced_targets.png",
        "figure4_teacher_given_student.png",
        "rescue_filter.html",
        "loss_curves.png",
        "index.html",
        "README.md",
    ):
        assert (tmp_path / "out" / f).is_file(), f


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("cache", "--cache {}: no such directory"),
        ("model", "--model {}: no such checkpoint directory"),
        ("not-a-cache", "not a target-sft cache"),
        ("preset", "unknown preset 'nope'"),
    ],
)
def test_cli_plot_errors(tmp_path: Path, which: str, message: str) -> None:
    missing = tmp_path / "missing"
    (tmp_path / "empty").mkdir()
    (tmp_path / "m").mkdir()
    args = {"--cache": str(tmp_path / "empty"), "--model": str(tmp_path / "m")}
    extra: list[str] = []
    if which in ("cache", "model"):
        args[f"--{which}"] = str(missing)
    if which == "preset":
        extra = ["--presets", "nope"]
    argv = [str(SCRIPT), "plot", *sum(args.items(), ()), "--out", str(tmp_path / "o"), *extra]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert p.stderr.startswith("target-sft: error:")
    assert message.format(missing) in p.stderr
