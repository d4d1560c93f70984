"""HF alignment, reductions, gradient accumulation and all-ignored batches."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from target_sft import losses as L
from target_sft import target_sft_loss

TOL = 1e-10
B, T, V, K = 3, 9, 37, 6


def seq_batch(seed: int = 0, *, b: int = B, t: int = T, k: int = K) -> dict[str, Tensor]:
    """HF-style [B, T, V] logits and [B, T] labels, teacher and reference tensors aligned with
    labels."""
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(b, t, V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (b, t), generator=g)
    y[:, :2] = -100  # prompt
    y[0, -2:] = -100  # padding
    teacher = torch.log_softmax(2.0 * torch.randn(b, t, V, generator=g, dtype=torch.float64), -1)
    lp, ids = teacher.topk(k, -1)
    reference = torch.log_softmax(torch.randn(b, t, V, generator=g, dtype=torch.float64), -1)
    rlp, rids = reference.topk(k + 1, -1)
    logp_y = torch.zeros(b, t, dtype=torch.float64)
    logp_y[:, 1:] = (
        torch.log_softmax(z[:, :-1], -1).gather(-1, y[:, 1:].clamp_min(0)[..., None]).squeeze(-1)
    )
    return {
        "z": z,
        "y": y,
        "teacher_ids": ids.to(torch.int32),
        "teacher_logprobs": lp.float(),
        "token_weights": torch.rand(b, t, generator=g, dtype=torch.float64),
        "reference_ids": rids.to(torch.int32),
        "reference_logprobs": rlp.float(),
        "reference_label_logprobs": logp_y
        - 0.1 * torch.rand(b, t, generator=g, dtype=torch.float64),
        "old_logprobs": logp_y + 0.4 * (torch.rand(b, t, generator=g, dtype=torch.float64) - 0.5),
        "sequence_ids": torch.arange(b)[:, None].expand(b, t),  # one sample per row
    }


def extras(d: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in d.items() if k not in ("z", "y")}


def hf_causal_lm_loss(
    logits: Tensor, labels: Tensor, num_items_in_batch: int | None = None
) -> Tensor:
    """transformers' ForCausalLMLoss, written out."""
    logits = logits.float() if logits.dtype != torch.float64 else logits
    labels = F.pad(labels, (0, 1), value=-100)
    shift_labels = labels[..., 1:].contiguous()
    logits = logits.view(-1, logits.shape[-1])
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(logits, shift_labels.view(-1), ignore_index=-100, reduction=reduction)
    return loss / num_items_in_batch if num_items_in_batch is not None else loss


def test_sft_shift_matches_hf_for_causal_lm_loss() -> None:
    d = seq_batch()
    z1 = d["z"].clone().requires_grad_(True)
    z2 = d["z"].clone().requires_grad_(True)
    a = L.SFT()(z1, d["y"])
    b = hf_causal_lm_loss(z2, d["y"])
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)
    torch.testing.assert_close(z1.grad, z2.grad, atol=TOL, rtol=TOL)
    n = int((d["y"][:, 1:] != -100).sum())
    torch.testing.assert_close(
        L.SFT()(d["z"], d["y"], num_items_in_batch=3 * n),
        hf_causal_lm_loss(d["z"], d["y"], 3 * n),
        atol=TOL,
        rtol=TOL,
    )
    # the gradient of the last position (which predicts nothing) is exactly zero
    assert bool((z1.grad[:, -1] == 0).all())


@pytest.mark.parametrize("name", sorted(L.PRESETS))
def test_3d_input_equals_manually_shifted_2d_input(name: str) -> None:
    d = seq_batch(1)
    loss = L.get_preset(name, **({"tau": 0.02} if name == "profit" else {}))
    z3 = d["z"].clone().requires_grad_(True)
    out3 = loss(z3, d["y"], reduction="none", **extras(d))
    out3.sum().backward()

    # manual alignment: row (b, t) of the logits predicts labels[b, t + 1]
    z2 = d["z"][:, :-1].reshape(-1, V).clone().requires_grad_(True)
    kw = {k: v[:, 1:].reshape(-1, *v.shape[2:]) for k, v in extras(d).items()}
    kw["sequence_ids"] = torch.arange(B).repeat_interleave(T - 1)
    out2 = loss(z2, d["y"][:, 1:].reshape(-1), reduction="none", **kw)
    out2.sum().backward()
    assert out3.shape == (B, T)
    torch.testing.assert_close(out3[:, :-1].reshape(-1), out2, atol=TOL, rtol=TOL)
    assert bool((out3[:, -1] == 0).all())
    torch.testing.assert_close(z3.grad[:, :-1].reshape(-1, V), z2.grad, atol=TOL, rtol=TOL)


