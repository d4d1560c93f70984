"""The report: the paper's figures for any teacher cache and student checkpoint.

* :func:`plot_induced_targets` — Figure 3: the induced target ``Q`` (Eq. 6) of each loss on the
  observed token and on another token, as a function of the model probability ``p_y``.
* :func:`observed_token_stats` — ``(p_θ(y_t), p_T(y_t))`` on every supervised token of some cache
  records: ``p_T`` from the cache, ``p_θ`` from one forward pass of the student.
* :func:`plot_teacher_given_student` — Figure 4: the heatmap ``P(p_T | p_θ)`` (columns normalised
  per ``p_θ`` bin) with the paper's four quadrants.
* :func:`rescue_filter_html` — Appendix G: trajectories with each supervised token coloured
  *rescue* (student low, teacher high) or *filter* (both low), with a tooltip per token; one
  self-contained HTML file.
* :func:`plot_loss_curves` — training curves per method, mean ± one standard deviation over seeds;
  :func:`plot_loss_panels` — several views of the same runs side by side (mean, min–max band).
* :class:`ReportTable` — a results table, written as Markdown (README) and as HTML (index).
* :func:`write_report` — all of the above into one directory with an ``index.html`` (no raw
  Markdown, no JSON) and a ``README.md``; what ``target-sft plot`` and the demo call.

Every plotting function writes one file and returns a small dataclass holding its ``path`` and
the numbers drawn, so that they can be checked. Figures are drawn with matplotlib's Agg canvas
(no display, no pyplot global state); matplotlib and torch are imported only when needed.
``docs/REPORT.md`` explains how to read each figure.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from target_sft.cache import Key, TeacherCache
from target_sft.fingerprint import (
    TokenizerCheck,
    check_ids_in_vocab,
    check_student_vocab,
    student_vocab,
)

__all__ = [
    "DEFAULT_PRESETS",
    "DEFAULT_TEACHER",
    "InducedTargets",
    "LossCurves",
    "ObservedTokenStats",
    "ReportTable",
    "RescueFilterView",
    "TeacherGivenStudent",
    "check_tokenizer",
    "classify_tokens",
    "figure3_inputs",
    "observed_token_stats",
    "parse_preset_spec",
    "plot_induced_targets",
    "plot_loss_curves",
    "plot_loss_panels",
    "plot_teacher_given_student",
    "rescue_filter_html",
    "teacher_given_student_matrix",
    "token_decoder",
    "write_report",
]

PathLike = str | os.PathLike[str]

#: Figure 3's losses: ``"name"`` or ``"name:key=value,key=value"`` (a :func:`get_preset` name and
#: its keyword arguments).
DEFAULT_PRESETS: tuple[str, ...] = (
    "sft",
    "dft",
    "beyond_log:alpha=0.5",
    "profit",
    "eaft",
    "label_smoothing",
    "kd",
    "hybrid_kd",
    "target_sft:eta=0.2",
    "target_sft:eta=0.5",
    "target_sft:eta=1.0",
)

#: The illustrative teacher of Figure 3 (vocabulary of 8; token 0 = the observed token y, token 1
#: = the plotted other token k): the teacher prefers the alternative k (0.5) over y (0.3) and
#: spreads 0.2 evenly over the six remaining tokens.
DEFAULT_TEACHER: tuple[float, ...] = (0.3, 0.5) + (0.2 / 6,) * 6

_PRETTY = {
    "sft": "SFT",
    "dft": "DFT (= p-loss)",
    "beyond_log": "Beyond-log",
    "profit": "ProFiT",
    "eaft": "EAFT",
    "iw_sft": "iw-SFT",
    "cft": "CFT",
    "label_smoothing": "Label smoothing",
    "sft_kl": "SFT+KL",
    "asft": "ASFT",
    "proximal_sft": "Proximal SFT",
    "gem": "GEM",
    "kd": "KD",
    "hybrid_kd": "Hybrid KD",
    "target_sft": "TARGET-SFT",
    "target_sft_constant": "TARGET-SFT, constant branch",
}


# ----------------------------------------------------------------------------------------------
# helpers


def _figure(figsize: tuple[float, float], dpi: int) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: PathLike, dpi: int) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=dpi)  # no bbox_inches: the PNG is exactly figsize × dpi pixels
    return p


def _parse_value(v: str) -> Any:
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_preset_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"target_sft:eta=0.5"`` → ``("target_sft", {"eta": 0.5})`` (``-`` in names = ``_``)."""
    name, _, rest = spec.partition(":")
    name = name.strip().lower().replace("-", "_")
    kwargs: dict[str, Any] = {}
    for part in filter(None, (s.strip() for s in rest.split(","))):
        k, eq, v = part.partition("=")
        if not eq or not k.strip():
            raise ValueError(f"bad preset spec {spec!r}: expected name:key=value,key=value")
        kwargs[k.strip()] = _parse_value(v.strip())
    return name, kwargs


def _preset_label(name: str, kwargs: Mapping[str, Any]) -> str:
    base = _PRETTY.get(name, name)
    if not kwargs:
        return base
    sym = {"eta": "η", "alpha": "α", "tau": "τ", "epsilon": "ε", "lam": "λ", "beta": "β"}
    inner = ", ".join(f"{sym.get(k, k)}={v:g}" if isinstance(v, float) else f"{sym.get(k, k)}={v}"
                      for k, v in kwargs.items())  # fmt: skip
    return f"{base} ({inner})"


# ----------------------------------------------------------------------------------------------
# Figure 3


@dataclass(frozen=True)
class InducedTargets:
    """What :func:`plot_induced_targets` drew: per preset label, ``q_y[label]`` (Q on the
    observed token) and ``q_other[label]`` (Q on the other token k), both ``[M]`` over ``p_y``;
    ``p_other`` is the model's own probability of k (``(1 − p_y)/(V − 1)``)."""

    path: Path
    p_y: npt.NDArray[np.float64]
    p_other: npt.NDArray[np.float64]
    q_y: dict[str, npt.NDArray[np.float64]]
    q_other: dict[str, npt.NDArray[np.float64]]
    teacher: npt.NDArray[np.float64]
    specs: dict[str, str]


def figure3_inputs(sweep: Any, *, token_weight: float = 0.5) -> dict[str, Any]:
    """The per-token inputs Figure 3 gives every loss, one row per sweep point ``p_y`` (a float64
    ``[M]`` tensor), chosen to be neutral: ``token_weights = token_weight`` (CFT's weight);
    ``old_logprobs = reference_label_logprobs = log p_y`` (Proximal SFT's ratio and iw-SFT's
    weight are 1: π_old = π_ref = the current model); ``sequence_ids = 0, 1, …, M − 1`` (each point is its own
    one-token sequence, so per-sequence weights are per point) and ``sequence_weights = 1``. A loss
    ignores the inputs it does not use."""
    import torch

    m = int(sweep.numel())
    log_p = torch.log(sweep)
    return {
        "token_weights": torch.full((m,), float(token_weight), dtype=sweep.dtype),
        "old_logprobs": log_p,
        "reference_label_logprobs": log_p,
        "sequence_ids": torch.arange(m),
        "sequence_weights": torch.ones(m, dtype=sweep.dtype),
    }


