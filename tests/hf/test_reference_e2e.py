"""Issue 14's end-to-end check: every Q-target method that needs a reference or an old policy,
trained from caches through the collator and ``TargetSFTTrainer``, step by step against float64
from the uncached models.

A teacher cache and a reference cache are built with the real builder from two tiny Llamas (the
second with ``role="reference"``); the student (a third) trains a few steps of SFT+KL, ASFT,
iw-SFT (padded and packed rows) and Proximal SFT (two epochs, so that the second epoch's
``old_logprobs`` come from the trainer's store). Every step's loss and every parameter's gradient
are compared with the method's formula written out here in float64, on log-probs computed by
running the uncached reference model and the student (at that step's parameters) on each sample
alone: the reference's top-k + label support (as the builder and ``label_in_support`` make it),
its label log-probs, and π_old = the student at the sample's previous visit (the first visit:
the student itself, r = 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoTokenizer, LlamaForCausalLM

from build_helpers import cpu_training_args, make_samples, save_tiny_model, save_tiny_tokenizer
from target_sft import (
    TargetSFTCollator,
    TeacherCache,
    TeacherCacheDataset,
    build_teacher_cache,
)
from target_sft.hf import TargetSFTTrainer

V, K, N = 96, 6, 6
LAM, EPS = 0.3, 0.2
MODEL = dict(initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(path, seed):
    save_tiny_model(path, "llama", seed=seed, vocab=V, **MODEL)
    save_tiny_tokenizer(path, V)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    teacher, reference, student = (tiny(root / n, s) for n, s in (("t", 1), ("r", 2), ("s", 3)))
    samples = make_samples(N, seed=5, vocab=V, max_len=16)
    opts = dict(top_k=K, codec="exact", progress=False)
    build_teacher_cache(str(teacher), samples, root / "tc", **opts)
    build_teacher_cache(str(reference), samples, root / "rc", role="reference", **opts)
    return {
        "teacher": TeacherCache(root / "tc"),
        "reference": TeacherCache(root / "rc"),
        "reference_dir": reference,
        "student_dir": student,
        "samples": {s["id"]: s for s in samples},
        "tok": AutoTokenizer.from_pretrained(teacher),
    }


def float64_logprobs(model, ids):
    """log-softmax [T, V] of ``model`` on one sample alone, float64."""
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)


@pytest.fixture(scope="module")
def reference64(world):
    """key → float64 log-probs [T, V] of the uncached reference model."""
    model = LlamaForCausalLM.from_pretrained(world["reference_dir"], dtype=torch.float64)
    with torch.no_grad():
        return {k: float64_logprobs(model, s["input_ids"]) for k, s in world["samples"].items()}


def test_the_reference_cache_is_the_reference_model(world, reference64):
    """Sanity: what the builder cached under role='reference' is the float64 model's top-k."""
    cache = world["reference"]
    assert cache.info.role == "reference" and world["teacher"].info.role == "teacher"
    for key, s in world["samples"].items():
        rec, lp = cache.get(key), reference64[key]
        rows = np.flatnonzero(np.asarray(s["labels"])[1:] != -100) + 1
        for r, t in enumerate(rows):
            want = torch.topk(lp[t - 1], K)
            assert set(rec.topk_ids[r].tolist()) == set(want.indices.tolist())
            got = dict(zip(rec.topk_ids[r].tolist(), rec.topk_logprobs[r].tolist(), strict=True))
            for i, v in zip(want.indices.tolist(), want.values.tolist(), strict=True):
                assert abs(got[i] - v) < 1e-5
            assert abs(rec.label_logprobs[r] - lp[t - 1, s["labels"][t]].item()) < 1e-5


class Spy(TargetSFTTrainer):
    """Records, per optimizer step, the batch's sample keys, the parameters before the step, the
    loss and the gradients."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.steps.append(
            {
                "keys": list(inputs["sample_keys"]),
                "params": before,
                "loss": loss.item(),
                "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
                "packed": "cu_seqlens" in inputs,
            }
        )
        return loss


def train(world, tmp_path, loss, *, packing=False, epochs=1, **loss_kwargs):
    collator = TargetSFTCollator(
        world["teacher"],
        reference=world["reference"],
        pad_token_id=0,
        packing=packing,
        max_length=32 if packing else None,
        return_keys=True,
    )
    trainer = Spy(
        LlamaForCausalLM.from_pretrained(world["student_dir"], dtype=torch.float64),
        cpu_training_args(
            tmp_path,
            per_device_train_batch_size=3,
            num_train_epochs=epochs,
            learning_rate=0.5,
            optim="sgd",
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
        ),
        train_dataset=TeacherCacheDataset(world["teacher"]),
        data_collator=collator,
        processing_class=world["tok"],
        loss=loss,
        loss_kwargs=loss_kwargs,
    )
    trainer.steps = []
    trainer.train()
    return trainer.steps


def token_rows(sample):
    """Positions t >= 1 with a label: logits row t - 1 predicts labels[t]."""
    labels = sample["labels"]
    return [t for t in range(1, len(labels)) if labels[t] != -100]


def kl_to_reference(lp, ref, y):
    """KL(π̃_ref ‖ π_θ) over the reference's top-K ∪ {label}, π̃_ref renormalised on it."""
    support = torch.topk(ref, K).indices.tolist()
    if y not in support:
        support.append(y)
    s = torch.tensor(support)
    pi = torch.softmax(ref[s], -1)
    return (pi * (torch.log(pi) - lp[s])).sum()


