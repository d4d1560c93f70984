"""Tokenizer and vocabulary checks at training and plotting time (target_sft.fingerprint).

Real parts: word-level tokenizers trained here with the `tokenizers` package (the build_helpers
one, a variant with another chat template and one whose words have other ids), a cache built by
`build_teacher_cache` from a tiny random Llama (its manifest records the tokenizer fingerprint),
tiny students saved with `save_pretrained`. A different tokenizer is an error in the collator, the
trainer, the report and `target-sft plot`; the same tokenizer from another path passes;
`allow_tokenizer_mismatch=True` warns; a student vocabulary too small for the ids is an error
before the forward pass."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from batch_reference import make_sample
from build_helpers import make_samples, save_tiny_llama, save_tiny_tokenizer
from target_sft import (
    CacheMismatchError,
    CacheWriter,
    StreamingTeacherDataset,
    TargetSFTCollator,
    TeacherCache,
    TeacherCacheDataset,
    build_teacher_cache,
)
from target_sft import report as R
from target_sft.build import tokenizer_fingerprint
from target_sft.hf import TargetSFTTrainer, compute_target_sft_loss

V = 256
SCRIPT = Path(sys.executable).parent / "target-sft"
OTHER_TEMPLATE = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + ' ' }}{% endfor %}"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    """Tokenizer and model directories, and a cache built from the teacher (tokenizer "a")."""
    root = tmp_path_factory.mktemp("checks")
    teacher = save_tiny_llama(root / "teacher", vocab=V)  # with tokenizer "a"
    save_tiny_tokenizer(root / "a", V)
    AutoTokenizer.from_pretrained(root / "a").save_pretrained(root / "a_copy")
    save_tiny_tokenizer(root / "template", V, chat_template=OTHER_TEMPLATE)
    save_tiny_tokenizer(root / "shuffled", V, shuffle_seed=1)
    cache = root / "cache"
    build_teacher_cache(str(teacher), make_samples(12, vocab=V), cache, top_k=8, progress=False)
    return root


def tok(d, name):
    return AutoTokenizer.from_pretrained(d / name)


def items(cache, n=6):
    ds = TeacherCacheDataset(cache)
    return [ds[i] for i in range(n)]


def targs(tmp_path):
    return TrainingArguments(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, per_device_train_batch_size=4,
    )  # fmt: skip


# ---------------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_content_not_path_or_call_state(d):
    a, copy = tok(d, "a"), tok(d, "a_copy")
    fa = tokenizer_fingerprint(a)
    assert fa["name"] != tokenizer_fingerprint(copy)["name"]
    assert tokenizer_fingerprint(copy)["fingerprint"] == fa["fingerprint"]
    assert TeacherCache(d / "cache").info.tokenizer["fingerprint"] == fa["fingerprint"]
    # a call with truncation/padding leaves them set in the backend: not part of the tokenizer
    a(["w10 w11 w12", "w13"], padding=True, truncation=True, max_length=2)
    assert tokenizer_fingerprint(a)["fingerprint"] == fa["fingerprint"]
    a.pad_token = a.eos_token  # which existing token pads changes no id
    assert tokenizer_fingerprint(a)["fingerprint"] == fa["fingerprint"]
    for other in ("template", "shuffled"):
        fo = tokenizer_fingerprint(tok(d, other))
        assert fo["size"] == fa["size"] and fo["fingerprint"] != fa["fingerprint"], other
    assert tok(d, "shuffled")("w10")["input_ids"] != a("w10")["input_ids"]


# ---------------------------------------------------------------------------------- collator


@pytest.mark.parametrize("other", ["template", "shuffled"])
def test_collator_refuses_another_tokenizer(d, other):
    cache = TeacherCache(d / "cache")
    want = cache.info.tokenizer["fingerprint"]
    got = tokenizer_fingerprint(tok(d, other))["fingerprint"]
    # with the cache: at construction
    with pytest.raises(CacheMismatchError) as e:
        TargetSFTCollator(cache, tokenizer=tok(d, other))
    msg = str(e.value)
    for part in (want, got, str(d / other), str(d / "cache"), "allow_tokenizer_mismatch=True"):
        assert part in msg, part
    # items carrying their cache: at the first batch
    collate = TargetSFTCollator(tokenizer=tok(d, other))
    with pytest.raises(CacheMismatchError, match=r"batch item 0: tokenizer mismatch"):
        collate(items(cache))


def test_collator_accepts_the_same_tokenizer_from_another_path(d):
    cache = TeacherCache(d / "cache")
    plain = TargetSFTCollator(pad_token_id=0)(items(cache))
    for t in (tok(d, "a_copy"), str(d / "a_copy")):
        collate = TargetSFTCollator(cache, tokenizer=t)  # pad id from the tokenizer
        assert collate.pad_token_id == 0
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            batch = collate(items(cache))
        assert sorted(batch) == sorted(plain)
        for k, v in plain.items():
            torch.testing.assert_close(batch[k], v, rtol=0, atol=0)


def test_allow_tokenizer_mismatch_warns(d):
    cache = TeacherCache(d / "cache")
    with pytest.warns(UserWarning, match=r"tokenizer mismatch.*allow_tokenizer_mismatch=True"):
        collate = TargetSFTCollator(
            cache, tokenizer=tok(d, "shuffled"), allow_tokenizer_mismatch=True
        )
    batch = collate(items(cache))
    assert batch["input_ids"].shape[0] == 6


def test_collator_check_in_dataloader_workers(d):
    """The collator pickles into workers (fingerprints only) and checks there; the error reaches
    the main process with its type."""
    cache = TeacherCache(d / "cache")
    loader = torch.utils.data.DataLoader(
        StreamingTeacherDataset(cache.path, batch_size=4),
        batch_size=4,
        num_workers=1,
        collate_fn=TargetSFTCollator(tokenizer=tok(d, "template")),
    )
    it = iter(loader)
    try:
        with pytest.raises(CacheMismatchError, match="tokenizer mismatch"):
            next(it)
    finally:
        it._shutdown_workers()  # now, not when a later test collects the iterator


def test_cache_without_fingerprint_warns_once(tmp_path, d):
    rng = np.random.default_rng(0)
    with CacheWriter(tmp_path / "c", top_k=8, vocab_size=V) as w:  # no tokenizer recorded
        for i in range(4):
            w.add(**make_sample(i, rng, t=10, k=8, vocab=V))
    cache = TeacherCache(tmp_path / "c")
    with pytest.warns(UserWarning, match="records no tokenizer fingerprint") as rec:
        collate = TargetSFTCollator(cache, tokenizer=tok(d, "a"))
        collate(items(cache, 4))
        TargetSFTCollator(tokenizer=tok(d, "a"))(items(cache, 4))
    assert len([w for w in rec if "tokenizer fingerprint" in str(w.message)]) == 1


def test_cache_with_a_version_1_fingerprint_is_still_checked(tmp_path, d):
    """Caches written before fingerprint_version 2 recorded the version-1 hash (which still
    covered the pad token and the backend's truncation/padding state)."""
    from target_sft.fingerprint import _fingerprint_hash

    entry = {
        "name": "old",
        "class": "X",
        "size": V,
        "fingerprint": _fingerprint_hash(tok(d, "a"), 1),
    }
    assert entry["fingerprint"] != tokenizer_fingerprint(tok(d, "a"))["fingerprint"]
    rng = np.random.default_rng(0)
    with CacheWriter(tmp_path / "c", top_k=8, vocab_size=V, tokenizer=entry) as w:
        w.add(**make_sample(0, rng, t=10, k=8, vocab=V))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TargetSFTCollator(tmp_path / "c", tokenizer=tok(d, "a_copy"))
    with pytest.raises(CacheMismatchError, match=entry["fingerprint"]):
        TargetSFTCollator(tmp_path / "c", tokenizer=tok(d, "template"))


# ---------------------------------------------------------------------------------- trainer


def test_trainer_refuses_another_tokenizer(d, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(d / "teacher")
    train = TeacherCacheDataset(d / "cache")
    with pytest.raises(CacheMismatchError, match=r"train_dataset: tokenizer mismatch"):
        TargetSFTTrainer(
            model, targs(tmp_path), train_dataset=train, processing_class=tok(d, "template")
        )
    stream = StreamingTeacherDataset(d / "cache", batch_size=4)
    with pytest.raises(CacheMismatchError, match=r"eval_dataset: tokenizer mismatch"):
        TargetSFTTrainer(
            model, targs(tmp_path), eval_dataset=stream, processing_class=tok(d, "shuffled")
        )
    # dict items looked up in the collator's cache
    keys = [{"key": k} for k in TeacherCache(d / "cache").keys()]
    with pytest.raises(CacheMismatchError, match=r"data_collator: tokenizer mismatch"):
        TargetSFTTrainer(
            model,
            targs(tmp_path),
            train_dataset=keys,
            data_collator=TargetSFTCollator(d / "cache", pad_token_id=0),
            processing_class=tok(d, "shuffled"),
        )
    # the same tokenizer from another path: fine, and the default collator checks later batches
    trainer = TargetSFTTrainer(
        model, targs(tmp_path), train_dataset=train, processing_class=tok(d, "a_copy")
    )
    assert trainer.data_collator.tokenizer_check is not None
    with pytest.warns(UserWarning, match="tokenizer mismatch"):
        TargetSFTTrainer(
            model,
            targs(tmp_path),
            train_dataset=train,
            processing_class=tok(d, "template"),
            allow_tokenizer_mismatch=True,
        )


# ---------------------------------------------------------------------------------- vocabulary


def forward_counter(model):
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_student_vocab_smaller_than_the_ids(d, tmp_path):
    small = AutoModelForCausalLM.from_pretrained(save_tiny_llama(tmp_path / "s", vocab=200))
    cache = TeacherCache(d / "cache")
    with pytest.raises(
        CacheMismatchError,
        match=r"student's vocabulary \(200 embedding rows, 200 lm_head outputs; "
        r"config.vocab_size 200\) is smaller than .*\(its tokenizer has 256 tokens\)",
    ):
        TargetSFTTrainer(small, targs(tmp_path), train_dataset=TeacherCacheDataset(cache))
    # a custom loop: refused before the forward pass (it was an IndexError in the embedding)
    batch = TargetSFTCollator(pad_token_id=0)(items(cache, 12))
    calls = forward_counter(small)
    with pytest.raises(CacheMismatchError) as e:
        compute_target_sft_loss(small, batch)
    name, idx, value = _first_bad(batch, 200)
    assert f"{name}[{idx[0]}, {idx[1]}] = {value} is outside the student's vocabulary" in str(
        e.value
    )
    assert "ids must be < 200" in str(e.value) and not calls
    with pytest.warns(UserWarning, match="smaller than the ids the cache"):
        TargetSFTTrainer(
            small,
            targs(tmp_path),
            train_dataset=TeacherCacheDataset(cache),
            allow_tokenizer_mismatch=True,
        )


def _first_bad(batch, vocab):
    for name in ("input_ids", "labels", "teacher_ids"):
        a = batch[name].numpy()
        if (a >= vocab).any():
            idx = np.unravel_index(int(np.argmax(a.reshape(-1) >= vocab)), a.shape)
            return name, idx, int(a[idx])
    raise AssertionError("no id >= vocab")


def test_teacher_id_beyond_the_student(tmp_path, d):
    """Token ids fit the student, a teacher top-k id does not: refused before the forward (it
    was a ValueError from the loss after the forward)."""
    rng = np.random.default_rng(3)
    while True:
        s = make_sample("x", rng, t=6, k=8, vocab=V)
        ok = s["input_ids"].max() < 200 and s["labels"].max() < 200
        if ok and s["topk_ids"].max() >= 200:
            break
    with CacheWriter(tmp_path / "c", top_k=8, vocab_size=V) as w:
        w.add(**s)
    small = AutoModelForCausalLM.from_pretrained(save_tiny_llama(tmp_path / "s", vocab=200))
    batch = TargetSFTCollator(pad_token_id=0)(items(TeacherCache(tmp_path / "c"), 1))
    calls = forward_counter(small)
    name, idx, value = _first_bad(batch, 200)
    assert name == "teacher_ids"
    with pytest.raises(
        CacheMismatchError,
        match=rf"teacher_ids\[0, {idx[1]}, {idx[2]}\] = {value} is outside the student's",
    ):
        compute_target_sft_loss(small, batch)
    assert not calls


def test_larger_student_vocab_is_fine(d, tmp_path):
    """Qwen's case: more embedding rows (here 300) than the tokenizer has tokens (256)."""
    big = AutoModelForCausalLM.from_pretrained(save_tiny_llama(tmp_path / "b", vocab=300))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TargetSFTTrainer(
            big,
            targs(tmp_path),
            train_dataset=TeacherCacheDataset(d / "cache"),
            processing_class=tok(d, "a"),
        )
    batch = TargetSFTCollator(pad_token_id=0)(items(TeacherCache(d / "cache")))
    assert torch.isfinite(compute_target_sft_loss(big, batch))


def test_student_between_tokenizer_and_teacher_vocab_warns(tmp_path, d):
    """A cache whose teacher has more logits (300) than its tokenizer has tokens (256): a
    256-row student takes every token id; a teacher id >= 256 would be refused per batch."""
    rng = np.random.default_rng(5)
    with CacheWriter(
        tmp_path / "c", top_k=8, vocab_size=300, tokenizer=tokenizer_fingerprint(tok(d, "a"))
    ) as w:
        w.add(**make_sample("x", rng, t=8, k=8, vocab=V))
    student = AutoModelForCausalLM.from_pretrained(d / "teacher")
    with pytest.warns(UserWarning, match=r"smaller than the teacher's 300 logits"):
        TargetSFTTrainer(
            student,
            targs(tmp_path),
            train_dataset=TeacherCacheDataset(tmp_path / "c"),
            processing_class=tok(d, "a"),
        )


# ---------------------------------------------------------------------------------- report


def test_report_checks_tokenizer_and_vocab(d, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(d / "teacher")
    with pytest.raises(CacheMismatchError, match="write_report: tokenizer mismatch"):
        R.write_report(tmp_path / "r", cache=d / "cache", model=model, tokenizer=tok(d, "shuffled"))
    assert not (tmp_path / "r" / "figure3_induced_targets.png").exists()  # nothing computed
    with pytest.raises(CacheMismatchError, match="rescue_filter_html: tokenizer mismatch"):
        R.rescue_filter_html(tmp_path / "x.html", d / "cache", model, tok(d, "template"))
    small = AutoModelForCausalLM.from_pretrained(save_tiny_llama(tmp_path / "s", vocab=200))
    with pytest.raises(CacheMismatchError, match=r"observed_token_stats: the student's vocab"):
        R.observed_token_stats(d / "cache", small, max_records=3)


def test_cli_plot_refuses_another_tokenizer(d, tmp_path):
    student = save_tiny_llama(tmp_path / "student", vocab=V, tokenizer=False)
    save_tiny_tokenizer(student, V, chat_template=OTHER_TEMPLATE)
    argv = [
        str(SCRIPT), "plot", "--cache", str(d / "cache"), "--model", str(student),
        "--out", str(tmp_path / "o"), "--records", "3", "--presets", "sft", "-q",
    ]  # fmt: skip
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr
    assert p.stderr.startswith("target-sft: error: target-sft plot: tokenizer mismatch")
    assert "--allow-tokenizer-mismatch" in p.stderr
    p = subprocess.run(
        [*argv, "--allow-tokenizer-mismatch"], capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr
    assert "tokenizer mismatch" in p.stderr and "OK: report in" in p.stdout
