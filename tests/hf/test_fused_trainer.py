"""``fused_linear=True`` in the Trainer path: the loss from the last hidden states and the LM head.

Tiny random Llama, Qwen2, Qwen3 and Mistral models (and Gemma2 for the final-logit softcap),
saved with ``save_pretrained`` and loaded back. In float64 the loss and every parameter's gradient
equal those of the logits path to rounding (padded and packed batches, several presets); two
Trainer steps give the same parameters either way; under the Triton interpreter the fused-linear
Triton kernels agree too; a model the fused path cannot reproduce is an error naming it.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, TrainingArguments

from batch_reference import write_sample_cache
from build_helpers import cpu_training_args, save_tiny_model
from target_sft import (
    TargetSFTCollator,
    TeacherCache,
    TeacherCacheDataset,
    target_sft_loss,
)
from target_sft import losses as L
from target_sft.hf import TargetSFTTrainer, compute_target_sft_loss
from target_sft.losses.backend import FusedLinearBackend

K, V, N = 8, 256, 12
ETA = 0.5
FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("fused") / "cache"
    return write_sample_cache(path, N, seed=11, k=K, vocab=V, lengths=(6, 20))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused-models")
    dirs = {f: save_tiny_model(root / f, f, vocab=V) for f in FAMILIES}
    dirs["gemma2"] = save_tiny_model(
        root / "gemma2", "Gemma2", vocab=V, head_dim=8, final_logit_softcapping=3.0
    )
    return dirs


def load(path, dtype=torch.float64, **kw):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    model.train()
    return model


def collate(cache, **kw):
    return TargetSFTCollator(cache, pad_token_id=0, **kw)


def batch_of(cache, n=6, **kw):
    ds = TeacherCacheDataset(cache)
    return collate(cache, **kw)([ds[i] for i in range(n)])


def loss_and_grads(model, batch, loss="target_sft", **kw):
    model.zero_grad()
    out = compute_target_sft_loss(model, batch, loss, **kw)
    out.backward()
    params = model.named_parameters()
    grads = {k.removeprefix("_orig_mod."): p.grad.clone() for k, p in params if p.grad is not None}
    return out.detach(), grads


def assert_same(a, b, rtol: float, atol: float) -> None:
    (la, ga), (lb, gb) = a, b
    assert_close(la, lb, rtol=rtol, atol=atol)
    assert sorted(ga) == sorted(gb)
    for name, g in ga.items():
        assert_close(gb[name], g, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("family", [*FAMILIES, "gemma2"])
def test_fused_equals_logits_path_float64(cache, model_dirs, family):
    model = load(model_dirs[family], attn_implementation="eager")
    batch = batch_of(cache)
    ref = loss_and_grads(model, batch, eta=ETA)
    got = loss_and_grads(model, batch, eta=ETA, fused_linear=True)
    assert "lm_head.weight" in got[1] or "model.embed_tokens.weight" in got[1]
    assert_same(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("loss", "kw"), [("sft", {}), ("eaft", {"k": 4}), ("kd", {}), ("gem", {"beta": 0.7})]
)
def test_other_presets_and_packed_batches(cache, model_dirs, loss, kw):
    model = load(model_dirs["qwen3"], attn_implementation="sdpa")
    packed = batch_of(cache, 8, packing=True, max_length=48)
    assert "attention_mask" not in packed
    ref = loss_and_grads(model, packed, loss, **kw)
    got = loss_and_grads(model, packed, loss, fused_linear=True, **kw)
    assert_same(got, ref, rtol=1e-10, atol=1e-12)


def test_torch_compile(cache, model_dirs):
    model = load(model_dirs["mistral"])
    batch = batch_of(cache, 4)
    ref = loss_and_grads(model, batch, eta=ETA)
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(2):  # the hook of one call is gone at the next: no recompilation needed
        got = loss_and_grads(compiled, batch, eta=ETA, fused_linear=True)
        assert_same(got, ref, rtol=1e-10, atol=1e-12)


def test_args_fused_linear_field(cache, model_dirs, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    args.fused_linear = True  # what a TargetSFTConfig carries
    trainer = TargetSFTTrainer(load(model_dirs["llama"]), args, data_collator=collate(cache))
    assert trainer.fused_linear is True
    # set in two places, differently: an error (as for loss=), never a silent choice
    with pytest.raises(ValueError, match=r"fused_linear=False was given.*args\.fused_linear"):
        TargetSFTTrainer(trainer.model, args, data_collator=collate(cache), fused_linear=False)


def test_num_items_and_outputs(cache, model_dirs):
    model = load(model_dirs["llama"])
    batch = batch_of(cache)
    n = torch.tensor(1000)
    want = compute_target_sft_loss(model, batch, eta=ETA, num_items_in_batch=n)
    got, outputs = compute_target_sft_loss(
        model, batch, eta=ETA, num_items_in_batch=n, fused_linear=True, return_outputs=True
    )
    assert_close(got, want, rtol=1e-12, atol=0)
    assert "logits" not in outputs  # never built


def _train(model_dirs, cache, tmp_path, fused_linear: bool):
    model = load(model_dirs["llama"], dtype=torch.float32)
    args = cpu_training_args(
        tmp_path,
        output_dir=str(tmp_path / f"out-{fused_linear}"),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
    )
    TargetSFTTrainer(
        model,
        args,
        train_dataset=TeacherCacheDataset(cache),
        data_collator=collate(cache),
        loss_kwargs={"eta": ETA},
        fused_linear=fused_linear,
    ).train()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_trainer_two_steps_same_parameters(cache, model_dirs, tmp_path, monkeypatch):
    p0 = {k: v.detach().clone() for k, v in load(model_dirs["llama"]).named_parameters()}
    a = _train(model_dirs, cache, tmp_path, fused_linear=False)
    seen: list[str] = []
    init = FusedLinearBackend.__init__

    def spy(self, *args, **kw):
        init(self, *args, **kw)
        seen.append(self.impl)

    monkeypatch.setattr(FusedLinearBackend, "__init__", spy)
    b = _train(model_dirs, cache, tmp_path, fused_linear=True)
    assert seen == ["torch", "torch"]  # the chunked fused-linear backend ran, once per step
    for name, w in a.items():
        assert not torch.equal(w.double(), p0[name]), name  # the step did move it
        assert_close(b[name], w, rtol=1e-5, atol=1e-6, msg=name)


def test_evaluate_gives_the_same_loss(cache, model_dirs, tmp_path):
    losses = []
    for fused in (False, True):
        trainer = TargetSFTTrainer(
            load(model_dirs["qwen2"], dtype=torch.float32),
            TrainingArguments(
                output_dir=str(tmp_path), use_cpu=True, report_to=[], disable_tqdm=True
            ),
            eval_dataset=TeacherCacheDataset(cache),
            data_collator=collate(cache),
            fused_linear=fused,
        )
        losses.append(trainer.evaluate()["eval_loss"])
    assert abs(losses[0] - losses[1]) <= 1e-6 * abs(losses[0])
    with pytest.raises(ValueError, match="compute_metrics needs the model's logits"):
        TargetSFTTrainer(
            trainer.model,
            trainer.args,
            eval_dataset=TeacherCacheDataset(cache),
            data_collator=collate(cache),
            compute_metrics=lambda p: {},
            fused_linear=True,
        )


def test_triton_fused_linear_kernels_agree(cache, model_dirs):
    from triton.knobs import runtime

    assert runtime.interpret, "conftest.py sets TRITON_INTERPRET=1"
    model = load(model_dirs["qwen2"], dtype=torch.float32)
    batch = batch_of(cache, 3)
    ref = loss_and_grads(model, batch, L.TargetSFT(eta=ETA, impl="torch"))
    got = loss_and_grads(model, batch, L.TargetSFT(eta=ETA, impl="triton"), fused_linear=True)
    assert_same(got, ref, rtol=1e-4, atol=1e-6)


def _ddp_worker(rank: int, port: int, cache_path, model_path, out_dir) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    cache = TeacherCache(cache_path)
    batch = batch_of(cache, 6)
    batch = {k: v[rank * 3 : rank * 3 + 3] for k, v in batch.items()}  # each rank its half
    grads = {}
    for fused in (False, True):
        model = load(model_path)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        compute_target_sft_loss(ddp, batch, eta=ETA, fused_linear=fused).backward()
        grads[fused] = {k: p.grad for k, p in model.named_parameters()}
    torch.save(grads, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_synchronises_the_fused_gradients(cache, model_dirs, tmp_path):
    """Two gloo processes, each its own half of the batch: the fused path runs the DDP wrapper's
    forward, so the gradients are averaged over the ranks exactly as on the logits path."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, cache.path, model_dirs["llama"], tmp_path), nprocs=2)
    g0, g1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name, want in g0[False].items():
        assert_close(g0[True][name], want, rtol=1e-10, atol=1e-12, msg=name)
        assert_close(g1[True][name], want, rtol=1e-10, atol=1e-12, msg=name)  # synchronised


