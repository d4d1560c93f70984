#!/usr/bin/env python
"""Time and peak memory of the Q-target losses against plain ``F.cross_entropy``.

Every measurement (each preset and each baseline) runs in a fresh subprocess so that peak memory
is not polluted by earlier runs. The subprocess builds the inputs chunk by chunk (no temporary
N × V buffers), records its resident set size, runs ``--warmup`` + ``--repeat`` forward+backward
passes and reports:

* time: the best (minimum) wall time of one forward + backward over ``--repeat`` passes (robust
  to other load on a shared machine; the median is reported too);
* peak: on CPU ``ru_maxrss`` minus the resident set size before the first pass (i.e. the extra
  memory the loss needed on top of its inputs); on CUDA ``torch.cuda.max_memory_allocated`` minus
  the allocation before the first pass.

Ratios are against ``F.cross_entropy`` on the same logits (``ce``) in the same run. ``ce_fp32`` is
the HF ``ForCausalLMLoss`` style ``F.cross_entropy(logits.float(), labels)``.

Example (the figures in benches/RESULTS.md)::

    PYTHONPATH=python .venv/bin/python benches/bench_losses.py --n 8192 --v 151936 \
        --dtype bf16 --presets sft,dft,target_sft,kd,gem
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

BASELINES = ("ce", "ce_fp32")
TEACHER_PRESETS = {"target_sft", "kd", "hybrid_kd", "sft_kl", "asft"}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])
    n, v, k = args.n, args.v, args.k
    g = torch.Generator(device="cpu").manual_seed(0)

    logits = torch.empty(n, v, dtype=dtype, device=device)
    step = max(1, (1 << 24) // v)
    for s in range(0, n, step):
        e = min(n, s + step)
        logits[s:e].copy_(3.0 * torch.randn(e - s, v, generator=g))
    labels = torch.randint(0, v, (n,), generator=g)
    if args.ignore_every > 0:
        labels[:: args.ignore_every] = -100
    # sparse teacher: K distinct consecutive ids from a random offset, label put in half the rows
    start = torch.randint(0, v - k, (n,), generator=g)
    ids = (start[:, None] + torch.arange(k)[None, :]).to(torch.int32)
    lp = torch.log_softmax(torch.randn(n, k, generator=g), -1) + torch.log(torch.tensor(0.9))
    inputs: dict[str, Any] = {}
    name = args.worker
    if name in TEACHER_PRESETS:
        inputs = {"teacher_ids": ids.to(device), "teacher_logprobs": lp.to(device)}
        if name in ("sft_kl", "asft"):  # their anchor: the reference model's top-k
            inputs = {"reference_ids": ids.to(device), "reference_logprobs": lp.to(device)}
    elif name == "cft":
        inputs = {"token_weights": (torch.rand(n, generator=g) > 0.5).float().to(device)}
    elif name == "iw_sft":
        inputs = {
            "reference_label_logprobs": torch.full((n,), -2.0, device=device),
            "sequence_ids": (torch.arange(n) // 1024).to(device),
        }
    elif name == "proximal_sft":
        inputs = {"old_logprobs": torch.full((n,), -12.0, device=device)}
    labels = labels.to(device)
    logits.requires_grad_(True)

    if name == "ce":

        def step_fn() -> Any:
            return F.cross_entropy(logits, labels)
    elif name == "ce_fp32":

        def step_fn() -> Any:
            return F.cross_entropy(logits.float(), labels)
    else:
        from target_sft.losses import get_preset

        loss = get_preset(name)

        def step_fn() -> Any:
            return loss(logits, labels, **inputs)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times = []
    for i in range(args.warmup + args.repeat):
        logits.grad = None
        t0 = time.perf_counter()
        out = step_fn()
        out.backward()
        sync()
        dt = time.perf_counter() - t0
        del out
        if i >= args.warmup:
            times.append(dt)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {
        "name": name,
        "time_s": min(times),
        "median_s": statistics.median(times),
        "times_s": times,
        "peak_bytes": peak,
        "input_bytes": logits.numel() * logits.element_size(),
    }


def _run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        name,
        "--n",
        str(args.n),
        "--v",
        str(args.v),
        "--k",
        str(args.k),
        "--dtype",
        args.dtype,
        "--repeat",
        str(args.repeat),
        "--warmup",
        str(args.warmup),
        "--device",
        args.device,
        "--ignore-every",
        str(args.ignore_every),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"name": name, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=8192, help="tokens (rows of the logits)")
    ap.add_argument("--v", type=int, default=151936, help="vocabulary size")
    ap.add_argument("--k", type=int, default=64, help="teacher support size")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="logits dtype")
    ap.add_argument(
        "--presets",
        default="sft,dft,target_sft,kd,gem",
        help="comma-separated preset names (see target_sft.losses.PRESETS) or 'all'",
    )
    ap.add_argument(
        "--baselines", default="ce", help=f"comma-separated, from {BASELINES}; 'none' for no ratios"
    )
    ap.add_argument("--repeat", type=int, default=3, help="timed passes (best and median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed passes first")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument(
        "--ignore-every", type=int, default=8, help="label -100 every k-th token (0: none)"
    )
    ap.add_argument("--json", default="", help="also write the results to this file")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(_worker(args)))
        return 0

    if args.presets == "all":
        from target_sft.losses import PRESETS

        presets = sorted(PRESETS)
    else:
        presets = [p for p in args.presets.split(",") if p]
    baselines = [b for b in args.baselines.split(",") if b and b != "none"]
    for b in baselines:
        if b not in BASELINES:
            ap.error(f"unknown baseline {b!r}; choose from {BASELINES} or 'none'")
    if "ce" not in baselines and args.baselines != "none":
        baselines.insert(0, "ce")

    print(
        f"# N={args.n} V={args.v} K={args.k} dtype={args.dtype} device={args.device} "
        f"threads={args.threads or 'default'} repeat={args.repeat} warmup={args.warmup}",
        flush=True,
    )
    results = []
    for name in baselines + presets:
        r = _run_one(name, args)
        results.append(r)
        if "error" in r:
            print(f"{name:>15}: ERROR {r['error']}", flush=True)
        else:
            print(
                f"{name:>15}: best {r['time_s']:.3f} s  median {r['median_s']:.3f} s  "
                f"peak +{r['peak_bytes'] / 2**30:.2f} GiB",
                flush=True,
            )
    ok = [r for r in results if "error" not in r]
    ce = next((r for r in ok if r["name"] == "ce"), None)
    unit = 2**30
    print()
    if ok:
        print(f"logits: {ok[0]['input_bytes'] / unit:.2f} GiB")
    print(
        f"| {'loss':<15} | {'best (s)':>9} | {'× ce':>6} | {'median (s)':>10} "
        f"| {'peak extra (GiB)':>16} | {'× ce':>6} |"
    )
    print(f"|{'-' * 17}|{'-' * 11}|{'-' * 8}|{'-' * 12}|{'-' * 18}|{'-' * 8}|")
    for r in results:
        if "error" in r:
            print(f"| {r['name']:<15} | {'error':>9} | {'':>6} | {'':>10} | {'':>16} | {'':>6} |")
            continue
        nan = float("nan")
        tr = r["time_s"] / ce["time_s"] if ce else nan
        mr = r["peak_bytes"] / ce["peak_bytes"] if ce and ce["peak_bytes"] > 0 else nan
        print(
            f"| {r['name']:<15} | {r['time_s']:>9.3f} | {tr:>6.2f} | {r['median_s']:>10.3f} "
            f"| {r['peak_bytes'] / unit:>16.2f} | {mr:>6.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
