"""The Trainer under ``torchrun`` and ``accelerate launch``: 2 CPU processes (gloo), gradient
accumulation, AdamW with a linear schedule, over a ``StreamingTeacherDataset`` (filtered on
every rank to ``split_by_key``'s train side) and a ``TeacherCacheDataset`` of a real cache (built
by ``build_teacher_cache`` from a tiny Llama saved with ``save_pretrained``). A run interrupted
at a checkpoint and resumed with ``resume_from_checkpoint`` in a new launch ends with every
parameter bit-identical (``torch.equal``) to the uninterrupted run (tests/hf/accelerate_child.py
is one process). Then wrapped datasets (``Subset``, ``ConcatDataset``, dicts of eval datasets)
with the default collator, and the error for data that is not teacher data."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from safetensors.torch import load_file

from build_helpers import cpu_training_args, make_samples, save_tiny_llama
from target_sft import TeacherCache

CHILD = os.path.join(os.path.dirname(__file__), "accelerate_child.py")
# 24 records: 12 a rank, 6 batches of 2, 3 optimizer steps (accumulation 2) an epoch (the
# streaming run trains on split_by_key's train side, 22 records: 11 a rank, the same 6 batches)
N_RECORDS = 24
STOP = 4  # the interrupted run stops in epoch 1, after its first optimizer step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: str, *child_args: str) -> None:
    """Run the child under ``launcher`` with 2 processes. The rendezvous port is picked free and
    then released, so another process on this shared machine can take it before the launcher
    binds it: only that failure (address in use) is retried, with a new port."""
    for attempt in range(3):
        r = _launch_once(launcher, str(free_port()), child_args)
        out = r.stdout[-3000:] + r.stderr[-6000:]
        if r.returncode == 0 or "address already in use" not in out.lower() or attempt == 2:
            break
    assert r.returncode == 0, out


def _launch_once(
    launcher: str, port: str, child_args: tuple[str, ...]
) -> subprocess.CompletedProcess[str]:
    if launcher == "torchrun":
        pre = ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
        pre += ["--master-addr", "127.0.0.1", "--master-port", port]
    else:
        # --multi_gpu is accelerate's torch.distributed launcher; with no GPU each process
        # runs on CPU (TrainingArguments(use_cpu=True, ddp_backend="gloo"))
        pre = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
        pre += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        pre += ["--main_process_ip", "127.0.0.1", "--main_process_port", port]
    # HF_HOME: no user accelerate config (its default_config.yaml) changes the launch
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": os.path.join(child_args[2], "hf")}
    cmd = [sys.executable, *pre, CHILD, *child_args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny Llama (student and teacher) and the cache the teacher's outputs fill."""
    from target_sft import build_teacher_cache

    root = tmp_path_factory.mktemp("accel")
    model = save_tiny_llama(root / "llama", vocab=256)
    cache = root / "cache"
    rows = make_samples(N_RECORDS, seed=1, vocab=256, max_len=20)
    build_teacher_cache(
        str(model), rows, cache, top_k=4, tokenizer=None, progress=False, shard_size="1KiB"
    )
    return str(model), str(cache)


@pytest.fixture(scope="module")
def full_run(parts, tmp_path_factory):
    """The uninterrupted run (under torchrun): its parameters' directory."""
    model, cache = parts
    out = tmp_path_factory.mktemp("full")
    launch("torchrun", model, cache, str(out), "full", "0", "0")
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(parts, full_run, tmp_path, launcher):
    """Interrupted at step 4 of 6 (mid-epoch 1, the linear schedule planned for 6 steps), then
    resumed in a new launch: the same parameters as the uninterrupted torchrun run, whichever
    launcher ran the two halves."""
    model, cache = parts
    out = str(tmp_path)
    launch(launcher, model, cache, out, "cut.stop", str(STOP), "0")
    launch(launcher, model, cache, out, "cut.resume", str(STOP), "1")
    for kind in ("stream", "map"):
        full = load_file(os.path.join(full_run, f"full-{kind}.safetensors"))
        stopped = load_file(os.path.join(out, f"cut.stop-{kind}.safetensors"))
        resumed = load_file(os.path.join(out, f"cut.resume-{kind}.safetensors"))
        assert sorted(full) == sorted(resumed)
        # the interrupted run did stop early (its parameters differ from the full run's) ...
        assert any(not torch.equal(full[k], stopped[k]) for k in full), kind
        # ... and resuming it reproduces the full run bit for bit
        diff = [k for k in full if not torch.equal(full[k], resumed[k])]
        assert not diff, (kind, diff)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_proximal_sft_old_policy_is_shared_and_resumed_under_ddp(parts, tmp_path):
    """Proximal SFT under torchrun (2 processes): after every step both ranks hold the same
    old-policy store (each rank's records all-gathered; samples change ranks between epochs),
    holding every sample trained on; a run stopped in epoch 2 and resumed from its checkpoint
    (the store restored from it) ends equal to the uninterrupted run."""
    from target_sft import OldPolicyStore

    model, cache = parts
    out = str(tmp_path)
    launch("torchrun", model, cache, out, "full", "0", "0", "proximal_sft")
    launch("torchrun", model, cache, out, "cut.stop", str(STOP), "0", "proximal_sft")
    launch("torchrun", model, cache, out, "cut.resume", str(STOP), "1", "proximal_sft")
    for kind in ("stream", "map"):
        stores = {
            (tag, r): OldPolicyStore.load(os.path.join(out, f"{tag}-{kind}-store{r}.npz"))
            for tag in ("full", "cut.resume")
            for r in (0, 1)
        }
        full = stores["full", 0]
        assert all(s == full for s in stores.values()), kind
        assert len(full) >= 20, (kind, len(full))  # both ranks' samples (11 or 12 a rank)
        a = load_file(os.path.join(out, f"full-{kind}.safetensors"))
        b = load_file(os.path.join(out, f"cut.resume-{kind}.safetensors"))
        assert [k for k in a if not torch.equal(a[k], b[k])] == [], kind