def plot_induced_targets(
    path: PathLike,
    presets: Sequence[str] = DEFAULT_PRESETS,
    *,
    p_y: Sequence[float] | npt.ArrayLike | None = None,
    teacher: Sequence[float] | npt.ArrayLike = DEFAULT_TEACHER,
    token_weight: float = 0.5,
    figsize: tuple[float, float] = (13.0, 5.0),
    dpi: int = 100,
) -> InducedTargets:
    """Figure 3: the induced target of each preset against the model probability ``p_y``.

    The model distribution puts ``p_y`` on the observed token y (token 0) and spreads ``1 − p_y``
    evenly over the ``V − 1`` others (``V = len(teacher)``, 8 by default); the right panel shows
    token k = 1. Presets whose residual reads a sparse distribution (KD, Hybrid KD, TARGET-SFT
    read the teacher's; SFT+KL, ASFT their reference anchor's) see ``teacher`` as that
    full-vocabulary distribution (default :data:`DEFAULT_TEACHER`: it prefers k); every preset
    gets the neutral per-token inputs of :func:`figure3_inputs`. Values
    come from :func:`target_sft.losses.induced_target_curve` (Eq. 6). A preset that cannot be
    drawn from these inputs is a ``ValueError`` naming it and the cause.

    Args:
        path: the PNG to write (``figsize × dpi`` pixels).
        presets: ``"name"`` or ``"name:key=value,..."`` per line (see :data:`DEFAULT_PRESETS`).
        p_y: the sweep (default: 199 points in ``[0.005, 0.995]``).
        teacher: the illustrative teacher distribution ``[V]``.
        token_weight: the constant ``token_weights`` (CFT's critical-token weight) of every point.
    """
    import torch

    from target_sft.losses import get_preset, induced_target_curve

    tp = torch.as_tensor(np.asarray(teacher, dtype=np.float64))
    if tp.ndim != 1 or tp.numel() < 2 or bool((tp < 0).any()) or float(tp.sum()) <= 0:
        raise ValueError("teacher must be a non-negative distribution over at least 2 tokens")
    tp = tp / tp.sum()
    v = tp.numel()
    sweep = (
        torch.linspace(0.005, 0.995, 199, dtype=torch.float64)
        if p_y is None
        else torch.as_tensor(np.asarray(p_y, dtype=np.float64)).reshape(-1)
    )
    if sweep.numel() == 0 or bool(((sweep <= 0) | (sweep >= 1) | sweep.isnan()).any()):
        raise ValueError("p_y must be a non-empty sweep of values strictly inside (0, 1)")
    q_y: dict[str, np.ndarray] = {}
    q_other: dict[str, np.ndarray] = {}
    specs: dict[str, str] = {}
    names: dict[str, str] = {}
    p_other = None
    inputs = figure3_inputs(sweep, token_weight=token_weight)
    for spec in presets:
        name, kw = parse_preset_spec(spec)
        loss = get_preset(name, **kw)
        source = getattr(getattr(loss, "residual", None), "source", None)
        try:
            curve = induced_target_curve(
                loss,
                sweep,
                vocab_size=v,
                label=0,
                other=1,
                teacher_probs=tp if source == "teacher" else None,
                reference_probs=tp if source == "reference" else None,
                **inputs,
            )
        except (ValueError, RuntimeError) as e:
            raise ValueError(
                f"plot_induced_targets cannot draw preset {spec!r} ({type(loss).__name__}): {e}. "
                f"Figure 3 gives every loss only {', '.join(inputs)} (neutral values, "
                "docs/REPORT.md) and, to losses reading a teacher or a reference, a "
                "full-vocabulary one; leave this preset out of `presets`"
            ) from e
        label = _preset_label(name, kw)
        q_y[label] = curve.q_y.numpy().copy()
        q_other[label] = curve.q_other.numpy().copy()
        specs[label] = spec
        names[label] = name
        p_other = curve.p_other.numpy().copy()
    if p_other is None:
        p_other = ((1.0 - sweep) / (v - 1)).numpy()
    x = sweep.numpy()

    fig = _figure(figsize, dpi)
    ax1, ax2 = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.06, right=0.78, bottom=0.11, top=0.88, wspace=0.22)
    ax1.plot(x, x, color="0.6", ls=":", lw=1.2, label="Q = p (no update)")
    ax2.plot(x, p_other, color="0.6", ls=":", lw=1.2)
    colors = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
        "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939",
    ]  # fmt: skip
    styles = ["-", "--", "-.", (0, (5, 1, 1, 1))]
    for i, label in enumerate(q_y):
        kw = dict(color=colors[i % len(colors)], ls=styles[(i // len(colors)) % 4], lw=1.8)
        if names[label] == "target_sft":
            kw["lw"] = 2.4
        ax1.plot(x, q_y[label], label=label, **kw)
        ax2.plot(x, q_other[label], **kw)
    ax1.set_title("Observed token y:  Q(y)")
    ax2.set_title("Another token k:  Q(k)   (dotted: the model's p_k)")
    for ax in (ax1, ax2):
        ax.set_xlabel("model probability of the observed token  p_y")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
    ax1.set_ylabel("induced target  Q = p − ∂L/∂z")
    ax1.set_ylim(-0.02, 1.02)
    handles, labels = ax1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.79, 0.5), fontsize=9)
    t = ", ".join(f"{float(a):.3g}" for a in tp[:3])
    fig.suptitle(
        f"Figure 3 · induced targets (V = {v}; teacher presets use π_T = [{t}, …], "
        f"π_T(y) = {float(tp[0]):.2g}, π_T(k) = {float(tp[1]):.2g})",
        fontsize=11,
    )
    out = _save(fig, path, dpi)
    return InducedTargets(
        path=out,
        p_y=x,
        p_other=np.asarray(p_other, dtype=np.float64),
        q_y=q_y,
        q_other=q_other,
        teacher=tp.numpy(),
        specs=specs,
    )


# ----------------------------------------------------------------------------------------------
# observed-token statistics


@dataclass(frozen=True)
class ObservedTokenStats:
    """``p_θ(y_t)`` and ``p_T(y_t)`` on every supervised token of some records.

    Token ``i`` belongs to record ``record[i]`` (an index into ``keys``), sits at position
    ``position[i]`` of its ``input_ids``/``labels`` and has label ``label[i]``; the tokens of
    record ``r`` are ``offsets[r]:offsets[r + 1]`` (in position order, the cache's row order).
    """

    keys: list[Key]
    p_student: npt.NDArray[np.float64]
    p_teacher: npt.NDArray[np.float64]
    record: npt.NDArray[np.int64]
    position: npt.NDArray[np.int64]
    label: npt.NDArray[np.int64]
    offsets: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.p_student.shape[0])

    def for_record(self, r: int) -> slice:
        return slice(int(self.offsets[r]), int(self.offsets[r + 1]))

    @classmethod
    def from_arrays(
        cls,
        keys: Sequence[Key],
        per_record_p_student: Sequence[npt.ArrayLike],
        records: Sequence[Any],
    ) -> ObservedTokenStats:
        """Assemble from per-record ``p_θ`` arrays (row order of the cache) and the records."""
        ps, pt, rec, pos, lab, offs = [], [], [], [], [], [0]
        for r, (p, cr) in enumerate(zip(per_record_p_student, records, strict=True)):
            p = np.asarray(p, dtype=np.float64).reshape(-1)
            positions = cr.supervised_positions
            if p.shape[0] != positions.shape[0]:
                raise ValueError(
                    f"record {cr.key!r}: {p.shape[0]} student probabilities for "
                    f"{positions.shape[0]} supervised tokens"
                )
            ps.append(p)
            pt.append(np.exp(cr.label_logprobs.astype(np.float64)))
            rec.append(np.full(p.shape[0], r, dtype=np.int64))
            pos.append(positions.astype(np.int64))
            lab.append(cr.labels[positions].astype(np.int64))
            offs.append(offs[-1] + p.shape[0])

        def cat(xs: list[np.ndarray], dt: Any) -> np.ndarray:
            return np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)

        return cls(
            keys=list(keys),
            p_student=cat(ps, np.float64),
            p_teacher=cat(pt, np.float64),
            record=cat(rec, np.int64),
            position=cat(pos, np.int64),
            label=cat(lab, np.int64),
            offsets=np.asarray(offs, dtype=np.int64),
        )


def _open_cache(cache: TeacherCache | PathLike) -> TeacherCache:
    return cache if isinstance(cache, TeacherCache) else TeacherCache(cache)


def _select_keys(cache: TeacherCache, keys: Iterable[Key] | None, max_records: int | None) -> list:
    if keys is None:
        n = len(cache) if max_records is None else min(len(cache), max(0, int(max_records)))
        return [cache.key_at(i) for i in range(n)]
    out = list(keys)
    return out if max_records is None else out[: max(0, int(max_records))]


def _load_model(model: Any, device: str | None, dtype: Any) -> Any:
    if isinstance(model, (str, os.PathLike)):
        from target_sft.models import load_teacher

        return load_teacher(model, dtype=dtype, device=device)
    if hasattr(model, "eval"):
        model.eval()
    return model


