"""Bad input: a clear ValueError that names the tensor and the offending index."""

from __future__ import annotations

import re

import pytest
import torch
from torch import Tensor

from target_sft import losses as L
from target_sft import target_sft_loss

B, T, V, K = 2, 6, 20, 4


def good() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(B, T, V, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    y[:, 0] = -100
    lp, ids = torch.log_softmax(torch.randn(B, T, V, generator=g), -1).topk(K, -1)
    return {"z": z, "y": y, "ids": ids.to(torch.int32), "lp": lp}


def call(d: dict[str, Tensor], **kw: object) -> Tensor:
    return target_sft_loss(d["z"], d["y"], d["ids"], d["lp"], **kw)  # type: ignore[arg-type]


def test_good_inputs_pass() -> None:
    assert torch.isfinite(call(good()))


def test_teacher_id_at_or_above_vocab() -> None:
    d = good()
    d["ids"][1, 3, 2] = V
    with pytest.raises(
        ValueError,
        match=re.escape(f"teacher_ids[1, 3, 2] = {V} is outside the vocabulary [0, {V})"),
    ):
        call(d)


def test_teacher_id_below_minus_one() -> None:
    d = good()
    d["ids"][0, 4, 1] = -2
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"teacher_ids[0, 4, 1] = -2 is outside the vocabulary [0, {V}); use -1 for padding"
        ),
    ):
        call(d)


def test_teacher_shape_mismatch() -> None:
    d = good()
    d["ids"], d["lp"] = d["ids"][:, :-1], d["lp"][:, :-1]
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"teacher_ids has shape ({B}, {T - 1}, {K}) but labels has shape ({B}, {T})"
        ),
    ):
        call(d)


def test_teacher_logprobs_shape_mismatch() -> None:
    d = good()
    d["lp"] = d["lp"][..., :-1]
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"teacher_logprobs has shape ({B}, {T}, {K - 1}) but teacher_ids has shape ({B}, {T}, {K})"
        ),
    ):
        call(d)


def test_labels_shape_mismatch() -> None:
    d = good()
    d["y"] = d["y"][:, 1:]
    with pytest.raises(
        ValueError,
        match=re.escape(f"labels has shape ({B}, {T - 1}) but logits has shape ({B}, {T}, {V})"),
    ):
        call(d)


def test_logits_rank() -> None:
    with pytest.raises(ValueError, match=re.escape("logits has shape (20,): expected [B, L, V]")):
        L.SFT()(torch.randn(V), torch.tensor(1))


def test_integer_dtypes() -> None:
    d = good()
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        L.SFT()(d["z"], d["y"].float())
    with pytest.raises(ValueError, match="teacher_ids must be an integer tensor"):
        target_sft_loss(d["z"], d["y"], d["ids"].float(), d["lp"])


def test_nan_logits_named_with_index() -> None:
    d = good()
    d["z"][1, 2, 7] = float("nan")
    with pytest.raises(ValueError, match=re.escape("logits[1, 2, 7] is NaN")):
        call(d)
    with pytest.raises(ValueError, match=re.escape("logits[8, 7] is NaN")):
        L.SFT()(d["z"].reshape(-1, V), d["y"].reshape(-1))
    # the half-precision path (in-place float32 copy) reports the same
    with pytest.raises(ValueError, match=re.escape("logits[1, 2, 7] is NaN")):
        L.TargetSFT()(d["z"].bfloat16(), d["y"], teacher_ids=d["ids"], teacher_logprobs=d["lp"])
    d = good()
    d["z"][0, 3, 1] = float("inf")
    with pytest.raises(ValueError, match=re.escape("logits[0, 3, 1] = inf")):
        L.DFT()(d["z"].half(), d["y"])
    with pytest.raises(ValueError, match=re.escape("logits[0, 3, 1] = inf")):
        L.DFT()(d["z"], d["y"])
    d = good()
    d["z"][0, 1, :] = float("-inf")
    with pytest.raises(ValueError, match=re.escape("logits[0, 1, :] are all -inf")):
        L.DFT()(d["z"], d["y"])
    with pytest.raises(ValueError, match=re.escape("logits[0, 1, :] are all -inf")):
        L.DFT()(d["z"].bfloat16(), d["y"])


def test_nan_teacher_logprob() -> None:
    d = good()
    d["lp"][0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=re.escape("teacher_logprobs[0, 2, 3] is NaN")):
        call(d)


@pytest.mark.parametrize("eta", [-0.1, 1.5, float("nan")])
def test_eta_outside_unit_interval(eta: float) -> None:
    with pytest.raises(ValueError, match=r"eta = .* is outside \[0, 1\]"):
        call(good(), eta=eta)
    with pytest.raises(ValueError, match=r"eta = .* is outside \[0, 1\]"):
        L.TargetSFT(eta=eta)


def test_labels_outside_vocab() -> None:
    d = good()
    d["y"][1, 4] = V
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"labels[1, 4] = {V} is outside the vocabulary [0, {V}) and is not ignore_index (-100)"
        ),
    ):
        call(d)
    d = good()
    d["y"][0, 2] = -7
    with pytest.raises(ValueError, match=re.escape("labels[0, 2] = -7 is outside the vocabulary")):
        L.SFT()(d["z"], d["y"])
    # a custom ignore_index is honoured
    d = good()
    d["y"][d["y"] == -100] = -1
    d["y"][0, 2] = -1
    assert torch.isfinite(L.SFT(ignore_index=-1)(d["z"], d["y"]))


