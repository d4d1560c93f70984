#!/usr/bin/env python
"""Fused Target-SFT kernels vs cross-entropy baselines on CUDA (time, peak memory, bf16 error).

Runs on CUDA only; on a machine without a GPU it prints a message and exits 0. For every shape
(N tokens × V vocabulary × H hidden, bf16) it measures, in one run, forward + backward of:

* ``ce``            — ``F.cross_entropy`` on materialised bf16 logits (the baseline of the ratios);
* ``torch_ref``     — our PyTorch reference ``target_sft_loss(impl="torch")`` on the same logits;
* ``triton_logits`` — ``target_sft_loss(impl="triton", inplace_grad=True)`` on the same logits;
* ``liger_flce``    — ``liger_kernel`` fused linear cross entropy (if installed);
* ``cce``           — ``cut_cross_entropy.linear_cross_entropy`` (if installed);
* ``triton_fused``  — ``fused_linear_target_sft_loss(impl="triton")`` from hidden states.

Logits-level rows start from materialised logits (the time and memory of the LM-head matmul are
not included, as for ``F.cross_entropy``); fused rows start from ``hidden`` and the weight and
include the matmuls. Time: CUDA events, ``--warmup`` passes, median of ``--repeat``. Peak memory:
``torch.cuda.max_memory_allocated()`` minus the allocation before the pass (inputs excluded;
gradients included). A final table gives the gradient error vs float64 on a small shape.

    .venv/bin/python benches/bench_kernels.py                  # all shapes of the issue
    .venv/bin/python benches/bench_kernels.py --n 4096 --v 151936 --h 4096
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

K = 64
ETA = 0.5


def _inputs(n: int, v: int, h: int, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    hidden = torch.randn(n, h, device=dev, generator=g, dtype=torch.bfloat16)
    weight = (torch.randn(v, h, device=dev, generator=g, dtype=torch.bfloat16) / h**0.5).mul_(4)
    labels = torch.randint(0, v, (n,), device=dev, generator=g)
    labels[::7] = -100
    ids = torch.randint(0, v, (n, K), device=dev, generator=g, dtype=torch.int32)
    # unique ids per row: offset a random permutation of K buckets
    ids = (ids % (v // K)) * K + torch.arange(K, device=dev, dtype=torch.int32)
    lp = torch.log_softmax(torch.randn(n, K, device=dev, generator=g), -1) - 0.05
    return {"hidden": hidden, "weight": weight, "labels": labels, "ids": ids, "lp": lp}


def _measure(fn: Callable[[], None], warmup: int, repeat: int) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return statistics.median(times), peak


def _competitors(d: dict[str, Any]) -> dict[str, Callable[[], None] | str]:
    from target_sft import fused_linear_target_sft_loss
    from target_sft.losses import target_sft_loss

    hidden, weight, labels, ids, lp = d["hidden"], d["weight"], d["labels"], d["ids"], d["lp"]
    logits = hidden @ weight.T  # materialised once for the logits-level rows
    out: dict[str, Callable[[], None] | str] = {}

    def ce() -> None:
        z = logits.detach().requires_grad_(True)
        F.cross_entropy(z, labels).backward()

    def torch_ref() -> None:
        z = logits.detach().requires_grad_(True)
        target_sft_loss(z, labels, ids, lp, eta=ETA, impl="torch", check_inputs=False).backward()

    def triton_logits() -> None:
        z = logits.detach().clone().requires_grad_(True)  # in place: the clone is consumed
        target_sft_loss(
            z, labels, ids, lp, eta=ETA, impl="triton", inplace_grad=True, check_inputs=False
        ).backward()

    def triton_fused() -> None:
        e = hidden.detach().requires_grad_(True)
        w = weight.detach().requires_grad_(True)
        fused_linear_target_sft_loss(
            e, w, labels, ids, lp, eta=ETA, impl="triton", check_inputs=False
        ).backward()

    out["ce"], out["torch_ref"], out["triton_logits"] = ce, torch_ref, triton_logits
    if importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        flce = LigerFusedLinearCrossEntropyLoss()

        def liger() -> None:
            e = hidden.detach().requires_grad_(True)
            w = weight.detach().requires_grad_(True)
            flce(w, e, labels).backward()

        out["liger_flce"] = liger
    else:
        out["liger_flce"] = "not installed: pip install liger-kernel"
    if importlib.util.find_spec("cut_cross_entropy") is not None:
        from cut_cross_entropy import linear_cross_entropy

        def cce() -> None:
            e = hidden.detach().requires_grad_(True)
            w = weight.detach().requires_grad_(True)
            linear_cross_entropy(e, w, labels, ignore_index=-100).backward()

        out["cce"] = cce
    else:
        out["cce"] = "not installed: pip install cut-cross-entropy"
    out["triton_fused"] = triton_fused
    return out


def _grad_error() -> list[str]:
    """Max |grad − grad64| / max |grad64| for bf16 inputs on a small shape."""
    from target_sft import fused_linear_target_sft_loss
    from target_sft.losses import target_sft_loss

    d = _inputs(512, 32003, 256, seed=1)
    e, w, y, ids, lp = d["hidden"], d["weight"], d["labels"], d["ids"], d["lp"]
    e64 = e.double().requires_grad_(True)
    w64 = w.double().requires_grad_(True)
    z64 = (e64 @ w64.T).requires_grad_(True)
    z64.retain_grad()
    target_sft_loss(z64, y, ids, lp.double(), eta=ETA, impl="torch").backward()
    rows = []

    def rel(a: torch.Tensor, r: torch.Tensor) -> float:
        return float((a.double() - r).abs().max() / r.abs().max())

    for impl in ("torch", "triton"):
        z = (e @ w.T).detach().requires_grad_(True)
        target_sft_loss(z, y, ids, lp, eta=ETA, impl=impl).backward()
        assert z.grad is not None and z64.grad is not None
        rows.append(f"| logits, impl={impl} | dlogits | {rel(z.grad, z64.grad):.2e} |")
    ee, ww = e.detach().requires_grad_(True), w.detach().requires_grad_(True)
    fused_linear_target_sft_loss(ee, ww, y, ids, lp, eta=ETA, impl="triton").backward()
    assert ee.grad is not None and ww.grad is not None and e64.grad is not None
    assert w64.grad is not None
    rows.append(f"| fused-linear, triton | dhidden | {rel(ee.grad, e64.grad):.2e} |")
    rows.append(f"| fused-linear, triton | dweight | {rel(ww.grad, w64.grad):.2e} |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, nargs="*", default=[4096, 16384, 32768])
    ap.add_argument("--v", type=int, nargs="*", default=[128256, 151936])
    ap.add_argument("--h", type=int, nargs="*", default=[1536, 4096])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (none found): nothing measured.")
        return 0
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| N | V | H | impl | time ms | × ce | peak GiB | × ce |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|")
    hints: set[str] = set()
    for n in args.n:
        for v in args.v:
            for h in args.h:
                d = _inputs(n, v, h)
                base: tuple[float, float] | None = None
                for name, fn in _competitors(d).items():
                    if isinstance(fn, str):
                        hints.add(f"{name}: {fn}")
                        continue
                    try:
                        t, m = _measure(fn, args.warmup, args.repeat)
                    except torch.cuda.OutOfMemoryError:
                        print(f"| {n} | {v} | {h} | {name} | OOM | | | |")
                        torch.cuda.empty_cache()
                        continue
                    if name == "ce":
                        base = (t, m)
                    rt = f"{t / base[0]:.2f}" if base else "–"
                    rm = f"{m / base[1]:.2f}" if base and base[1] > 0 else "–"
                    print(f"| {n} | {v} | {h} | {name} | {t:.1f} | {rt} | {m:.2f} | {rm} |")
                    sys.stdout.flush()
                del d
                torch.cuda.empty_cache()
    for hint in sorted(hints):
        print(f"skipped {hint}")
    print("\nbf16 gradient error vs float64 (N = 512, V = 32003, H = 256; max abs err / max abs):")
    print("| kernel | gradient | rel. error |\n|---|---|---:|")
    for row in _grad_error():
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