def test_model_as_its_own_teacher_is_dft_only_when_aligned() -> None:
    """A cache built from the student itself: teacher_ids[b, t] = top-V of log_softmax(logits[b, t-1]).

    Then π̃ = π_θ for every η and TARGET-SFT has exactly DFT's gradient; an off-by-one cache does not.
    """
    d = seq_batch(2)
    z, y = d["z"], d["y"]
    own = torch.log_softmax(z, -1)
    lp, ids = own.topk(V, -1)  # full support
    aligned_ids = torch.full_like(ids, -1)
    aligned_lp = torch.full_like(lp, float("-inf"))
    aligned_ids[:, 1:] = ids[:, :-1]
    aligned_lp[:, 1:] = lp[:, :-1]
    dft = z.clone().requires_grad_(True)
    L.DFT()(dft, y).backward()
    for eta in (0.5, 1.0):
        zz = z.clone().requires_grad_(True)
        target_sft_loss(zz, y, aligned_ids.int(), aligned_lp, eta=eta).backward()
        torch.testing.assert_close(zz.grad, dft.grad, atol=TOL, rtol=TOL)
        # the classic off-by-one: cache indexed by logits position instead of label position
        zz = z.clone().requires_grad_(True)
        target_sft_loss(zz, y, ids.int(), lp, eta=eta).backward()
        assert not torch.allclose(zz.grad, dft.grad, atol=1e-4)


def test_reductions_and_num_items() -> None:
    d = seq_batch(3)
    loss = L.TargetSFT(eta=0.5)
    none = loss(d["z"], d["y"], reduction="none", **extras(d))
    total = loss(d["z"], d["y"], reduction="sum", **extras(d))
    mean = loss(d["z"], d["y"], **extras(d))
    n = int((d["y"][:, 1:] != -100).sum())
    torch.testing.assert_close(total, none.sum(), atol=TOL, rtol=TOL)
    torch.testing.assert_close(mean, none.sum() / n, atol=TOL, rtol=TOL)
    for num in (57, torch.tensor(57), torch.tensor([57.0])):
        got = loss(d["z"], d["y"], num_items_in_batch=num, **extras(d))
        torch.testing.assert_close(got, none.sum() / 57, atol=TOL, rtol=TOL)
    assert loss(d["z"], d["y"], **extras(d)).dtype == torch.float64
    assert loss(d["z"].float(), d["y"], **extras(d)).dtype == torch.float32
    assert loss(d["z"].bfloat16(), d["y"], **extras(d)).dtype == torch.float32


ACCUM_PRESETS: list[tuple[str, Callable[[], L.QTargetLoss]]] = [
    ("sft", L.SFT),
    ("dft", L.DFT),
    ("target_sft", lambda: L.TargetSFT(eta=0.5)),
    ("gem", L.GEM),
    ("hybrid_kd", L.HybridKD),
    ("iw_sft", L.IwSFT),
    ("label_smoothing", L.LabelSmoothing),
]


@pytest.mark.parametrize(("name", "make"), ACCUM_PRESETS, ids=[n for n, _ in ACCUM_PRESETS])
def test_gradient_accumulation_equals_full_batch(
    name: str, make: Callable[[], L.QTargetLoss]
) -> None:
    """4 micro-batches with different supervised counts, num_items_in_batch = global count."""
    d = seq_batch(4, b=8)
    y = d["y"].clone()
    y[0:2, 2:7] = -100  # micro-batch 0: few supervised tokens
    y[4:6, :] = -100  # micro-batch 2: none at all
    y[4, 5] = 3  # ... except one
    y[6, 4:] = -100  # micro-batch 3: a short sequence
    counts = [int((y[i : i + 2, 1:] != -100).sum()) for i in range(0, 8, 2)]
    assert len(set(counts)) == 4
    total = sum(counts)
    loss = make()

    full = d["z"].clone().requires_grad_(True)
    loss(full, y, **extras(d)).backward()

    parts = []
    for i in range(0, 8, 2):
        zi = d["z"][i : i + 2].clone().requires_grad_(True)
        kw = {k: v[i : i + 2] for k, v in extras(d).items()}
        n = torch.tensor(total) if i % 4 == 0 else total  # int or 0-dim tensor
        loss(zi, y[i : i + 2], num_items_in_batch=n, **kw).backward()
        parts.append(zi.grad)
    torch.testing.assert_close(torch.cat(parts), full.grad, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("name", sorted(L.PRESETS))
@pytest.mark.parametrize("shape", ["2d", "3d", "3d_len1"])
def test_all_ignored_gives_zero_loss_and_zero_grad(name: str, shape: str) -> None:
    d = seq_batch(5)
    if shape == "2d":
        z = d["z"].reshape(-1, V)
        y = torch.full((B * T,), -100)
        kw = {k: v.reshape(-1, *v.shape[2:]) for k, v in extras(d).items()}
        kw["sequence_ids"] = torch.arange(B).repeat_interleave(T)
    elif shape == "3d":
        z, y, kw = d["z"], torch.full((B, T), -100), extras(d)
    else:  # one position per sequence: nothing can be predicted after the shift
        z, y = d["z"][:, :1], d["y"][:, :1].clamp_min(0)
        kw = {k: v[:, :1] for k, v in extras(d).items()}
    for kind in ("mean", "sum", "num_items"):
        zz = z.clone().requires_grad_(True)
        loss = L.get_preset(name)
        if kind == "num_items":
            out = loss(zz, y, num_items_in_batch=torch.tensor(0), **kw)
        else:
            out = loss(zz, y, reduction=kind, **kw)
        out.backward()
        assert float(out.detach()) == 0.0 and bool(torch.isfinite(out.detach()))
        assert zz.grad is not None and bool((zz.grad == 0).all())
