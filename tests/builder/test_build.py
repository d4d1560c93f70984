"""build_teacher_cache: a tiny random Llama saved with save_pretrained, its cache checked against a
float64 log-softmax of unbatched forward passes; padding, batching and dtype; resume after SIGKILL;
multi-rank builds under real torchrun processes (one node and two nodes on 127.0.0.1); the CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from build_helpers import (
    VOCAB,
    assert_records_equal,
    make_samples,
    reference_logprobs,
    save_tiny_llama,
    save_tiny_tokenizer,
    write_jsonl,
)
from target_sft import TeacherCache
from target_sft.build import build_teacher_cache, plan_batches
from target_sft.errors import BuildError, CacheInputError, CacheMismatchError

HERE = Path(__file__).resolve().parent  # tests/builder
TESTS = HERE.parent  # the shared helpers (build_helpers.py, ...)
ROOT = TESTS.parent
K = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("teacher") / "llama")


@pytest.fixture(scope="module")
def model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return make_samples(40, seed=1)


def build(teacher, data, out, **kw):
    kw.setdefault("top_k", K)
    kw.setdefault("codec", "exact")
    kw.setdefault("progress", False)
    return build_teacher_cache(teacher, data, out, **kw)


def check_against_reference(cache: TeacherCache, model, samples, atol: float) -> None:
    """Every row: the cached ids are a top-k of the reference distribution (up to ties within
    atol), the cached log-probs equal the reference at those ids, the label's log-prob and rank
    are the reference's."""
    for s in samples:
        rec = cache[s["id"]]
        pos, ref = reference_logprobs(model, s)
        np.testing.assert_array_equal(rec.supervised_positions, pos)
        assert rec.topk_ids.shape == (len(pos), K)
        if not len(pos):
            continue
        got = np.take_along_axis(ref, rec.topk_ids.astype(np.int64), 1)
        np.testing.assert_allclose(rec.topk_logprobs, got, atol=atol, rtol=0)
        assert np.all(np.diff(rec.topk_logprobs, axis=1) <= 0)  # sorted, best first
        outside = ref.copy()
        np.put_along_axis(outside, rec.topk_ids.astype(np.int64), -np.inf, 1)
        assert np.all(rec.topk_logprobs[:, -1] >= outside.max(1) - atol)
        lab = np.asarray(s["labels"])[pos]
        ref_lab = ref[np.arange(len(pos)), lab]
        np.testing.assert_allclose(rec.label_logprobs, ref_lab, atol=atol, rtol=0)
        lo = (ref > ref_lab[:, None] + atol).sum(1)
        hi = (ref > ref_lab[:, None] - atol).sum(1)
        assert np.all((lo <= rec.label_ranks) & (rec.label_ranks <= hi))


def test_cache_matches_float64_log_softmax(model_dir, model, samples, tmp_path):
    res = build(model_dir, samples, tmp_path / "c", batch_tokens=200, window=16)
    cache = TeacherCache(tmp_path / "c")
    assert res.info.complete and res.info.records == len(samples) == len(cache)
    assert res.stats.records_added == len(samples) and res.stats.batches > 3
    check_against_reference(cache, model, samples, atol=2e-5)
    teacher = cache.info.teacher
    assert teacher["name"] == str(model_dir) and teacher["dtype"] == "float32"
    assert len(teacher["config_hash"]) == 32 and len(teacher["weights_hash"]) == 32
    assert cache.info.tokenizer["size"] == VOCAB and len(cache.info.tokenizer["fingerprint"]) == 32
    assert cache.verify() == len(samples)


def test_temperature_scales_logits(model_dir, model, samples, tmp_path):
    build(model_dir, samples[:10], tmp_path / "c", temperature=2.0)
    cache = TeacherCache(tmp_path / "c")
    assert cache.info.temperature == 2.0
    s = samples[5]
    rec = cache[s["id"]]
    with torch.no_grad():
        logits = model(torch.tensor([s["input_ids"]])).logits[0].double() / 2.0
    ref = torch.log_softmax(logits, -1).numpy()[rec.supervised_positions - 1]
    got = np.take_along_axis(ref, rec.topk_ids.astype(np.int64), 1)
    np.testing.assert_allclose(rec.topk_logprobs, got, atol=2e-5, rtol=0)