@pytest.mark.usefixtures("one_thread")
def test_resume_with_dataloader_workers_is_bit_identical(parts, tmp_path, monkeypatch):
    """The same in one process, the streaming split read by 2 DataLoader workers."""
    from accelerate_child import train

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model, cache = parts
    out = str(tmp_path)
    for tag, stop, resume in (
        ("full", 0, False),
        ("cut.stop", STOP, False),
        ("cut.resume", STOP, True),
    ):
        train(model, cache, out, tag, "stream", stop, resume, workers=2)
    full = load_file(os.path.join(out, "full-stream.safetensors"))
    stopped = load_file(os.path.join(out, "cut.stop-stream.safetensors"))
    resumed = load_file(os.path.join(out, "cut.resume-stream.safetensors"))
    assert any(not torch.equal(full[k], stopped[k]) for k in full)
    assert [k for k in full if not torch.equal(full[k], resumed[k])] == []


# ------------------------------------------------------------------ wrapped datasets, eval splits


def targs(tmp_path, **kw):
    batches = dict(per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=2)
    return cpu_training_args(tmp_path, **{**batches, **kw})


def student(parts):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(parts[0], dtype=torch.float32)


@pytest.mark.usefixtures("one_thread")
def test_wrapped_datasets_get_the_target_sft_collator(parts, tmp_path):
    """Subset, ConcatDataset and a dict of eval datasets (a split_by_key eval side, a streaming
    one) train and evaluate with the default TargetSFTCollator."""
    from torch.utils.data import ConcatDataset, Subset

    from target_sft import (
        StreamingTeacherDataset,
        TargetSFTCollator,
        TeacherCacheDataset,
        split_by_key,
    )
    from target_sft.hf import TargetSFTTrainer

    cache = parts[1]
    train, held = split_by_key(cache, eval_fraction=0.25, seed=0)
    _, s_held = split_by_key(StreamingTeacherDataset(cache, batch_size=4), 0.25)
    assert len(s_held) == len(held)
    full = TeacherCacheDataset(cache)
    train_ds = ConcatDataset([train, Subset(full, [0, 1, 2])])
    evals = {"held": held, "subset": Subset(held, [0, 1]), "stream": s_held}
    trainer = TargetSFTTrainer(
        student(parts), targs(tmp_path), train_dataset=train_ds, eval_dataset=evals
    )
    assert isinstance(trainer.data_collator, TargetSFTCollator)
    trainer.train()
    metrics = trainer.evaluate()
    for name in evals:
        assert np.isfinite(metrics[f"eval_{name}_loss"]), metrics
    # the held-out side and its streaming twin give the same loss (same records, same model)
    assert metrics["eval_held_loss"] == pytest.approx(metrics["eval_stream_loss"], rel=1e-5)


@pytest.mark.usefixtures("one_thread")
def test_data_that_is_not_teacher_data_is_a_clear_error(parts, tmp_path):
    from torch.utils.data import ConcatDataset, Subset

    from target_sft import StreamingTeacherDataset, TargetSFTCollator, TeacherCacheDataset
    from target_sft.hf import TargetSFTTrainer

    cache = parts[1]
    rows = [{"key": "s0000", "input_ids": [7]}] * 4
    model = student(parts)
    cases = [
        (rows, "train_dataset is a list of 4 items, not teacher data"),
        (
            ConcatDataset([TeacherCacheDataset(cache), rows]),
            r"train_dataset.datasets\[1\] is a list of 4 items",
        ),
        (Subset(rows, [0]), "train_dataset.dataset is a list"),
    ]
    for ds, match in cases:
        with pytest.raises(TypeError, match=match) as e:
            TargetSFTTrainer(model, targs(tmp_path), train_dataset=ds)
        assert "data_collator=TargetSFTCollator(cache" in str(e.value)
    with pytest.raises(TypeError, match=r"eval_dataset\['x'\] is a list"):
        TargetSFTTrainer(
            model,
            targs(tmp_path),
            train_dataset=TeacherCacheDataset(cache),
            eval_dataset={"x": rows},
        )
    # a streaming dataset cannot be wrapped
    stream = StreamingTeacherDataset(cache, batch_size=4)
    with pytest.raises(TypeError, match=r"StreamingTeacherDataset inside a Subset.*split_by_key"):
        TargetSFTTrainer(model, targs(tmp_path), train_dataset=Subset(stream, [0]))
    # with a collator, rows with keys are fine; without a teacher loss, HF's collator is used
    TargetSFTTrainer(
        model,
        targs(tmp_path),
        train_dataset=rows,
        data_collator=TargetSFTCollator(TeacherCache(cache), pad_token_id=0),
    )
    t = TargetSFTTrainer(model, targs(tmp_path), train_dataset=rows, loss="sft")
    assert not isinstance(t.data_collator, TargetSFTCollator)
