"""Hugging Face ``transformers.Trainer`` integration: :class:`TargetSFTTrainer`.

Three pieces, each usable on its own (``docs/HF.md``):

* :func:`compute_target_sft_loss` — the functional hook: splits a collated batch into what the
  model sees and what the loss takes (``labels``, ``teacher_ids``, ``teacher_logprobs``, …), runs
  the model, and calls the Q-target loss with ``num_items_in_batch``. The trainer uses it; a
  custom loop or another ``Trainer`` subclass can call it from its own ``compute_loss``.
* :class:`TargetSFTTrainerMixin` — ``compute_loss``, column handling and the streaming
  dataloader, for mixing into any ``transformers.Trainer`` subclass.
* :class:`TargetSFTTrainer` — ``TargetSFTTrainerMixin`` + ``transformers.Trainer``.

Gradient accumulation is exact: HF Trainer passes ``num_items_in_batch``, the number of
supervised tokens (``labels[..., 1:] != -100``) of all the micro-batches of one optimizer step
(summed over ranks with ``average_tokens_across_devices``), and the loss divides its sum by it,
so the accumulated gradient equals that of one batch holding every micro-batch.

This module imports ``transformers`` (``import target_sft`` does not).
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from target_sft.collate import TargetSFTCollator, TeacherCacheDataset
from target_sft.config import resolve_loss
from target_sft.fingerprint import (
    TokenizerCheck,
    check_ids_in_vocab,
    check_student_vocab,
    student_vocab,
)
from target_sft.losses import (
    DEPRECATED_INPUT_NAMES,
    LOSS_INPUT_NAMES,
    QTargetLoss,
    fused_linear_qtarget_loss,
    get_preset,
)
from target_sft.losses.target_sft import target_sft_loss
from target_sft.old_policy import (
    OldPolicyCallback,
    OldPolicyStore,
    label_logprobs,
    label_logprobs_from_hidden,
)

__all__ = [
    "LOSS_INPUT_KEYS",
    "TargetSFTTrainer",
    "TargetSFTTrainerMixin",
    "compute_target_sft_loss",
    "make_loss",
    "split_batch",
]

log = logging.getLogger(__name__)

#: batch entries that go to the loss, never to the model: the fields of
#: :class:`target_sft.losses.LossInputs` (all aligned with ``labels``, except
#: ``sequence_weights``; see docs/LOSSES.md), and their deprecated names (``ref_logprobs``,
#: which the loss still takes, with a ``DeprecationWarning``)
LOSS_INPUT_KEYS: tuple[str, ...] = (*LOSS_INPUT_NAMES, *DEPRECATED_INPUT_NAMES)
#: packed-layout entries that become flash-attention varlen kwargs (or are dropped)
_VARLEN_KEYS = ("cu_seqlens", "max_seqlen")
#: columns a dataset item may carry that the collator reads (kept by ``remove_unused_columns``)
_ITEM_COLUMNS = ("key", "input_ids", "labels")
#: batch entries that neither the model nor the loss takes (``TargetSFTCollator(return_keys=True)``)
_BOOKKEEPING_KEYS = ("sample_keys",)
#: loss inputs every collated batch may carry whether the loss reads them or not: a loss callable
#: that takes no such keyword (e.g. ``functools.partial(target_sft_loss, ...)``) gets none of them
_LAYOUT_INPUTS = ("sequence_ids", "reference_ids", "reference_logprobs", "reference_label_logprobs")

LossFn = Callable[..., torch.Tensor]


def make_loss(loss: str | LossFn | None = "target_sft", **loss_kwargs: Any) -> LossFn:
    """The loss callable: a preset name (``"target_sft"``, ``"sft"``, ``"dft"``, ``"kd"``, …, with
    ``loss_kwargs`` such as ``eta=0.5``), or any callable
    ``loss(logits, labels, *, teacher_ids=..., teacher_logprobs=..., num_items_in_batch=...)``
    (a :class:`~target_sft.losses.QTargetLoss`, :func:`~target_sft.target_sft_loss`, …)
    returned as it is. ``None`` is TARGET-SFT."""
    if loss is None:
        loss = "target_sft"
    if isinstance(loss, str):
        fn = get_preset(loss, **loss_kwargs)
        if getattr(fn, "reduction", "mean") != "mean":
            raise ValueError(
                "the trainer needs reduction='mean' (normalised by num_items_in_batch); "
                f"got reduction={fn.reduction!r}"
            )
        return fn
    if loss_kwargs:
        raise ValueError("loss_kwargs apply to a preset name; pass a configured callable instead")
    if not callable(loss):
        raise TypeError(f"loss must be a preset name or a callable, got {type(loss).__name__}")
    return loss


def _required(loss_fn: Any) -> tuple[str, ...]:
    """The loss inputs the loss cannot run without (:attr:`QTargetLoss.required_inputs`; a
    ``functools.partial`` of :func:`target_sft_loss` needs the teacher's)."""
    if isinstance(loss_fn, QTargetLoss):
        return loss_fn.required_inputs
    fn = getattr(loss_fn, "func", loss_fn)  # functools.partial
    return ("teacher_ids", "teacher_logprobs") if fn is target_sft_loss else ()


def _needs_teacher(loss_fn: Any) -> bool:
    """Whether the loss cannot run without ``teacher_ids``/``teacher_logprobs``."""
    return "teacher_ids" in _required(loss_fn)


def _needs_reference(loss_fn: Any) -> tuple[str, ...]:
    """The reference tensors the loss cannot run without: the top-k of a residual anchored on
    the reference (SFT+KL, ASFT), the label log-probs of iw-SFT's trust."""
    return tuple(k for k in _required(loss_fn) if k.startswith("reference_"))


def _needs_old_logprobs(loss_fn: Any) -> bool:
    """Whether the loss reads ``old_logprobs`` (Proximal SFT's trust)."""
    return "old_logprobs" in _required(loss_fn)


def _accepted_inputs(loss_fn: Any, loss_inputs: dict[str, Any]) -> dict[str, Any]:
    """``loss_inputs`` without the :data:`_LAYOUT_INPUTS` a plain callable has no keyword for
    (it cannot read them, so nothing it computes depends on them); everything else is passed as
    it is (a wrong keyword stays the callable's ``TypeError``)."""
    if isinstance(loss_fn, QTargetLoss) or not any(k in loss_inputs for k in _LAYOUT_INPUTS):
        return loss_inputs
    try:
        params = inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):
        return loss_inputs
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return loss_inputs
    return {k: v for k, v in loss_inputs.items() if k not in _LAYOUT_INPUTS or k in params}