def test_padding_side_and_batch_composition_do_not_change_records(model_dir, samples, tmp_path):
    build(model_dir, samples, tmp_path / "a", batch_tokens=4096, window=64)
    build(model_dir, samples, tmp_path / "b", batch_tokens=40, window=5, padding_side="left")
    a, b = TeacherCache(tmp_path / "a"), TeacherCache(tmp_path / "b")
    for s in samples:
        ra, rb = a[s["id"]], b[s["id"]]
        np.testing.assert_array_equal(ra.labels, rb.labels)
        np.testing.assert_allclose(ra.topk_logprobs, rb.topk_logprobs, atol=2e-5, rtol=0)
        np.testing.assert_allclose(ra.label_logprobs, rb.label_logprobs, atol=2e-5, rtol=0)
        # ids agree except where two log-probs are tied within float noise
        differ = ra.topk_ids != rb.topk_ids
        assert np.all(np.abs(ra.topk_logprobs[differ] - rb.topk_logprobs[differ]) < 2e-5)


def test_compact_cache_is_the_exact_cache_within_its_kl_budget(model_dir, samples, tmp_path):
    build(model_dir, samples, tmp_path / "x", codec="exact")
    build(model_dir, samples, tmp_path / "c", codec="compact", max_mean_kl=3e-5)
    x, c = TeacherCache(tmp_path / "x"), TeacherCache(tmp_path / "c")
    assert c.info.codec_params["max_mean_kl"] == 3e-5
    total, rows = 0.0, 0
    for s in samples:
        rx, rc = x[s["id"]], c[s["id"]]
        np.testing.assert_array_equal(rx.label_ranks, rc.label_ranks)
        # the compact codec keeps each row's (id, value) pairs, not their order
        ox, oc = np.argsort(rx.topk_ids, 1), np.argsort(rc.topk_ids, 1)
        np.testing.assert_array_equal(
            np.take_along_axis(rx.topk_ids, ox, 1), np.take_along_axis(rc.topk_ids, oc, 1)
        )
        a = np.take_along_axis(rx.topk_logprobs, ox, 1).astype(np.float64)
        b = np.take_along_axis(rc.topk_logprobs, oc, 1).astype(np.float64)
        a -= np.logaddexp.reduce(a, axis=1, keepdims=True)
        b -= np.logaddexp.reduce(b, axis=1, keepdims=True)
        with np.errstate(invalid="ignore"):  # -inf entries (no mass) are skipped
            terms = np.where(np.isfinite(a), np.exp(a) * (a - b), 0.0)
        kl = np.maximum(0.0, terms.sum(1))
        # docs/FORMAT.md §5.1: every record's mean codec KL per row is within the budget
        assert kl.size == 0 or kl.mean() <= 3e-5 * (1 + 1e-6), (s["id"], kl.mean())
        total, rows = total + kl.sum(), rows + kl.size
    assert c.info.stats.codec_kl_mean == pytest.approx(total / rows, rel=1e-6)
    # the budget is a setting: resuming with another one is refused, naming codec_params
    with pytest.raises(CacheMismatchError, match="codec_params"):
        build(model_dir, samples, tmp_path / "c", codec="compact", max_mean_kl=1e-4)


def test_bf16_teacher_on_cpu(model_dir, samples, tmp_path):
    from transformers import AutoModelForCausalLM

    build(model_dir, samples[:12], tmp_path / "c", dtype="bfloat16")
    cache = TeacherCache(tmp_path / "c")
    assert cache.info.teacher["dtype"] == "bfloat16"
    bf16 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    check_against_reference(cache, bf16, samples[2:12], atol=0.05)


def test_model_object_and_plain_callable_teacher(model, samples, tmp_path):
    build(model, samples[:10], tmp_path / "m")
    emb = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(3))

    def bigram(input_ids, attention_mask=None):
        return emb[input_ids]  # logits of a bigram teacher: [B, T, V]

    build(bigram, samples[:10], tmp_path / "f")
    # a callable cannot be fingerprinted: resuming with one is said out loud, not assumed
    with pytest.warns(UserWarning, match="nothing checks that it is the same teacher"):
        build(bigram, samples[:12], tmp_path / "f")
    f = TeacherCache(tmp_path / "f")
    assert f.info.teacher["kind"] == "callable" and f.info.tokenizer == {}
    for s in samples[2:10]:
        rec = f[s["id"]]
        ref = torch.log_softmax(emb.double(), -1).numpy()[
            np.asarray(s["input_ids"])[rec.supervised_positions - 1]
        ]
        np.testing.assert_allclose(
            rec.topk_logprobs, np.sort(ref, 1)[:, ::-1][:, :K], atol=1e-5, rtol=0
        )


