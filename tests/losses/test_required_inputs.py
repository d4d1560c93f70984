"""``QTargetLoss.required_inputs`` (what a trainer checks its data provides before the first step)
is exactly what each preset cannot run without: with only those inputs it runs, and without any
one of them it refuses (ValueError naming it), for every preset of :data:`PRESETS`."""

from __future__ import annotations

import pytest
import torch
from test_losses_presets import make_data

from target_sft import losses as L
from target_sft.losses.presets import PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_required_inputs_are_exactly_what_the_loss_needs(name: str) -> None:
    loss = L.get_preset(name)
    d = make_data()
    every = d.inputs()
    required = set(loss.required_inputs)
    assert required <= set(L.LOSS_INPUT_NAMES)
    given = {k: v for k, v in every.items() if k in required}
    value = loss(d.z, d.y, **given)
    assert torch.isfinite(value)
    for k in required:
        partial = {j: v for j, v in given.items() if j != k}
        with pytest.raises(ValueError, match=k):
            loss(d.z, d.y, **partial)


def test_required_inputs_of_the_reference_methods() -> None:
    assert L.get_preset("sft_kl").required_inputs == ("reference_ids", "reference_logprobs")
    assert L.get_preset("sft_kl", anchor="teacher").required_inputs == (
        "teacher_ids",
        "teacher_logprobs",
    )
    # per-sequence weights need each token's sample (packed rows hold several)
    assert L.get_preset("iw_sft").required_inputs == ("reference_label_logprobs", "sequence_ids")
    assert L.get_preset("proximal_sft").required_inputs == ("old_logprobs",)
    assert L.get_preset("target_sft").required_inputs == ("teacher_ids", "teacher_logprobs")
    assert L.get_preset("target_sft", eta=0.0).required_inputs == ()
    assert L.get_preset("sft").required_inputs == ()
