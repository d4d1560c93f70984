"""SFT+KL and ASFT anchored on the reference model's cached top-k (``reference_ids`` /
``reference_logprobs``), the deprecated ``ref_logprobs`` name, and every error of the reference
inputs.

The float64 references are the full-vocabulary formulas written out here (a dense ``[N, V]``
anchor built from the sparse tensors), never the library's own helpers.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import Tensor

from target_sft import losses as L

TOL = 1e-12
B, T, V, K = 2, 7, 23, 5
LAM = 0.3


def batch(seed: int = 0, *, label_column: bool = False) -> dict[str, Tensor]:
    """[B, T, V] logits, [B, T] labels; a teacher and a *different* reference, both label-aligned
    (``label_column``: the reference support holds the label as an extra column, K + 1 wide)."""
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (B, T), generator=g)
    y[:, 0] = -100
    y[1, -2:] = -100
    teacher = torch.log_softmax(2.0 * torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    tlp, tids = teacher.topk(K, -1)
    reference = torch.log_softmax(1.5 * torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    rlp, rids = reference.topk(K, -1)
    rids[0, 3, -2:] = -1  # padding
    rlp[0, 3, -2:] = float("-inf")
    if label_column:
        col_ids = torch.full((B, T, 1), -1, dtype=rids.dtype)
        col_lp = torch.full((B, T, 1), float("-inf"), dtype=rlp.dtype)
        for b in range(B):
            for t in range(T):
                lab = int(y[b, t])
                if lab >= 0 and lab not in rids[b, t].tolist():
                    col_ids[b, t, 0] = lab
                    col_lp[b, t, 0] = reference[b, t, lab]
        assert bool((col_ids >= 0).any())
        rids = torch.cat([rids, col_ids], -1)
        rlp = torch.cat([rlp, col_lp], -1)
    return {
        "z": z,
        "y": y,
        "teacher_ids": tids.to(torch.int32),
        "teacher_logprobs": tlp,
        "reference_ids": rids.to(torch.int32),
        "reference_logprobs": rlp,
    }


def inputs(d: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in d.items() if k not in ("z", "y")}


def dense_anchor(ids: Tensor, lp: Tensor, renormalize: bool) -> Tensor:
    """The cached top-k as a dense distribution over V (shape [..., V])."""
    r = torch.where(ids >= 0, lp.exp(), torch.zeros_like(lp))
    out = torch.zeros(*ids.shape[:-1], V, dtype=torch.float64)
    out.scatter_add_(-1, ids.long().clamp_min(0), r)
    return out / out.sum(-1, keepdim=True) if renormalize else out


def objective(name: str, z: Tensor, d: dict[str, Tensor], source: str, renormalize: bool) -> Tensor:
    """The published per-token objective, HF-shifted by hand: logits (b, t) predict labels (b, t+1).

    SFT+KL: ``−log p_y + λ KL(π ‖ π_θ)``; ASFT: ``−sg[p_y] log p_y + λ KL(π ‖ π_θ)``, with π the
    dense anchor (``renormalize=False``: the truncated values, KL over the support only)."""
    logp = torch.log_softmax(z[:, :-1], -1)
    y = d["y"][:, 1:]
    mask = y != -100
    lpy = logp.gather(-1, y.clamp_min(0)[..., None]).squeeze(-1)
    pi = dense_anchor(d[f"{source}_ids"][:, 1:], d[f"{source}_logprobs"][:, 1:], renormalize)
    kl = (torch.special.xlogy(pi, pi) - pi * logp).sum(-1)
    nll = -lpy
    first = nll if name == "sft_kl" else lpy.detach().exp() * nll
    out = torch.where(mask, first + LAM * kl, torch.zeros_like(nll))
    return torch.cat([out, torch.zeros(B, 1, dtype=out.dtype)], 1)


@pytest.mark.parametrize("label_column", [False, True], ids=["topk", "label_column"])
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "raw"])
@pytest.mark.parametrize("name", ["sft_kl", "asft"])
def test_value_and_gradient_from_the_reference(name, renormalize, label_column) -> None:
    d = batch(1, label_column=label_column)
    loss = L.get_preset(name, lam=LAM, renormalize=renormalize)
    assert loss.residual.source == "reference"
    z = d["z"].clone().requires_grad_(True)
    got = loss(z, d["y"], reduction="none", **inputs(d))
    got.sum().backward()
    zr = d["z"].clone().requires_grad_(True)
    want = objective(name, zr, d, "reference", renormalize)
    want.sum().backward()
    torch.testing.assert_close(got, want.detach(), atol=TOL, rtol=TOL)
    torch.testing.assert_close(z.grad, zr.grad, atol=TOL, rtol=TOL)
    # the teacher tensors in the same batch are not read: the teacher anchor differs
    other = objective(name, d["z"], d, "teacher", renormalize)
    assert not torch.allclose(got, other, atol=1e-3)


@pytest.mark.parametrize("name", ["sft_kl", "asft"])
def test_anchor_teacher_is_the_old_behaviour(name) -> None:
    d = batch(2)
    loss = L.get_preset(name, lam=LAM, anchor="teacher")
    assert loss.residual.source == "teacher"
    z = d["z"].clone().requires_grad_(True)
    got = loss(z, d["y"], reduction="none", **inputs(d))
    got.sum().backward()
    zr = d["z"].clone().requires_grad_(True)
    want = objective(name, zr, d, "teacher", True)
    want.sum().backward()
    torch.testing.assert_close(got, want.detach(), atol=TOL, rtol=TOL)
    torch.testing.assert_close(z.grad, zr.grad, atol=TOL, rtol=TOL)
    # reference tensors alone are enough by default, teacher tensors alone with anchor="teacher"
    ref_only = {k: v for k, v in inputs(d).items() if k.startswith("reference")}
    teacher_only = {k: v for k, v in inputs(d).items() if k.startswith("teacher")}
    torch.testing.assert_close(
        L.get_preset(name, lam=LAM)(d["z"], d["y"], **ref_only),
        L.get_preset(name, lam=LAM)(d["z"], d["y"], **inputs(d)),
        atol=0,
        rtol=0,
    )
    torch.testing.assert_close(
        loss(d["z"], d["y"], **teacher_only), got.sum() / (d["y"][:, 1:] != -100).sum()
    )


@pytest.mark.parametrize("name", ["sft_kl", "asft"])
def test_tail_model_is_the_kd_tail_on_the_reference(name) -> None:
    """``tail="model"``: the anchor's missing mass m spread as c·p_v off its support,
    c = m / (1 − π_θ(S)); value and gradient against that dense anchor written out."""
    d = batch(3)
    loss = L.get_preset(name, lam=LAM, tail="model")
    z = d["z"].clone().requires_grad_(True)
    got = loss(z, d["y"], reduction="none", **inputs(d))
    got.sum().backward()

    zr = d["z"].clone().requires_grad_(True)
    logp = torch.log_softmax(zr[:, :-1], -1)
    p = logp.detach().exp()
    ids, lp = d["reference_ids"][:, 1:], d["reference_logprobs"][:, 1:]
    raw = dense_anchor(ids, lp, renormalize=False)
    on_s = raw > 0
    m = 1 - raw.sum(-1, keepdim=True)
    tau = 1 - torch.where(on_s, p, torch.zeros_like(p)).sum(-1, keepdim=True)
    pi = torch.where(on_s, raw, m * p / tau)
    y = d["y"][:, 1:]
    mask = y != -100
    lpy = logp.gather(-1, y.clamp_min(0)[..., None]).squeeze(-1)
    kl = (torch.special.xlogy(pi, pi) - pi * logp).sum(-1)
    first = -lpy if name == "sft_kl" else -lpy.detach().exp() * lpy
    want = torch.where(mask, first + LAM * kl, torch.zeros_like(lpy))
    want.sum().backward()
    torch.testing.assert_close(got[:, :-1], want.detach(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(z.grad, zr.grad, atol=1e-10, rtol=1e-10)


def test_flat_logits_read_the_reference_too() -> None:
    d = batch(4)
    loss = L.SFTKL(lam=LAM)
    flat = {k: v[:, 1:].reshape(-1, *v.shape[2:]) for k, v in inputs(d).items()}
    a = loss(d["z"], d["y"], reduction="none", **inputs(d))[:, :-1].reshape(-1)
    b = loss(d["z"][:, :-1].reshape(-1, V), d["y"][:, 1:].reshape(-1), reduction="none", **flat)
    torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)


def test_fused_linear_reads_the_reference() -> None:
    g = torch.Generator().manual_seed(5)
    d = batch(5)
    h = torch.randn(B, T, 6, generator=g, dtype=torch.float64)
    w = torch.randn(V, 6, generator=g, dtype=torch.float64)
    for name in ("sft_kl", "asft"):
        loss = L.get_preset(name, lam=LAM)
        h1, w1 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        a = L.fused_linear_qtarget_loss(loss, h1, w1, d["y"], impl="torch", **inputs(d))
        a.backward()
        h2, w2 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        b = loss(h2 @ w2.T, d["y"], **inputs(d))
        b.backward()
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)
        torch.testing.assert_close(h1.grad, h2.grad, atol=TOL, rtol=TOL)
        torch.testing.assert_close(w1.grad, w2.grad, atol=TOL, rtol=TOL)


# ----------------------------------------------------------------------- the deprecated name
def test_ref_logprobs_is_the_deprecated_name_of_reference_label_logprobs() -> None:
    d = batch(6)
    ref = torch.full((B, T), -2.0, dtype=torch.float64)
    loss = L.IwSFT()
    sid = torch.arange(B)[:, None].expand(B, T)  # one sample per row
    want = loss(d["z"], d["y"], reference_label_logprobs=ref, sequence_ids=sid)
    with pytest.warns(DeprecationWarning, match="'ref_logprobs' is now called") as rec:
        got = loss(d["z"], d["y"], ref_logprobs=ref, sequence_ids=sid)
    assert rec[0].filename == __file__  # points at the user's call, not inside the library
    assert torch.equal(got, want)
    with pytest.warns(DeprecationWarning):
        t = loss.target(d["z"], d["y"], ref_logprobs=ref, sequence_ids=sid)
    assert torch.equal(
        t.gamma, loss.target(d["z"], d["y"], reference_label_logprobs=ref, sequence_ids=sid).gamma
    )
    h = torch.randn(B, T, 4, dtype=torch.float64)
    w = torch.randn(V, 4, dtype=torch.float64)
    with pytest.warns(DeprecationWarning):
        f = L.fused_linear_qtarget_loss(loss, h, w, d["y"], ref_logprobs=ref, sequence_ids=sid)
    assert torch.equal(
        f,
        L.fused_linear_qtarget_loss(
            loss, h, w, d["y"], reference_label_logprobs=ref, sequence_ids=sid
        ),
    )
    both = re.escape("both ref_logprobs (the deprecated name) and reference_label_logprobs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ValueError, match=both):
            loss(d["z"], d["y"], ref_logprobs=ref, reference_label_logprobs=ref, sequence_ids=sid)
        with pytest.raises(ValueError, match=both):
            L.fused_linear_qtarget_loss(
                loss, h, w, d["y"], ref_logprobs=ref, reference_label_logprobs=ref
            )
    # not a field: the field list is the signature's (test_losses_inputs.py)
    assert "ref_logprobs" not in L.LOSS_INPUT_NAMES
    with pytest.raises(TypeError, match="unexpected keyword argument 'ref_logprob'"):
        L.fused_linear_qtarget_loss(loss, h, w, d["y"], ref_logprob=ref)


# ----------------------------------------------------------------------- errors
def test_missing_reference_names_what_to_pass() -> None:
    d = batch(7)
    teacher_only = {k: v for k, v in inputs(d).items() if k.startswith("teacher")}
    for cls in (L.SFTKL, L.ASFT):
        with pytest.raises(ValueError) as info:
            cls()(d["z"], d["y"], **teacher_only)
        msg = str(info.value)
        assert f"{cls.__name__} with residual" in msg
        assert "needs reference_ids and reference_logprobs" in msg
        assert "reference=" in msg and "anchor='teacher'" in msg
    with pytest.raises(ValueError, match=r"needs teacher_ids and teacher_logprobs"):
        L.SFTKL(anchor="teacher")(
            d["z"],
            d["y"],
            reference_ids=d["reference_ids"],
            reference_logprobs=d["reference_logprobs"],
        )
    with pytest.raises(
        ValueError, match=r"anchor = 'base' is not one of \('reference', 'teacher'\)"
    ):
        L.ASFT(anchor="base")


def test_reference_tensors_are_validated_like_teacher_tensors() -> None:
    d = batch(8)
    z, y = d["z"], d["y"]
    ids, lp = d["reference_ids"], d["reference_logprobs"]
    loss = L.SFTKL()
    with pytest.raises(ValueError, match="reference_logprobs is missing"):
        L.SFT()(z, y, reference_ids=ids)
    with pytest.raises(ValueError, match="reference_ids is missing"):
        L.SFT()(z, y, reference_logprobs=lp)
    with pytest.raises(
        ValueError, match=re.escape(f"reference_ids has shape ({B}, {T - 1}, {K}) but labels")
    ):
        loss(z, y, reference_ids=ids[:, 1:], reference_logprobs=lp[:, 1:])
    with pytest.raises(ValueError, match="reference_logprobs has shape"):
        loss(z, y, reference_ids=ids, reference_logprobs=lp[..., :-1])
    with pytest.raises(ValueError, match="reference_ids must be an integer tensor"):
        loss(z, y, reference_ids=ids.double(), reference_logprobs=lp)
    bad = ids.clone()
    bad[1, 2, 0] = V
    with pytest.raises(ValueError, match=re.escape(f"reference_ids[1, 2, 0] = {V} is outside")):
        loss(z, y, reference_ids=bad, reference_logprobs=lp)
    bad = ids.clone()
    bad[0, 4, 1] = bad[0, 4, 0]
    with pytest.raises(
        ValueError, match=r"reference_ids\[0, 4, :\] lists token .* a reference support"
    ):
        loss(z, y, reference_ids=bad, reference_logprobs=lp)
    nan = lp.clone()
    nan[1, 1, 2] = float("nan")
    with pytest.raises(ValueError, match=re.escape("reference_logprobs[1, 1, 2] is NaN")):
        loss(z, y, reference_ids=ids, reference_logprobs=nan)
    # a reference given to a loss that does not read it is still checked (no silent bad batch)
    with pytest.raises(ValueError, match=re.escape("reference_logprobs[1, 1, 2] is NaN")):
        L.SFT()(z, y, reference_ids=ids, reference_logprobs=nan)
    # an empty reference support at a supervised position names the reference tensor
    empty_ids, empty_lp = ids.clone(), lp.clone()
    empty_ids[0, 2] = -1
    empty_lp[0, 2] = float("-inf")
    with pytest.raises(ValueError, match=re.escape("reference_ids[0, 2, :] has no valid entry")):
        loss(z, y, reference_ids=empty_ids, reference_logprobs=empty_lp)
    with pytest.raises(ValueError, match=re.escape("reference_label_logprobs has shape")):
        L.IwSFT()(z, y, reference_label_logprobs=torch.zeros(B, T + 1))
