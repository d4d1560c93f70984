"""Per-sequence terms in packed rows: ``sequence_ids`` groups tokens by sample, not by row.

Two samples packed in one row with ``sequence_ids`` must give exactly the loss and the gradient of
the same two samples padded in two rows (and of the flattened ``[N, V]`` layout with
``sequence_ids``): iw-SFT's trajectory weight (plain sum, length-normalised, clipped) and
SequenceWeightTrust's ``sequence_weights[sequence_ids]``. Per-sequence terms require
``sequence_ids``: without it a packed row was silently one trajectory (a test shows that this
reading differs, and that the call is refused now). Float64, to 1e-12, against the weights
written out here.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import Tensor

from target_sft import losses as L

TOL = 1e-12
V = 19
LA, LB = 6, 5  # the two samples' lengths
PAD = 2  # padding after the packed row


def samples(seed: int = 0) -> list[dict[str, Tensor]]:
    """Two samples: logits [L, V], labels [L] (first label ignored: a prompt token, so that the
    packed row's boundary position is unsupervised), reference label log-probs [L]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for length in (LA, LB):
        z = 2.0 * torch.randn(length, V, generator=g, dtype=torch.float64)
        y = torch.randint(0, V, (length,), generator=g)
        y[0] = -100
        ref = -3.0 * torch.rand(length, generator=g, dtype=torch.float64)
        out.append({"z": z, "y": y, "ref": ref})
    out[1]["y"][2] = -100  # an ignored token inside a sample
    return out


def padded(s: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Each sample in its own row, padded on the right to max(LA, LB)."""
    length = max(LA, LB)
    z = torch.zeros(2, length, V, dtype=torch.float64)
    y = torch.full((2, length), -100)
    ref = torch.zeros(2, length, dtype=torch.float64)
    sid = torch.full((2, length), -1)
    for b, d in enumerate(s):
        n = d["y"].numel()
        z[b, :n], y[b, :n], ref[b, :n], sid[b, :n] = d["z"], d["y"], d["ref"], b
    return {"z": z, "y": y, "ref": ref, "sid": sid}


def packed(s: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Both samples in one row (A then B), then PAD padding positions."""
    z = torch.cat([s[0]["z"], s[1]["z"], torch.zeros(PAD, V, dtype=torch.float64)])[None]
    y = torch.cat([s[0]["y"], s[1]["y"], torch.full((PAD,), -100)])[None]
    ref = torch.cat([s[0]["ref"], s[1]["ref"], torch.zeros(PAD, dtype=torch.float64)])[None]
    sid = torch.tensor([0] * LA + [1] * LB + [-1] * PAD)[None]
    return {"z": z, "y": y, "ref": ref, "sid": sid}


def packed_grad_as_padded(g: Tensor) -> Tensor:
    """The packed row's logit gradient laid out as the padded batch's."""
    out = torch.zeros(2, max(LA, LB), V, dtype=g.dtype)
    out[0, :LA] = g[0, :LA]
    out[1, :LB] = g[0, LA : LA + LB]
    return out


def iw_closed_form(
    s: list[dict[str, Tensor]], length_normalize: bool = False, clip=None, temperature: float = 1.0
) -> Tensor:
    """Mean over supervised tokens of −w(τ) log p_y, w(τ) = exp(T · Σ_τ (log p_y − log π_ref(y)))
    per sample (Σ → mean with ``length_normalize``; then clipped), HF-shifted by hand."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for d in s:
        logp = torch.log_softmax(d["z"][:-1], -1)
        y = d["y"][1:]
        mask = y != -100
        lpy = logp.gather(1, y.clamp_min(0)[:, None]).squeeze(1)
        diff = torch.where(mask, lpy - d["ref"][1:], torch.zeros_like(lpy)).sum()
        if length_normalize:
            diff = diff / mask.sum()
        w = (temperature * diff).exp()
        if clip is not None:
            w = w.clamp(*clip)
        total = total + torch.where(mask, -w * lpy, torch.zeros_like(lpy)).sum()
        count += int(mask.sum())
    return total / count


def run(loss: L.QTargetLoss, z: Tensor, y: Tensor, **kw: Tensor) -> tuple[Tensor, Tensor]:
    zz = z.clone().requires_grad_(True)
    out = loss(zz, y, **kw)
    out.backward()
    assert zz.grad is not None
    return out.detach(), zz.grad


IW = [
    {},
    {"length_normalize": True},
    {"length_normalize": True, "clip": (0.0, 1.05)},
    {"temperature": 0.5, "clip": (0.2, 3.0)},
]


@pytest.mark.parametrize("params", IW, ids=lambda p: ",".join(p) or "paper")
def test_iw_sft_packed_equals_padded_equals_flat(params) -> None:
    s = samples()
    loss = L.IwSFT(**params)
    pd, pk = padded(s), packed(s)
    # padded rows: one sample per row (sequence_ids = the row, or the samples' own ids)
    rows = torch.arange(2)[:, None].expand_as(pd["y"])
    a, ga = run(loss, pd["z"], pd["y"], reference_label_logprobs=pd["ref"], sequence_ids=rows)
    a2, ga2 = run(
        loss, pd["z"], pd["y"], reference_label_logprobs=pd["ref"], sequence_ids=pd["sid"]
    )
    # packed: two samples in one row, told apart by sequence_ids
    b, gb = run(loss, pk["z"], pk["y"], reference_label_logprobs=pk["ref"], sequence_ids=pk["sid"])
    assert abs(float(a - b)) <= TOL and abs(float(a - a2)) <= TOL
    assert (ga - packed_grad_as_padded(gb)).abs().max() <= TOL
    assert (ga - ga2).abs().max() <= TOL
    # the flat [N, V] layout (already shifted), sequence_ids per row
    zf = torch.cat([s[0]["z"][:-1], s[1]["z"][:-1]])
    yf = torch.cat([s[0]["y"][1:], s[1]["y"][1:]])
    rf = torch.cat([s[0]["ref"][1:], s[1]["ref"][1:]])
    sf = torch.tensor([0] * (LA - 1) + [1] * (LB - 1))
    c, _ = run(loss, zf, yf, reference_label_logprobs=rf, sequence_ids=sf)
    assert abs(float(a - c)) <= TOL
    # and the closed form
    assert abs(float(b - iw_closed_form(s, **params))) <= TOL


def test_a_per_sequence_term_without_sequence_ids_is_refused() -> None:
    """Without sequence_ids a packed row read as one trajectory (one weight for both samples,
    not iw-SFT's per-sample weight), silently: the loss cannot tell a packed row from a row of
    one sample, so per-sequence terms require sequence_ids."""
    s = samples(1)
    pk = packed(s)
    loss = L.IwSFT()
    with_ids, _ = run(
        loss, pk["z"], pk["y"], reference_label_logprobs=pk["ref"], sequence_ids=pk["sid"]
    )
    one_trajectory, _ = run(
        loss,
        pk["z"],
        pk["y"],
        reference_label_logprobs=pk["ref"],
        sequence_ids=torch.zeros_like(pk["sid"]),
    )
    assert abs(float(with_ids - iw_closed_form(s))) <= TOL
    assert abs(float(one_trajectory - with_ids)) > 1e-3  # what the old reading computed
    msg = "iw-SFT's importance weight is per sequence, and without sequence_ids the loss cannot"
    with pytest.raises(ValueError, match=msg):
        loss(pk["z"], pk["y"], reference_label_logprobs=pk["ref"])
    with pytest.raises(ValueError, match="sequence_weights is per sequence"):
        L.QTargetLoss(gamma=L.SequenceWeightTrust())(
            pk["z"], pk["y"], sequence_weights=torch.ones(2, dtype=torch.float64)
        )


def test_a_sample_spread_over_two_rows_is_refused() -> None:
    """sequence_ids that put two padded rows in one sample (zeros) would pool their iw-SFT
    weight into one trajectory weight, silently: a sample lies in one row of [B, L, V] logits."""
    s = samples(4)
    pd = padded(s)
    zeros = torch.zeros_like(pd["y"])
    with pytest.raises(ValueError, match=r"sample 0 supervised tokens in rows 0 and 1"):
        L.IwSFT()(pd["z"], pd["y"], reference_label_logprobs=pd["ref"], sequence_ids=zeros)
    with pytest.raises(ValueError, match=r"a sample lies in one row"):
        L.QTargetLoss(gamma=L.SequenceWeightTrust())(
            pd["z"],
            pd["y"],
            sequence_weights=torch.ones(1, dtype=torch.float64),
            sequence_ids=zeros,
        )


def test_sequence_weight_trust_packed_equals_padded() -> None:
    s = samples(2)
    pd, pk = padded(s), packed(s)
    weights = torch.tensor([0.3, 1.7], dtype=torch.float64)
    loss = L.QTargetLoss(gamma=L.SequenceWeightTrust())
    rows = torch.arange(2)[:, None].expand_as(pd["y"])
    a, ga = run(loss, pd["z"], pd["y"], sequence_weights=weights, sequence_ids=rows)
    b, gb = run(loss, pk["z"], pk["y"], sequence_weights=weights, sequence_ids=pk["sid"])
    assert abs(float(a - b)) <= TOL
    assert (ga - packed_grad_as_padded(gb)).abs().max() <= TOL
    # written out: CE(w_s δ_y + (1 − w_s) sg[p], p) = w_s NLL + (1 − w_s) H(p), averaged over
    # supervised tokens
    total, count = 0.0, 0
    for w, d in zip(weights, s, strict=True):
        logp = torch.log_softmax(d["z"][:-1], -1)
        nll = -logp.gather(1, d["y"][1:].clamp_min(0)[:, None]).squeeze(1)
        entropy = -(logp.exp() * logp).sum(-1)
        mask = d["y"][1:] != -100
        total += float((w * nll + (1 - w) * entropy)[mask].sum())
        count += int(mask.sum())
    assert abs(float(b) - total / count) <= TOL


def test_sequence_weights_are_checked_by_sample_count_not_rows() -> None:
    s = samples(3)
    pk = packed(s)
    z = torch.cat([pk["z"], pk["z"]])  # two packed rows: four samples in two rows
    y = torch.cat([pk["y"], pk["y"]])
    sid = torch.cat([pk["sid"], torch.where(pk["sid"] >= 0, pk["sid"] + 2, pk["sid"])])
    loss = L.QTargetLoss(gamma=L.SequenceWeightTrust())
    w = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64)
    out, _ = run(loss, z, y, sequence_weights=w, sequence_ids=sid)  # 4 weights, 2 rows: fine
    assert torch.isfinite(out)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "sequence_weights has shape (2,) but sequence_ids goes up to 3: expected one weight "
            "per sample, at least (4,)"
        ),
    ):
        loss(z, y, sequence_weights=w[:2], sequence_ids=sid)
    with pytest.raises(ValueError, match="sequence_weights is per sequence"):
        loss(z, y, sequence_weights=w)


def test_sequence_ids_errors() -> None:
    s = samples(4)
    pk = packed(s)
    z, y, sid = pk["z"], pk["y"], pk["sid"]
    ref = pk["ref"]
    loss = L.IwSFT()
    bad = sid.clone()
    bad[0, 3] = -1  # labels[0, 3] is supervised
    assert int(y[0, 3]) != -100
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"sequence_ids[0, 3] = -1 is negative at a supervised position (labels[0, 3] = "
            f"{int(y[0, 3])})"
        ),
    ):
        loss(z, y, reference_label_logprobs=ref, sequence_ids=bad)
    # -1 where the label is ignored is fine (prompt, padding)
    ok = sid.clone()
    ok[0, 0] = -1
    loss(z, y, reference_label_logprobs=ref, sequence_ids=ok)
    with pytest.raises(ValueError, match="sequence_ids must be an integer tensor"):
        loss(z, y, reference_label_logprobs=ref, sequence_ids=sid.double())
    with pytest.raises(ValueError, match=re.escape("sequence_ids has shape (1, 12) but labels")):
        loss(z, y, reference_label_logprobs=ref, sequence_ids=sid[:, 1:])
    # the flat layout follows the same rule
    zf, yf = z[0], y[0]
    with pytest.raises(
        ValueError, match=re.escape("sequence_ids[3] = -1 is negative at a supervised")
    ):
        loss(zf, yf, reference_label_logprobs=ref[0], sequence_ids=bad[0])
