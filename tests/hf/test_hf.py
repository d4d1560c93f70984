"""``target_sft.hf``: the Hugging Face Trainer integration, with a tiny random Llama.

``compute_loss`` against the loss on hand-computed logits (and SFT against HF's own causal-LM
loss), exact gradient accumulation (2 micro-batches × 2 = one batch of the union, after an SGD
step), ``remove_unused_columns`` on and off with the map-style and the streaming datasets
(``set_epoch`` every epoch, every record once per epoch), packed batches (same loss and gradients
as padded, in the trainer and in a custom loop on freshly loaded Llama and Qwen2 models, eager and
SDPA; a clear error where packing cannot be honoured), and the errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import transformers
from transformers import (
    AutoModelForCausalLM,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from batch_reference import write_sample_cache
from build_helpers import cpu_training_args, save_tiny_llama, tiny_config
from target_sft import (
    StreamingTeacherDataset,
    TargetSFTCollator,
    TeacherCacheDataset,
    target_sft_loss,
)
from target_sft.hf import (
    TargetSFTTrainer,
    compute_target_sft_loss,
    split_batch,
)

K, V, N = 8, 256, 16
ETA = 0.5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "cache"
    return write_sample_cache(path, N, seed=7, k=K, vocab=V, lengths=(6, 24))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("hf") / "llama", vocab=V, tokenizer=False)


def fresh_model(model_dir):
    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


targs = cpu_training_args


def collate(cache, **kw):
    return TargetSFTCollator(cache, pad_token_id=0, **kw)


def supervised(batch):
    return int((batch["labels"][:, 1:] != -100).sum())


# ---------------------------------------------------------------------------------- loss


def test_compute_loss_equals_target_sft_loss_on_the_logits(cache, model_dir, tmp_path):
    model = fresh_model(model_dir)
    ds = TeacherCacheDataset(cache)
    trainer = TargetSFTTrainer(model, targs(tmp_path), train_dataset=ds, loss_kwargs={"eta": ETA})
    assert isinstance(trainer.data_collator, TargetSFTCollator)  # the default collator
    batch = collate(cache)([ds[i] for i in range(5)])
    keys = sorted(batch)
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    assert sorted(batch) == keys  # the batch is not modified
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(outputs.logits, logits, rtol=0, atol=0)
    args = (batch["labels"], batch["teacher_ids"], batch["teacher_logprobs"])
    want = target_sft_loss(logits.double(), *args, eta=ETA)
    assert abs(loss.item() - want.item()) <= 1e-6 * abs(want.item())
    # num_items_in_batch replaces the mean's denominator
    n = supervised(batch)
    got = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(3 * n))
    torch.testing.assert_close(got.double(), want / 3, rtol=1e-6, atol=0)
    # the same through the functional hook, with a preset name
    hook = compute_target_sft_loss(model, batch, "target_sft", eta=ETA)
    torch.testing.assert_close(hook, loss, rtol=0, atol=0)


def test_a_plain_callable_gets_the_inputs_it_takes(cache, model_dir):
    """Batches carry sequence_ids (and reference tensors with a reference cache); a loss
    callable without those keywords (``functools.partial(target_sft_loss, ...)``) is called
    without them, with the same loss as on the bare teacher tensors."""
    import functools

    model = fresh_model(model_dir)
    batch = collate(cache)([TeacherCacheDataset(cache)[i] for i in range(4)])
    assert "sequence_ids" in batch
    fn = functools.partial(target_sft_loss, eta=ETA)
    got = compute_target_sft_loss(model, batch, fn)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = fn(logits, batch["labels"], batch["teacher_ids"], batch["teacher_logprobs"])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_sft_preset_equals_hf_causal_lm_loss(cache, model_dir, tmp_path):
    """Alignment: loss="sft" through the trainer is the model's own ForCausalLMLoss."""
    model = fresh_model(model_dir)
    ds = TeacherCacheDataset(cache)
    trainer = TargetSFTTrainer(model, targs(tmp_path), train_dataset=ds, loss="sft")
    batch = collate(cache)([ds[i] for i in range(6)])
    got = trainer.compute_loss(model, batch)
    with torch.no_grad():
        want = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        ).loss
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_missing_teacher_tensors_is_a_clear_error(cache, model_dir, tmp_path):
    model = fresh_model(model_dir)
    ds = TeacherCacheDataset(cache)
    trainer = TargetSFTTrainer(model, targs(tmp_path), train_dataset=ds)
    batch = collate(cache)([ds[i] for i in range(3)])
    plain = {k: v for k, v in batch.items() if not k.startswith("teacher_")}
    with pytest.raises(ValueError, match=r"needs teacher_ids and teacher_logprobs.*Collator"):
        trainer.compute_loss(model, plain)
    with pytest.raises(ValueError, match="no 'labels'"):
        trainer.compute_loss(model, {"input_ids": batch["input_ids"]})
    # a loss without a teacher runs on such a batch
    sft = TargetSFTTrainer(model, targs(tmp_path), train_dataset=ds, loss="sft")
    assert torch.isfinite(sft.compute_loss(model, plain))
    with pytest.raises(ValueError, match="unknown preset"):
        TargetSFTTrainer(model, targs(tmp_path), train_dataset=ds, loss="nope")


