"""``target_sft.old_policy``: Proximal SFT's old-policy label log-probs recorded by the trainer.

The chunked label log-probs (from logits and from hidden states) against ``log_softmax``; the
store's batch layout (padded and packed), its length check, its file round trip and its sharing
between two gloo processes; the trainer turning it on by itself, restoring it on resume (the
resumed run ends equal to the uninterrupted one), refusing a checkpoint without it; the
fused-linear path giving the logits path's loss; and the trainer's errors for a loss whose
reference cache is missing. The loss values themselves are checked against float64 in
``tests/hf/test_reference_e2e.py``."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from transformers import LlamaForCausalLM, TrainerCallback

from batch_reference import write_sample_cache
from build_helpers import cpu_training_args, save_tiny_llama
from target_sft import TargetSFTCollator, TeacherCacheDataset
from target_sft.hf import TargetSFTTrainer, compute_target_sft_loss, split_batch
from target_sft.losses import ProximalSFT
from target_sft.old_policy import (
    OLD_POLICY_FILE,
    OldPolicyCallback,
    OldPolicyStore,
    label_logprobs,
    label_logprobs_from_hidden,
)

K, V, N = 4, 128, 8

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("op") / "cache"
    return write_sample_cache(path, N, seed=3, k=K, vocab=V, lengths=(5, 14))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("op") / "llama", vocab=V, tokenizer=False)


def fresh(model_dir, dtype=torch.float32):
    return LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype)


def targs(tmp_path, **kw):
    sgd = dict(learning_rate=0.05, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0)
    return cpu_training_args(tmp_path, per_device_train_batch_size=2, **{**sgd, **kw})


def batch_of(cache, keys, **kw):
    return TargetSFTCollator(cache, pad_token_id=0, return_keys=True, **kw)(keys)


# ---------------------------------------------------------------------------- label log-probs


def test_label_logprobs_is_log_softmax_at_the_labels_in_chunks():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 50, (3, 7), generator=g)
    labels[0, 3] = labels[2, 5] = -100
    want = torch.zeros(3, 7, dtype=torch.float64)
    lp = torch.log_softmax(logits, -1)
    for b in range(3):
        for t in range(1, 7):
            if labels[b, t] != -100:
                want[b, t] = lp[b, t - 1, labels[b, t]]
    for chunk in (None, 50, 120):  # one row, two rows, all rows per chunk
        got = label_logprobs(logits, labels, chunk_elements=chunk)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    got32 = label_logprobs(logits.to(torch.bfloat16), labels)
    assert got32.dtype == torch.float32  # bf16 logits: float32 log-probs


def test_label_logprobs_from_hidden_equals_the_heads_logits():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(40, 8, generator=g, dtype=torch.float64)
    bias = torch.randn(40, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 40, (2, 6), generator=g)
    labels[1, 2] = -100
    for b_, cap in ((None, None), (bias, 3.0)):
        z = hidden @ weight.T + (0 if b_ is None else b_)
        if cap is not None:
            z = cap * torch.tanh(z / cap)
        want = label_logprobs(z, labels)
        got = label_logprobs_from_hidden(
            hidden, weight, labels, bias=b_, softcap=cap, chunk_elements=80
        )
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------- the store


@pytest.mark.parametrize("packing", [False, True])
def test_the_store_keeps_each_samples_positions(cache, packing):
    keys = [cache.key_at(i) for i in range(4)]
    kw = dict(packing=True, max_length=64) if packing else {}
    batch = batch_of(cache, keys, **kw)
    assert batch["sample_keys"] == keys
    labels, sids = batch["labels"], batch["sequence_ids"]
    values = torch.randn(labels.shape)
    store = OldPolicyStore()
    current = torch.full(labels.shape, 7.0)
    # nothing stored: the current policy's own (r = 1)
    torch.testing.assert_close(store.old_logprobs(batch, current), current)
    store.record_batch(batch, values)
    sup = labels != -100
    sup[:, 0] = False
    for i, key in enumerate(keys):
        want = values[sup & (sids == i)].numpy()  # row-major order of the sample's positions
        np.testing.assert_array_equal(store[key], want.astype(np.float32))
        assert store[key].size == int((cache.get(key).labels[1:] != -100).sum())
    old = store.old_logprobs(batch, current)
    torch.testing.assert_close(old[sup], values[sup])
    torch.testing.assert_close(old[~sup], current[~sup])
    # the same samples in another order and layout land on their own positions
    other = batch_of(cache, keys[::-1], packing=not packing, max_length=64)
    o_sup = other["labels"] != -100
    o_sup[:, 0] = False
    got = store.old_logprobs(other, torch.zeros(other["labels"].shape))
    for i, key in enumerate(keys[::-1]):
        np.testing.assert_array_equal(got[o_sup & (other["sequence_ids"] == i)].numpy(), store[key])
    assert store.nbytes == 4 * int(sup.sum())


def test_a_stored_length_that_does_not_fit_names_the_key(cache):
    key = cache.key_at(2)
    store = OldPolicyStore()
    store.record(key, np.zeros(1000, np.float32))
    batch = batch_of(cache, [cache.key_at(0), key])
    with pytest.raises(ValueError, match=rf"sample {key!r} cover 1000 supervised tokens"):
        store.old_logprobs(batch, torch.zeros(batch["labels"].shape))


@pytest.mark.parametrize("packing", [False, True])
def test_keys_that_do_not_line_up_with_the_tensors_are_refused(cache, packing):
    """A batch whose sample_keys no longer match its tensors (what a batch dispatcher that
    slices tensors but leaves the key list whole would give: every rank with all the keys) would
    record one rank's samples under another rank's keys; it is refused."""
    keys = [cache.key_at(i) for i in range(4)]
    kw = dict(packing=True, max_length=64) if packing else {}
    batch = batch_of(cache, keys, **kw)
    store = OldPolicyStore()
    wrong = dict(batch, sample_keys=[*keys, cache.key_at(4), cache.key_at(5)])
    current = torch.zeros(batch["labels"].shape)
    with pytest.raises(ValueError, match=r"6 sample_keys but its sequence_ids name 4 samples"):
        store.record_batch(wrong, current)
    with pytest.raises(ValueError, match=r"do not line up with the tensors"):
        store.old_logprobs(wrong, current)
    assert len(store) == 0
    store.record_batch(batch, current)  # the collator's batch as it is
    assert len(store) == 4


def test_the_batch_needs_sample_keys(cache):
    batch = TargetSFTCollator(cache, pad_token_id=0)([cache.key_at(0)])
    with pytest.raises(ValueError, match=r"return_keys=True"):
        OldPolicyStore().old_logprobs(batch, torch.zeros(batch["labels"].shape))


def test_the_store_file_round_trip(tmp_path):
    store = OldPolicyStore()
    store.record("a", [-1.0, -2.5])
    store.record(7, [])
    store.record("7", [-0.25])  # a str and an int key stay apart
    store.save(tmp_path / "s.npz")
    back = OldPolicyStore.load(tmp_path / "s.npz")
    assert back == store and sorted(map(repr, back.keys())) == ["'7'", "'a'", "7"]
    assert back[7].dtype == np.float32 and back[7].size == 0


def _sync_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    store = OldPolicyStore()
    store.record(f"r{rank}", [float(rank)])
    store.record("both", [10.0 + rank])  # the same key on two ranks: the later rank wins
    store.sync()
    store.sync()  # nothing new: a no-op
    store.save(os.path.join(out, f"{rank}.npz"))
    dist.destroy_process_group()


def test_sync_gives_every_rank_every_record(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_sync_worker, args=(port, str(tmp_path)), nprocs=2)
    a, b = (OldPolicyStore.load(tmp_path / f"{r}.npz") for r in (0, 1))
    assert a == b and set(a.keys()) == {"r0", "r1", "both"}
    assert a["both"].tolist() == [11.0]


# ---------------------------------------------------------------------------------- trainer


def test_split_batch_drops_sample_keys(cache):
    batch = batch_of(cache, [cache.key_at(0)])
    model_inputs, _, loss_inputs = split_batch(batch)
    assert "sample_keys" not in model_inputs and "sample_keys" not in loss_inputs
    assert "sequence_ids" in loss_inputs and "sequence_ids" not in model_inputs


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_save = control.should_training_stop = True


def psft_trainer(model_dir, cache, tmp_path, **kw):
    callbacks = kw.pop("callbacks", None)
    return TargetSFTTrainer(
        fresh(model_dir),
        targs(tmp_path, num_train_epochs=2, **kw),
        train_dataset=TeacherCacheDataset(cache),
        data_collator=TargetSFTCollator(pad_token_id=0),
        loss="proximal_sft",
        loss_kwargs={"epsilon": 0.2},
        callbacks=callbacks,
    )


def test_the_trainer_records_and_resumes_exactly(model_dir, cache, tmp_path):
    full = psft_trainer(model_dir, cache, tmp_path / "a")
    assert isinstance(full.old_policy, OldPolicyCallback)
    assert full.data_collator.return_keys  # turned on by the trainer
    full.train()
    store = full.old_policy.store
    assert len(store) == N
    for i in range(N):
        rec = cache.get(cache.key_at(i))
        assert store[rec.key].size == int((rec.labels[1:] != -100).sum())
    # stopped mid epoch 2 (4 steps an epoch) at a checkpoint, resumed in a new trainer
    part = psft_trainer(model_dir, cache, tmp_path / "b", callbacks=[StopAt(6)])
    part.train()
    ckpt = tmp_path / "b" / "out" / "checkpoint-6"
    assert (ckpt / OLD_POLICY_FILE).is_file()
    again = psft_trainer(model_dir, cache, tmp_path / "b")
    again.train(resume_from_checkpoint=str(ckpt))
    for (name, p), q in zip(full.model.named_parameters(), again.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert again.old_policy.store == store
    # a checkpoint without the store would silently change π_old: refused
    (ckpt / OLD_POLICY_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="would change π_old"):
        psft_trainer(model_dir, cache, tmp_path / "b").train(resume_from_checkpoint=str(ckpt))


def test_a_frozen_store_is_never_written(model_dir, cache, tmp_path):
    store = OldPolicyStore()
    trainer = psft_trainer(
        model_dir, cache, tmp_path, callbacks=[OldPolicyCallback(store, frozen=True)], max_steps=2
    )
    assert trainer.old_policy.store is store
    trainer.train()
    assert len(store) == 0


def test_fused_linear_gets_the_same_old_logprobs(model_dir, cache):
    keys = [cache.key_at(i) for i in range(3)]
    batch = batch_of(cache, keys)
    model = fresh(model_dir, torch.float64)
    losses = []
    for fused in (False, True):
        store = OldPolicyStore()
        store.record_batch(batch, torch.full(batch["labels"].shape, -3.0))  # a stored π_old
        loss = compute_target_sft_loss(
            model, batch, ProximalSFT(), fused_linear=fused, old_policy=store
        )
        losses.append(loss)
        # and the batch's own label log-probs recorded, the same on both paths
        assert all(store[k].min() > -10 for k in keys)
        recorded = store
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=1e-12)
    assert recorded is not None


def test_without_a_store_the_error_says_what_to_do(model_dir, cache):
    batch = batch_of(cache, [cache.key_at(0)])
    with pytest.raises(ValueError, match=r"needs old_logprobs.*OldPolicyStore"):
        compute_target_sft_loss(fresh(model_dir), batch, "proximal_sft")


@pytest.mark.parametrize("loss", ["sft_kl", "asft", "iw_sft"])
def test_a_loss_without_its_reference_cache_fails_at_construction(model_dir, cache, tmp_path, loss):
    with pytest.raises(ValueError, match=r"reference="):
        TargetSFTTrainer(
            fresh(model_dir),
            targs(tmp_path, max_steps=1),
            train_dataset=TeacherCacheDataset(cache),
            data_collator=TargetSFTCollator(pad_token_id=0),
            loss=loss,
        )
    # and a batch without the reference tensors, in a loop of one's own
    batch = batch_of(cache, [cache.key_at(0)])
    with pytest.raises(ValueError, match=r"reference="):
        compute_target_sft_loss(fresh(model_dir), batch, loss)


def test_the_docs_fixed_policy_example_runs(model_dir, cache, tmp_path, monkeypatch):
    """docs/HF.md's blocks of "Proximal SFT: the old policy", as written (a cache at cache/)."""
    import re
    import shutil
    from pathlib import Path
    from types import SimpleNamespace

    import target_sft as ts

    text = (Path(__file__).resolve().parents[2] / "docs" / "HF.md").read_text()
    section = text.split("## Proximal SFT: the old policy", 1)[1].split("\n## ", 1)[0]
    plain, fixed = re.findall(r"```python\n(.*?)```", section, re.S)
    shutil.copytree(cache.path, tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    model = fresh(model_dir)
    base = {"ts": ts, "torch": torch, "tok": SimpleNamespace(pad_token_id=0)}
    scope = {**base, "model": model, "args": targs(tmp_path, max_steps=1)}
    exec(compile(plain, "docs/HF.md", "exec"), scope)
    assert isinstance(scope["trainer"].old_policy.store, OldPolicyStore)
    scope = {**base, "model": model, "args": targs(tmp_path, max_steps=2)}
    exec(compile(fixed, "docs/HF.md", "exec"), scope)
    store, trainer = scope["store"], scope["trainer"]
    assert len(store) == N and trainer.old_policy.store is store and trainer.old_policy.frozen
    before = {k: store[k].copy() for k in store.keys()}
    trainer.train()
    assert all(np.array_equal(store[k], v) for k, v in before.items())  # frozen: unchanged
