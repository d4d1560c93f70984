"""One type names the per-token loss inputs: ``LossInputs`` (and ``LOSS_INPUT_NAMES``)."""

from __future__ import annotations

import inspect

import torch

from target_sft import losses as L
from target_sft.losses.backend import LogitsBackend


def _per_token_keywords(fn: object) -> tuple[str, ...]:
    params = inspect.signature(fn).parameters  # type: ignore[arg-type]
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in params.values() if p.kind in kinds]
    return tuple(n for n in names if n in L.LOSS_INPUT_NAMES or n.endswith("_logprobs"))


def test_names_are_the_fields_and_the_keywords_of_every_loss_call() -> None:
    assert L.LOSS_INPUT_NAMES == (
        "teacher_ids",
        "teacher_logprobs",
        "token_weights",
        "sequence_weights",
        "sequence_ids",
        "reference_ids",
        "reference_logprobs",
        "reference_label_logprobs",
        "old_logprobs",
    )
    assert tuple(L.LossInputs().as_dict()) == L.LOSS_INPUT_NAMES
    assert _per_token_keywords(L.QTargetLoss.forward) == L.LOSS_INPUT_NAMES
    assert _per_token_keywords(L.fused_linear_qtarget_loss) == L.LOSS_INPUT_NAMES
    # an old name is taken through **kwargs (with a DeprecationWarning), never a field or a
    # keyword of the signature; it maps to a field
    for old, new in L.DEPRECATED_INPUT_NAMES.items():
        assert new in L.LOSS_INPUT_NAMES and old not in L.LOSS_INPUT_NAMES


def test_pipeline_on_a_logits_backend_is_the_call() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 11, generator=g, dtype=torch.float64)
    y = torch.randint(0, 11, (2, 5), generator=g)
    ids = torch.randint(0, 11, (2, 5, 3), generator=g).to(torch.int32)
    ids[..., 1] = (ids[..., 0] + 1) % 11
    ids[..., 2] = (ids[..., 0] + 2) % 11
    lp = torch.log_softmax(torch.randn(2, 5, 3, generator=g, dtype=torch.float64), -1)
    inputs = L.LossInputs(teacher_ids=ids, teacher_logprobs=lp)
    loss = L.TargetSFT(eta=0.5)
    z1 = z.clone().requires_grad_(True)
    z2 = z.clone().requires_grad_(True)
    a = loss(z1, y, **inputs.as_dict())
    b = loss.pipeline(LogitsBackend(z2), y, inputs)
    a.backward()
    b.backward()
    assert torch.equal(a, b)
    assert z1.grad is not None and z2.grad is not None
    assert torch.equal(z1.grad, z2.grad)