def expected_step(world, reference64, step, method, old):
    """``(loss, {name: grad})`` of one step in float64, written out from the method's formula."""
    model = LlamaForCausalLM.from_pretrained(world["student_dir"], dtype=torch.float64)
    model.load_state_dict(step["params"])
    model.train()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for key in step["keys"]:
        s = world["samples"][key]
        lp, ref = float64_logprobs(model, s["input_ids"]), reference64[key]
        rows = token_rows(s)
        count += len(rows)
        if method == "iw_sft":  # one weight per sample (per trajectory), w = q(τ)/π_ref(τ)
            log_w = sum(
                lp[t - 1, s["labels"][t]].detach() - ref[t - 1, s["labels"][t]] for t in rows
            )
            w = torch.exp(torch.as_tensor(log_w, dtype=torch.float64))
        for j, t in enumerate(rows):
            y = s["labels"][t]
            lp_y = lp[t - 1, y]
            if method == "sft_kl":
                term = -lp_y + LAM * kl_to_reference(lp[t - 1], ref[t - 1], y)
            elif method == "asft":
                term = lp_y.detach().exp() * -lp_y + LAM * kl_to_reference(lp[t - 1], ref[t - 1], y)
            elif method == "iw_sft":
                term = -w * lp_y
            else:  # proximal_sft
                o = old[key][j] if key in old else lp_y.detach()
                r = torch.exp(lp_y - o)
                term = -torch.minimum(r, r.clamp(1 - EPS, 1 + EPS))
            total = total + term
    loss = total / count
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def check(world, reference64, steps, method, old_from=None):
    old: dict = {}
    for i, step in enumerate(steps):
        loss, grads = expected_step(world, reference64, step, method, old)
        assert step["loss"] == pytest.approx(loss, rel=1e-6, abs=1e-9), f"step {i} loss"
        for name, g in grads.items():
            # the cache holds float32 log-probs: ~1e-7 relative, felt where gradients cancel
            tol = 1e-6 * float(g.abs().max())
            got = step["grads"][name]
            torch.testing.assert_close(got, g, rtol=1e-5, atol=tol, msg=f"step {i}: {name}")
        if old_from is not None:  # this step's policy is π_old at the sample's next visit
            model = LlamaForCausalLM.from_pretrained(world["student_dir"], dtype=torch.float64)
            model.load_state_dict(step["params"])
            with torch.no_grad():
                for key in step["keys"]:
                    s = world["samples"][key]
                    lp = float64_logprobs(model, s["input_ids"])
                    old[key] = [lp[t - 1, s["labels"][t]].float().double() for t in token_rows(s)]


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [("sft_kl", {"lam": LAM}), ("asft", {"lam": LAM}), ("iw_sft", {})],
)
def test_reference_methods_match_float64(world, reference64, tmp_path, method, kwargs):
    steps = train(world, tmp_path, method, **kwargs)
    assert len(steps) == 2 and not steps[0]["packed"]
    check(world, reference64, steps, method)


def test_iw_sft_in_packed_rows_weights_each_sample(world, reference64, tmp_path):
    """Packed rows hold several samples: iw-SFT's trajectory weight is still one per sample."""
    steps = train(world, tmp_path, "iw_sft", packing=True)
    assert steps[0]["packed"]
    check(world, reference64, steps, "iw_sft")


def test_proximal_sft_over_two_epochs_reads_the_store(world, reference64, tmp_path):
    steps = train(world, tmp_path, "proximal_sft", epochs=2, epsilon=EPS)
    assert len(steps) == 4
    # every sample comes again in epoch 2: its π_old is the student of its epoch-1 step
    assert {k for s in steps[2:] for k in s["keys"]} == set(world["samples"])
    check(world, reference64, steps, "proximal_sft", old_from=True)


def test_the_docs_sft_kl_example_runs(world, tmp_path, monkeypatch):
    """docs/HF.md's SFT+KL block, as written, with tiny local models for the Qwen ones (fewer
    rows and steps, on the CPU)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "HF.md").read_text()
    section = text[text.index("## A reference model: SFT+KL") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    teacher = world["tok"].name_or_path
    subs = {
        '"Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"': (
            f"{str(teacher)!r}, {str(world['reference_dir'])!r}"
        ),
        "range(256)": "range(4)",
        "num_train_epochs=1": "max_steps=2, use_cpu=True",
        "torch.bfloat16": "torch.float32",
        "top_k=64": "top_k=8, progress=False",
    }
    for old, new in subs.items():
        assert old in code, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "docs/HF.md", "exec"), scope)
    trainer = scope["trainer"]
    assert trainer.state.global_step == 2
    assert type(trainer.loss_fn).__name__ == "SFTKL" and trainer.loss_fn.lam == 0.1
    assert TeacherCache(tmp_path / "ref-cache").info.role == "reference"