def test_keys_default_to_the_index_and_labels_to_the_inputs(model_dir, tmp_path):
    data = [{"input_ids": list(range(10 + i, 20 + i))} for i in range(5)]
    build(model_dir, data, tmp_path / "c")
    cache = TeacherCache(tmp_path / "c")
    assert sorted(cache.keys()) == [0, 1, 2, 3, 4]
    rec = cache[3]
    np.testing.assert_array_equal(rec.labels, np.arange(13, 23))
    assert rec.n_supervised == 9


def test_plan_batches_respects_the_token_budget():
    lengths = [5, 30, 7, 7, 100, 3, 12, 30]
    plan = plan_batches(lengths, batch_tokens=40, max_batch_size=3)
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
    for b in plan:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 40
    assert plan == [[5, 0, 2], [3, 6], [1], [7], [4]]


@pytest.mark.parametrize(
    "item, message",
    [
        ({"input_ids": [5, 6], "labels": [5]}, "labels has 1 entries but input_ids has 2"),
        ({"input_ids": [5, -6]}, "negative id -6"),
        ({"input_ids": [5, 6], "labels": [5, -7]}, "labels[1] = -7"),
        ({"input_ids": [5, 6], "labels": [5, VOCAB + 5]}, f"label {VOCAB + 5} is outside"),
        ({"tokens": [5, 6]}, "has no 'input_ids'"),
        ({"input_ids": [5, 6], "id": 1.5}, "must be an int or a str"),
        ({"input_ids": []}, "input_ids is empty"),
        ({"input_ids": [[5, 6]]}, "must be a 1-D sequence"),
        (
            {"input_ids": [5, VOCAB + 3, 6]},
            f"input_ids[1] = {VOCAB + 3} is outside the teacher's vocabulary (its input "
            f"embedding has {VOCAB} rows)",
        ),
    ],
)
def test_bad_items_are_named(model, tmp_path, item, message):
    data = [{"input_ids": [8, 9, 10]}] * 2 + [item]
    data = [dict(d, id=i) if "id" not in d else d for i, d in enumerate(data)]
    with pytest.raises(CacheInputError) as e:
        build(model, data, tmp_path / "c")
    assert message in str(e.value) and "dataset item 2" in str(e.value)


def test_refuses_to_resume_with_another_teacher_or_setting(model_dir, samples, tmp_path):
    build(model_dir, samples[:6], tmp_path / "c")
    other = save_tiny_llama(tmp_path / "other", seed=7)
    with pytest.raises(CacheMismatchError, match="teacher"):
        build(other, samples, tmp_path / "c")
    with pytest.raises(CacheMismatchError, match="top_k"):
        build(model_dir, samples, tmp_path / "c", top_k=K + 1)
    with pytest.raises(CacheInputError, match="MASTER_ADDR is not set; launch with torchrun"):
        build(model_dir, samples, tmp_path / "c", rank=0, world_size=2)


def test_rerun_of_a_finished_build_adds_nothing(model_dir, samples, tmp_path):
    build(model_dir, samples, tmp_path / "c")
    before = (tmp_path / "c" / "manifest.json").read_text()
    res = build(model_dir, samples, tmp_path / "c")
    assert res.stats.records_added == 0 and res.stats.records_skipped == len(samples)
    assert res.stats.batches == 0  # no teacher pass at all
    assert (tmp_path / "c" / "manifest.json").read_text() == before
    more = make_samples(50, seed=9)[40:]
    for s in more:
        s["id"] = "new-" + s["id"]
    res = build(model_dir, samples + more, tmp_path / "c")
    assert res.stats.records_added == 10 and res.info.records == 50


def changed(samples: list[dict], which: dict[int, str]) -> list[dict]:
    """A copy of ``samples`` where sample i gets other tokens (``"tokens"``) or the same tokens
    with other labels (``"labels"``: one more position masked), under the same key."""
    out = [dict(s) for s in samples]
    for i, what in which.items():
        s = out[i]
        if what == "tokens":
            s["input_ids"] = [(t + 1) % VOCAB for t in s["input_ids"]]
            s["labels"] = [t if t == -100 else (t + 1) % VOCAB for t in s["labels"]]
        else:
            sup = [t for t, y in enumerate(s["labels"]) if y != -100 and t >= 1]
            assert sup, "pick a sample with a supervised position"
            s["labels"] = [-100 if t == sup[0] else y for t, y in enumerate(s["labels"])]
    return out