def _unwrap(model: Any) -> Any:
    """Look through DDP/FSDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module) or inner is model:
            return model
        model = inner


def _transformers_model(model: Any) -> Any:
    """The ``transformers.PreTrainedModel`` that ``model`` is or wraps (DDP, FSDP,
    ``torch.compile``, PEFT), else ``None``."""
    from transformers import PreTrainedModel

    m = _unwrap(model)
    if not isinstance(m, PreTrainedModel):
        base = getattr(m, "get_base_model", None)  # PEFT: forwards **kwargs to it
        if callable(base):
            m = _unwrap(base())
    return m if isinstance(m, PreTrainedModel) else None


@functools.lru_cache(maxsize=64)
def _forward_takes_use_cache(cls: type) -> bool:
    """Whether ``cls.forward`` takes ``use_cache`` (by name or through ``**kwargs``)."""
    try:
        params = inspect.signature(cls.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "use_cache" or p.kind is p.VAR_KEYWORD for p in params)


def _attn_implementation(model: Any) -> str:
    cfg = getattr(_unwrap(model), "config", None)
    return str(getattr(cfg, "_attn_implementation", None) or "")


def _packed_mask_problem(hf_model: Any) -> str | None:
    """Why ``hf_model`` (eager/SDPA/flex attention) would let a packed row attend across its
    samples, or ``None`` when it cannot.

    transformers (>= 4.54) builds the block-diagonal causal mask itself: its
    ``masking_utils.create_causal_mask`` (and the sliding-window variant) splits a row into
    samples where ``position_ids`` do not increase by 1 — but only when it is given no
    ``attention_mask`` and no KV cache (a model with ``config.use_cache`` creates one unless
    ``use_cache=False``; :func:`split_batch` passes it), for a model whose code builds its mask
    with that function, with an attention implementation that takes masks from it."""
    import transformers

    try:
        from transformers import masking_utils
    except ImportError:
        masking_utils = None
    if masking_utils is None or not hasattr(masking_utils, "find_packed_sequence_indices"):
        return (
            f"transformers {transformers.__version__} builds no packed-sequence mask from "
            "position_ids (transformers >= 4.54 does)"
        )
    impl = str(getattr(hf_model.config, "_attn_implementation", None) or "eager")
    registry = getattr(masking_utils.ALL_MASK_ATTENTION_FUNCTIONS, "_global_mapping", {})
    if impl not in registry:
        return (
            f"its attention implementation {impl!r} takes no mask from transformers' "
            f"masking_utils (those that do: {sorted(registry)})"
        )
    names = {type(hf_model).__module__, type(hf_model.base_model).__module__}
    if not any(hasattr(sys.modules.get(n), "create_causal_mask") for n in names):
        return (
            f"its code ({type(hf_model).__module__}) does not build the attention mask with "
            "transformers.masking_utils.create_causal_mask, which is what reads sample "
            "boundaries from position_ids"
        )
    return None


def split_batch(
    inputs: Mapping[str, Any], model: Any = None
) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """``(model_inputs, labels, loss_inputs)`` of a collated batch (docs/DATA.md).

    ``labels`` and :data:`LOSS_INPUT_KEYS` are taken out (the model computes no loss of its own
    and never sees the teacher or reference tensors, nor ``sequence_ids``); ``sample_keys``
    (``TargetSFTCollator(return_keys=True)``) is dropped. A ``transformers`` model also gets
    ``use_cache=False``: a loss needs no KV cache, and a cache would switch off transformers'
    packed-sequence masks.

    Packed layout (``position_ids`` and ``cu_seqlens``, no ``attention_mask``) needs ``model``
    (how samples are kept apart depends on its attention): a flash-attention model gets the
    segment offsets as HF's varlen kwargs (``cu_seq_lens_q/k``, ``max_length_q/k``); an
    eager/SDPA/flex model gets ``position_ids``, from which transformers (>= 4.54) builds a
    block-diagonal causal mask (attention never crosses a sample). Where that cannot be
    guaranteed (older transformers, an attention implementation or a model whose code takes no
    mask from ``transformers.masking_utils``, a model that is not a ``transformers`` model) a
    packed batch is a ``ValueError`` saying why, never a loss over attention that leaks across
    samples. The input mapping is not modified.
    """
    model_inputs = dict(inputs)
    labels = model_inputs.pop("labels", None)
    loss_inputs = {k: model_inputs.pop(k) for k in LOSS_INPUT_KEYS if k in model_inputs}
    for k in _BOOKKEEPING_KEYS:
        model_inputs.pop(k, None)
    cu = model_inputs.pop("cu_seqlens", None)
    max_seqlen = model_inputs.pop("max_seqlen", None)
    hf_model = _transformers_model(model) if model is not None else None
    if hf_model is not None and _forward_takes_use_cache(type(hf_model)):
        model_inputs.setdefault("use_cache", False)
    if cu is None:
        return model_inputs, labels, loss_inputs
    if "position_ids" not in model_inputs:
        raise ValueError("a packed batch (cu_seqlens) needs position_ids")
    if model_inputs.get("attention_mask") is not None:
        raise ValueError(
            "a packed batch (cu_seqlens) must not carry an attention_mask: a [B, L] mask "
            "cannot express sample boundaries (docs/DATA.md, packed layout)"
        )
    model_inputs.pop("attention_mask", None)
    fix = (
        "; use padded batches (TargetSFTCollator(packing=False)), a flash-attention model "
        '(attn_implementation="flash_attention_2"), or transformers >= 4.54 with "eager" or '
        '"sdpa" attention (docs/HF.md, packed batches)'
    )
    if model is None:
        raise ValueError(
            "split_batch(batch, model): a packed batch needs the model, whose attention "
            "decides how samples are kept apart" + fix
        )
    if hf_model is None:
        raise ValueError(
            f"a packed batch cannot be given to {type(_unwrap(model)).__name__}: only a "
            "transformers model is known to keep attention inside each sample (for your own "
            "model, run it on position_ids/cu_seqlens yourself and call the loss on its "
            "logits)" + fix
        )
    if model_inputs.get("use_cache"):
        raise ValueError(
            "a packed batch with use_cache=True: transformers ignores the packed layout when it "
            "has a KV cache; leave use_cache out of the batch"
        )
    if "flash" in _attn_implementation(hf_model):
        model_inputs.update(
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=int(max_seqlen),
            max_length_k=int(max_seqlen),
        )
        return model_inputs, labels, loss_inputs
    problem = _packed_mask_problem(hf_model)
    if problem is not None:
        raise ValueError(
            f"packed batches would let attention cross samples in {type(hf_model).__name__}: "
            + problem
            + fix
        )
    return model_inputs, labels, loss_inputs


#: config attributes by which a model scales its logits in ways the fused-linear path does not
#: reproduce (Cohere's ``logit_scale``, Granite's ``logits_scaling``), when not 1
_LOGIT_SCALING_ATTRS = ("logit_scale", "logits_scaling")
#: models whose LM head was checked once against their own logits (:func:`_check_head_logits`)
_HEAD_CHECKED: weakref.WeakSet[Any] = weakref.WeakSet()


def _fused_linear_head(model: Any) -> tuple[Any, nn.Module, nn.Linear, float | None]:
    """``(hf_model, body, lm_head, softcap)`` of a causal LM whose logits are
    ``softcap·tanh(lm_head(body(...).last_hidden_state)/softcap)``, or a ``ValueError`` that names
    the model class and what to do (never a silently different loss)."""
    fix = "use fused_linear=False (the loss on the model's logits)"
    hf = _transformers_model(model)
    if hf is None:
        raise ValueError(
            f"fused_linear=True needs a transformers causal LM, got "
            f"{type(_unwrap(model)).__name__}: {fix}, or run your model's body yourself and call "
            "target_sft.losses.fused_linear_qtarget_loss(loss, hidden, lm_head_weight, labels)"
        )
    name = type(hf).__name__
    head = hf.get_output_embeddings()
    if head is None:
        raise ValueError(f"fused_linear=True: {name} has no output embeddings (LM head); {fix}")
    if type(head) is not nn.Linear:
        raise ValueError(
            f"fused_linear=True: the LM head of {name} is a {type(head).__name__}, not a plain "
            "torch.nn.Linear (a LoRA adapter or modules_to_save on lm_head, a quantized layer, "
            f"...), so its weight is not the whole map; keep lm_head a plain Linear, or {fix}"
        )
    from torch.distributed.tensor import DTensor

    if isinstance(head.weight, DTensor) or "FullyShardedDataParallel" in {
        type(m).__name__ for m in (model, _unwrap(model))
    }:
        raise ValueError(
            f"fused_linear=True reads {name}'s lm_head.weight outside the model's forward, where "
            "FSDP / tensor parallelism keeps it sharded: train with DDP or one process, or " + fix
        )
    cfg = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    for attr in _LOGIT_SCALING_ATTRS:
        value = getattr(cfg, attr, None)
        if value is not None and float(value) != 1.0:
            raise ValueError(
                f"fused_linear=True: {name} scales its logits ({attr} = {value}), which the "
                f"fused-linear loss does not reproduce; {fix}"
            )
    body = hf.get_decoder() if hasattr(hf, "get_decoder") else hf.base_model
    if body is None or body is hf:
        raise ValueError(f"fused_linear=True: {name} has no separate body (decoder); {fix}")
    if "logits_to_keep" not in inspect.signature(type(hf).forward).parameters:
        raise ValueError(
            f"fused_linear=True: {name}.forward takes no logits_to_keep, so it would build the "
            f"[B, L, V] logits anyway; {fix}"
        )
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return hf, body, head, None if softcap is None else float(softcap)


def _check_head_logits(
    hf: Any, head: nn.Linear, softcap: float | None, hidden: torch.Tensor, logits: Any
) -> None:
    """Once per model: its own logits at the last position (``logits_to_keep=1``) must be
    ``softcap·tanh(lm_head(last hidden state)/softcap)``; else the model does something to its
    logits that the fused-linear path would silently leave out."""
    if hf in _HEAD_CHECKED:
        return
    name = type(hf).__name__
    if not isinstance(logits, torch.Tensor) or logits.shape[:-1] != (hidden.shape[0], 1):
        raise ValueError(
            f"fused_linear=True: {name}(..., logits_to_keep=1) returned no [B, 1, V] logits to "
            "check the LM head against; use fused_linear=False"
        )
    with torch.no_grad():
        want = head(hidden[:, -1:])
        if softcap is not None:
            want = softcap * torch.tanh(want / softcap)
        want, got = want.float(), logits.detach().float()
        err = float((got - want).abs().max())
        scale = float(want.abs().max())
    if not err <= 1e-3 * scale + 1e-5:
        raise ValueError(
            f"fused_linear=True: the logits of {name} are not "
            + ("softcap·tanh(lm_head(h)/softcap)" if softcap is not None else "lm_head(h)")
            + f" of its last hidden state h (max difference {err:.3g} at the last position): "
            "it transforms them in a way the fused-linear loss does not know; use "
            "fused_linear=False"
        )
    _HEAD_CHECKED.add(hf)


def _fused_linear_forward(
    model: nn.Module,
    model_inputs: dict[str, Any],
    labels: Any,
    loss_inputs: dict[str, Any],
    loss_fn: LossFn,
    num_items_in_batch: int | torch.Tensor | None,
    old_policy: Callable[[Callable[[], torch.Tensor]], None] | None = None,
) -> tuple[torch.Tensor, Any]:
    """The loss of :func:`compute_target_sft_loss` with ``fused_linear=True``: the model runs its
    forward (through every wrapper: DDP, ``torch.compile``, PEFT) with ``logits_to_keep=1``; its
    body's last hidden states, taken by a forward hook for this call, go with the LM head's
    weight, bias and softcap to :func:`~target_sft.losses.fused_linear_qtarget_loss`.
    ``old_policy`` (given) is called with a function computing the label log-probs from them
    (:func:`~target_sft.old_policy.label_logprobs_from_hidden`) before the loss."""
    if not isinstance(loss_fn, QTargetLoss):
        raise TypeError(
            f"fused_linear=True needs a Q-target loss (a preset name or a QTargetLoss), got "
            f"{loss_fn!r}, which can only be called on logits"
        )
    hf, body, head, softcap = _fused_linear_head(model)
    if "logits_to_keep" in model_inputs:
        raise ValueError("fused_linear=True sets logits_to_keep itself; leave it out of the batch")
    seen: list[torch.Tensor] = []

    def keep(_module: nn.Module, _args: Any, output: Any) -> None:
        hidden = getattr(output, "last_hidden_state", None)
        seen.append(output[0] if hidden is None else hidden)

    handle = body.register_forward_hook(keep)
    try:
        outputs = model(**model_inputs, logits_to_keep=1)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise RuntimeError(
            f"fused_linear=True: the body of {type(hf).__name__} ran {len(seen)} times in one "
            "forward (expected once)"
        )
    hidden = seen[0]
    logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
    _check_head_logits(hf, head, softcap, hidden, logits)
    weight = head.weight
    if old_policy is not None:
        old_policy(
            lambda: label_logprobs_from_hidden(
                hidden,
                weight,
                labels,
                bias=head.bias,
                softcap=softcap,
                ignore_index=loss_fn.ignore_index,
            )
        )
    loss = fused_linear_qtarget_loss(
        loss_fn,
        hidden.to(weight.dtype),
        weight,
        labels,
        bias=head.bias,
        softcap=softcap,
        impl=loss_fn.impl,
        **loss_inputs,
        num_items_in_batch=num_items_in_batch,
    )
    if isinstance(outputs, Mapping):  # the [B, 1, V] logits are not the model's logits
        outputs = type(outputs)(**{k: v for k, v in outputs.items() if k != "logits"})
    return loss, outputs


def compute_target_sft_loss(
    model: nn.Module,
    inputs: Mapping[str, Any],
    loss_fn: str | LossFn | None = "target_sft",
    *,
    num_items_in_batch: int | torch.Tensor | None = None,
    return_outputs: bool = False,
    fused_linear: bool = False,
    old_policy: OldPolicyStore | None = None,
    record_old_policy: bool | None = None,
    **loss_kwargs: Any,
) -> torch.Tensor | tuple[torch.Tensor, Any]:
    """Run ``model`` on a :class:`~target_sft.TargetSFTCollator` batch and compute the Q-target
    loss on its logits (the logic of :meth:`TargetSFTTrainer.compute_loss`).

    Args:
        model: a causal LM returning ``logits`` ``[B, L, V]`` (``outputs.logits`` or
            ``outputs[0]``).
        inputs: the batch, on the model's device (``input_ids``, ``attention_mask`` or
            ``position_ids``/``cu_seqlens``, ``labels``, ``teacher_ids``, ``teacher_logprobs``,
            and optionally the other :data:`LOSS_INPUT_KEYS`). Not modified.
        loss_fn: a loss callable or a preset name (see :func:`make_loss`, with ``loss_kwargs``).
        num_items_in_batch: the mean's denominator (HF Trainer's supervised-token count over
            the accumulated micro-batches); ``None``: this batch's supervised tokens.
        return_outputs: also return the model outputs.
        fused_linear: never build the ``[B, L, V]`` logits: run the model with
            ``logits_to_keep=1``, take its body's last hidden states and compute the loss from
            them and the LM head (``get_output_embeddings()``: weight, bias, and the softcap of
            ``config.final_logit_softcapping``) with
            :func:`~target_sft.losses.fused_linear_qtarget_loss` (Triton kernels on CUDA, the
            chunked PyTorch reference elsewhere; same loss and gradients). For transformers
            causal LMs whose logits are ``lm_head(last hidden state)`` (Llama, Qwen2, Qwen3,
            Mistral, ...; checked once per model against its own logits); ``loss_fn`` must be a
            preset name or a :class:`~target_sft.losses.QTargetLoss`. The returned outputs
            then have no ``logits``.
        old_policy: where a loss that reads ``old_logprobs`` (Proximal SFT) gets them when the
            batch has none (:class:`~target_sft.old_policy.OldPolicyStore`; the batch needs
            ``sample_keys``: ``TargetSFTCollator(return_keys=True)``): each sample's stored
            label log-probs, the current policy's own (``r = 1``) for a sample not stored yet.
        record_old_policy: record this batch's label log-probs (detached) in ``old_policy``
            (default: when ``model.training``).

    Returns:
        The loss (0-dim), or ``(loss, outputs)``.

    Raises:
        ValueError: no ``labels``; the loss needs the teacher or reference tensors, or
            ``old_logprobs``, and the batch has none (the message names the cache or the store to
            add); a packed batch the model's attention cannot keep apart (:func:`split_batch`);
            ``fused_linear=True`` with a model it cannot handle (no plain ``nn.Linear`` LM
            head, logit scaling, FSDP / tensor-parallel sharding, not a transformers model).
        CacheMismatchError: an id of ``input_ids``, ``labels`` or ``teacher_ids`` does not fit
            the model's vocabulary (checked before the forward pass, docs/HF.md).
    """
    if not callable(loss_fn) or loss_kwargs:
        loss_fn = make_loss(loss_fn, **loss_kwargs)
    model_inputs, labels, loss_inputs = split_batch(inputs, model)
    if labels is None:
        raise ValueError(
            f"the batch has no 'labels' (keys: {sorted(inputs)}); build it with "
            "target_sft.TargetSFTCollator"
        )
    if _needs_teacher(loss_fn) and (
        loss_inputs.get("teacher_ids") is None or loss_inputs.get("teacher_logprobs") is None
    ):
        raise ValueError(
            f"the loss {loss_fn!r} needs teacher_ids and teacher_logprobs, but the batch has "
            f"only {sorted(inputs)}: collate with target_sft.TargetSFTCollator (trainer "
            "data_collator=...) over a teacher cache (TeacherCacheDataset, "
            "StreamingTeacherDataset), or pick a loss without a teacher (loss='sft', 'dft')"
        )
    missing = [k for k in _needs_reference(loss_fn) if loss_inputs.get(k) is None]
    if missing:
        raise ValueError(
            f"the loss {loss_fn!r} needs {', '.join(missing)}, but the batch has only "
            f"{sorted(inputs)}: give the collator the reference model's cache "
            "(TargetSFTCollator(teacher, reference=...), or TeacherCacheDataset(teacher, "
            "reference=...) / StreamingTeacherDataset(..., reference=...); a cache built from the "
            "reference model with build_teacher_cache(..., role='reference'))"
        )
    fill_old = None
    ignore = int(getattr(loss_fn, "ignore_index", -100))
    if _needs_old_logprobs(loss_fn) and loss_inputs.get("old_logprobs") is None:
        if old_policy is None:
            raise ValueError(
                f"the loss {loss_fn!r} needs old_logprobs (the old policy's label log-probs), "
                "which the batch does not carry: train with TargetSFTTrainer (it records them "
                "per sample as batches pass, docs/HF.md), or pass old_policy="
                "target_sft.OldPolicyStore() here with batches from "
                "TargetSFTCollator(..., return_keys=True)"
            )
        record = model.training if record_old_policy is None else bool(record_old_policy)

        def fill_old(current: Callable[[], torch.Tensor]) -> None:
            cur = current()
            layout = {
                "labels": labels,
                **{k: inputs.get(k) for k in ("sample_keys", "sequence_ids", "cu_seqlens")},
            }
            loss_inputs["old_logprobs"] = old_policy.old_logprobs(layout, cur, ignore_index=ignore)
            if record:
                old_policy.record_batch(layout, cur, ignore_index=ignore)

    check_ids_in_vocab(
        student_vocab(model),
        {
            "input_ids": model_inputs.get("input_ids"),
            "labels": labels,
            "teacher_ids": loss_inputs.get("teacher_ids"),
        },
        "compute_target_sft_loss",
    )
    if fused_linear:
        loss, outputs = _fused_linear_forward(
            model, model_inputs, labels, loss_inputs, loss_fn, num_items_in_batch, fill_old
        )
        return (loss, outputs) if return_outputs else loss
    outputs = model(**model_inputs)
    logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
    if fill_old is not None:
        fill_old(lambda: label_logprobs(logits, labels, ignore_index=ignore))
    loss_inputs = _accepted_inputs(loss_fn, loss_inputs)
    loss = loss_fn(logits, labels, **loss_inputs, num_items_in_batch=num_items_in_batch)
    return (loss, outputs) if return_outputs else loss


def _is_streaming(dataset: Any) -> bool:
    from target_sft.streaming import StreamingTeacherDataset

    return isinstance(dataset, StreamingTeacherDataset)


def _dataset_leaves(
    dataset: Any, label: str, wrapper: str | None = None
) -> Iterator[tuple[str, Any, str | None]]:
    """``(label, dataset, wrapper)`` of every dataset that ``dataset`` is made of, looking
    through ``torch.utils.data.Subset``, ``ConcatDataset`` and a dict of eval datasets
    (``wrapper``: the innermost ``Subset``/``ConcatDataset`` class name holding it, or ``None``).
    The leaves are teacher datasets or anything else, which the caller judges."""
    if dataset is None:
        return
    if isinstance(dataset, Mapping):
        for name, ds in dataset.items():
            yield from _dataset_leaves(ds, f"{label}[{name!r}]", wrapper)
    elif isinstance(dataset, torch.utils.data.Subset):
        yield from _dataset_leaves(dataset.dataset, f"{label}.dataset", "Subset")
    elif isinstance(dataset, torch.utils.data.ConcatDataset):
        for i, ds in enumerate(dataset.datasets):
            yield from _dataset_leaves(ds, f"{label}.datasets[{i}]", "ConcatDataset")
    else:
        yield label, dataset, wrapper


def _is_teacher_data(dataset: Any) -> bool:
    return isinstance(dataset, TeacherCacheDataset) or _is_streaming(dataset)


def _dataset_caches(dataset: Any, label: str) -> Iterator[tuple[str, Any]]:
    """``(label, CacheInfo)`` of every cache a dataset reads, teacher and reference (through
    ``Subset``, ``ConcatDataset`` and a dict of eval datasets)."""
    for where, ds, _ in _dataset_leaves(dataset, label):
        if isinstance(ds, TeacherCacheDataset):
            yield where, ds.cache.info
        elif _is_streaming(ds):
            yield where, ds.info
        else:
            continue
        ref = getattr(getattr(ds, "reference", None), "info", None)
        if ref is not None:  # its reference cache (TeacherCacheDataset(..., reference=...))
            yield f"{where}.reference", ref


def _check_datasets(
    datasets: Mapping[str, Any], *, has_collator: bool, needs_teacher: bool
) -> bool:
    """Whether every dataset is teacher data (then, without a ``data_collator``, the trainer
    builds a :class:`TargetSFTCollator`), through ``Subset``/``ConcatDataset``/dicts.

    Raises ``TypeError``: a ``StreamingTeacherDataset`` inside a ``Subset``/``ConcatDataset``
    (an iterable dataset cannot be indexed or concatenated); no ``data_collator`` and a
    dataset that is not teacher data while the loss needs the teacher (HF's default collator
    would give batches without teacher tensors, or fail obscurely on the cache's items)."""
    leaves = [x for name, ds in datasets.items() for x in _dataset_leaves(ds, name)]
    for where, ds, wrapper in leaves:
        if _is_streaming(ds) and wrapper is not None:
            raise TypeError(
                f"TargetSFTTrainer: {where} is a StreamingTeacherDataset inside a {wrapper}: "
                "an iterable dataset cannot be indexed or concatenated; pass it on its own "
                "(to hold samples out, target_sft.split_by_key(dataset, eval_fraction=...))"
            )
    foreign = [(where, ds) for where, ds, _ in leaves if not _is_teacher_data(ds)]
    if not foreign:
        return bool(leaves)
    if has_collator or not needs_teacher:
        return False
    where, ds = foreign[0]
    raise TypeError(
        f"TargetSFTTrainer: {where} is {_describe_dataset(ds)}, not teacher data, and no "
        "data_collator was given, so its batches would carry no teacher tensors. Pass a "
        "target_sft.TeacherCacheDataset or StreamingTeacherDataset (also inside "
        "torch.utils.data.Subset / ConcatDataset, or a dict of eval datasets), or pass rows "
        "with a 'key' (and 'input_ids') together with data_collator=TargetSFTCollator(cache, "
        "pad_token_id=...)"
    )


def _describe_dataset(ds: Any) -> str:
    kind = type(ds).__name__
    n = f" of {len(ds)} items" if hasattr(ds, "__len__") else ""
    return f"a {kind}{n}"


def _default_pad_id(kwargs: Mapping[str, Any], model: Any) -> int:
    for name in ("processing_class", "tokenizer"):
        tok = kwargs.get(name)
        pad = getattr(tok, "pad_token_id", None)
        if pad is None:
            pad = getattr(getattr(tok, "tokenizer", None), "pad_token_id", None)
        if pad is not None:
            return int(pad)
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return int(pad) if isinstance(pad, int) else 0


class TargetSFTTrainerMixin:
    """The Target-SFT parts of a trainer; put it before a ``transformers.Trainer`` subclass
    in the bases (``class T(TargetSFTTrainerMixin, SomeTrainer)``).

    Keyword args (the rest goes to the trainer):
        loss: a preset name or a loss callable (see :func:`make_loss`); ``reduction`` must be
            ``"mean"``. Not given: ``args.loss`` of a :class:`~target_sft.config.TargetSFTConfig`,
            else ``"target_sft"``.
        loss_kwargs: a preset's arguments, e.g. ``{"eta": 0.5}`` (merged with those of ``args``).
        allow_tokenizer_mismatch: warn instead of raising when the tokenizer or the model's
            vocabulary does not match a cache (see below).
        fused_linear: compute the loss from the last hidden states and the LM head, never
            building the ``[B, L, V]`` logits (:func:`compute_target_sft_loss`); evaluation
            then gives the loss but no logits (so no ``compute_metrics``). Not given:
            ``args.fused_linear`` (a ``TargetSFTConfig`` field), else ``False``.

    Checks at construction, against every cache of ``train_dataset``, ``eval_dataset`` and
    the ``data_collator`` (teacher and reference caches alike): the tokenizer
    (``processing_class``, or ``tokenizer`` on old transformers) must be the one the cache was
    built with (content fingerprint), and the model's vocabulary must hold the cache's token ids;
    :class:`~target_sft.CacheMismatchError` otherwise. A :class:`~target_sft.TargetSFTCollator`
    without a tokenizer of its own gets this one, so the caches of later batches are checked
    too; every batch's ids are checked against the model before its forward pass
    (:func:`compute_target_sft_loss`).

    Datasets are looked into through ``torch.utils.data.Subset``, ``ConcatDataset`` and dicts of
    eval datasets. Without a ``data_collator``, a dataset that is not teacher data is a
    ``TypeError`` when the loss needs the teacher (HF's default collator would drop the teacher
    tensors); a ``StreamingTeacherDataset`` inside a ``Subset``/``ConcatDataset`` always is.

    ``data_collator`` defaults to a :class:`~target_sft.TargetSFTCollator` (pad id from the
    tokenizer, else the model config, else 0; ``label_in_support`` from
    ``args.label_in_support``, else ``True``) when the dataset is a
    :class:`~target_sft.TeacherCacheDataset` or :class:`~target_sft.StreamingTeacherDataset`.
    A :class:`~target_sft.TargetSFTCollator` given whose ``label_in_support`` differs from a
    config's ``args.label_in_support`` is a ``ValueError`` naming both.

    A loss that reads the reference model (SFT+KL, ASFT, iw-SFT) with a
    :class:`~target_sft.TargetSFTCollator` and no reference cache in it or in the datasets is a
    ``ValueError`` naming ``reference=``. A loss that reads ``old_logprobs`` (Proximal SFT) gets
    them from an :class:`~target_sft.old_policy.OldPolicyCallback` (``self.old_policy``: the one
    in ``callbacks``, else one made here), which records each sample's label log-probs as it
    trains (docs/HF.md, "Proximal SFT: the old policy"); the collator's ``return_keys`` is
    turned on for it.

    ``args`` (any ``TrainingArguments``/``SFTConfig``) is read by
    :func:`~target_sft.config.resolve_loss`: a ``TargetSFTConfig``'s loss and parameters, and the
    knobs the Q-target loss would ignore (``label_smoothing_factor``, TRL's ``loss_type``,
    ``use_liger_kernel``) mapped onto a preset or refused (docs/HF.md, "Config-driven runs").
    """

    def __init__(
        self,
        *args: Any,
        loss: str | LossFn | None = None,
        loss_kwargs: Mapping[str, Any] | None = None,
        allow_tokenizer_mismatch: bool = False,
        fused_linear: bool | None = None,
        **kwargs: Any,
    ) -> None:
        train_args = args[1] if len(args) > 1 else kwargs.get("args")
        from_args = bool(getattr(train_args, "fused_linear", False))
        if fused_linear is not None and from_args and not fused_linear:
            raise ValueError(
                "fused_linear=False was given to the trainer but args.fused_linear=True: "
                "set it in one place"
            )
        self.fused_linear = from_args if fused_linear is None else bool(fused_linear)
        self._loss_request = (loss, dict(loss_kwargs or {}))  # kept for _hp_search_setup
        self._set_loss(train_args)
        if self.fused_linear and kwargs.get("compute_metrics") is not None:
            raise ValueError(
                "compute_metrics needs the model's logits, which fused_linear=True never builds: "
                "evaluate with a trainer without fused_linear (the eval loss is the same)"
            )
        self.allow_tokenizer_mismatch = bool(allow_tokenizer_mismatch)
        has_collator = kwargs.get("data_collator") is not None or len(args) >= 3
        datasets = {
            k: kwargs[k] for k in ("train_dataset", "eval_dataset") if kwargs.get(k) is not None
        }
        teacher = _check_datasets(
            datasets, has_collator=has_collator, needs_teacher=_needs_teacher(self.loss_fn)
        )
        label_in_support = getattr(train_args, "label_in_support", None)
        if not has_collator and teacher:
            model = args[0] if args else kwargs.get("model")
            kwargs["data_collator"] = TargetSFTCollator(
                pad_token_id=_default_pad_id(kwargs, model),
                label_in_support=True if label_in_support is None else label_in_support,
            )
        collator = kwargs.get("data_collator", args[2] if len(args) >= 3 else None)
        if (
            isinstance(collator, TargetSFTCollator)
            and label_in_support is not None
            and collator.label_in_support != label_in_support
        ):
            raise ValueError(
                f"two label supports: args.label_in_support={label_in_support} but the "
                f"data_collator's label_in_support={collator.label_in_support}; set one "
                f"of them to agree (TargetSFTCollator(label_in_support={label_in_support}) "
                f"or args.label_in_support={collator.label_in_support})"
            )
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        # HF counts num_items_in_batch (and treats the loss as normalised over the accumulated
        # batch, i.e. does not divide it by the accumulation steps again) only for models that
        # accept loss kwargs; our loss always takes it, whatever the model.
        self.model_accepts_loss_kwargs = True
        # and the loss shifts the labels (HF counts labels[..., 1:] only for the models whose
        # own loss does: a model without one would get its position 0 counted too)
        self._loss_shifts_labels = True
        self._check_cache_identity(kwargs.get("processing_class", kwargs.get("tokenizer")))
        self._check_reference(datasets)
        self._setup_old_policy()

    def _set_loss(self, args: Any) -> None:
        """``self.loss_fn`` from the trainer's ``loss=``/``loss_kwargs=`` and ``args``
        (:func:`~target_sft.config.resolve_loss`)."""
        loss, loss_kwargs = resolve_loss(args, *self._loss_request)
        self.loss_fn = make_loss(loss, **loss_kwargs)
        if self.fused_linear and not isinstance(self.loss_fn, QTargetLoss):
            raise TypeError(
                f"fused_linear=True needs a Q-target loss (a preset name or a QTargetLoss), got "
                f"loss={self.loss_fn!r}, which can only be called on logits"
            )

    def _hp_search_setup(self, trial: Any) -> None:
        """HF's ``hyperparameter_search`` sets a trial's values on ``args``: the loss is made
        again from them, so a sweep over ``eta``, ``lam``, ``loss``, … trains what it says."""
        super()._hp_search_setup(trial)  # type: ignore[misc]
        self._set_loss(self.args)  # type: ignore[attr-defined]
        self._setup_old_policy()
        if trial is not None and self.old_policy is not None and self._own_old_policy:
            self.old_policy.store = OldPolicyStore()  # a trial is a new run: π_old unknown

    def _check_reference(self, datasets: Mapping[str, Any]) -> None:
        """A loss that reads the reference tensors (SFT+KL, ASFT, iw-SFT) with a
        :class:`~target_sft.TargetSFTCollator` and datasets none of which has a reference cache:
        ``ValueError`` naming ``reference=`` now, not deep in the first batch's loss."""
        need = _needs_reference(self.loss_fn)
        collator = getattr(self, "data_collator", None)
        if not need or not isinstance(collator, TargetSFTCollator):
            return
        if getattr(collator, "reference", None) is not None:
            return
        leaves = [x for name, ds in datasets.items() for x in _dataset_leaves(ds, name)]
        if any(getattr(ds, "reference", None) is not None for _, ds, _ in leaves):
            return
        raise ValueError(
            f"the loss {self.loss_fn!r} needs {', '.join(need)}, the reference model's signals, "
            "but neither the data_collator nor the datasets have a reference cache: pass "
            "TargetSFTCollator(teacher, reference='ref-cache/', ...) or "
            "TeacherCacheDataset(teacher, reference=...) / StreamingTeacherDataset(..., "
            "reference=...), with a cache built from the reference model "
            "(build_teacher_cache(reference_model, data, 'ref-cache/', role='reference'))"
        )

    def _setup_old_policy(self) -> None:
        """With a loss that reads ``old_logprobs`` (Proximal SFT): the
        :class:`~target_sft.old_policy.OldPolicyCallback` given in ``callbacks``, else a new one
        (added), and ``return_keys`` on a :class:`~target_sft.TargetSFTCollator` (the store is
        keyed by sample). ``self.old_policy`` is that callback, or ``None``."""
        handler = getattr(self, "callback_handler", None)
        given = (
            []
            if handler is None
            else [cb for cb in handler.callbacks if isinstance(cb, OldPolicyCallback)]
        )
        if len(given) > 1:
            raise ValueError(f"{len(given)} OldPolicyCallbacks were given; pass one")
        if not hasattr(self, "_own_old_policy"):
            self._own_old_policy = False  # whether the trainer made the callback
        if not _needs_old_logprobs(self.loss_fn):
            self.old_policy: OldPolicyCallback | None = given[0] if given else None
            return
        if given:
            self.old_policy = given[0]
        else:
            self.old_policy = OldPolicyCallback()
            self.add_callback(self.old_policy)  # type: ignore[attr-defined]
            self._own_old_policy = True
        collator = getattr(self, "data_collator", None)
        if isinstance(collator, TargetSFTCollator):
            collator.return_keys = True

    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        """``Trainer.train``; on resume, the old-policy store (Proximal SFT) is restored from the
        checkpoint too, so the resumed run is the uninterrupted one."""
        callback = getattr(self, "old_policy", None)
        if callback is not None and resume_from_checkpoint not in (None, False):
            path = resume_from_checkpoint
            if path is True:
                from transformers.trainer_utils import get_last_checkpoint

                path = get_last_checkpoint(self.args.output_dir)  # type: ignore[attr-defined]
            if path is not None:  # else Trainer.train says there is no checkpoint
                callback.restore(path)
        return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]

    def _check_cache_identity(self, tokenizer: Any) -> None:
        """The tokenizer and vocabulary checks against the caches in hand (class docstring)."""
        allow = self.allow_tokenizer_mismatch
        collator = getattr(self, "data_collator", None)
        found = [
            *_dataset_caches(getattr(self, "train_dataset", None), "train_dataset"),
            *_dataset_caches(getattr(self, "eval_dataset", None), "eval_dataset"),
        ]
        if isinstance(collator, TargetSFTCollator) and collator.cache is not None:
            found.append(("data_collator", collator.cache.info))
        ref = getattr(getattr(collator, "reference", None), "info", None)
        if isinstance(collator, TargetSFTCollator) and ref is not None:
            found.append(("data_collator.reference", ref))
        infos: dict[str, tuple[str, Any]] = {}
        for label, info in found:
            infos.setdefault(str(info.path), (label, info))
        if tokenizer is not None:
            check = TokenizerCheck(
                tokenizer,
                allow_mismatch=allow,
                what="the trainer's tokenizer (processing_class)",
            )
            for label, info in infos.values():
                check.check(info, f"TargetSFTTrainer: {label}")
            if isinstance(collator, TargetSFTCollator) and collator.tokenizer_check is None:
                collator.set_tokenizer(check)
        model = getattr(self, "model", None)
        vocab = student_vocab(model) if model is not None else None
        for label, info in infos.values():
            check_student_vocab(
                vocab, info, where=f"TargetSFTTrainer: {label}", allow_mismatch=allow
            )

    # ---- loss ------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The Q-target loss of the batch (:func:`compute_target_sft_loss`), normalised by
        ``num_items_in_batch`` when the trainer passes it."""
        callback = getattr(self, "old_policy", None)
        loss, outputs = compute_target_sft_loss(
            model,
            inputs,
            self.loss_fn,
            num_items_in_batch=num_items_in_batch,
            return_outputs=True,
            fused_linear=self.fused_linear,
            old_policy=None if callback is None else callback.store,
            record_old_policy=model.training and not (callback is not None and callback.frozen),
        )
        args = self.args  # type: ignore[attr-defined]
        if getattr(args, "average_tokens_across_devices", False) and num_items_in_batch is not None:
            # num_items_in_batch is then the count over all ranks, and DDP averages the
            # gradients over ranks: scale back to a sum over ranks (as Trainer.compute_loss does)
            tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            n_gpu = getattr(args, "n_gpu", 1)
            loss = loss * (self.accelerator.num_processes // tp if n_gpu <= 1 else n_gpu)  # type: ignore[attr-defined]
        return (loss, outputs) if return_outputs else loss

    # ---- columns ---------------------------------------------------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        """``remove_unused_columns=True`` keeps the model's arguments and the labels; keep also
        what the collator reads (``key``) and what the loss takes (the teacher tensors …),
        whether a ``datasets.Dataset`` carries them or the items are dicts. (Items that are not
        dicts, such as the ``CacheSample`` of the target-sft datasets, are never filtered.)"""
        super()._set_signature_columns_if_needed()  # type: ignore[misc]
        cols = self._signature_columns  # type: ignore[has-type]
        extra = [c for c in (*_ITEM_COLUMNS, *LOSS_INPUT_KEYS, *_VARLEN_KEYS) if c not in cols]
        self._signature_columns = list(cols) + extra

    # ---- data ------------------------------------------------------------------------------

    def get_train_dataloader(self) -> Any:
        ds = self.train_dataset  # type: ignore[attr-defined]
        if _is_streaming(ds):
            return self._streaming_dataloader(ds, self._train_batch_size, "Training")  # type: ignore[attr-defined]
        return super().get_train_dataloader()  # type: ignore[misc]

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        ds = eval_dataset
        if ds is None:
            ds = self.eval_dataset  # type: ignore[attr-defined]
        elif isinstance(ds, str):
            ds = self.eval_dataset[ds]  # type: ignore[attr-defined]
        if _is_streaming(ds):
            return self._streaming_dataloader(ds, self.args.eval_batch_size, "Evaluation")  # type: ignore[attr-defined]
        return super().get_eval_dataloader(eval_dataset)  # type: ignore[misc]

    def _streaming_dataloader(self, dataset: Any, batch_size: int, description: str) -> Any:
        """A DataLoader over a :class:`StreamingTeacherDataset`, which already gives every rank
        its own share: no sampler, and not re-sharded by accelerate (which would split one
        rank's stream again). It is an accelerate ``DataLoaderShard`` (device placement,
        ``set_epoch`` forwarded to the dataset every epoch, fast-forwarding on resume)."""
        from accelerate.data_loader import prepare_data_loader
        from torch.utils.data import DataLoader

        if dataset.batch_size != batch_size:
            raise ValueError(
                f"StreamingTeacherDataset(batch_size={dataset.batch_size}) must equal the "
                f"trainer's per-device batch size ({batch_size}) for {description.lower()}: "
                "the dataset deals whole batches to ranks and workers"
            )
        args = self.args  # type: ignore[attr-defined]
        collate = self.data_collator  # type: ignore[attr-defined]
        if hasattr(self, "_get_collator_with_removed_columns"):
            collate = self._get_collator_with_removed_columns(collate, description=description)
        params: dict[str, Any] = {
            "batch_size": batch_size,
            "collate_fn": collate,
            "num_workers": args.dataloader_num_workers,
            "pin_memory": args.dataloader_pin_memory,
        }
        if args.dataloader_num_workers > 0:
            params["persistent_workers"] = args.dataloader_persistent_workers
            params["prefetch_factor"] = args.dataloader_prefetch_factor
            ctx = getattr(args, "dataloader_multiprocessing_context", None)
            if ctx is not None:
                params["multiprocessing_context"] = ctx
        loader = DataLoader(dataset, **params)
        return prepare_data_loader(
            loader,
            device=args.device,
            num_processes=1,
            process_index=0,
            put_on_device=True,
            dispatch_batches=False,
        )


class TargetSFTTrainer(TargetSFTTrainerMixin, Trainer):
    """``transformers.Trainer`` that trains with a Q-target loss on teacher-cache batches.

    ``TargetSFTTrainer(model, args, train_dataset=..., loss="target_sft",
    loss_kwargs={"eta": 0.5}, ...)``; every other argument is ``Trainer``'s. See
    :class:`TargetSFTTrainerMixin` and ``docs/HF.md``.
    """
