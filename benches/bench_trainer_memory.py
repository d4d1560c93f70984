#!/usr/bin/env python
"""Peak memory of one Trainer step with and without ``fused_linear`` (docs/HF.md).

One step is the forward + backward of :func:`target_sft.hf.compute_target_sft_loss` (what
``TargetSFTTrainer.compute_loss`` runs, then ``backward``) on a causal LM with a tiny body and a
large vocabulary (default: Llama-style, hidden 256, 2 layers, V = 151,936 as Qwen2/Qwen3, untied
LM head), batch 2 × 512 tokens, TARGET-SFT with a top-64 teacher. Each variant runs in a fresh
subprocess:

* ``logits``: ``fused_linear=False`` — the model's ``[B, L, V]`` logits, the loss on them;
* ``fused``: ``fused_linear=True`` — the last hidden states and the LM head, never ``[B, L, V]``
  (the chunked PyTorch reference on CPU, the Triton kernels on CUDA).

Peak: on CPU the growth of the resident set size during the step (the kernel's high-water mark
``VmHWM``, reset just before the step through ``/proc/self/clear_refs``; else ``ru_maxrss``,
which can only over-state the baseline's peak); on CUDA ``torch.cuda.max_memory_allocated`` minus
the allocation before the step. It includes the parameter gradients the step creates (their
size is printed; the same in both variants). Also the wall time of the step and the loss (equal in both variants). The ratio is
measured in the same run.

Example (the figures in benches/RESULTS.md)::

    PYTHONPATH=python .venv/bin/python benches/bench_trainer_memory.py
    PYTHONPATH=python .venv/bin/python benches/bench_trainer_memory.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

VARIANTS = ("logits", "fused")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
MIB = 1 << 20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def _reset_cpu_peak() -> bool:
    """Reset the kernel's RSS high-water mark (Linux ``clear_refs`` 5); whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_peak_bytes(reset: bool) -> int:
    if reset:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _batch(args: argparse.Namespace, device: Any) -> dict[str, Any]:
    """A collated batch (docs/DATA.md): padded layout, the prompt (first eighth) unsupervised,
    a top-``k`` teacher row at every supervised position."""
    import torch

    g = torch.Generator().manual_seed(0)
    b, length, v, k = args.batch, args.seq, args.vocab, args.k
    ids = torch.randint(3, v, (b, length), generator=g)
    labels = ids.clone()
    labels[:, : length // 8] = -100
    sup = labels != -100
    base = torch.randint(0, v, (b, length, 1), generator=g)
    stride = torch.randint(1, v // k, (b, length, 1), generator=g)
    t_ids = ((base + stride * torch.arange(k)) % v).to(torch.int32)  # k distinct ids per row
    t_lp = torch.log_softmax(3 * torch.randn(b, length, k, generator=g), -1) - 0.1
    t_lp = t_lp.sort(-1, descending=True).values
    t_ids = torch.where(sup[..., None], t_ids, torch.full_like(t_ids, -1))
    t_lp = torch.where(sup[..., None], t_lp, torch.full_like(t_lp, float("-inf")))
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "teacher_ids": t_ids,
        "teacher_logprobs": t_lp.float(),
    }
    return {name: t.to(device) for name, t in batch.items()}


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from target_sft.hf import compute_target_sft_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max(512, args.seq),
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    model.config.use_cache = False
    model.train()
    batch = _batch(args, device)
    fused = args.child == "fused"

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
        reset = _reset_cpu_peak()
    t0 = time.perf_counter()
    loss = compute_target_sft_loss(model, batch, "target_sft", eta=0.5, fused_linear=fused)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
        how = "torch.cuda.max_memory_allocated"
    else:
        peak = _cpu_peak_bytes(reset) - base
        how = "VmHWM (reset)" if reset else "ru_maxrss"
    grads = sum(
        p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None
    )
    return {
        "variant": args.child,
        "peak_mib": peak / MIB,
        "grads_mib": grads / MIB,
        "seconds": seconds,
        "loss": float(loss),
        "measured_by": how,
        "logits_mib": args.batch * args.seq * args.vocab * 4 / MIB,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--k", type=int, default=64, help="teacher top-k")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_worker(args)))
        return
    print(
        f"one Trainer step (compute_target_sft_loss forward + backward), TARGET-SFT η=0.5: "
        f"Llama-style body hidden={args.hidden} layers={args.layers}, V={args.vocab:,}, "
        f"batch {args.batch} × {args.seq} tokens, top-{args.k} teacher, {args.dtype} on "
        f"{args.device}"
    )
    rows = {}
    for variant in VARIANTS:
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child", variant]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    logits_mib = rows["logits"]["logits_mib"]
    print(f"(float32 [B, L, V] logits alone: {logits_mib:.0f} MiB)")
    print(f"{'variant':<8} {'peak MiB':>10} {'param grads MiB':>16} {'step s':>8} {'loss':>10}")
    for variant, r in rows.items():
        print(
            f"{variant:<8} {r['peak_mib']:>10.0f} {r['grads_mib']:>16.0f} {r['seconds']:>8.2f} "
            f"{r['loss']:>10.5f}"
        )
    ratio = rows["logits"]["peak_mib"] / max(rows["fused"]["peak_mib"], 1e-9)
    print(f"peak ratio logits / fused: {ratio:.2f}x (measured by {rows['fused']['measured_by']})")


if __name__ == "__main__":
    main()