# ---------------------------------------------------------------------------------- errors


def test_cohere_logit_scale_is_an_error(cache, tmp_path):
    model = load(save_tiny_model(tmp_path / "cohere", "Cohere", vocab=V))
    with pytest.raises(ValueError, match=r"CohereForCausalLM scales its logits \(logit_scale"):
        compute_target_sft_loss(model, batch_of(cache), fused_linear=True)


def test_unknown_logit_transform_is_caught_against_the_model_logits(cache, model_dirs):
    model = load(model_dirs["llama"])
    model.config.final_logit_softcapping = 5.0  # Llama ignores it: the fused path would not
    with pytest.raises(ValueError, match=r"logits of LlamaForCausalLM are not softcap"):
        compute_target_sft_loss(model, batch_of(cache), fused_linear=True)


def test_a_head_that_is_not_a_plain_linear_is_an_error(cache, model_dirs):
    model = load(model_dirs["mistral"])
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(ValueError, match=r"MistralForCausalLM is a Sequential, not a plain"):
        compute_target_sft_loss(model, batch_of(cache), fused_linear=True)


class PlainLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(V, 8)
        self.head = torch.nn.Linear(8, V)

    def forward(self, input_ids, attention_mask=None):
        return {"logits": self.head(self.emb(input_ids))}


def test_not_a_transformers_model_or_not_a_qtarget_loss_is_an_error(cache, model_dirs, tmp_path):
    with pytest.raises(ValueError, match="needs a transformers causal LM, got PlainLM"):
        compute_target_sft_loss(PlainLM(), batch_of(cache), fused_linear=True)
    model = load(model_dirs["llama"])
    with pytest.raises(TypeError, match="needs a Q-target loss"):
        compute_target_sft_loss(model, batch_of(cache), target_sft_loss, fused_linear=True)
    with pytest.raises(TypeError, match="needs a Q-target loss"):
        TargetSFTTrainer(
            model,
            TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
            loss=target_sft_loss,
            fused_linear=True,
        )