def test_changed_data_under_cached_keys_is_an_error(model_dir, samples, tmp_path):
    build(model_dir, samples, tmp_path / "c")
    before = sorted(f.name for f in (tmp_path / "c").iterdir())
    new = changed(samples, {5: "tokens", 9: "labels", 17: "tokens"})
    with pytest.raises(CacheMismatchError) as e:
        build(model_dir, new, tmp_path / "c")
    msg = str(e.value)
    assert "3 sample(s) of the dataset differ from the records cached under their keys" in msg
    assert "(2 with other token ids, 1 with other labels only)" in msg
    assert "key 's0005' (dataset item 5: other token ids)" in msg
    assert "key 's0009' (dataset item 9: the same token ids but other labels" in msg
    assert "key 's0017'" in msg
    assert "new directory" in msg and "rebuild_changed=True" in msg and "--rebuild-changed" in msg
    assert sorted(f.name for f in (tmp_path / "c").iterdir()) == before  # nothing touched
    # the same check on a resume of an unfinished build, before any teacher batch
    (tmp_path / "c" / "manifest.json").unlink()
    batches = []
    with pytest.raises(CacheMismatchError, match="2 sample"):
        build(model_dir, changed(samples, {2: "labels", 30: "tokens"}), tmp_path / "c",
              on_batch=batches.append)  # fmt: skip
    assert batches == []


def shard_files(path: Path) -> list[str]:
    return sorted(f.name for f in path.iterdir() if f.suffix == ".safetensors")


def test_rebuild_changed_replaces_exactly_the_changed_records(model_dir, samples, tmp_path):
    kw = {"shard_size": 1024, "codec": "compact"}  # several shards, rewritten by frame copy
    build(model_dir, samples, tmp_path / "c", **kw)
    new = changed(samples, {1: "tokens", 5: "tokens", 9: "labels", 33: "tokens"})
    res = build(model_dir, new, tmp_path / "c", rebuild_changed=True, **kw)
    assert res.stats.records_replaced == 4 and res.stats.records_added == 4
    assert res.stats.records_skipped == len(samples) - 4
    build(model_dir, new, tmp_path / "fresh", **kw)
    got, fresh = TeacherCache(tmp_path / "c"), TeacherCache(tmp_path / "fresh")
    assert got.verify() == len(samples)  # every key once, every checksum
    assert_records_equal(got, fresh)
    assert set(shard_files(tmp_path / "c")) == {s["file"] for s in got.info.shards}
    assert build(model_dir, new, tmp_path / "c", **kw).stats.records_added == 0  # agreement


REBUILD_SCRIPT = """
import json, sys
from target_sft.build import build_teacher_cache
data = json.load(open(sys.argv[2]))
build_teacher_cache(sys.argv[1], data, sys.argv[3], top_k=8, codec="compact", shard_size=1024,
                    progress=False, rebuild_changed=True)
print("DONE", flush=True)
"""


@pytest.mark.parametrize(
    "fault",
    ["rewrite:shard-committed@1", "rewrite:manifest-stored@1", "rewrite:shard-committed@3"],
)
def test_rebuild_killed_at_any_step_resumes_to_every_record_once(
    model_dir, samples, tmp_path, fault
):
    """kill -9 (SIGKILL from the writer's fault points) after a rewritten shard is committed but
    not listed, after the manifest lists it but the old shard still exists, and in the middle
    of several rewrites: the re-run ends with the records of a fresh build, each once."""
    build(model_dir, samples, tmp_path / "c", codec="compact", shard_size=1024)
    assert len(shard_files(tmp_path / "c")) > 4
    new = changed(samples, {1: "tokens", 9: "labels", 20: "tokens", 33: "tokens", 39: "labels"})
    (tmp_path / "new.json").write_text(json.dumps(new))
    run = [sys.executable, "-c", REBUILD_SCRIPT, str(model_dir), str(tmp_path / "new.json"),
           str(tmp_path / "c")]  # fmt: skip
    killed = subprocess.run(run, capture_output=True, text=True,
                            env=dict(os.environ, TARGET_SFT_FAULT=fault))  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "c" / "manifest.json").exists()  # no manifest naming a deleted shard
    done = subprocess.run(run, capture_output=True, text=True)
    assert done.returncode == 0 and "DONE" in done.stdout, done.stderr
    build(model_dir, new, tmp_path / "fresh", codec="compact", shard_size=1024)
    got = TeacherCache(tmp_path / "c")
    assert got.verify() == len(samples)  # no key twice (the key map refuses duplicates)
    assert_records_equal(got, TeacherCache(tmp_path / "fresh"))
    assert set(shard_files(tmp_path / "c")) == {s["file"] for s in got.info.shards}


