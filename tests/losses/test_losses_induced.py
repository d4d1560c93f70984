"""Eq. 6 (Q = p − ∂L/∂z) for arbitrary losses, and the Figure-3 curves for every preset."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from target_sft import induced_target
from target_sft import losses as L

TOL = 1e-10


def test_sft_induced_target_is_one_hot_eq13() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(10, 17, generator=g, dtype=torch.float64)
    y = torch.randint(0, 17, (10,), generator=g)
    q = induced_target(F.cross_entropy, z, y)  # reduction="sum" is passed automatically
    torch.testing.assert_close(q, F.one_hot(y, 17).double(), atol=TOL, rtol=TOL)
    # a loss without a reduction keyword: per-token output is summed
    q2 = induced_target(lambda z, y: -torch.log_softmax(z, -1).gather(1, y[:, None]), z, y)
    torch.testing.assert_close(q2, F.one_hot(y, 17).double(), atol=TOL, rtol=TOL)


def test_any_softmax_loss_induces_a_normalised_target() -> None:
    """Focal loss is not in Table 5, but its induced target still sums to one (Σ_k ∂L/∂z_k = 0)."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(12, 9, generator=g)
    y = torch.randint(0, 9, (12,), generator=g)

    def focal(z: Tensor, y: Tensor) -> Tensor:
        logp = torch.log_softmax(z, -1).gather(1, y[:, None]).squeeze(1)
        return -((1 - logp.exp()) ** 2) * logp

    q = induced_target(focal, z, y)
    assert q.dtype == torch.float64
    torch.testing.assert_close(q.sum(-1), torch.ones(12, dtype=torch.float64), atol=TOL, rtol=TOL)
    # label entry in closed form: g_y = (dL/d log p)(1 − p), so Q_y = p − (dL/d log p)(1 − p)
    p = torch.softmax(z.double(), -1).gather(1, y[:, None]).squeeze(1)
    dl_dlogp = -((1 - p) ** 2) + 2 * (1 - p) * p * torch.log(p)
    qy = p - dl_dlogp * (1 - p)
    torch.testing.assert_close(q.gather(1, y[:, None]).squeeze(1), qy, atol=TOL, rtol=TOL)


def test_induced_target_with_hf_shaped_inputs() -> None:
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 5, 11, generator=g, dtype=torch.float64)
    y = torch.randint(0, 11, (2, 5), generator=g)
    q = induced_target(L.SFT(), z, y)
    assert q.shape == z.shape
    torch.testing.assert_close(q[:, :-1], F.one_hot(y[:, 1:], 11).double(), atol=TOL, rtol=TOL)
    torch.testing.assert_close(q[:, -1], torch.softmax(z[:, -1], -1), atol=TOL, rtol=TOL)


def test_figure3_p_loss_curve_eq16() -> None:
    curve = L.induced_target_curve(L.DFT(), vocab_size=6)
    qy, qk = L.p_loss_closed_form(curve.p_y, curve.p_other)
    torch.testing.assert_close(curve.q_y, qy, atol=TOL, rtol=TOL)
    torch.testing.assert_close(curve.q_other, qk, atol=TOL, rtol=TOL)
    torch.testing.assert_close(curve.q_sum, torch.ones_like(curve.q_sum), atol=TOL, rtol=TOL)
    # SFT: δ_y whatever p_y is
    sft = L.induced_target_curve(L.SFT(), vocab_size=6)
    torch.testing.assert_close(sft.q_y, torch.ones_like(sft.q_y), atol=TOL, rtol=TOL)
    torch.testing.assert_close(sft.q_other, torch.zeros_like(sft.q_other), atol=TOL, rtol=TOL)


def test_figure3_target_sft_curve_with_teacher() -> None:
    """TARGET-SFT at η = 1 with a full-vocabulary teacher: Q = p δ_y + (1 − p) π_T."""
    teacher = torch.tensor([0.1, 0.5, 0.2, 0.1, 0.05, 0.05], dtype=torch.float64)
    curve = L.induced_target_curve(
        L.TargetSFT(eta=1.0), vocab_size=6, teacher_probs=teacher, other=1
    )
    py = curve.p_y
    torch.testing.assert_close(curve.q_y, py + (1 - py) * teacher[0], atol=TOL, rtol=TOL)
    torch.testing.assert_close(curve.q_other, (1 - py) * teacher[1], atol=TOL, rtol=TOL)


def _curve_kwargs(name: str, m: int) -> dict[str, object]:
    kw: dict[str, object] = {}
    source = L.get_preset(name).residual.source
    if source is not None:  # the teacher's (KD, TARGET-SFT) or the reference's (SFT+KL, ASFT)
        kw[f"{source}_probs"] = torch.tensor([0.3, 0.25, 0.2, 0.1, 0.1, 0.05], dtype=torch.float64)
    if name == "cft":
        kw["token_weights"] = torch.full((m,), 0.7, dtype=torch.float64)
    if name == "proximal_sft":
        kw["old_logprobs"] = torch.full((m,), -1.0, dtype=torch.float64)
    if name == "iw_sft":
        kw["reference_label_logprobs"] = torch.full((m,), -1.0, dtype=torch.float64)
        kw["sequence_ids"] = torch.arange(m)
    return kw


@pytest.mark.parametrize("name", sorted(L.PRESETS))
def test_figure3_curve_for_every_preset(name: str) -> None:
    p_y = torch.linspace(0.01, 0.99, 25, dtype=torch.float64)
    loss = L.get_preset(name, **({"k": 4} if name == "eaft" else {}))
    curve = L.induced_target_curve(loss, p_y, vocab_size=6, **_curve_kwargs(name, 25))  # type: ignore[arg-type]
    assert curve.q.shape == (25, 6)
    torch.testing.assert_close(curve.q_sum, torch.ones(25, dtype=torch.float64), atol=TOL, rtol=TOL)
    torch.testing.assert_close(curve.grad, curve.p - curve.q, atol=0, rtol=0)
    # the decomposition the preset reports agrees with Eq. 6 (scale s: Q_6 = p − s (p − Q))
    logits = torch.log(curve.p)
    labels = torch.full((25,), curve.label)
    kw = dict(_curve_kwargs(name, 25))
    for source in ("teacher", "reference"):
        if f"{source}_probs" in kw:
            tp = kw.pop(f"{source}_probs")
            assert isinstance(tp, Tensor)
            kw[f"{source}_ids"] = torch.arange(6).expand(25, -1)
            kw[f"{source}_logprobs"] = torch.log(tp).expand(25, -1)
    t = loss.target(logits, labels, **kw)  # type: ignore[arg-type]
    want = curve.p - t.scale[:, None] * (curve.p - t.dense())
    torch.testing.assert_close(curve.q, want, atol=TOL, rtol=TOL)


def test_curve_input_checks() -> None:
    with pytest.raises(ValueError, match="p_y values must lie strictly inside"):
        L.induced_target_curve(L.SFT(), torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match="other = 0 must be a token other than label = 0"):
        L.induced_target_curve(L.SFT(), other=0)
