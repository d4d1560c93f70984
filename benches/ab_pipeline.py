"""A/B of the loss pipeline between two checkouts: CPU seconds of one forward + backward.

    python benches/ab_pipeline.py OLD_CHECKOUT NEW_CHECKOUT   # each with its built _core .so

Each side runs in its own subprocess (its own ``python/`` on ``PYTHONPATH``); the sides alternate
for 5 rounds and the minimum over rounds × passes is kept. The time is the computing thread's CPU
time (``time.thread_time``, one torch thread), far less sensitive to other load on a shared
machine than wall time; ratios are against ``F.cross_entropy`` on the same logits in the same
subprocess. Shapes: N = 2048 rows, V = 32,000, bf16 logits, top-64 teacher.
"""

import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
NAMES = ("ce", "sft", "target_sft")
torch.set_num_threads(1)
import target_sft as ts
from target_sft.losses import get_preset
g = torch.Generator().manual_seed(0)
n, v, k = 2048, 32000, 64
z = (torch.randn(n, v, generator=g) * 2).to(torch.bfloat16)
y = torch.randint(0, v, (n,), generator=g)
tid = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
tlp = torch.log_softmax(torch.randn(n, k, generator=g), -1)
out = {}
for name in NAMES:
    if name == "ce":
        f = lambda x: torch.nn.functional.cross_entropy(x, y)
    else:
        fn = get_preset(name, impl="torch")
        f = lambda x: fn(x, y, teacher_ids=tid, teacher_logprobs=tlp)
    best = 1e9
    for i in range(8):
        x = z.clone().requires_grad_(True)
        t0 = time.thread_time()
        f(x).backward()
        dt = time.thread_time() - t0
        if i: best = min(best, dt)
    out[name] = best
print(json.dumps(out))
"""

sides = sys.argv[1:]
res = {s: [] for s in sides}
for _round in range(5):
    for s in sides:
        r = subprocess.run(
            [sys.executable, "-c", CHILD],
            env={"PYTHONPATH": f"{s}/python", "PATH": os.environ.get("PATH", "")},
            capture_output=True,
            text=True,
        )
        if r.returncode:
            print(r.stderr[-1500:])
            sys.exit(1)
        res[s].append(json.loads(r.stdout.strip().splitlines()[-1]))
for s in sides:
    best = {k: min(r[k] for r in res[s]) for k in res[s][0]}
    print(s, " ".join(f"{k}={best[k]:.3f}s(x{best[k] / best['ce']:.2f})" for k in best))
