"""Choosing between the PyTorch reference and the Triton kernels (``impl=``).

Rules (documented in ``docs/KERNELS.md``):

* ``"torch"``: the chunked PyTorch reference (:mod:`.reference`), everywhere.
* ``"triton"``: the Triton kernels. CUDA tensors, or CPU tensors when Triton runs in interpreter
  mode (``TRITON_INTERPRET=1`` set before ``triton`` is first imported; slow, for tests). Anything
  else — CPU without the interpreter, Triton missing, float64 inputs, a loss the kernels do not
  implement (GEM's dense sharpened-softmax term; EAFT's top-k for the fused-linear kernel) —
  raises an error that says why; it never silently computes something else.
* ``"auto"`` (default): ``"triton"`` for CUDA float32/bf16/fp16 tensors when Triton is importable
  and the loss is supported by the kernels, the PyTorch reference otherwise (CPU, float64, GEM,
  no Triton).

This module never imports Triton (it only asks whether it is installed).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .contract import StatRequest

__all__ = [
    "IMPLS",
    "check_impl",
    "device_problem",
    "interpreting",
    "resolve_impl",
    "triton_unsupported_reason",
]

IMPLS = ("auto", "torch", "triton")


def check_impl(impl: str) -> str:
    """``impl`` itself when it is one of :data:`IMPLS`, else a ``ValueError``."""
    if impl not in IMPLS:
        raise ValueError(f"impl = {impl!r} is not one of {IMPLS}")
    return impl


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton kernels run in interpreter mode (CPU tensors allowed)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_unsupported_reason(request: StatRequest, *, fused_linear: bool = False) -> str | None:
    """Why the Triton kernels cannot compute a loss that needs ``request`` (``None``: they can)."""
    if request.dense:
        return (
            "a dense target term (GEM's sharpened softmax π_θ^(β)) is not implemented in the "
            "Triton kernels"
        )
    if fused_linear and request.topk is not None:
        return (
            "the top-k entropy (EAFT's trust) needs a top-k over the logits, which the fused-linear "
            "kernel never materialises"
        )
    return None


def device_problem(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on ``device`` now (``None``: they can)."""
    if not _triton_importable():
        return "triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    if device.type == "cpu":
        return (
            "impl='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before triton is imported (slow; meant for tests), or use impl='torch' / 'auto'"
        )
    return f"impl='triton' needs CUDA tensors, got tensors on {device}"


def resolve_impl(
    impl: str,
    device: torch.device,
    request: StatRequest,
    *,
    dtype: torch.dtype | None = None,
    fused_linear: bool = False,
) -> str:
    """``"torch"`` or ``"triton"`` for a loss needing ``request`` on inputs of ``dtype`` on
    ``device`` (``fused_linear``: the inputs are hidden states and the LM head; see the module
    docstring for the rules)."""
    check_impl(impl)
    if impl == "torch":
        return "torch"
    if dtype == torch.float64:
        if impl == "triton":
            what = "inputs" if fused_linear else "logits"
            raise ValueError(f"impl='triton' takes float32/bf16/fp16 {what}, not float64")
        return "torch"
    reason = triton_unsupported_reason(request, fused_linear=fused_linear)
    where = device_problem(device)
    if impl == "auto":
        ok = reason is None and device.type == "cuda" and where is None
        return "triton" if ok else "torch"
    if reason is not None:
        raise ValueError(
            f"impl='triton' is not available for this loss: {reason}; use impl='torch'"
        )
    if where is not None:
        raise RuntimeError(where)
    return "triton"
