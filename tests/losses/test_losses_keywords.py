"""Every loss takes the teacher tensors as ``target_sft_loss`` does (by position after logits and
labels), and a wrong keyword, at construction or at the call, names the class the user called
(the preset) and what it takes — never ``QTargetLoss.__init__``/``forward``."""

from __future__ import annotations

import pytest
import torch

from target_sft import losses as L
from target_sft.losses.qtarget import LOSS_OPTIONS


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 6, 17, generator=g, dtype=torch.float64)
    y = torch.randint(0, 17, (2, 6), generator=g)
    y[:, 0] = -100
    ids = torch.stack([(y.clamp_min(0) + j) % 17 for j in range(4)], -1).to(torch.int32)
    lp = torch.log_softmax(torch.randn(2, 6, 4, generator=g, dtype=torch.float64), -1)
    return z, y, ids, lp


TEACHER_PRESETS = ["target_sft", "kd", "hybrid_kd", "sft_kl", "asft"]


@pytest.mark.parametrize("name", TEACHER_PRESETS)
def test_teacher_tensors_by_position_equal_by_keyword(name):
    z, y, ids, lp = _data()
    # SFT+KL and ASFT read the teacher tensors only with anchor="teacher"
    loss = L.get_preset(name, **({"anchor": "teacher"} if name in ("sft_kl", "asft") else {}))
    za, zb = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    a = loss(za, y, ids, lp)
    b = loss(zb, y, teacher_ids=ids, teacher_logprobs=lp)
    a.backward()
    b.backward()
    assert torch.equal(a, b)
    assert za.grad is not None and zb.grad is not None
    assert torch.equal(za.grad, zb.grad)
    if name == "target_sft":  # and as the functional form takes them
        want = L.target_sft_loss(z, y, ids, lp)
        assert torch.equal(a.detach(), want)


@pytest.mark.parametrize("name", sorted(L.PRESETS))
def test_a_wrong_keyword_at_construction_names_the_preset(name):
    cls = L.PRESETS[name]
    params = ", ".join(cls.parameter_names())
    want = rf"^{cls.__name__} got an unexpected keyword argument 'etta'; its parameters are "
    with pytest.raises(TypeError, match=want) as info:
        cls(etta=0.5)
    assert params in str(info.value)
    assert "QTargetLoss" not in str(info.value)
    with pytest.raises(TypeError, match=want):
        L.get_preset(name, etta=0.5)
    # the trust and residual are the preset's own choice: not keywords of a preset
    for fixed in ("gamma", "residual"):
        with pytest.raises(
            TypeError, match=rf"^{cls.__name__} got an unexpected keyword argument '{fixed}'"
        ):
            cls(**{fixed: 0.5})


def test_parameter_names():
    assert L.TargetSFT.parameter_names() == ("eta", "tail", *LOSS_OPTIONS)
    assert L.SFT.parameter_names() == LOSS_OPTIONS
    assert L.HybridKD.parameter_names() == ("lam", "renormalize", "tail", *LOSS_OPTIONS)
    assert L.QTargetLoss.parameter_names() == ("gamma", "residual", *LOSS_OPTIONS)
    with pytest.raises(TypeError, match=r"^TargetSFT got .* 'etta'; .*; did you mean 'eta'\?$"):
        L.TargetSFT(etta=0.2)
    with pytest.raises(TypeError, match=r"^QTargetLoss got an unexpected keyword argument 'gama'"):
        L.QTargetLoss(gama=0.5)

    class Mine(L.QTargetLoss):  # a user's subclass that forwards **kwargs is named too
        def __init__(self, width: int = 3, **kwargs):
            super().__init__(gamma=0.5, **kwargs)

    with pytest.raises(TypeError, match=r"^Mine got an unexpected keyword argument 'wdth'.*width"):
        Mine(wdth=2)


def test_a_wrong_keyword_or_too_many_positions_at_the_call_names_the_preset():
    z, y, ids, lp = _data()
    loss = L.TargetSFT()
    with pytest.raises(
        TypeError,
        match=r"^TargetSFT got an unexpected keyword argument 'teacher_idz'; its inputs are teacher_ids, teacher_logprobs, token_weights.*did you mean 'teacher_ids'",
    ):
        loss(z, y, teacher_idz=ids, teacher_logprobs=lp)
    with pytest.raises(
        TypeError,
        match=r"^TargetSFT takes \(logits, labels, teacher_ids, teacher_logprobs\) by position, got 5",
    ):
        loss(z, y, ids, lp, torch.ones_like(y, dtype=z.dtype))
    with pytest.raises(TypeError, match=r"^KD got an unexpected keyword argument 'eta'"):
        L.KD()(z, y, ids, lp, eta=0.5)
    with pytest.raises(TypeError, match="multiple values"):  # Python's own, naming the argument
        loss(z, y, ids, lp, teacher_ids=ids)