# ---------------------------------------------------------------------------------- GA


def _one_sgd_step(model_dir, cache, tmp_path, batch_size, accum):
    model = fresh_model(model_dir)
    # 4 samples of very different supervised counts: per-micro-batch means would differ
    items = sorted(range(N), key=lambda i: int((cache.records_at([i])[0].labels != -100).sum()))
    ds = torch.utils.data.Subset(
        TeacherCacheDataset(cache), [items[0], items[1], items[-2], items[-1]]
    )
    args = targs(
        tmp_path,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accum,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
    )
    TargetSFTTrainer(
        model, args, train_dataset=ds, data_collator=collate(cache), loss_kwargs={"eta": ETA}
    ).train()
    return {k: v.detach().clone() for k, v in model.named_parameters()}, ds


def test_gradient_accumulation_equals_one_big_batch(cache, model_dir, tmp_path):
    p0 = {k: v.detach().clone() for k, v in fresh_model(model_dir).named_parameters()}
    pa, ds = _one_sgd_step(model_dir, cache, tmp_path, batch_size=2, accum=2)
    pb, _ = _one_sgd_step(model_dir, cache, tmp_path, batch_size=4, accum=1)
    # the reference: one batch of the union, mean over its supervised tokens, by hand
    model = fresh_model(model_dir)
    batch = collate(cache)([ds[i] for i in range(len(ds))])
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    target_sft_loss(
        out.logits, batch["labels"], batch["teacher_ids"], batch["teacher_logprobs"], eta=ETA
    ).backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    for name, g in grads.items():
        want = p0[name].double() - 0.5 * g.double()
        # float32 parameters: the update is exact up to its rounding into the parameter
        tol = 1e-5 * (0.5 * g).abs().max().item() + 2.0**-23 * p0[name].abs().max().item()
        for got in (pa[name], pb[name]):
            err = (got.double() - want).abs().max().item()
            assert err <= tol, (name, err, tol)
    # the tolerance tells the exact normalisation from HF's fallback (a mean per micro-batch,
    # divided by the accumulation steps)
    model.zero_grad()
    for part in ([0, 1], [2, 3]):
        b = collate(cache)([ds[i] for i in part])
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        loss = target_sft_loss(
            out.logits, b["labels"], b["teacher_ids"], b["teacher_logprobs"], eta=ETA
        )
        (loss / 2).backward()
    g, w = model.lm_head.weight.grad, grads["lm_head.weight"]
    assert (g - w).abs().max().item() > 100 * 1e-5 * w.abs().max().item()


# ---------------------------------------------------------------------------------- training


def _fixed_loss(model, cache):
    batch = collate(cache)([TeacherCacheDataset(cache)[i] for i in range(N)])
    with torch.no_grad():
        return compute_target_sft_loss(model, batch, "target_sft", eta=ETA).item()