def test_resume_accepts_the_same_teacher_under_any_path_and_refuses_other_weights(
    samples, tmp_path, monkeypatch
):
    from transformers import AutoModelForCausalLM

    base = tmp_path / "w"
    save_tiny_llama(base / "t")
    (base / "link").symlink_to(base / "t")
    shutil.copytree(base / "t", tmp_path / "mnt" / "t")  # the same files on another mount
    out = tmp_path / "c"
    monkeypatch.chdir(base)
    assert build("./t", samples[:10], out).stats.records_added == 10
    assert build("t", samples[:20], out).stats.records_added == 10
    monkeypatch.chdir(tmp_path)
    assert build(str(base / "t"), samples[:25], out).stats.records_added == 5
    assert build(base / "link", samples[:30], out).stats.records_added == 5
    res = build(tmp_path / "mnt" / "t", samples, out)
    assert res.stats.records_added == 10 and res.info.records == len(samples)
    # one weight changed (not one the old 64-per-tensor sample looked at): another teacher
    m = AutoModelForCausalLM.from_pretrained(base / "t", dtype=torch.float32)
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight.view(-1)[1] += 0.25
    m.save_pretrained(tmp_path / "other")
    save_tiny_tokenizer(tmp_path / "other")
    with pytest.raises(CacheMismatchError, match=r"teacher\.weights_hash = "):
        build(tmp_path / "other", samples, out)
    # the same weights in another dtype are another teacher too
    with pytest.raises(CacheMismatchError, match=r"teacher\.dtype = "):
        build(base / "t", samples, out, dtype="bfloat16")


def test_first_batches_without_supervision_and_all_unsupervised_data(model_dir, tmp_path):
    # the shortest samples (planned first: two batches) have no supervised position
    data = [{"id": i, "input_ids": [7, 8, 9], "labels": [-100] * 3} for i in range(6)]
    data += [{"id": 10 + i, "input_ids": list(range(10, 30 + i))} for i in range(4)]
    res = build(model_dir, data, tmp_path / "c", batch_tokens=9)
    cache = TeacherCache(tmp_path / "c")
    assert res.info.records == 10 and cache.info.vocab_size == VOCAB
    assert cache[0].n_supervised == 0 and cache[12].n_supervised == 21
    with pytest.raises(CacheInputError, match="none of the 6 samples has a supervised position"):
        build(model_dir, data[:6], tmp_path / "d")
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


def test_one_shot_iterators_and_iterables_build_the_same_cache(model_dir, samples, tmp_path):
    class Iterable:  # re-iterable, no length
        def __iter__(self):
            return iter(samples[:12])

    build(model_dir, samples[:12], tmp_path / "a", batch_tokens=100, window=5)
    build(model_dir, (s for s in samples[:12]), tmp_path / "b", batch_tokens=100, window=5)
    build(model_dir, Iterable(), tmp_path / "c", batch_tokens=100, window=5)
    for d in ("b", "c"):
        assert_records_equal(TeacherCache(tmp_path / d), TeacherCache(tmp_path / "a"))


