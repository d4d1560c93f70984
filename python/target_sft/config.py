"""Config, not code: the loss of a training run as ``TrainingArguments`` fields (docs/HF.md,
"Config-driven runs").

* :class:`TargetSFTArguments` — the field set, once: ``loss`` (a preset name), the presets'
  parameters (``eta``, ``lam``, ``tau``, ``alpha``, …), ``loss_kwargs``, ``label_in_support``
  (the label in the teacher support of the collator the trainer makes), ``impl`` and
  ``fused_linear``.
* :class:`TargetSFTConfig` — those fields on ``transformers.TrainingArguments``.
* ``TargetSFTTRLConfig`` — the same fields on TRL's ``SFTConfig``; built on first access, so that
  ``import target_sft.config`` does not import TRL.
* :func:`resolve_loss` — the loss a trainer runs, from its ``args`` and its own ``loss=`` /
  ``loss_kwargs=``; the knobs of ``TrainingArguments``/``SFTConfig`` that the Q-target loss would
  otherwise silently ignore are mapped onto a preset or refused.

Each class is a dataclass, so ``transformers.HfArgumentParser`` reads a run from the command line,
a JSON file or a YAML file. This module imports ``transformers`` (``import target_sft`` does not).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from transformers import TrainingArguments

from target_sft.losses.presets import PRESETS, TargetSFT, preset_class

__all__ = [
    "PRESET_PARAMETERS",
    "TargetSFTArguments",
    "TargetSFTConfig",
    "TargetSFTTRLConfig",
    "resolve_loss",
]

log = logging.getLogger(__name__)

LossSpec = str | Callable[..., Any] | None

#: the presets' own parameters that are fields of :class:`TargetSFTArguments` (each belongs to the
#: presets named in its help); every other keyword a preset takes is one of ``LOSS_OPTIONS``
PRESET_PARAMETERS: tuple[str, ...] = (
    "eta",
    "tau",
    "inclusive",
    "alpha",
    "k",
    "temperature",
    "length_normalize",
    "clip",
    "epsilon",
    "lam",
    "renormalize",
    "tail",
    "normalize",
    "anchor",
    "beta",
    "repulsion",
    "c",
)
_IMPLS = ("auto", "torch", "triton")


def _param(help: str) -> Any:
    return field(default=None, metadata={"help": help + " (unset: the preset's default)"})


@dataclass
class TargetSFTArguments:
    """The Target-SFT fields of a training config (mixed into :class:`TargetSFTConfig` and
    ``TargetSFTTRLConfig``). Every preset parameter is ``None`` (the preset's default) unless set;
    setting one the chosen preset does not take is a ``ValueError`` naming the preset and its
    parameters. See docs/LOSSES.md for the presets and docs/HF.md for the knobs that map."""

    loss: str | None = field(
        default=None,
        metadata={
            "help": "Q-target preset: "
            + ", ".join(PRESETS)
            + " (unset: target_sft; with label_smoothing_factor > 0: label_smoothing)"
        },
    )
    eta: float | None = _param("target_sft, target_sft_constant: teacher intensity η in [0, 1]")
    tau: float | None = _param("profit: probability threshold τ")
    inclusive: bool | None = _param("profit: keep p >= τ instead of p > τ")
    alpha: float | None = _param("beyond_log: exponent α; eaft: power of the entropy weight")
    k: int | None = _param("eaft: top-k of the entropy")
    temperature: float | None = _param("iw_sft: temperature of the importance weight")
    length_normalize: bool | None = _param("iw_sft: length-normalised trajectory weight")
    clip: list[float] | None = field(
        default=None,
        metadata={"help": "iw_sft: clip the weight to [lo, hi] (two numbers; unset: no clip)"},
    )
    epsilon: float | None = _param("label_smoothing: ε; proximal_sft: clip range ε")
    lam: float | None = _param("sft_kl, asft: KL weight λ; hybrid_kd: KD weight λ (the paper's c)")
    renormalize: bool | None = _param("sft_kl, asft, kd, hybrid_kd: renormalise the top-k")
    tail: str | None = _param(
        "target_sft, kd, hybrid_kd, sft_kl, asft: the mass missing from the cached top-k: "
        "renormalize (spread over the top-k) or model (spread as the model's own tail)"
    )
    normalize: bool | None = _param("sft_kl, asft: divide the scale out (Table 5's exact Q)")
    anchor: str | None = _param(
        "sft_kl, asft: the KL anchor: reference (the reference cache's top-k, default) or teacher"
    )
    beta: float | None = _param("gem: temperature β of the repelled distribution")
    repulsion: float | None = _param("gem: repulsion weight λ")
    c: float | None = _param("target_sft_constant: constant residual weight c in [0, 1] (Table 6)")
    loss_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "more preset keyword arguments, as a dict (JSON on the command line), e.g. "
            '\'{"eta": 0.2, "chunk_elements": 1048576}\'; a key also set as a field must agree'
        },
    )
    label_in_support: bool = field(
        default=True,
        metadata={
            "help": "the label in the teacher support: the collator the trainer makes adds a "
            "column with the label's cached teacher log-prob where it is outside the top-k, so "
            "it gets the residual weight of the paper's full-vocabulary formula (False: the "
            "bare top-k, the label outside it gets none); a data_collator given to the trainer "
            "must agree (docs/DATA.md)"
        },
    )
    impl: str = field(
        default="auto",
        metadata={
            "help": "loss kernels: auto, torch or triton (docs/KERNELS.md)",
            "choices": _IMPLS,
        },
    )
    fused_linear: bool = field(
        default=False,
        metadata={
            "help": "compute the loss from the last hidden states and the lm_head weight, "
            "never materialising the [B, L, V] logits"
        },
    )

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        if isinstance(self.loss_kwargs, str):  # the command line passes JSON
            try:
                self.loss_kwargs = json.loads(self.loss_kwargs)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"loss_kwargs is not a JSON object: {self.loss_kwargs!r} ({e})"
                ) from e
        if self.loss_kwargs is not None and not isinstance(self.loss_kwargs, Mapping):
            raise ValueError(f"loss_kwargs must be a dict, got {self.loss_kwargs!r}")
        if self.impl not in _IMPLS:
            raise ValueError(f"impl = {self.impl!r}; choose one of {', '.join(_IMPLS)}")
        if self.clip is not None:
            self.clip = [float(c) for c in self.clip]
        if not isinstance(self.label_in_support, bool):
            raise ValueError(
                f"label_in_support must be True or False, got {self.label_in_support!r}"
            )
        resolve_loss(self)  # every check now, at parse time, not at the first training step

    def preset_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for the preset: the parameter fields that are set, ``impl``
        (when not ``"auto"``) and ``loss_kwargs``; a key given both ways with two values is a
        ``ValueError``. Not checked against the preset here (:func:`resolve_loss` does)."""
        fields = {n: getattr(self, n) for n in PRESET_PARAMETERS if getattr(self, n) is not None}
        if "clip" in fields:
            clip = fields["clip"]
            if len(clip) != 2:
                raise ValueError(f"clip = {clip}: give two numbers, lo and hi")
            fields["clip"] = (float(clip[0]), float(clip[1]))
        if self.impl != "auto":
            fields["impl"] = self.impl
        extra = self.loss_kwargs if isinstance(self.loss_kwargs, Mapping) else {}
        return _merge(fields, extra, "the field", "loss_kwargs")


def _merge(a: Mapping[str, Any], b: Mapping[str, Any], a_name: str, b_name: str) -> dict[str, Any]:
    """``a`` and ``b`` merged; a key in both with different values is a ``ValueError``."""
    out = dict(b)
    for key, value in a.items():
        if key in out and _norm(out[key]) != _norm(value):
            raise ValueError(
                f"{key} is given twice with different values: {key}={value!r} ({a_name}) and "
                f"{key}={out[key]!r} ({b_name}); set it once"
            )
        out[key] = value
    return out


def _norm(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _same_loss(a: LossSpec, b: LossSpec) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return preset_class(a) is preset_class(b)
    return a is b


def _preset_name(loss: LossSpec) -> str | None:
    """The canonical preset name of a string loss (``None`` stays ``None``: TARGET-SFT)."""
    if not isinstance(loss, str):
        return None
    cls = preset_class(loss)
    return next(name for name, c in PRESETS.items() if c is cls)


def _check_preset_kwargs(loss: LossSpec, kwargs: Mapping[str, Any]) -> None:
    """Every key of ``kwargs`` is a parameter of the preset (``ValueError`` naming both)."""
    if not kwargs:
        return
    if loss is not None and not isinstance(loss, str):
        raise ValueError(
            f"the loss parameters {sorted(kwargs)} apply to a preset name, but the loss is the "
            f"callable {loss!r}: configure the callable itself, or name a preset"
        )
    cls = TargetSFT if loss is None else preset_class(loss)
    valid = cls.parameter_names()
    bad = [k for k in kwargs if k not in valid]
    if bad:
        name = "target_sft" if loss is None else _preset_name(loss)
        raise ValueError(
            f"loss={name!r} ({cls.__name__}) has no parameter {bad[0]!r}; its parameters are "
            + ", ".join(valid)
        )


def resolve_loss(
    args: Any, loss: LossSpec = None, loss_kwargs: Mapping[str, Any] | None = None
) -> tuple[LossSpec, dict[str, Any]]:
    """The ``(loss, loss_kwargs)`` a trainer runs (for :func:`target_sft.hf.make_loss`).

    Args:
        args: the trainer's ``TrainingArguments`` (any; a :class:`TargetSFTArguments` brings its
            ``loss`` and parameters), TRL ``SFTConfig``, or ``None``.
        loss: the trainer's own ``loss=`` (``None``: not given).
        loss_kwargs: the trainer's own ``loss_kwargs=``.

    The loss comes from ``loss=`` or from ``args.loss`` (both given and different: ``ValueError``
    naming both); its parameters from ``loss_kwargs=`` and ``args`` (a key set twice must agree).
    ``None`` means TARGET-SFT. Then the knobs the Q-target loss would silently ignore:

    * ``label_smoothing_factor > 0``: the ``label_smoothing`` preset with ``epsilon`` = the factor
      when the loss is ``"sft"`` or not given (what HF's Trainer would compute); with any other
      loss a ``ValueError``.
    * TRL's ``loss_type``: ``"nll"`` is the chosen loss; ``"dft"`` maps to the ``dft`` preset
      when the loss is ``"dft"`` or not given, else ``ValueError``; anything else ``ValueError``.
    * ``use_liger_kernel=True``: ``ValueError`` unless ``liger_kernel_config`` sets
      ``fused_linear_cross_entropy: False`` (Liger's fused cross-entropy is HF's loss, which is
      not the one trained; use ``impl="triton"`` and ``fused_linear=True`` instead).

    Raises:
        ValueError: the conflicts above; a parameter the chosen preset does not take (naming the
            preset and its parameters); an unknown preset name.
    """
    kwargs = dict(loss_kwargs or {})
    if isinstance(args, TargetSFTArguments):
        if loss is not None and args.loss is not None and not _same_loss(loss, args.loss):
            raise ValueError(
                f"two losses: the trainer's loss={loss!r} and the config's loss={args.loss!r}; "
                "give one of them"
            )
        if loss is None:
            loss = args.loss
        kwargs = _merge(args.preset_kwargs(), kwargs, "the config", "the trainer's loss_kwargs")
    name = _preset_name(loss)
    smoothing = float(getattr(args, "label_smoothing_factor", 0.0) or 0.0)
    if smoothing > 0:
        if loss is not None and name != "sft":
            raise ValueError(
                f"label_smoothing_factor={smoothing:g} smooths HF's cross-entropy, which is not "
                f"the loss trained here (loss={loss!r}); set label_smoothing_factor=0, or train "
                f"label smoothing with loss='label_smoothing', epsilon={smoothing:g}"
            )
        kwargs = _merge({"epsilon": smoothing}, kwargs, "label_smoothing_factor", "loss_kwargs")
        log.info("label_smoothing_factor=%g: training loss='label_smoothing'", smoothing)
        loss = name = "label_smoothing"
    loss_type = getattr(args, "loss_type", None)
    if loss_type is not None and loss_type != "nll":
        if loss_type != "dft" or (loss is not None and name != "dft"):
            raise ValueError(
                f"SFTConfig(loss_type={loss_type!r}) conflicts with loss={loss!r}: the loss is "
                "the Q-target loss; leave loss_type='nll' and choose the loss with loss= "
                "(loss_type='dft' alone means loss='dft')"
            )
        loss = name = "dft"
    if getattr(args, "use_liger_kernel", False):
        config = getattr(args, "liger_kernel_config", None) or {}
        if config.get("fused_linear_cross_entropy", True) is not False:
            raise ValueError(
                "use_liger_kernel=True: Liger's fused linear cross-entropy computes HF's loss, "
                "not the Q-target loss this trainer trains, so its memory saving would silently "
                "not happen. Use impl='triton' (the loss kernels) and fused_linear=True (no "
                "[B, L, V] logits) instead; to keep only Liger's layer kernels, set "
                "liger_kernel_config={'fused_linear_cross_entropy': False}"
            )
    _check_preset_kwargs(loss, kwargs)
    return loss, kwargs


@dataclass
class TargetSFTConfig(TargetSFTArguments, TrainingArguments):
    """``transformers.TrainingArguments`` with the Target-SFT fields of
    :class:`TargetSFTArguments`; :class:`~target_sft.hf.TargetSFTTrainer` reads its loss from
    them. ``HfArgumentParser(TargetSFTConfig)`` parses a run from the command line, a JSON or a
    YAML file (docs/HF.md)."""


@functools.cache
def _trl_config() -> type:
    from trl import SFTConfig

    @dataclass
    class TargetSFTTRLConfig(TargetSFTArguments, SFTConfig):  # type: ignore[misc,valid-type]
        """TRL's ``SFTConfig`` with the Target-SFT fields of :class:`TargetSFTArguments`."""

    TargetSFTTRLConfig.__module__ = __name__
    TargetSFTTRLConfig.__qualname__ = "TargetSFTTRLConfig"  # pickled by name (checkpoints)
    return TargetSFTTRLConfig


if TYPE_CHECKING:  # pragma: no cover - the class _trl_config() builds, for type checkers
    from trl import SFTConfig

    @dataclass
    class TargetSFTTRLConfig(TargetSFTArguments, SFTConfig):  # type: ignore[misc]
        pass


def __getattr__(name: str) -> Any:
    if name == "TargetSFTTRLConfig":
        return _trl_config()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