def test_duplicate_teacher_ids() -> None:
    d = good()
    d["ids"][1, 5, 3] = d["ids"][1, 5, 0]
    tok = int(d["ids"][1, 5, 0])
    with pytest.raises(
        ValueError,
        match=re.escape(f"teacher_ids[1, 5, :] lists token {tok} twice (positions 0 and 3)"),
    ):
        call(d)


def test_empty_teacher_support_at_supervised_position() -> None:
    d = good()
    d["ids"][0, 3] = -1
    d["lp"][0, 3] = float("-inf")
    lab = int(d["y"][0, 3])
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"teacher_ids[0, 3, :] has no valid entry (all -1) at a supervised position (labels[0, 3] = {lab})"
        ),
    ):
        call(d)
    # the same row unsupervised is fine, and so is η = 0 (no teacher needed)
    d2 = {k: v.clone() for k, v in d.items()}
    d2["y"][0, 3] = -100
    assert torch.isfinite(call(d2))
    assert torch.isfinite(call(d, eta=0.0))
    with pytest.raises(
        ValueError, match=re.escape("teacher_ids[0, 3, :] has no valid entry with finite log-prob")
    ):
        L.KD()(d["z"], d["y"], teacher_ids=d["ids"], teacher_logprobs=d["lp"])


def test_missing_inputs() -> None:
    d = good()
    with pytest.raises(
        ValueError,
        match=r"TargetSFT with residual GuidedResidual.*needs teacher_ids and teacher_logprobs",
    ):
        L.TargetSFT()(d["z"], d["y"])
    with pytest.raises(ValueError, match="teacher_logprobs is missing"):
        L.SFT()(d["z"], d["y"], teacher_ids=d["ids"])
    with pytest.raises(ValueError, match=r"Proximal SFT .* needs old_logprobs"):
        L.ProximalSFT()(d["z"], d["y"])
    with pytest.raises(ValueError, match=r"iw-SFT .* needs reference_label_logprobs"):
        L.IwSFT()(d["z"], d["y"])
    with pytest.raises(ValueError, match="TokenWeightTrust needs token_weights"):
        L.CFT()(d["z"], d["y"])
    with pytest.raises(ValueError, match="iw-SFT's importance weight is per sequence"):
        L.IwSFT()(
            d["z"].reshape(-1, V), d["y"].reshape(-1), reference_label_logprobs=torch.zeros(B * T)
        )


def test_per_token_inputs_shape_and_finiteness() -> None:
    d = good()
    with pytest.raises(
        ValueError,
        match=re.escape(f"old_logprobs has shape ({B}, {T - 1}) but labels has shape ({B}, {T})"),
    ):
        L.ProximalSFT()(d["z"], d["y"], old_logprobs=torch.zeros(B, T - 1))
    ref = torch.zeros(B, T)
    ref[1, 2] = float("nan")
    rows = torch.arange(B)[:, None].expand(B, T)  # one sample per row
    with pytest.raises(
        ValueError,
        match=re.escape(
            "reference_label_logprobs[1, 2] = nan is not finite at a supervised position"
        ),
    ):
        L.IwSFT()(d["z"], d["y"], reference_label_logprobs=ref, sequence_ids=rows)
    with pytest.raises(
        ValueError, match=re.escape(f"sequence_weights has shape ({B - 1},) but sequence_ids")
    ):
        L.QTargetLoss(gamma=L.SequenceWeightTrust())(
            d["z"], d["y"], sequence_weights=torch.ones(B - 1), sequence_ids=rows
        )


def test_reduction_and_num_items() -> None:
    d = good()
    with pytest.raises(ValueError, match="reduction = 'avg' is not one of"):
        call(d, reduction="avg")
    with pytest.raises(ValueError, match="num_items_in_batch = -3 must be >= 0"):
        call(d, num_items_in_batch=-3)
    with pytest.raises(ValueError, match="num_items_in_batch only applies to reduction='mean'"):
        call(d, num_items_in_batch=3, reduction="sum")


def test_hyperparameters() -> None:
    with pytest.raises(ValueError, match=re.escape("tau = 1.5 is outside")):
        L.ProFiT(tau=1.5)
    with pytest.raises(ValueError, match=re.escape("epsilon = -0.1 is outside")):
        L.LabelSmoothing(epsilon=-0.1)
    with pytest.raises(ValueError, match=re.escape("lam = 1.2 is outside")):
        L.HybridKD(lam=1.2)
    with pytest.raises(ValueError, match=re.escape("beta = 0.0 must be > 0")):
        L.GEM(beta=0.0)
    with pytest.raises(ValueError, match=re.escape("k = 1 must be >= 2")):
        L.EAFT(k=1)
    with pytest.raises(ValueError, match=re.escape("lam = -1.0 must be >= 0")):
        L.SFTKL(lam=-1.0)


def test_check_inputs_false_skips_value_checks() -> None:
    d = good()
    d["ids"][1, 3, 2] = V + 5  # would be caught with checks on
    with pytest.raises(ValueError):
        call(d)
    # without checks the caller takes responsibility (here: an out-of-range gather raises)
    with pytest.raises((RuntimeError, IndexError)):
        call(d, check_inputs=False)