def test_plan_deals_batches_to_every_rank():
    from target_sft.builder.plan import plan_ranks as _plan

    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 40, 600)
    for bt, worlds in ((16_384, (2, 3)), (2048, (2, 3, 8))):  # 3 and 8 batches
        one = _plan(lengths, 4096, bt, 256, 1)[0]
        assert len(one) == (3 if bt == 16_384 else 8)
        for world in worlds:
            plan = _plan(lengths, 4096, bt, 256, world)
            assert plan == _plan(lengths, 4096, bt, 256, world)  # deterministic
            assert all(plan)  # no idle rank
            # the same batches as on one rank (records computed in the same batch)
            assert sorted(b for p in plan for b in p) == sorted(one)
    plan = _plan(lengths, 64, 512, 256, 4)
    padded = [sum(len(b) * max(lengths[b]) for b in p) for p in plan]
    assert max(padded) - min(padded) <= max(len(b) * max(lengths[b]) for p in plan for b in p)
    # tiny datasets: fewer batches than ranks are split so that every rank gets a sample
    for n in (2, 3, 5):
        plan = _plan(np.full(n, 5), 4096, 16_384, 256, n)
        assert sorted(i for p in plan for b in p for i in b) == list(range(n))
        assert all(len(p) == 1 and len(p[0]) == 1 for p in plan)
    assert _plan(np.full(1, 5), 4096, 16_384, 256, 2) == [[[0]], []]


KILL_SCRIPT = """
import json, sys
from target_sft.build import build_teacher_cache
data = json.load(open(sys.argv[2]))
def on_batch(stats):
    print("BATCH", stats.batches, flush=True)
build_teacher_cache(sys.argv[1], data, sys.argv[3], top_k=8, codec="compact", window=16,
                    batch_tokens=96, shard_size=2048, progress=False, on_batch=on_batch)
print("DONE", flush=True)
"""


def test_resume_after_sigkill_equals_an_uninterrupted_build(model_dir, tmp_path):
    samples = make_samples(120, seed=4)
    (tmp_path / "data.json").write_text(json.dumps(samples))
    run = [sys.executable, "-c", KILL_SCRIPT, str(model_dir), str(tmp_path / "data.json")]
    ref = subprocess.run([*run, str(tmp_path / "ref")], capture_output=True, text=True)
    assert ref.returncode == 0 and "DONE" in ref.stdout, ref.stderr
    n_batches = ref.stdout.count("BATCH")
    assert n_batches > 10
    for kill_after in (1, n_batches // 2):
        out = tmp_path / f"killed{kill_after}"
        child = subprocess.Popen([*run, str(out)], stdout=subprocess.PIPE, text=True)
        for line in child.stdout:
            if line.startswith("BATCH") and int(line.split()[1]) >= kill_after:
                child.send_signal(signal.SIGKILL)
                break
        child.wait()
        assert child.returncode == -signal.SIGKILL
        assert not (out / "manifest.json").exists()  # the merged manifest comes only at the end
        done = subprocess.run([*run, str(out)], capture_output=True, text=True)
        assert done.returncode == 0 and "DONE" in done.stdout, done.stderr
        assert_records_equal(TeacherCache(out), TeacherCache(tmp_path / "ref"))
        assert TeacherCache(out).verify() == len(samples)
    # a kill halfway must have left committed shards that the resumed run kept
    part = json.loads((out / "manifest.rank00000-of-00001.json").read_text())
    assert len(part["shards"]) > 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(
    *args: str, nproc: int = 2, extra: tuple[str, ...] = (), cli: bool = False
) -> subprocess.Popen:
    """torchrun of tests/builder/build_worker.py (the Python API), or of ``target-sft cache build``
    through ``--no-python`` when ``cli``."""
    # this checkout's package first (not an installed one), and the helpers
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), str(TESTS)])
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    target = ["--no-python", "target-sft"] if cli else [str(HERE / "build_worker.py")]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        *extra,
        *target,
        *args,
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def single_rank_reference(model_dir: Path, samples: list[dict], out: Path) -> TeacherCache:
    torch.set_num_threads(1)  # the torchrun workers run one thread each
    try:
        build(model_dir, samples, out, window=8, batch_tokens=256)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    return TeacherCache(out)


