"""A teacher cache and a reference cache built by the real builder from two tiny HF models over the
same rows: the reference cache says its role, the collator checks both caches against the student's
tokenizer, and a batch's ``reference_*`` tensors are the reference model's float64 log-probs placed
like the teacher's (padded and packed)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from batch_reference import assert_batches_equal, reference_batch
from build_helpers import make_samples, reference_logprobs, save_tiny_llama, save_tiny_tokenizer
from target_sft import (
    CacheInputError,
    CacheMismatchError,
    TargetSFTCollator,
    TeacherCache,
    TeacherCacheDataset,
    build_teacher_cache,
)

V, K, KR = 256, 8, 4

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    root = tmp_path_factory.mktemp("refbuild")
    samples = make_samples(14, seed=2, vocab=V)
    teacher = save_tiny_llama(root / "teacher", seed=0, vocab=V)
    reference = save_tiny_llama(root / "reference", seed=1, vocab=V)
    kw = {"codec": "exact", "progress": False, "batch_tokens": 256}
    build_teacher_cache(str(teacher), samples, root / "t", top_k=K, **kw)
    build_teacher_cache(str(reference), samples, root / "r", top_k=KR, role="reference", **kw)
    return root, samples


def test_the_reference_cache_records_its_role(d):
    root, _ = d
    assert TeacherCache(root / "t").role == "teacher"
    assert TeacherCache(root / "r").role == "reference"
    with pytest.raises(CacheInputError, match="role must be 'teacher' or 'reference'"):
        build_teacher_cache(str(root / "reference"), [], root / "x", role="base")
    # a resumed build keeps its role
    with pytest.raises(CacheMismatchError, match=r'role = "reference" vs "teacher"'):
        build_teacher_cache(
            str(root / "reference"), d[1], root / "r", top_k=KR, codec="exact", progress=False
        )


def test_a_reference_built_at_another_temperature_is_flagged_at_build_time(d, tmp_path):
    """Said before the model runs (a training run would refuse the cache in the reference slot,
    after the whole build)."""
    root, samples = d

    def build(out: str, **kw: object) -> TeacherCache:
        kw.update(top_k=KR, temperature=2.0, codec="exact", progress=False)
        build_teacher_cache(str(root / "reference"), samples, tmp_path / out, **kw)
        return TeacherCache(tmp_path / out)

    with pytest.warns(UserWarning, match=r"reference cache at temperature 2.*refuses it") as rec:
        hot = build("hot", role="reference")
    assert rec[0].filename == __file__
    assert hot.info.temperature == 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a teacher at T = 2 (distillation) is not flagged
        build("warm")


@pytest.mark.parametrize(
    "layout", [{}, {"packing": True, "max_length": 64}], ids=["padded", "packed"]
)
def test_reference_tensors_are_the_reference_models_logprobs(d, layout):
    root, samples = d
    teacher, reference = TeacherCache(root / "t"), TeacherCache(root / "r")
    tok = AutoTokenizer.from_pretrained(root / "teacher")
    collate = TargetSFTCollator(
        teacher, reference=reference, tokenizer=tok, return_tensors="np", **layout
    )
    ds = TeacherCacheDataset(teacher, reference=reference)
    order = [5, 0, 9, 2, 13, 7]
    b = collate(ds.__getitems__(order))
    recs = teacher.records_at(order)
    refs = [reference[r.key] for r in recs]
    want = reference_batch(recs, pad_token_id=tok.pad_token_id, references=refs, **layout)
    assert_batches_equal(b, want)
    # the reference model's float64 log-prob of each label, where sequence_ids put the sample
    model = AutoModelForCausalLM.from_pretrained(root / "reference", dtype=torch.float32).eval()
    by_key = {s["id"]: s for s in samples}
    for i, r in enumerate(recs):
        pos, lp = reference_logprobs(model, by_key[r.key])
        where = np.argwhere(b["sequence_ids"] == i)
        row, start = where[0]
        lab = np.asarray(by_key[r.key]["labels"])[pos]
        got = b["reference_label_logprobs"][row, start + pos]
        np.testing.assert_allclose(got, lp[np.arange(len(pos)), lab], atol=2e-5, rtol=0)
        assert (b["reference_ids"][row, start + pos, :KR] >= 0).all() or len(pos) == 0


def test_the_tokenizer_check_covers_the_reference_cache(d, tmp_path):
    root, samples = d
    save_tiny_tokenizer(tmp_path / "shuffled", V, shuffle_seed=1)
    other = save_tiny_llama(tmp_path / "other", seed=1, vocab=V, tokenizer=False)
    build_teacher_cache(
        str(other),
        samples,
        tmp_path / "r2",
        tokenizer=str(tmp_path / "shuffled"),
        top_k=KR,
        role="reference",
        codec="exact",
        progress=False,
    )
    tok = AutoTokenizer.from_pretrained(root / "teacher")
    with pytest.raises(CacheMismatchError, match=r"TargetSFTCollator\(reference=...\)"):
        TargetSFTCollator(root / "t", reference=tmp_path / "r2", tokenizer=tok)