def _model_device(model: Any, device: str | None) -> Any:
    import torch

    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def _label_logprobs(logits: Any, rows: Any, labels: Any, chunk_elements: int = 1 << 24) -> Any:
    """log softmax(logits[rows])[labels] in float64, a few rows at a time."""
    import torch

    v = logits.shape[-1]
    step = max(1, chunk_elements // max(v, 1))
    out = []
    for s in range(0, rows.shape[0], step):
        z = logits[rows[s : s + step]].to(torch.float64)
        lab = labels[s : s + step]
        out.append(z.gather(1, lab[:, None])[:, 0] - torch.logsumexp(z, dim=-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def observed_token_stats(
    cache: TeacherCache | PathLike,
    model: Any,
    keys: Iterable[Key] | None = None,
    *,
    max_records: int | None = 256,
    batch_size: int = 4,
    device: str | None = None,
    dtype: Any = None,
    progress: bool | None = False,
    allow_tokenizer_mismatch: bool = False,
) -> ObservedTokenStats:
    """``(p_θ(y_t), p_T(y_t))`` on the supervised tokens of ``keys`` (Figure 4's data).

    ``p_T(y_t) = exp(label_logprobs)`` from the cache (the teacher's full-vocabulary log-prob of
    the label, at the cache's temperature). ``p_θ(y_t)`` is the softmax of the student's logits at
    position ``t − 1`` (which predict ``labels[t]``), taken in float64 from one forward pass over
    the record's ``input_ids``; records are batched ``batch_size`` at a time, right-padded with an
    attention mask (causal attention never sees the padding).

    Args:
        cache: a :class:`TeacherCache` or its directory.
        model: a ``transformers`` causal LM, a checkpoint directory (loaded with
            ``AutoModelForCausalLM``: float32 on CPU, bfloat16 on GPU unless ``dtype`` is given),
            or a callable ``f(input_ids=..., attention_mask=...)`` returning logits or ``.logits``.
        keys: the records (default: the first ``max_records`` in cache order).
        max_records: cap on the number of records (``None``: all).
        batch_size: records per forward pass (the ``[B, T, V]`` logits are materialised).
        device: where to run (default: a loaded model's device; the model's parameters' device).
        progress: a tqdm bar over records (``None``: tqdm's default).
        allow_tokenizer_mismatch: warn instead of raising when the model's vocabulary is smaller
            than the cache's tokenizer.

    Raises:
        CacheMismatchError: the model's vocabulary (embedding rows, ``lm_head`` outputs) is
            smaller than the cache's tokenizer, or than a token id of a record (checked before
            each forward pass; see :mod:`target_sft.fingerprint`).
    """
    import torch

    c = _open_cache(cache)
    ks = _select_keys(c, keys, max_records)
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size} must be at least 1")
    m = _load_model(model, device, dtype)
    dev = _model_device(m, device)
    student = student_vocab(m)
    check_student_vocab(
        student, c.info, where="observed_token_stats", allow_mismatch=allow_tokenizer_mismatch
    )
    records = [c[k] for k in ks]
    per_record: list[np.ndarray] = [np.zeros(0)] * len(records)
    todo = [i for i, r in enumerate(records) if r.n_supervised > 0]
    from tqdm import tqdm

    disable = None if progress is None else not progress
    with torch.no_grad(), tqdm(total=len(todo), unit="rec", desc="student", disable=disable) as bar:
        for s in range(0, len(todo), batch_size):
            idx = todo[s : s + batch_size]
            length = max(records[i].n_tokens for i in idx)
            ids = torch.zeros(len(idx), length, dtype=torch.long)
            mask = torch.zeros(len(idx), length, dtype=torch.long)
            for b, i in enumerate(idx):
                t = records[i].n_tokens
                ids[b, :t] = torch.from_numpy(records[i].input_ids.astype(np.int64))
                mask[b, :t] = 1
            for i in idx:
                check_ids_in_vocab(
                    student,
                    {"input_ids": records[i].input_ids, "labels": records[i].labels},
                    f"observed_token_stats: record {records[i].key!r}",
                )
            out = m(input_ids=ids.to(dev), attention_mask=mask.to(dev))
            logits = getattr(out, "logits", out)
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
            vocab = int(logits.shape[-1])
            for b, i in enumerate(idx):
                r = records[i]
                pos = r.supervised_positions
                lab = r.labels[pos].astype(np.int64)
                if lab.size and (lab.max() >= vocab or lab.min() < 0):
                    bad = int(lab[np.argmax((lab >= vocab) | (lab < 0))])
                    raise ValueError(
                        f"record {r.key!r}: label {bad} is outside the model's vocabulary "
                        f"[0, {vocab}); is this the checkpoint the cache was built for?"
                    )
                lp = _label_logprobs(
                    logits[b],
                    torch.from_numpy(pos - 1).to(logits.device),
                    torch.from_numpy(lab).to(logits.device),
                )
                per_record[i] = torch.exp(lp).cpu().numpy()
            bar.update(len(idx))
    return ObservedTokenStats.from_arrays(ks, per_record, records)


# ----------------------------------------------------------------------------------------------
# Figure 4


@dataclass(frozen=True)
class TeacherGivenStudent:
    """Figure 4's numbers. ``matrix[i, j] = P(p_T ∈ teacher bin i | p_θ ∈ student bin j)``
    (columns sum to 1 where ``counts[:, j].sum() > 0``, else 0); ``counts`` the raw 2-D histogram;
    ``quadrants`` the token counts per quadrant (split at ``split``); ``title`` the figure's."""

    path: Path
    matrix: npt.NDArray[np.float64]
    counts: npt.NDArray[np.int64]
    student_edges: npt.NDArray[np.float64]
    teacher_edges: npt.NDArray[np.float64]
    quadrants: dict[str, int]
    split: float
    n_tokens: int
    title: str = ""


def _edges(bins: int | Sequence[float], scale: str, min_p: float) -> np.ndarray:
    if not isinstance(bins, (int, np.integer)):
        e = np.asarray(bins, dtype=np.float64)
        if e.ndim != 1 or e.size < 2 or bool(np.any(np.diff(e) <= 0)):
            raise ValueError("bin edges must be a strictly increasing sequence of 2+ numbers")
        return e
    if bins < 1:
        raise ValueError(f"bins = {bins} must be at least 1")
    if scale == "linear":
        return np.linspace(0.0, 1.0, int(bins) + 1)
    if scale == "log":
        if not 0 < min_p < 1:
            raise ValueError(f"min_p = {min_p} must lie in (0, 1)")
        return np.logspace(math.log10(min_p), 0.0, int(bins) + 1)
    raise ValueError(f'scale must be "linear" or "log", got {scale!r}')


def _bin_index(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin ``i`` holds ``edges[i] <= x < edges[i + 1]``; the last bin also holds its right edge;
    values outside the edges go to the first/last bin."""
    i = np.searchsorted(edges, x, side="right") - 1
    return np.clip(i, 0, edges.size - 2)


def teacher_given_student_matrix(
    p_student: npt.ArrayLike,
    p_teacher: npt.ArrayLike,
    student_edges: npt.ArrayLike,
    teacher_edges: npt.ArrayLike,
) -> tuple[np.ndarray, np.ndarray]:
    """``(P(p_T bin | p_θ bin), counts)``, both ``[n_teacher_bins, n_student_bins]``."""
    ps = np.asarray(p_student, dtype=np.float64).reshape(-1)
    pt = np.asarray(p_teacher, dtype=np.float64).reshape(-1)
    if ps.shape != pt.shape:
        raise ValueError(f"p_student has {ps.size} values but p_teacher has {pt.size}")
    se, te = np.asarray(student_edges, np.float64), np.asarray(teacher_edges, np.float64)
    counts = np.zeros((te.size - 1, se.size - 1), dtype=np.int64)
    np.add.at(counts, (_bin_index(pt, te), _bin_index(ps, se)), 1)
    col = counts.sum(axis=0, keepdims=True)
    matrix = np.divide(counts, col, out=np.zeros(counts.shape, np.float64), where=col > 0)
    return matrix, counts


def plot_teacher_given_student(
    path: PathLike,
    p_student: npt.ArrayLike,
    p_teacher: npt.ArrayLike,
    bins: int | Sequence[float] = 20,
    *,
    scale: str = "linear",
    min_p: float = 1e-4,
    split: float = 0.5,
    title: str | None = None,
    figsize: tuple[float, float] = (7.0, 6.0),
    dpi: int = 100,
) -> TeacherGivenStudent:
    """Figure 4: heatmap of ``P(p_T | p_θ)`` on the observed tokens, one column per ``p_θ`` bin.

    Args:
        path: the PNG to write.
        p_student, p_teacher: ``p_θ(y_t)`` and ``p_T(y_t)`` (e.g. from :func:`observed_token_stats`).
        bins: the number of bins per axis, or explicit edges (used for both axes).
        scale: ``"linear"`` (the paper's: equal bins on ``[0, 1]``) or ``"log"`` (log-spaced from
            ``min_p`` to 1; smaller values fall into the first bin).
        split: where the quadrant lines are drawn (Q1 high p_T / low p_θ, Q2 both low, Q3 both
            high, Q4 high p_θ / low p_T; "high" = ``>= split``).
    """
    edges = _edges(bins, scale, min_p)
    ps = np.asarray(p_student, dtype=np.float64).reshape(-1)
    pt = np.asarray(p_teacher, dtype=np.float64).reshape(-1)
    matrix, counts = teacher_given_student_matrix(ps, pt, edges, edges)
    hs, ht = ps >= split, pt >= split
    quadrants = {
        "Q1": int(np.sum(~hs & ht)),
        "Q2": int(np.sum(~hs & ~ht)),
        "Q3": int(np.sum(hs & ht)),
        "Q4": int(np.sum(hs & ~ht)),
    }

    fig = _figure(figsize, dpi)
    ax = fig.add_subplot(1, 1, 1)
    fig.subplots_adjust(left=0.12, right=0.95, bottom=0.1, top=0.9)
    shown = np.where(counts.sum(0, keepdims=True) > 0, matrix, np.nan)
    mesh = ax.pcolormesh(edges, edges, shown, cmap="viridis", vmin=0.0, shading="flat")
    fig.colorbar(mesh, ax=ax, label="P(p_T bin | p_θ bin)")
    if scale == "log" and isinstance(bins, (int, np.integer)):
        ax.set_xscale("log")
        ax.set_yscale("log")
    lo, hi = edges[0], edges[-1]
    ax.plot([lo, hi], [lo, hi], color="white", ls="--", lw=1, alpha=0.8)
    if lo < split < hi:
        ax.axvline(split, color="white", lw=1.2)
        ax.axhline(split, color="white", lw=1.2)
        geo = (lambda a, b: math.sqrt(a * b)) if scale == "log" else (lambda a, b: (a + b) / 2)
        xl, xh = geo(lo, split), geo(split, hi)
        for q, (x, y) in {"Q1": (xl, xh), "Q2": (xl, xl), "Q3": (xh, xh), "Q4": (xh, xl)}.items():
            ax.text(
                x, y, f"{q}\n{quadrants[q]:,}", color="white", ha="center", va="center",
                fontsize=11, fontweight="bold",
                bbox={"facecolor": "black", "alpha": 0.35, "lw": 0},
            )  # fmt: skip
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("student  p_θ(y_t)")
    ax.set_ylabel("teacher  p_T(y_t)")
    title = title or f"Figure 4 · P(p_T | p_θ) on {ps.size:,} observed tokens"
    # long titles (a model label) wrap instead of running past the figure's edges
    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=10)
    out = _save(fig, path, dpi)
    return TeacherGivenStudent(
        path=out,
        matrix=matrix,
        counts=counts,
        student_edges=edges,
        teacher_edges=edges,
        quadrants=quadrants,
        split=float(split),
        n_tokens=int(ps.size),
        title=title,
    )


# ----------------------------------------------------------------------------------------------
# Appendix G: rescue / filter tokens

RESCUE, FILTER, OTHER = "rescue", "filter", "other"


def classify_tokens(
    p_student: npt.ArrayLike,
    p_teacher: npt.ArrayLike,
    *,
    student_low: float = 0.5,
    teacher_high: float = 0.5,
    teacher_low: float = 0.5,
) -> npt.NDArray[np.str_]:
    """Appendix G's categories (Figure 4's quadrants Q1 and Q2):

    * ``"rescue"``: ``p_θ < student_low`` and ``p_T >= teacher_high`` (the student underweights a
      token the teacher supports: TARGET-SFT's residual pushes mass back onto it);
    * ``"filter"``: ``p_θ < student_low`` and ``p_T < teacher_low`` (both doubt the label:
      TARGET-SFT's ``γ = p_θ`` is small and the teacher residual takes the mass);
    * ``"other"``: everything else.

    The paper gives no numbers; the defaults split at 0.5, where Figure 4's quadrant lines are.
    """
    ps = np.asarray(p_student, dtype=np.float64)
    pt = np.asarray(p_teacher, dtype=np.float64)
    if teacher_low > teacher_high:
        raise ValueError(f"teacher_low = {teacher_low} must be <= teacher_high = {teacher_high}")
    low = ps < student_low
    out = np.full(ps.shape, OTHER, dtype="<U6")
    out[low & (pt >= teacher_high)] = RESCUE
    out[low & (pt < teacher_low)] = FILTER
    return out


def token_decoder(tokenizer_or_decode: Any) -> Callable[[int], str]:
    """How the report shows a token id: ``tokenizer.decode`` of it for a tokenizer, the callable
    itself for an ``id -> str`` callable, ``[id]`` for ``None``."""
    if tokenizer_or_decode is None:
        return lambda i: f"[{i}]"
    if hasattr(tokenizer_or_decode, "decode"):
        tok = tokenizer_or_decode

        def dec(i: int) -> str:
            try:
                return str(tok.decode([int(i)], clean_up_tokenization_spaces=False))
            except TypeError:  # tokenizers without that keyword
                return str(tok.decode([int(i)]))

        return dec
    if callable(tokenizer_or_decode):
        return lambda i: str(tokenizer_or_decode(int(i)))
    raise TypeError("tokenizer_or_decode must be a tokenizer (with .decode), a callable or None")


def _visible(s: str) -> str:
    if s == "":
        return "∅"
    return s.replace("\n", "↵\n")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:70em;
color:#222;line-height:1.5}
h1{font-size:1.4em}h2{font-size:1.05em;margin:0 0 .4em}
.traj{border:1px solid #ddd;border-radius:6px;padding:1em;margin:1.2em 0}
.text{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.92em;white-space:pre-wrap;
word-break:break-word}
.tok{border-radius:3px;padding:0 1px;margin:0 1px 0 0;border-bottom:1px solid #ccc;cursor:help}
.ctx{color:#999;border-bottom:none;cursor:default}
.rescue{background:#b7e4c7;border-bottom:2px solid #2d6a4f}
.filter{background:#ffccd5;border-bottom:2px solid #c9184a}
.other{background:transparent}
.legend span.tok{display:inline-block;padding:0 .5em;margin-right:.4em}
.counts{color:#555;font-size:.9em}
.label{font-size:.75em;letter-spacing:.15em;color:#888;text-transform:uppercase;margin-top:.6em}
table{border-collapse:collapse}td,th{padding:.1em .6em;text-align:left}
"""


@dataclass(frozen=True)
class RescueFilterView:
    """What :func:`rescue_filter_html` wrote: per shown record, its categories (row order)."""

    path: Path
    keys: list[Key]
    categories: dict[Key, list[str]]
    counts: dict[str, int]
    thresholds: dict[str, float] = field(default_factory=dict)


def rescue_filter_html(
    path: PathLike,
    cache: TeacherCache | PathLike,
    model: Any,
    tokenizer_or_decode: Any,
    keys: Iterable[Key] | None = None,
    *,
    student_low: float = 0.5,
    teacher_high: float = 0.5,
    teacher_low: float = 0.5,
    max_records: int = 3,
    stats: ObservedTokenStats | None = None,
    batch_size: int = 4,
    device: str | None = None,
    title: str = "Rescue and filter tokens (Appendix G)",
    allow_tokenizer_mismatch: bool = False,
) -> RescueFilterView:
    """Appendix G's view: trajectories with every supervised token coloured by category.

    Each supervised token ``y_t`` (the label, decoded alone) is a span coloured *rescue* or
    *filter* (:func:`classify_tokens`); hovering shows ``p_θ(y_t)``, ``p_T(y_t)``, the teacher's
    rank of ``y_t`` and its top-3 tokens. Unsupervised tokens (the prompt) are shown in grey, in
    place. One self-contained file: inline CSS, no script, every text escaped.

    Args:
        path: the HTML file to write.
        cache: the teacher cache (or its directory).
        model: the student (see :func:`observed_token_stats`); unused when ``stats`` covers the
            records (then it may be ``None``).
        tokenizer_or_decode: a tokenizer (``decode([id])``), a callable ``id -> str`` or ``None``
            (ids are shown as ``[id]``).
        keys: the records to show (default: the first ``max_records`` of ``stats.keys`` or of
            the cache).
        student_low, teacher_high, teacher_low: the thresholds of :func:`classify_tokens`.
        stats: precomputed :class:`ObservedTokenStats` (the records are looked up in it by key).
        allow_tokenizer_mismatch: warn instead of raising :class:`CacheMismatchError` when the
            tokenizer is not the one the cache was built with (content fingerprint).
    """
    c = _open_cache(cache)
    check_tokenizer(tokenizer_or_decode, c, "rescue_filter_html", allow_tokenizer_mismatch)
    if keys is None:
        ks = (
            list(stats.keys[:max_records])
            if stats is not None
            else _select_keys(c, None, max_records)
        )
    else:
        ks = list(keys)
    have = {k: i for i, k in enumerate(stats.keys)} if stats is not None else {}
    missing = [k for k in ks if k not in have]
    if missing:
        if model is None:
            raise ValueError(f"no student probabilities for records {missing[:5]!r} and no model")
        extra = observed_token_stats(
            c, model, missing, max_records=None, batch_size=batch_size, device=device,
            allow_tokenizer_mismatch=allow_tokenizer_mismatch,
        )  # fmt: skip
    decode = token_decoder(tokenizer_or_decode)
    cache_text: dict[int, str] = {}

    def text(i: int) -> str:
        if i not in cache_text:
            cache_text[i] = decode(i)
        return cache_text[i]

    sections: list[str] = []
    cats_out: dict[Key, list[str]] = {}
    totals = {RESCUE: 0, FILTER: 0, OTHER: 0}
    for k in ks:
        rec = c[k]
        if k in have:
            sl = stats.for_record(have[k])  # type: ignore[union-attr]
            ps = stats.p_student[sl]  # type: ignore[union-attr]
        else:
            j = extra.keys.index(k)
            ps = extra.p_student[extra.for_record(j)]
        pos = rec.supervised_positions
        if ps.shape[0] != pos.shape[0]:
            raise ValueError(
                f"record {k!r}: stats hold {ps.shape[0]} tokens, the cache {pos.shape[0]}"
            )
        pt = np.exp(rec.label_logprobs.astype(np.float64))
        cats = classify_tokens(
            ps, pt, student_low=student_low, teacher_high=teacher_high, teacher_low=teacher_low
        )
        cats_out[k] = [str(x) for x in cats]
        n = {RESCUE: int(np.sum(cats == RESCUE)), FILTER: int(np.sum(cats == FILTER))}
        for kk in (RESCUE, FILTER):
            totals[kk] += n[kk]
        totals[OTHER] += int(np.sum(cats == OTHER))
        row_of = {int(t): r for r, t in enumerate(pos)}
        parts: list[str] = []
        for t in range(rec.n_tokens):
            r = row_of.get(t)
            if r is None:
                tid = int(rec.input_ids[t])
                parts.append(
                    f'<span class="tok ctx" title="{html.escape(f"position {t} · id {tid} · not supervised")}">'
                    f"{html.escape(_visible(text(tid)))}</span>"
                )
                continue
            y = int(rec.labels[t])
            order = np.argsort(-rec.topk_logprobs[r], kind="stable")[:3]
            top = ", ".join(
                f"{text(int(rec.topk_ids[r][j]))!r} {math.exp(float(rec.topk_logprobs[r][j])):.3f}"
                for j in order
                if int(rec.topk_ids[r][j]) >= 0
            )
            tip = (
                f"{cats[r]} · position {t} · id {y}\n"
                f"p_θ(y) = {ps[r]:.4f}\np_T(y) = {pt[r]:.4f} (teacher rank {int(rec.label_ranks[r])})\n"
                f"teacher top-3: {top}"
            )
            parts.append(
                f'<span class="tok {cats[r]}" data-pos="{t}" data-p-student="{ps[r]:.6g}" '
                f'data-p-teacher="{pt[r]:.6g}" title="{html.escape(tip)}">'
                f"{html.escape(_visible(text(y)))}</span>"
            )
        sections.append(
            f'<section class="traj" data-key="{html.escape(str(k))}">'
            f"<h2>record {html.escape(repr(k))}</h2>"
            f'<div class="counts"><b>Rescue · {n[RESCUE]}</b> &nbsp; <b>Filter · {n[FILTER]}</b>'
            f" &nbsp; Response · {pos.shape[0]} supervised tokens (of {rec.n_tokens})</div>"
            f'<div class="label">trajectory</div><div class="text">{"".join(parts)}</div></section>'
        )
    th = {"student_low": student_low, "teacher_high": teacher_high, "teacher_low": teacher_low}
    legend = (
        '<p class="legend">'
        f'<span class="tok rescue">rescue</span> p_θ(y) &lt; {student_low:g} and '
        f"p_T(y) ≥ {teacher_high:g}: the student underweights a token the teacher supports "
        "(TARGET-SFT's teacher residual strengthens it) &nbsp; "
        f'<span class="tok filter">filter</span> p_θ(y) &lt; {student_low:g} and '
        f"p_T(y) &lt; {teacher_low:g}: both doubt the label (likely noisy or non-unique; "
        "TARGET-SFT relaxes imitation, γ = p_θ) &nbsp; "
        '<span class="tok other">other</span> the rest &nbsp; '
        '<span class="tok ctx">grey</span> not supervised (prompt). '
        "Hover a token for p_θ, p_T and the teacher's top-3.</p>"
    )
    doc = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{legend}"
        f'<p class="counts">{len(ks)} trajectories · rescue {totals[RESCUE]} · '
        f"filter {totals[FILTER]} · other {totals[OTHER]}</p>"
        + "".join(sections)
        + "</body></html>\n"
    )
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(doc, encoding="utf-8")
    return RescueFilterView(path=p, keys=ks, categories=cats_out, counts=totals, thresholds=th)


# ----------------------------------------------------------------------------------------------
# loss curves


@dataclass(frozen=True)
class LossCurves:
    """Per method: ``steps``, ``mean`` and ``std`` over seeds (each seed truncated to the shortest
    run of that method), and the number of seeds."""

    path: Path
    steps: dict[str, npt.NDArray[np.float64]]
    mean: dict[str, npt.NDArray[np.float64]]
    std: dict[str, npt.NDArray[np.float64]]
    seeds: dict[str, int]


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or y.shape[-1] < 2:
        return y
    w = min(window, y.shape[-1])
    c = np.cumsum(np.pad(y, [(0, 0)] * (y.ndim - 1) + [(1, 0)]), axis=-1)
    out = np.empty_like(y)
    n = y.shape[-1]
    for i in range(n):  # trailing moving average (shorter at the start)
        lo = max(0, i + 1 - w)
        out[..., i] = (c[..., i + 1] - c[..., lo]) / (i + 1 - lo)
    return out


def _seed_matrix(
    runs: Sequence[Sequence[float]] | Sequence[float], smooth: int
) -> np.ndarray | None:
    """One method's seeds as a ``[seeds, n]`` array: a flat list of floats is one seed, empty
    seeds are dropped, every seed is truncated to the shortest and smoothed (:func:`_smooth`);
    ``None`` when no seed has a value."""
    runs_list: list[Any] = list(runs)
    if runs_list and np.ndim(runs_list[0]) == 0:
        runs_list = [runs_list]  # one seed given flat
    arrays = [np.asarray(r, dtype=np.float64).reshape(-1) for r in runs_list]
    arrays = [r for r in arrays if r.size]
    if not arrays:
        return None
    n = min(r.size for r in arrays)
    return _smooth(np.stack([r[:n] for r in arrays]), int(smooth))


def _draw_seed_curves(
    ax: Any,
    histories: Mapping[str, Sequence[Sequence[float]]],
    *,
    steps: Mapping[str, Sequence[float]] | None,
    smooth: int,
    band: str,
    xlabel: str,
    ylabel: str,
    log_y: bool = False,
    colors: Mapping[str, str] | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The one routine that draws training curves (:func:`plot_loss_curves`,
    :func:`plot_loss_panels`): per method the mean over its seeds (:func:`_seed_matrix`) as a
    line labelled ``"name (n=seeds)"`` and, with 2+ seeds, a shaded band — ``band="std"``: ± one
    sample standard deviation, ``band="minmax"``: the seeds' minimum to maximum. ``colors``
    fixes a colour per method (default: matplotlib's cycle). Returns ``{method: (x, y)}`` with
    ``y`` the ``[seeds, n]`` values drawn."""
    if band not in ("std", "minmax"):
        raise ValueError(f'band must be "std" or "minmax", got {band!r}')
    drawn: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, runs in histories.items():
        y = _seed_matrix(runs, smooth)
        if y is None:
            continue
        n = y.shape[1]
        mean = y.mean(axis=0)
        x = (
            np.asarray(steps[name], dtype=np.float64)[:n]
            if steps is not None and name in steps
            else np.arange(1, n + 1, dtype=np.float64)
        )
        color = colors.get(name) if colors is not None else None
        (line,) = ax.plot(x, mean, lw=1.8, color=color, label=f"{name} (n={y.shape[0]})")
        if y.shape[0] > 1:
            if band == "std":
                std = y.std(axis=0, ddof=1)
                lo, hi = mean - std, mean + std
            else:
                lo, hi = y.min(axis=0), y.max(axis=0)
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
        drawn[name] = (x, y)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=9)
    return drawn


def plot_loss_curves(
    path: PathLike,
    histories: Mapping[str, Sequence[Sequence[float]]],
    *,
    steps: Mapping[str, Sequence[float]] | None = None,
    ylabel: str = "training loss",
    xlabel: str = "step",
    title: str | None = None,
    smooth: int = 1,
    log_y: bool = False,
    figsize: tuple[float, float] = (8.0, 5.0),
    dpi: int = 100,
) -> LossCurves:
    """Loss (or any metric) per method: the mean over seeds with a ± one-standard-deviation band.

    Args:
        histories: ``{method: [seed_0_values, seed_1_values, ...]}``; a method given as a flat
            list of floats is one seed. Seeds of one method are truncated to the shortest.
        steps: optional x values per method (default ``1..n``).
        smooth: trailing moving-average window applied to each seed before averaging.
        log_y: a log-scale y axis.
    """
    fig = _figure(figsize, dpi)
    ax = fig.add_subplot(1, 1, 1)
    drawn = _draw_seed_curves(
        ax, histories, steps=steps, smooth=smooth, band="std", xlabel=xlabel, ylabel=ylabel,
        log_y=log_y,
    )  # fmt: skip
    ax.set_title(title or f"{ylabel} per method (mean ± 1 std over seeds)")
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.11, top=0.92)
    p = _save(fig, path, dpi)
    return LossCurves(
        path=p,
        steps={k: x for k, (x, _) in drawn.items()},
        mean={k: y.mean(axis=0) for k, (_, y) in drawn.items()},
        std={
            k: y.std(axis=0, ddof=1) if y.shape[0] > 1 else np.zeros(y.shape[1])
            for k, (_, y) in drawn.items()
        },
        seeds={k: int(y.shape[0]) for k, (_, y) in drawn.items()},
    )


def plot_loss_panels(
    panels: Mapping[str, Mapping[str, Sequence[Sequence[float]]]],
    path: PathLike,
    *,
    xlabel: str = "optimizer step",
    smooth: int = 1,
    dpi: int = 100,
    figsize: tuple[float, float] | None = None,
) -> Path:
    """Several views of the same runs side by side, one subplot per panel.

    ``panels = {panel title: {method: [seed_0_values, seed_1_values, ...]}}``, e.g.
    ``{"label NLL (nats), every method": {...}, "each method's own objective": {...}}``. In each
    panel, one line per method: the mean over its seeds (truncated to the shortest seed,
    smoothed with a trailing ``smooth``-step moving average) with the seeds' min–max shaded. A
    method keeps its colour in every panel. Drawn by the same routine as
    :func:`plot_loss_curves` (only the band differs).

    Args:
        panels: the panels in order (at least one); a panel whose methods hold no value is drawn
            empty with "no data".
        path: the PNG to write.
        xlabel: the x axis of every panel (x = 1, 2, … per logged value).
        figsize: default ``(6.5 × panels, 4.8)`` inches.

    Returns:
        the PNG's path (``figsize × dpi`` pixels).
    """
    if isinstance(panels, (str, bytes)) or not isinstance(panels, Mapping) or not panels:
        raise ValueError(
            "plot_loss_panels: panels must be a non-empty mapping "
            "{panel title: {method: [seed curves]}}"
        )
    methods: list[str] = []
    for title, histories in panels.items():
        if not isinstance(histories, Mapping):
            raise ValueError(
                f"plot_loss_panels: panel {title!r} must map method -> seed curves, "
                f"got {type(histories).__name__}"
            )
        methods += [m for m in histories if m not in methods]
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}  # one colour per method, all panels
    k = len(panels)
    fig = _figure(figsize or (6.5 * k, 4.8), dpi)
    axes = fig.subplots(1, k, squeeze=False)[0]
    for ax, (title, histories) in zip(axes, panels.items(), strict=True):
        drawn = _draw_seed_curves(
            ax, histories, steps=None, smooth=smooth, band="minmax", xlabel=xlabel, ylabel="",
            colors=colors,
        )  # fmt: skip
        if not drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(str(title), fontsize=11)
    fig.suptitle("mean over seeds per method; shaded: min–max over seeds", fontsize=10)
    fig.subplots_adjust(left=0.06 / k + 0.02, right=0.98, bottom=0.12, top=0.86, wspace=0.2)
    return _save(fig, path, dpi)


# ----------------------------------------------------------------------------------------------
# tables and text: one structure, written as Markdown (README.md) and as HTML (index.html)

_ALIGN_SEP = {"left": "---", "right": "---:", "center": ":---:"}


@dataclass(frozen=True)
class ReportTable:
    """A results table for :func:`write_report`.

    ``columns`` and ``rows`` hold already-formatted cells (strings of one line; inline
    ``**bold**``, ``*italic*`` and ```code``` are Markdown in ``README.md`` and rendered as such
    in ``index.html``); ``title`` is shown above the table (``""``: none), ``caption`` below it;
    ``align`` optionally gives ``"left"``/``"right"``/``"center"`` per column (default left).
    Sequences are stored as tuples. A row of the wrong length, a cell that is not a ``str`` or a
    line break in a cell is an error naming the table, the row and the column.
    """

    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[str]]
    caption: str = ""
    align: Sequence[str] = ()

    def __post_init__(self) -> None:
        where = f"ReportTable {self.title!r}"
        for name, v in (("title", self.title), ("caption", self.caption)):
            if not isinstance(v, str):
                raise TypeError(f"{where}: {name} must be a str, got {type(v).__name__}")
        if "\n" in self.title:
            raise ValueError(f"{where}: the title must be one line")

        def line_tuple(what: str, seq: Any) -> tuple[str, ...]:
            if isinstance(seq, (str, bytes)) or not isinstance(seq, Iterable):
                raise TypeError(f"{where}: {what} must be a sequence of str, got {seq!r}")
            out = tuple(seq)
            for j, cell in enumerate(out):
                if not isinstance(cell, str):
                    raise TypeError(
                        f"{where}: {what}, column {j}: {cell!r} is a {type(cell).__name__}, not "
                        "a str; format the number first (cells are already-formatted strings)"
                    )
                if "\n" in cell or "\r" in cell:
                    raise ValueError(f"{where}: {what}, column {j}: {cell!r} has a line break")
            return out

        columns = line_tuple("columns", self.columns)
        if not columns:
            raise ValueError(f"{where}: no columns")
        if isinstance(self.rows, (str, bytes)):
            raise TypeError(f"{where}: rows must be a sequence of rows, got a str")
        rows = tuple(line_tuple(f"row {i}", r) for i, r in enumerate(self.rows))
        for i, r in enumerate(rows):
            if len(r) != len(columns):
                raise ValueError(
                    f"{where}: row {i} has {len(r)} cells for the {len(columns)} columns "
                    f"{list(columns)}"
                )
        align = line_tuple("align", self.align)
        if align and (len(align) != len(columns) or not set(align) <= set(_ALIGN_SEP)):
            raise ValueError(
                f"{where}: align must give one of {sorted(_ALIGN_SEP)} per column "
                f"({len(columns)}), got {list(align)}"
            )
        object.__setattr__(self, "columns", columns)
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "align", align)

    def markdown(self) -> str:
        """A pipe table: the title as a bold line above it, the caption as a paragraph below
        (a ``|`` in a cell is escaped with a backslash). :meth:`from_markdown` reads it back."""
        cells = [[c.replace("|", r"\|") for c in r] for r in (self.columns, *self.rows)]
        seps = [_ALIGN_SEP[a] for a in self.align] or ["---"] * len(self.columns)
        lines = [f"**{self.title}**", ""] if self.title else []
        lines.append("| " + " | ".join(cells[0]) + " |")
        lines.append("|" + "|".join(seps) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in cells[1:]]
        if self.caption:
            lines += ["", self.caption]
        return "\n".join(lines)

    def html(self) -> str:
        """A ``<table>`` with the title and caption in its ``<caption>``; every text escaped
        (inline ``**bold**``, ``*italic*``, ```code``` become ``<strong>``, ``<em>``, ``<code>``)."""
        style = [f' style="text-align:{a}"' if a != "left" else "" for a in self.align]
        style = style or [""] * len(self.columns)
        cap = []
        if self.title:
            cap.append(f"<strong>{_inline_html(self.title)}</strong>")
        if self.caption:
            cap.append(f'<span class="caption">{_inline_html(self.caption)}</span>')

        def row(tag: str, cells: Sequence[str]) -> str:
            return "".join(
                f"<{tag}{a}>{_inline_html(c)}</{tag}>" for a, c in zip(style, cells, strict=True)
            )

        head = row("th", self.columns)
        body = "".join(f"<tr>{row('td', r)}</tr>" for r in self.rows)
        return (
            "<table>"
            + (f"<caption>{'<br>'.join(cap)}</caption>" if cap else "")
            + f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        )

    @classmethod
    def from_markdown(cls, text: str, *, title: str = "", caption: str = "") -> ReportTable:
        """Read one pipe table (header, ``|---|`` separator, rows), optionally preceded by a
        ``**title**`` line and followed by a caption paragraph (what :meth:`markdown` writes);
        ``title``/``caption`` are used when the text has none. Anything else is a ``ValueError``
        saying what was found where."""
        lines = [ln.strip() for ln in text.strip().splitlines()]
        i = 0
        if lines and (m := _BOLD_LINE.fullmatch(lines[0])):
            title, i = m.group(1), 1
            while i < len(lines) and not lines[i]:
                i += 1
        j = i
        while j < len(lines) and lines[j].startswith("|"):
            j += 1
        if j == i:
            raise ValueError(f"ReportTable.from_markdown: no pipe table in {text[:80]!r}")
        table = _parse_pipe_table(lines[i:j], "ReportTable.from_markdown", title=title)
        rest = "\n".join(lines[j:]).strip()
        if "\n\n" in rest or any(ln.startswith("|") for ln in lines[j:]):
            raise ValueError(
                "ReportTable.from_markdown: more than one table and one caption paragraph in "
                f"{text[:80]!r}"
            )
        return cls(table.title, table.columns, table.rows, rest or caption, table.align)


_BOLD_LINE = re.compile(r"\*\*([^*\n]+)\*\*")
_SEP_CELL = re.compile(r":?-+:?")
_CODE_SPAN = re.compile(r"`([^`\n]+)`")
_STRONG = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*")
_EM = re.compile(r"(?<![*\w])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?![*\w])")


def _inline_html(text: str) -> str:
    """Escaped HTML of one piece of text with Markdown's inline ```code```, ``**bold**`` and
    ``*italic*`` rendered (inside a code span nothing is interpreted)."""

    def emphasis(s: str) -> str:
        s = _STRONG.sub(r"<strong>\1</strong>", html.escape(s))
        return _EM.sub(r"<em>\1</em>", s)

    out, pos = [], 0
    for m in _CODE_SPAN.finditer(text):
        out.append(emphasis(text[pos : m.start()]))
        out.append(f"<code>{html.escape(m.group(1))}</code>")
        pos = m.end()
    out.append(emphasis(text[pos:]))
    return "".join(out)


def _pipe_cells(line: str) -> list[str]:
    s = line.strip()
    s = s[1:] if s.startswith("|") else s
    s = s[:-1] if s.endswith("|") and not s.endswith(r"\|") else s
    return [c.strip().replace(r"\|", "|") for c in re.split(r"(?<!\\)\|", s)]


def _parse_pipe_table(lines: Sequence[str], where: str, *, title: str = "") -> ReportTable:
    """A GitHub pipe table (``lines``: header, separator, rows) as a :class:`ReportTable`."""
    header = _pipe_cells(lines[0])
    seps = _pipe_cells(lines[1]) if len(lines) > 1 else []
    if not seps or not all(_SEP_CELL.fullmatch(c) for c in seps):
        got = repr(lines[1]) if len(lines) > 1 else "nothing"
        raise ValueError(
            f"{where}: the lines starting with '|' from {lines[0]!r} are not a pipe table: the "
            f"second line must be the separator (|---|---|), got {got}"
        )
    if len(seps) != len(header):
        raise ValueError(
            f"{where}: the table {lines[0]!r} has {len(header)} header cells but "
            f"{len(seps)} in its separator {lines[1]!r}"
        )
    rows = []
    for ln in lines[2:]:
        r = _pipe_cells(ln)
        if len(r) != len(header):
            raise ValueError(
                f"{where}: the row {ln!r} has {len(r)} cells, its table's header {len(header)}"
            )
        rows.append(r)
    align = [
        "center"
        if c.startswith(":") and c.endswith(":")
        else "right"
        if c.endswith(":")
        else "left"
        for c in seps
    ]
    return ReportTable(title, header, rows, align=align if set(align) != {"left"} else ())


def _markdown_html(text: str, where: str) -> str:
    """The HTML of a small Markdown text (``write_report``'s ``table_markdown``): pipe tables
    as :meth:`ReportTable.html` (a ``**title**`` line right above one becomes its title),
    ``#`` headings, ``-``/``*``/``+`` list items, fenced code blocks and paragraphs, with inline
    markup (:func:`_inline_html`). Lines starting with ``|`` that are not a pipe table are a
    ``ValueError`` naming them (never shown raw)."""
    raw = text.strip("\n").splitlines()
    lines = [ln.strip() for ln in raw]
    out: list[str] = []
    para: list[str] = []
    items: list[str] = []
    title = ""  # a lone **bold** line: the next table's title, else a paragraph

    def flush() -> None:
        nonlocal title
        if title:
            out.append(f"<p><strong>{_inline_html(title)}</strong></p>")
            title = ""
        if para:
            out.append(f"<p>{_inline_html(' '.join(para))}</p>")
            para.clear()
        if items:
            out.append("<ul>" + "".join(f"<li>{_inline_html(t)}</li>" for t in items) + "</ul>")
            items.clear()

    i = 0
    while i < len(lines):
        s = lines[i]
        j = i + 1
        if s.startswith("|"):
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            if len(para) == 1 and not title and (m := _BOLD_LINE.fullmatch(para[0])):
                title = m.group(1)
                para.clear()
            t, title = title, ""
            flush()
            out.append(_parse_pipe_table(lines[i:j], where, title=t).html())
        elif s.startswith("```"):
            flush()
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append(f"<pre><code>{html.escape(chr(10).join(raw[i + 1 : j]))}</code></pre>")
            j += 1  # the closing fence
        elif not s:
            if len(para) == 1 and not title and not items and _BOLD_LINE.fullmatch(para[0]):
                title = para.pop()[2:-2]  # held: a table may follow
            else:
                flush()
        elif m := re.fullmatch(r"(#{1,6})\s+(.*)", s):
            flush()
            level = min(6, len(m.group(1)) + 2)  # below the index's <h2> sections
            out.append(f"<h{level}>{_inline_html(m.group(2))}</h{level}>")
        elif m := re.fullmatch(r"[-*+]\s+(.*)", s):
            if para or title:
                flush()
            items.append(m.group(1))
        else:
            if items or title:
                flush()
            para.append(s)
        i = j
    flush()
    return "".join(out)


def _value_markdown(v: Any) -> str:
    """A summary value in Markdown: a mapping as ``key: value`` pairs, a list comma-separated,
    a scalar in a code span (strings as they are, other scalars as JSON)."""
    if isinstance(v, Mapping):
        return "; ".join(f"{k}: {_value_markdown(x)}" for k, x in v.items()) if v else "–"
    if isinstance(v, (list, tuple)):
        return ", ".join(_value_markdown(x) for x in v) if v else "–"
    return f"`{v if isinstance(v, str) else json.dumps(v)}`"


def _value_html(v: Any) -> str:
    """A summary value in HTML: a mapping as a nested ``<dl>``, a list as a ``<ul>``, a scalar
    as ``<code>`` (never a JSON dump)."""
    if isinstance(v, Mapping):
        if not v:
            return "–"
        return (
            "<dl>"
            + "".join(
                f"<dt>{html.escape(str(k))}</dt><dd>{_value_html(x)}</dd>" for k, x in v.items()
            )
            + "</dl>"
        )
    if isinstance(v, (list, tuple)):
        return "<ul>" + "".join(f"<li>{_value_html(x)}</li>" for x in v) + "</ul>" if v else "–"
    return f"<code>{html.escape(v if isinstance(v, str) else json.dumps(v))}</code>"


_INDEX_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:70em;color:#222;"
    "line-height:1.5}table{border-collapse:collapse;margin:1em 0}"
    "th,td{padding:.2em .8em;border-bottom:1px solid #ddd;text-align:left}"
    "thead th{border-bottom:2px solid #999}caption{text-align:left;padding:.3em 0}"
    "caption .caption{color:#555;font-size:.9em}dl.summary>dt{font-weight:600;margin-top:.4em}"
    "dd{margin-left:1.5em}dd dl{margin:0}dd dt{display:inline;font-weight:normal;color:#555}"
    "dd dt::after{content:': '}dd dd{display:inline;margin:0}dd dd::after{content:'';"
    "display:block}p.note{color:#333}"
)


# ----------------------------------------------------------------------------------------------
# the whole report


def _pick_html_keys(stats: ObservedTokenStats, n: int, **thresholds: float) -> list[Key]:
    """The ``n`` records with the most rescue + filter tokens (ties: cache order)."""
    if not len(stats.keys) or n <= 0:
        return []
    cats = classify_tokens(stats.p_student, stats.p_teacher, **thresholds)
    hit = (cats != OTHER).astype(np.int64)
    per = np.bincount(stats.record, weights=hit, minlength=len(stats.keys))
    has_tokens = np.diff(stats.offsets) > 0
    order = [int(i) for i in np.argsort(-per, kind="stable") if has_tokens[i]]
    return [stats.keys[i] for i in order[:n]]


def check_tokenizer(tokenizer: Any, cache: TeacherCache, where: str, allow: bool) -> None:
    """A tokenizer (not a decode callable, not ``None``) must be the cache's (by content):
    :class:`CacheMismatchError` naming both (a warning when ``allow``), ``where`` naming the
    caller."""
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        return
    TokenizerCheck(tokenizer, allow_mismatch=allow, what="the tokenizer").check(cache.info, where)


def write_report(
    out_dir: PathLike,
    *,
    cache: TeacherCache | PathLike,
    model: Any,
    tokenizer: Any = None,
    histories: Mapping[str, Sequence[Sequence[float]]] | None = None,
    table_markdown: str | None = None,
    keys: Iterable[Key] | None = None,
    max_records: int | None = 256,
    presets: Sequence[str] = DEFAULT_PRESETS,
    batch_size: int = 4,
    device: str | None = None,
    dtype: Any = None,
    html_records: int = 3,
    bins: int = 20,
    scale: str = "linear",
    student_low: float = 0.5,
    teacher_high: float = 0.5,
    teacher_low: float = 0.5,
    loss_ylabel: str = "training loss",
    progress: bool | None = False,
    title: str = "target-sft report",
    allow_tokenizer_mismatch: bool = False,
    tables: Sequence[ReportTable] = (),
    notes: Sequence[str] = (),
    loss_panels: Mapping[str, Mapping[str, Sequence[Sequence[float]]]] | None = None,
    model_label: str = "student",
) -> dict[str, Path]:
    """Write every figure, the rescue/filter HTML, the observed-token data and an index.

    Files in ``out_dir``: ``figure3_induced_targets.png``, ``figure4_teacher_given_student.png``,
    ``rescue_filter.html``, ``observed_tokens.npz`` (``p_student``, ``p_teacher``, ``record``,
    ``position``, ``label``), ``loss_curves.png`` (only with ``histories`` or ``loss_panels``),
    ``README.md`` and ``index.html`` (both link everything).

    ``model`` is a causal LM or a checkpoint directory (:func:`observed_token_stats`);
    ``tokenizer`` a tokenizer, its directory, a callable ``id -> str`` or ``None`` (then the
    model directory's tokenizer if it has one, else ids are shown as ``[id]``).

    Results (a "Results" section, in this order): ``table_markdown`` (Markdown text: included
    verbatim in the README; in the HTML its pipe tables become ``<table>`` elements, its headings,
    list items and paragraphs HTML — a block of ``|`` lines that is not a pipe table is a
    ``ValueError``), ``tables`` (:class:`ReportTable`: :meth:`~ReportTable.markdown` in the
    README, :meth:`~ReportTable.html` in the HTML) and ``notes`` (paragraphs, escaped; inline
    ``**bold**``/``*italic*``/```code``` as in the tables). ``index.html`` shows no raw Markdown
    and no JSON: the summary is a definition list (the cache's teacher description a nested one).

    Training curves: ``histories`` (:func:`plot_loss_curves`' input, ``loss_ylabel`` its y axis)
    or ``loss_panels`` (:func:`plot_loss_panels`' input: several views side by side), not both.
    ``model_label`` names the model the student pass runs (e.g. ``"base student (before
    fine-tuning)"``) in Figure 4's title, the rescue/filter page and the index.

    Before the student pass, the tokenizer (given or found) is checked against the cache's
    (content fingerprint) and the model's vocabulary against the cache's token ids:
    :class:`CacheMismatchError` names both; ``allow_tokenizer_mismatch=True`` makes them warnings.

    Returns ``{"figure3", "figure4", "rescue_filter", "observed_tokens", "loss_curves"?,
    "readme", "index"}`` → paths. The student pass (:func:`observed_token_stats`) runs once, on
    ``keys`` or the first ``max_records`` records; the HTML shows the ``html_records`` records with
    the most rescue + filter tokens.
    """
    # the arguments that cost nothing to check, before the student pass
    if histories and loss_panels:
        raise ValueError(
            "write_report: give histories (one panel) or loss_panels (several), not both: "
            "both would be drawn into loss_curves.png"
        )
    if not isinstance(model_label, str) or not model_label.strip():
        raise ValueError(f"write_report: model_label must be a non-empty str, got {model_label!r}")
    if isinstance(tables, (str, ReportTable)) or isinstance(notes, str):
        raise TypeError("write_report: tables and notes are sequences (a list of them), not one")
    tables = list(tables)
    notes = list(notes)
    for t in tables:
        if not isinstance(t, ReportTable):
            raise TypeError(f"write_report: tables holds a {type(t).__name__}, not a ReportTable")
    for x in notes:
        if not isinstance(x, str):
            raise TypeError(f"write_report: notes holds a {type(x).__name__}, not a str")
    table_html = (
        _markdown_html(table_markdown, "write_report: table_markdown") if table_markdown else ""
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    c = _open_cache(cache)
    paths: dict[str, Path] = {}
    th = {"student_low": student_low, "teacher_high": teacher_high, "teacher_low": teacher_low}

    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        from target_sft.models import load_tokenizer

        tokenizer = load_tokenizer(model, tokenizer)  # None: ids are shown as [id]
    check_tokenizer(tokenizer, c, "write_report", allow_tokenizer_mismatch)
    fig3 = plot_induced_targets(out / "figure3_induced_targets.png", presets)
    paths["figure3"] = fig3.path
    stats = observed_token_stats(
        c, model, keys, max_records=max_records, batch_size=batch_size, device=device,
        dtype=dtype, progress=progress, allow_tokenizer_mismatch=allow_tokenizer_mismatch,
    )  # fmt: skip
    np.savez_compressed(
        out / "observed_tokens.npz",
        p_student=stats.p_student,
        p_teacher=stats.p_teacher,
        record=stats.record,
        position=stats.position,
        label=stats.label,
        offsets=stats.offsets,
        keys=np.asarray([str(k) for k in stats.keys]),
    )
    paths["observed_tokens"] = out / "observed_tokens.npz"
    fig4 = plot_teacher_given_student(
        out / "figure4_teacher_given_student.png",
        stats.p_student,
        stats.p_teacher,
        bins,
        scale=scale,
        split=student_low,
        title=f"Figure 4 · P(p_T | p_θ) on {len(stats):,} observed tokens of the {model_label}",
    )
    paths["figure4"] = fig4.path
    view = rescue_filter_html(
        out / "rescue_filter.html",
        c,
        None,
        token_decoder(tokenizer),  # checked above
        _pick_html_keys(stats, html_records, **th),
        stats=stats,
        title=f"Rescue and filter tokens (Appendix G) · p_θ of the {model_label}",
        student_low=student_low,
        teacher_high=teacher_high,
        teacher_low=teacher_low,
    )
    paths["rescue_filter"] = view.path
    curves_what = None
    if loss_panels:
        paths["loss_curves"] = plot_loss_panels(loss_panels, out / "loss_curves.png")
        curves_what = "One panel per quantity: per method the mean over seeds, shaded min–max."
    elif histories:
        curves = plot_loss_curves(out / "loss_curves.png", histories, ylabel=loss_ylabel)
        paths["loss_curves"] = curves.path
        curves_what = "Mean ± 1 std over seeds."

    n = len(stats)
    cats = classify_tokens(stats.p_student, stats.p_teacher, **th)
    n_rescue, n_filter = int(np.sum(cats == RESCUE)), int(np.sum(cats == FILTER))
    mean_ps = float(stats.p_student.mean()) if n else float("nan")
    mean_pt = float(stats.p_teacher.mean()) if n else float("nan")
    info = c.info
    # (term, value): a value is text with inline Markdown, or a mapping (a nested list)
    summary: list[tuple[str, Any]] = [
        ("cache", f"`{info.path}` ({info.records:,} records, top-{info.top_k})"),
        ("teacher", dict(info.teacher)),
        (model_label, f"`{_model_name(model)}`"),
        ("observed tokens", f"{n:,} supervised tokens in {len(stats.keys):,} records; "
         f"mean p_θ(y) = {mean_ps:.4f}, mean p_T(y) = {mean_pt:.4f}"),
        (f"quadrants (split at {student_low:g})",
         ", ".join(f"{q} {v:,}" for q, v in fig4.quadrants.items())),
        ("rescue / filter tokens", f"rescue {n_rescue:,} ({_pct(n_rescue, n)}); "
         f"filter {n_filter:,} ({_pct(n_filter, n)})"),
    ]  # fmt: skip
    entries = [
        ("Figure 3 — induced targets", "figure3_induced_targets.png",
         "Q(y) and Q(k) that each loss drives the model toward, against p_y (illustrative "
         "teacher for teacher-based losses)."),
        (f"Figure 4 — P(p_T | p_θ), {model_label}", "figure4_teacher_given_student.png",
         "Teacher probability of the observed token given the probability p_θ that the "
         f"{model_label} gives it, one column per p_θ bin."),
        ("Appendix G — rescue / filter tokens", "rescue_filter.html",
         f"Trajectories with rescue ({model_label} low, teacher high) and filter (both low) "
         "tokens; hover for numbers."),
    ]  # fmt: skip
    if curves_what is not None:
        entries.append(("Training curves", "loss_curves.png", curves_what))
    entries.append(
        ("Observed-token data", "observed_tokens.npz", "p_student, p_teacher, record, position.")
    )
    has_results = bool(table_markdown or tables or notes)

    md = [f"# {title}", "", *[f"- {k}: {_value_markdown(v) if isinstance(v, Mapping) else v}"
                              for k, v in summary], ""]  # fmt: skip
    if has_results:
        md += ["## Results", ""]
        if table_markdown:
            md += [table_markdown.strip(), ""]
        for t in tables:
            md += [t.markdown(), ""]
        for x in notes:
            md += [x.strip(), ""]
    for name, file, what in entries:
        md += [f"## {name}", "", what, ""]
        md.append(f"![{name}]({file})" if file.endswith(".png") else f"[{file}]({file})")
        md.append("")
    md.append("How to read these: `docs/REPORT.md` in the target-sft repository.")
    (out / "README.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    paths["readme"] = out / "README.md"

    e = html.escape
    dl = "".join(
        f"<dt>{e(k)}</dt><dd>{_value_html(v) if isinstance(v, Mapping) else _inline_html(v)}</dd>"
        for k, v in summary
    )
    body = [f'<h1>{e(title)}</h1><dl class="summary">{dl}</dl>']
    if has_results:
        body.append("<h2>Results</h2>" + table_html + "".join(t.html() for t in tables))
        body += [f'<p class="note">{_inline_html(x.strip())}</p>' for x in notes]
    for name, file, what in entries:
        body.append(f"<h2>{e(name)}</h2><p>{e(what)}</p>")
        if file.endswith(".png"):
            body.append(
                f'<p><a href="{e(file)}"><img src="{e(file)}" style="max-width:100%"></a></p>'
            )
        else:
            body.append(f'<p><a href="{e(file)}">{e(file)}</a></p>')
    (out / "index.html").write_text(
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{e(title)}</title><style>{_INDEX_CSS}</style></head><body>{''.join(body)}"
        "</body></html>\n",
        encoding="utf-8",
    )
    paths["index"] = out / "index.html"
    return paths


def _pct(a: int, n: int) -> str:
    return f"{100.0 * a / n:.1f} %" if n else "–"


def _model_name(model: Any) -> str:
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", None) if cfg is not None else None
    return str(name) if name else type(model).__name__
