"""Cache-building benchmark: how much of a build is *not* the teacher, and the writer alone.

One run measures, on the same samples and the same batch plan:

* ``forward only``: the teacher forward pass plus the on-device log-softmax / top-k of every
  batch, results copied to the host, nothing written (the baseline: what any builder must do);
* ``build``: :func:`target_sft.build_teacher_cache` end to end (planning, the teacher, handing
  records to the writer, encoding and writing shards, the final manifest);
* ``writer alone``: the same records added to a :class:`CacheWriter` (validation, encoding,
  writing; the CPU cost the build overlaps with the teacher).

The overhead of the build is ``1 - forward_only / build`` (target: at most 10%). On a CPU the
writer's encoder threads compete with the teacher for the same cores, so the overhead there is
an upper bound of what a GPU build sees. With a GPU the default model is Qwen2-0.5B-shaped
(random weights, bf16); on CPU a small Llama. Timings are the best of ``--repeats``.

    python benches/bench_build.py                 # CPU defaults
    python benches/bench_build.py --preset qwen0.5b --samples 2000   # on a GPU
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from target_sft import CacheWriter, TeacherCache
from target_sft.builder import build_teacher_cache, plan_batches
from target_sft.builder.inputs import make_item
from target_sft.builder.teacher import TeacherRunner, collate
from target_sft.sft_data import SFTSource

PRESETS = {
    # name: (hidden, layers, heads, kv heads, intermediate, vocab)
    "cpu-small": (256, 4, 4, 2, 768, 32_000),
    "qwen0.5b": (896, 24, 14, 2, 4864, 151_936),
    "qwen1.5b": (1536, 28, 12, 2, 8960, 151_936),
}


def make_model(preset: str, device: str, dtype: torch.dtype, path: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    h, n_layers, heads, kv, inter, vocab = PRESETS[preset]
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=h,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(dtype)
    model.save_pretrained(path)
    return path


def make_samples(n: int, mean_len: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = int(np.clip(rng.lognormal(np.log(mean_len), 0.5), 16, 4 * mean_len))
        ids = rng.integers(0, vocab, t)
        labels = ids.copy()
        labels[: int(t * rng.uniform(0.2, 0.5))] = -100  # a prompt, ~60% supervised
        out.append({"id": i, "input_ids": ids, "labels": labels})
    return out


def forward_only(model, samples, *, top_k, batch_tokens, window) -> tuple[float, list]:
    """The teacher's work on the build's own batch plan; returns (seconds, host results)."""
    runner = TeacherRunner(model, top_k, 1.0, 1 << 30)
    src = SFTSource(samples)
    items = [make_item(src, i, s) for i, s in enumerate(samples)]
    t0 = time.perf_counter()
    results = []
    for w in range(0, len(items), window):
        win = items[w : w + window]
        for idx in plan_batches([len(it.input_ids) for it in win], batch_tokens, 256):
            p = runner.submit(collate([win[i] for i in idx], 0, "right"))
            p.teacher_seconds()  # waits for the device
            results.append(p)
    return time.perf_counter() - t0, results


def writer_alone(results, out: Path, top_k: int, vocab: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) to add every record to a CacheWriter and close it."""
    t0, c0 = time.perf_counter(), time.process_time()
    with CacheWriter(out, top_k=top_k, vocab_size=vocab) as w:
        for p in results:
            ids, lp, lab, rk = (x.numpy() for x in (p.ids, p.lp, p.lab, p.rank))
            row = 0
            for it, c in zip(p.batch.items, p.batch.counts, strict=True):
                w.add(
                    it.key,
                    it.input_ids,
                    it.labels,
                    ids[row : row + c],
                    lp[row : row + c],
                    lab[row : row + c],
                    rk[row : row + c],
                )
                row += c
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    cuda = torch.cuda.is_available()
    ap.add_argument(
        "--preset", choices=sorted(PRESETS), default="qwen0.5b" if cuda else "cpu-small"
    )
    ap.add_argument("--samples", type=int, default=2000 if cuda else 160)
    ap.add_argument("--mean-length", type=int, default=1024 if cuda else 384)
    ap.add_argument("--batch-tokens", type=int, default=32_768 if cuda else 4096)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    tmp = Path(tempfile.mkdtemp(prefix="tsft-bench-build-"))
    try:
        path = make_model(args.preset, device, dtype, tmp / "model")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        vocab = PRESETS[args.preset][5]
        samples = make_samples(args.samples, args.mean_length, vocab)
        sup = sum(int((s["labels"][1:] != -100).sum()) for s in samples)
        tokens = sum(len(s["input_ids"]) for s in samples)
        kw = dict(top_k=args.top_k, batch_tokens=args.batch_tokens, window=len(samples))
        forward_only(model, samples[: max(4, len(samples) // 20)], **kw)  # warm-up
        fwd, build, results = [], [], None
        for r in range(args.repeats):
            t, results = forward_only(model, samples, **kw)
            fwd.append(t)
            out = tmp / f"cache{r}"
            t0 = time.perf_counter()
            res = build_teacher_cache(model, samples, out, progress=False, **kw)
            build.append(time.perf_counter() - t0)
        info = TeacherCache(out).info
        w_wall, w_cpu = writer_alone(results, tmp / "writer", args.top_k, vocab)
        f, b = min(fwd), min(build)
        print(
            f"# bench_build: {platform.node()} {platform.machine()}, torch {torch.__version__}, "
            f"{'GPU ' + torch.cuda.get_device_name() if cuda else f'CPU, {torch.get_num_threads()} torch threads'}"
        )
        print(
            f"model {args.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, "
            f"{str(dtype).removeprefix('torch.')}), {len(samples)} samples, {tokens:,} tokens, "
            f"{sup:,} supervised, top-{args.top_k}, batch_tokens {args.batch_tokens}, "
            f"{res.stats.batches} batches; best of {args.repeats}"
        )
        print("| run | seconds | supervised tok/s | vs forward only |")
        print("|---|---:|---:|---:|")
        print(f"| forward only (teacher + top-k) | {f:.2f} | {sup / f:,.0f} | 1.00 |")
        print(f"| build_teacher_cache | {b:.2f} | {sup / b:,.0f} | {f / b:.2f} |")
        print(
            f"| writer alone (same records) | {w_wall:.2f} | {sup / w_wall:,.0f} | "
            f"CPU {w_cpu:.2f} s = {sup / w_cpu:,.0f} tok/s/core |"
        )
        print(
            f"overhead of the build (1 - forward/build): {100 * (1 - f / b):.1f}% (target <= 10%); "
            f"cache {info.bytes_per_token:.1f} bytes/supervised token"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