class RecordingCollator(TargetSFTCollator):
    """Remembers the record positions of every batch (num_workers=0)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen: list[list[int]] = []

    def __call__(self, items):
        self.seen.append([getattr(it, "position", None) for it in items])
        return super().__call__(items)


class RecordingStream(StreamingTeacherDataset):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.epochs: list[int] = []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)
        super().set_epoch(epoch)


@pytest.mark.parametrize("remove_unused_columns", [True, False])
@pytest.mark.parametrize("kind", ["map", "stream", "dicts"])
def test_trains_with_remove_unused_columns(cache, model_dir, tmp_path, kind, remove_unused_columns):
    model = fresh_model(model_dir)
    before = _fixed_loss(model, cache)
    bs = 4
    if kind == "map":
        ds = TeacherCacheDataset(cache)
    elif kind == "stream":
        ds = RecordingStream(cache.path, shuffle=True, seed=3, batch_size=bs)
    else:  # dict items: "key" must survive remove_unused_columns (it is no model argument)
        recs = cache.records_at(range(N))
        ds = [{"key": r.key, "input_ids": r.input_ids.tolist(), "junk": 1} for r in recs]
    collator = RecordingCollator(cache, pad_token_id=0)
    args = targs(
        tmp_path,
        per_device_train_batch_size=bs,
        max_steps=10,  # 2.5 epochs of 4 batches
        learning_rate=3e-2,
        lr_scheduler_type="constant",
        remove_unused_columns=remove_unused_columns,
        logging_steps=1,
    )
    trainer = TargetSFTTrainer(model, args, train_dataset=ds, data_collator=collator)
    trainer.train()
    after = _fixed_loss(model, cache)
    assert after < before - 0.05, (before, after)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 10 and all(np.isfinite(losses))
    if kind == "stream":
        # no sampler, the dataset's own order; set_epoch before every epoch; each epoch is
        # every record once, in a new order
        # (accelerate's loader calls set_epoch again when an iteration starts)
        assert ds.epochs == sorted(ds.epochs) and set(ds.epochs) == {0, 1, 2}
        epochs = [[i for b in collator.seen[4 * e : 4 * e + 4] for i in b] for e in range(2)]
        assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(N))
        assert epochs[0] != epochs[1]


def test_streaming_resume_from_checkpoint_continues_the_same_batches(cache, model_dir, tmp_path):
    """HF fast-forwards the loader on resume; the dataset's order is a function of (seed,
    epoch) and set_epoch reaches it, so the resumed run sees exactly the same batches."""

    def run(resume):
        ds = StreamingTeacherDataset(cache.path, shuffle=True, seed=5, batch_size=4)
        collator = RecordingCollator(cache, pad_token_id=0)
        args = targs(
            tmp_path,
            per_device_train_batch_size=4,
            max_steps=6,  # crosses the epoch boundary after step 4
            learning_rate=1e-2,
            save_strategy="steps",
            save_steps=5,
        )
        model = fresh_model(model_dir)
        trainer = TargetSFTTrainer(model, args, train_dataset=ds, data_collator=collator)
        trainer.train(resume_from_checkpoint=resume)
        return collator.seen, {k: v.detach().clone() for k, v in model.named_parameters()}

    seen, params = run(None)
    seen2, params2 = run(str(tmp_path / "out" / "checkpoint-5"))
    # 4 batches per epoch; the resumed run decodes and skips epoch 1's first batch, trains on
    # its second (step 6), and accelerate's loader fetches one batch ahead in both runs
    assert len(seen) == 7
    assert seen2 == seen[4:7]
    for k, v in params.items():
        torch.testing.assert_close(params2[k], v, rtol=1e-5, atol=1e-7)


def test_streaming_batch_size_must_match(cache, model_dir, tmp_path):
    ds = StreamingTeacherDataset(cache.path, batch_size=3)
    trainer = TargetSFTTrainer(
        fresh_model(model_dir),
        targs(tmp_path, per_device_train_batch_size=4, max_steps=1),
        train_dataset=ds,
    )
    with pytest.raises(ValueError, match=r"batch_size=3.*per-device batch size \(4\)"):
        trainer.train()


# ---------------------------------------------------------------------------------- packing


def test_packed_batches_give_the_padded_loss(cache, model_dir, tmp_path):
    model = fresh_model(model_dir)
    ds = TeacherCacheDataset(cache)
    items = [ds[i] for i in range(8)]
    padded = collate(cache)(items)
    packed = collate(cache, packing=True, max_length=48)(items)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] < 8
    assert supervised(packed) == supervised(padded)
    trainer = TargetSFTTrainer(model, targs(tmp_path), train_dataset=ds)
    with torch.no_grad():
        a = trainer.compute_loss(model, padded)
        b = trainer.compute_loss(model, packed)
    # attention stays inside each sample (transformers' packed mask from position_ids)
    torch.testing.assert_close(a, b, rtol=2e-6, atol=0)
    # and a packed collator trains
    args = targs(tmp_path, per_device_train_batch_size=8, max_steps=3, learning_rate=3e-2)
    before = _fixed_loss(model, cache)
    TargetSFTTrainer(
        model, args, train_dataset=ds, data_collator=collate(cache, packing=True, max_length=48)
    ).train()
    assert _fixed_loss(model, cache) < before


def save_tiny_qwen2(path, vocab=V, seed=0):
    torch.manual_seed(seed)
    Qwen2ForCausalLM(Qwen2Config(**tiny_config(vocab))).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return save_tiny_qwen2(tmp_path_factory.mktemp("hf") / "qwen2")


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = compute_target_sft_loss(model, batch, "target_sft", eta=ETA)
    loss.backward()
    return loss.item(), {k: p.grad.detach().clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_equals_padded_in_a_custom_loop(cache, model_dir, qwen2_dir, arch, attn):
    """A custom loop on a model fresh from from_pretrained (config.use_cache=True, which the
    Trainer switches off but a loop does not): a KV cache would make transformers ignore the
    packed layout and let attention cross samples (on the old code: loss 5.5331 vs 5.5290)."""
    path = model_dir if arch == "llama" else qwen2_dir
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=attn
    )
    assert model.config.use_cache is True and model.config._attn_implementation == attn
    model.train()
    ds = TeacherCacheDataset(cache)
    items = [ds[i] for i in range(8)]
    padded = collate(cache)(items)
    packed = collate(cache, packing=True, max_length=48)(items)
    assert packed["input_ids"].shape[0] < 8  # rows do hold several samples
    loss_a, grads_a = loss_and_grads(model, padded)
    loss_b, grads_b = loss_and_grads(model, packed)
    assert abs(loss_a - loss_b) <= 1e-5, (loss_a, loss_b)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=0, atol=1e-5, msg=name)
    # the model inputs: no KV cache, position_ids only (transformers builds the mask)
    model_inputs = split_batch(packed, model)[0]
    assert sorted(model_inputs) == ["input_ids", "position_ids", "use_cache"]
    assert model_inputs["use_cache"] is False
    assert split_batch(padded, model)[0]["use_cache"] is False


def test_split_batch_varlen_kwargs_for_flash_attention(cache, model_dir):
    batch = collate(cache, packing=True, max_length=48)(
        [TeacherCacheDataset(cache)[i] for i in range(6)]
    )
    flash = fresh_model(model_dir)
    flash.config._attn_implementation = "flash_attention_2"  # no flash-attn on CPU: inputs only
    model_inputs, labels, loss_inputs = split_batch(batch, flash)
    assert labels is batch["labels"]
    assert sorted(loss_inputs) == ["sequence_ids", "teacher_ids", "teacher_logprobs"]
    assert sorted(model_inputs) == [
        "cu_seq_lens_k",
        "cu_seq_lens_q",
        "input_ids",
        "max_length_k",
        "max_length_q",
        "position_ids",
        "use_cache",
    ]
    assert model_inputs["cu_seq_lens_q"] is batch["cu_seqlens"]
    assert model_inputs["max_length_q"] == batch["max_seqlen"]
    assert model_inputs["use_cache"] is False
    bad = dict(batch, attention_mask=torch.ones_like(batch["input_ids"]))
    with pytest.raises(ValueError, match="must not carry an attention_mask"):
        split_batch(bad, fresh_model(model_dir))


class PlainLM(torch.nn.Module):
    """A causal LM that is not a transformers model: nothing tells whether it honours packing."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(V, 8)
        self.head = torch.nn.Linear(8, V)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return {"logits": self.head(self.emb(input_ids))}


