"""One process of the multi-process Trainer tests of tests/hf/test_accelerate.py (not a test
module): started by ``torchrun`` or ``accelerate launch`` (2 CPU processes, gloo).

Usage: ``<launcher> accelerate_child.py MODEL CACHE OUT TAG STOP RESUME [LOSS]``

Trains a :class:`TargetSFTTrainer` twice, over a ``StreamingTeacherDataset`` (the train side of
``split_by_key``, a key filter every rank applies) and over a ``TeacherCacheDataset``, with gradient accumulation 2, AdamW and a linear schedule, for
``MAX_STEPS`` optimizer steps. ``STOP > 0``: save a checkpoint at step ``STOP`` and stop there
(an interrupted run, its schedule still planned for ``MAX_STEPS``). ``RESUME`` (``1``): continue
from that checkpoint. Rank 0 writes every parameter to ``OUT/TAG-<kind>.safetensors``.
``LOSS`` (default ``target_sft``): with ``proximal_sft`` every rank also writes its old-policy
store to ``OUT/TAG-<kind>-store<rank>.npz``.
"""

from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM, TrainerCallback, TrainingArguments

from target_sft import StreamingTeacherDataset, TeacherCacheDataset, split_by_key
from target_sft.hf import TargetSFTTrainer

MAX_STEPS = 6  # 3 optimizer steps an epoch per rank (see test_accelerate.py): crosses an epoch
BATCH, ACCUM = 2, 2
EVAL_FRACTION = 0.25


class StopAt(TrainerCallback):
    """Save and stop at ``step``: what a preempted job leaves behind."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True
        return control


def train(
    model_dir: str,
    cache: str,
    out: str,
    tag: str,
    kind: str,
    stop: int,
    resume: bool,
    workers: int = 0,
    loss: str = "target_sft",
) -> None:
    """One run (module docstring); ``workers``: ``dataloader_num_workers``."""
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if kind == "stream":
        ds = StreamingTeacherDataset(cache, shuffle=True, seed=3, batch_size=BATCH)
        ds = split_by_key(ds, eval_fraction=EVAL_FRACTION, seed=0)[0]
    else:
        ds = TeacherCacheDataset(cache)
    run_dir = os.path.join(out, f"run-{tag.split('.')[0]}-{kind}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = TrainingArguments(
        output_dir=run_dir,
        use_cpu=True,
        ddp_backend="gloo" if world > 1 else None,
        report_to=[],
        disable_tqdm=True,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM,
        max_steps=MAX_STEPS,
        learning_rate=1e-2,
        warmup_steps=1,
        save_strategy="no",
        dataloader_num_workers=workers,
        seed=0,
        logging_steps=1,
    )
    callbacks = [StopAt(stop)] if stop and not resume else []
    trainer = TargetSFTTrainer(
        model,
        args,
        train_dataset=ds,
        loss=loss,
        loss_kwargs={"eta": 0.5} if loss == "target_sft" else {},
        callbacks=callbacks,
    )
    # the launcher's processes (two, joined by gloo), each with its own share of every batch
    assert trainer.accelerator.num_processes == world, trainer.accelerator.state
    if world > 1:
        assert torch.distributed.get_backend() == "gloo"
    ckpt = None
    if resume:
        ckpt = os.path.join(run_dir, f"checkpoint-{stop}")
    trainer.train(resume_from_checkpoint=ckpt)
    if trainer.is_world_process_zero():
        params = {k: v.detach().contiguous() for k, v in model.named_parameters()}
        save_file(params, os.path.join(out, f"{tag}-{kind}.safetensors"))
    if trainer.old_policy is not None:
        rank = int(os.environ.get("RANK", "0"))
        trainer.old_policy.store.save(os.path.join(out, f"{tag}-{kind}-store{rank}.npz"))


def main() -> None:
    model_dir, cache, out, tag, stop, resume = sys.argv[1:7]
    loss = sys.argv[7] if len(sys.argv) > 7 else "target_sft"
    torch.set_num_threads(1)
    for kind in ("stream", "map"):
        train(model_dir, cache, out, tag, kind, int(stop), resume == "1", loss=loss)


if __name__ == "__main__":
    main()