def test_torchrun_two_ranks_build_the_same_cache(model_dir, samples, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", samples)
    p = torchrun(
        "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "c"),
        extra=("--master-port", str(free_port())),
    )  # fmt: skip
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    # the two ranks share torchrun's stdout: their lines may arrive interleaved with other output
    added = {int(r): int(n) for r, n in re.findall(r"RANK (\d+) ADDED (\d+)", out)}
    assert sorted(added) == [0, 1], out
    assert sum(added.values()) == len(samples) and min(added.values()) > 0
    files = sorted(f.name for f in (tmp_path / "c").iterdir())
    assert "manifest.rank00000-of-00002.json" in files
    assert "manifest.rank00001-of-00002.json" in files
    cache = TeacherCache(tmp_path / "c")
    assert cache.info.complete and len(cache) == len(samples)
    # the plan does not depend on the world size: the same bits as a single-rank build
    assert_records_equal(cache, single_rank_reference(model_dir, samples, tmp_path / "ref"))
    with pytest.raises(CacheInputError, match="started with world_size = 2; resume it with 2"):
        build(model_dir, samples, tmp_path / "c")


def test_torchrun_ranks_given_different_data_are_refused(model_dir, samples, tmp_path):
    """Each rank plans the whole dataset: a rank that reads other data (here one sample less) is
    an error on every rank before the teacher runs, not a cache with samples missing."""
    data = write_jsonl(tmp_path / "d.jsonl", samples)
    p = torchrun(
        "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "c"),
        "--drop-last-on-rank", "1", extra=("--master-port", str(free_port())),
    )  # fmt: skip
    _, err = p.communicate(timeout=300)
    assert p.returncode != 0
    assert err.count("the ranks read different datasets") >= 2, err
    assert f"rank 0: {len(samples):,} samples" in err and f"rank 1: {len(samples) - 1:,}" in err
    assert not list((tmp_path / "c").glob("*.safetensors"))  # no teacher batch was written


def test_torchrun_600_samples_in_one_window_keep_both_ranks_busy(model_dir, tmp_path):
    """The issue's case: 600 samples, the default window (4,096) and batch size: one window,
    whose batches are dealt to both ranks; the records are those of a one-rank build."""
    samples = make_samples(600, seed=6)
    data = write_jsonl(tmp_path / "d.jsonl", samples)
    p = torchrun(
        "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "c"),
        "--window", "4096", "--batch-tokens", "16384",
        extra=("--master-port", str(free_port())),
    )  # fmt: skip
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    added = {int(r): int(n) for r, n in re.findall(r"RANK (\d+) ADDED (\d+)", out)}
    assert sorted(added) == [0, 1] and min(added.values()) > 0, out
    assert sum(added.values()) == len(samples)
    torch.set_num_threads(1)
    try:
        build(model_dir, samples, tmp_path / "ref")
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    assert_records_equal(TeacherCache(tmp_path / "c"), TeacherCache(tmp_path / "ref"))
    # changed samples held by both ranks' parts: refused on every rank, then rebuilt
    new = changed(samples, {i: "tokens" for i in (3, 100, 250, 420, 599)})
    args = ("--model", str(model_dir), "--data", str(write_jsonl(tmp_path / "n.jsonl", new)),
            "--out", str(tmp_path / "c"), "--window", "4096", "--batch-tokens", "16384")  # fmt: skip
    p = torchrun(*args, extra=("--master-port", str(free_port())))
    _, err = p.communicate(timeout=300)
    assert p.returncode != 0 and err.count("5 sample(s) of the dataset differ") >= 2, err
    p = torchrun(*args, "--rebuild-changed", extra=("--master-port", str(free_port())))
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    added = {int(r): int(n) for r, n in re.findall(r"RANK (\d+) ADDED (\d+)", out)}
    assert sum(added.values()) == 5
    cache = TeacherCache(tmp_path / "c")
    assert cache.verify() == len(samples)
    for i in (3, 100, 250, 420, 599):
        assert cache[new[i]["id"]].input_ids.tolist() == new[i]["input_ids"]


def test_torchrun_two_nodes_on_localhost(model_dir, samples, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", samples)
    port = str(free_port())
    # the CLI under torchrun, as the README shows it, with the settings of build_worker.py
    args = ("cache", "build", "--teacher", str(model_dir), "--data", str(data),
            "--out", str(tmp_path / "c"), "--top-k", str(K), "--codec", "exact",
            "--window", "8", "--batch-tokens", "256", "-q")  # fmt: skip
    nodes = [
        torchrun(
            *args,
            nproc=1,
            cli=True,
            extra=(
                "--nnodes=2",
                f"--node-rank={n}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
            ),
        )
        for n in (0, 1)
    ]
    for p in nodes:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    cache = TeacherCache(tmp_path / "c")
    assert cache.info.complete and len(cache) == len(samples)
    assert_records_equal(cache, single_rank_reference(model_dir, samples, tmp_path / "ref"))


def test_a_failing_rank_fails_the_build_and_a_rerun_resumes(model_dir, samples, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", samples)
    args = ("--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "c"))
    p = torchrun(*args, "--fail-rank", "1", extra=("--master-port", str(free_port())))
    _, err = p.communicate(timeout=300)
    assert p.returncode != 0
    assert "rank 1: RuntimeError: injected failure after batch 2" in err
    assert BuildError.__name__ in err  # rank 0 raised too, naming the failed rank
    assert not (tmp_path / "c" / "manifest.json").exists()
    kept = json.loads((tmp_path / "c" / "manifest.rank00001-of-00002.json").read_text())
    assert kept["num_records"] > 0 and not kept["complete"]
    p = torchrun(*args, extra=("--master-port", str(free_port())))
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    cache = TeacherCache(tmp_path / "c")
    assert cache.info.complete and len(cache) == len(samples)
    assert_records_equal(cache, single_rank_reference(model_dir, samples, tmp_path / "ref"))


def cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("target-sft")
    return subprocess.run([str(exe), *args], capture_output=True, text=True)


def test_cli_build_from_token_ids(model_dir, model, samples, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", samples)
    r = cli("cache", "build", "--teacher", str(model_dir), "--data", str(data),
            "--out", str(tmp_path / "c"), "--top-k", str(K), "--codec", "exact", "-q")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"OK: {tmp_path / 'c'}: {len(samples)} records" in r.stdout
    check_against_reference(TeacherCache(tmp_path / "c"), model, samples[:8], atol=2e-5)
    # the compact codec's budget reaches the manifest; without the flag, the default 1e-4
    for flag, budget in ((("--max-mean-kl", "2e-5"), 2e-5), ((), 1e-4)):
        out = tmp_path / f"k{budget}"
        r = cli("cache", "build", "--teacher", str(model_dir), "--data", str(data),
                "--out", str(out), "--top-k", str(K), "-q", *flag)  # fmt: skip
        assert r.returncode == 0, r.stderr
        info = TeacherCache(out).info
        assert info.codec_params["max_mean_kl"] == budget
        assert info.stats.codec_kl_mean <= budget


def test_cli_build_from_prompt_response_text_with_the_chat_template(model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [
        {"prompt": "w10 w11 w12", "response": "w20 w21"},
        {"id": "x", "prompt": "w13", "response": "w22 w23 w24"},
    ]
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    r = cli("cache", "build", "--teacher", str(model_dir), "--data", str(data),
            "--out", str(tmp_path / "c"), "--top-k", str(K), "-q")  # fmt: skip
    assert r.returncode == 0, r.stderr
    cache = TeacherCache(tmp_path / "c")
    rec = cache["x"]
    want = tok.apply_chat_template(
        [{"role": "user", "content": "w13"}, {"role": "assistant", "content": "w22 w23 w24"}]
    )
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    assert rec.input_ids.tolist() == want
    assert tok.convert_ids_to_tokens(rec.labels[rec.labels >= 0].tolist()) == [
        "w22", "w23", "w24", "</s>",
    ]  # fmt: skip
    assert sorted(cache.keys(), key=str) == [0, "x"]


def test_cli_build_reports_bad_lines(model_dir, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"input_ids": [5, 6]}\n{"tokens": [5, 6]}\n')
    r = cli("cache", "build", "--teacher", str(model_dir), "--data", str(tmp_path / "bad.jsonl"),
            "--out", str(tmp_path / "c"), "-q")  # fmt: skip
    assert r.returncode == 1
    assert "bad.jsonl:2 (sample 1) has no 'input_ids', 'messages'" in r.stderr


def test_cli_rebuild_changed(model_dir, samples, tmp_path):
    args = ("cache", "build", "--teacher", str(model_dir), "--out", str(tmp_path / "c"),
            "--top-k", str(K), "-q")  # fmt: skip
    build(model_dir, samples[:12], tmp_path / "c", codec="compact")  # the CLI's defaults
    data = write_jsonl(tmp_path / "b.jsonl", changed(samples[:12], {4: "tokens"}))
    r = cli(*args, "--data", str(data))
    assert r.returncode == 1
    assert "1 sample(s) of the dataset differ" in r.stderr and "--rebuild-changed" in r.stderr
    r = cli(*args, "--data", str(data), "--rebuild-changed")
    assert r.returncode == 0, r.stderr
    assert TeacherCache(tmp_path / "c")["s0004"].input_ids.tolist() == [
        (t + 1) % VOCAB for t in samples[4]["input_ids"]
    ]
