"""Shared data for the Triton kernel tests (CPU tensors, run under TRITON_INTERPRET=1)."""

from __future__ import annotations

import torch
from torch import Tensor


def require_interpreter() -> None:
    """Fail (not skip) when the kernels would not run in interpreter mode on CPU."""
    import triton.knobs

    assert triton.knobs.runtime.interpret, (
        "TRITON_INTERPRET=1 must be set before triton is imported (tests/conftest.py does it)"
    )


def make_batch(
    n: int, vocab: int, k: int, *, seed: int = 0, scale: float = 2.5
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Float64 logits ``[n, vocab]`` and loss inputs covering the edge cases.

    Confident rows, ignored rows, label inside the support on some rows and outside on others,
    -1 / -inf padding in some supports, all per-token inputs of the presets.
    """
    g = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    y = torch.randint(0, vocab, (n,), generator=g)
    z[1, y[1]] += 12.0
    z[4, y[4]] += 7.0
    y[[3, n - 2]] = -100
    teacher = torch.log_softmax(3.0 * torch.randn(n, vocab, generator=g, dtype=torch.float64), -1)
    teacher[0, y[0]] += 8.0
    teacher[1, y[1]] += 8.0
    teacher = torch.log_softmax(teacher, -1)
    lp, ids = teacher.topk(k, dim=-1)
    ids = ids.to(torch.int32)
    ids[2, -2:] = -1
    lp[2, -2:] = float("-inf")
    ids[5, -1] = -1
    lp[5, -1] = float("-inf")
    sup = [i for i in range(n) if y[i] >= 0]
    assert any(int(y[i]) in ids[i].tolist() for i in sup)
    assert any(int(y[i]) not in ids[i].tolist() for i in sup)
    # the reference model (SFT+KL's / ASFT's anchor): another distribution, a wider support with
    # padding on other rows, the label put in as an extra column on some rows (label_in_support)
    reference = torch.log_softmax(2.0 * torch.randn(n, vocab, generator=g, dtype=torch.float64), -1)
    rlp, rids = reference.topk(k + 2, dim=-1)
    rids = rids.to(torch.int32)
    rids[6, -3:] = -1
    rlp[6, -3:] = float("-inf")
    for r in (0, 4, 7):
        if int(y[r]) >= 0 and int(y[r]) not in rids[r].tolist():
            rids[r, -1] = int(y[r])
            rlp[r, -1] = reference[r, y[r]]
    logp_y = torch.log_softmax(z, -1).gather(1, y.clamp_min(0)[:, None]).squeeze(1)
    kw = {
        "teacher_ids": ids,
        "teacher_logprobs": lp.float(),
        "token_weights": torch.rand(n, generator=g).float(),
        "reference_ids": rids,
        "reference_logprobs": rlp.float(),
        "reference_label_logprobs": (logp_y - 0.2).float(),
        "old_logprobs": (logp_y + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)).float(),
        "sequence_ids": torch.arange(n) // 4,
    }
    return z, y, kw


def as64(kw: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: (v.double() if v.is_floating_point() else v) for k, v in kw.items()}


#: presets run by the kernels (name, constructor kwargs); GEM is PyTorch-only
SUPPORTED: list[tuple[str, dict[str, float | bool]]] = [
    ("sft", {}),
    ("dft", {}),
    ("beyond_log", {"alpha": 0.5}),
    ("profit", {}),
    ("eaft", {"k": 5}),
    ("iw_sft", {"length_normalize": True}),
    ("cft", {}),
    ("label_smoothing", {}),
    ("sft_kl", {}),
    ("sft_kl", {"anchor": "teacher"}),
    ("asft", {}),
    ("asft", {"renormalize": False}),
    ("proximal_sft", {}),
    ("kd", {}),
    ("kd", {"renormalize": False}),
    ("hybrid_kd", {}),
    ("target_sft", {"eta": 0.0}),
    ("target_sft", {"eta": 0.5}),
    ("target_sft", {"eta": 1.0}),
    ("target_sft_constant", {"c": 0.2, "eta": 0.5}),
]


def preset_id(p: tuple[str, dict[str, float | bool]]) -> str:
    name, kw = p
    return name + "".join(f"-{k}={v}" for k, v in kw.items())