def test_packing_that_cannot_be_honoured_is_an_error(cache, model_dir, monkeypatch):
    ds = TeacherCacheDataset(cache)
    packed = collate(cache, packing=True, max_length=48)([ds[i] for i in range(6)])
    padded = collate(cache)([ds[i] for i in range(6)])
    with pytest.raises(ValueError, match=r"packed batch needs the model"):
        split_batch(packed)
    with pytest.raises(ValueError, match=r"cannot be given to PlainLM.*packing=False"):
        compute_target_sft_loss(PlainLM(), packed)
    assert torch.isfinite(compute_target_sft_loss(PlainLM(), padded))  # padded: any model
    model = fresh_model(model_dir)
    with pytest.raises(ValueError, match="use_cache=True"):
        split_batch(dict(packed, use_cache=True), model)
    # an attention implementation that takes no mask from transformers' masking_utils: it would
    # run plain causal attention over the whole row
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("tsft_unmasked", sdpa_attention_forward)
    model.config._attn_implementation = "tsft_unmasked"
    with pytest.raises(ValueError, match=r"attention implementation 'tsft_unmasked' takes no mask"):
        compute_target_sft_loss(model, packed)
    # a transformers without packed-sequence masks (< 4.54)
    model.config._attn_implementation = "sdpa"
    monkeypatch.delattr(transformers.masking_utils, "find_packed_sequence_indices")
    with pytest.raises(ValueError, match=r"builds no packed-sequence mask.*>= 4\.54"):
        compute_target_sft_loss(model, packed)


def test_import_target_sft_does_not_import_transformers():
    code = (
        "import sys, target_sft; assert 'transformers' not in sys.modules; "
        "assert 'TargetSFTTrainer' in dir(target_sft)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
