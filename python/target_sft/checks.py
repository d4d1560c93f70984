"""Argument checks shared by every area of the package (cache, batching, streaming, building).

Each raises :class:`~target_sft.errors.CacheInputError` naming the argument and the value, so that
a wrong input is reported the same way wherever it enters.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import numpy.typing as npt

from target_sft import _core
from target_sft.errors import CacheInputError

__all__ = [
    "as_float32",
    "as_float64",
    "as_int32",
    "check_int",
    "check_role",
    "check_wait",
    "parse_size",
    "to_numpy",
]


def to_numpy(name: str, x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        x = x.numpy()
    try:
        return np.asarray(x)
    except Exception as e:  # pragma: no cover - exotic inputs
        raise CacheInputError(f"{name} cannot be converted to an array: {e}") from e


def as_int32(name: str, x: Any) -> npt.NDArray[np.int32]:
    a = to_numpy(name, x)
    if a.dtype == np.int32:
        return np.ascontiguousarray(a)
    if a.dtype.kind not in "iu":
        raise CacheInputError(f"{name} must hold integers, got dtype {a.dtype}")
    if a.size and (a.min() < -(2**31) or a.max() >= 2**31):
        i = int(np.argmax((a < -(2**31)) | (a >= 2**31)))
        idx = np.unravel_index(i, a.shape)
        raise CacheInputError(
            f"{name}[{', '.join(map(str, idx))}] = {a[idx]} does not fit in int32"
        )
    return np.ascontiguousarray(a, dtype=np.int32)


def as_float32(name: str, x: Any) -> npt.NDArray[np.float32]:
    a = to_numpy(name, x)
    if a.dtype.kind != "f":
        raise CacheInputError(f"{name} must hold floating-point log-probs, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.float32)


def as_float64(name: str, x: Any) -> npt.NDArray[np.float64]:
    a = to_numpy(name, x)
    if a.dtype.kind not in "fiu":
        raise CacheInputError(f"{name} must hold numbers, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.float64)


def check_int(name: str, v: Any, lo: int | None = None, hi: int | None = None) -> int:
    """``v`` as an int in ``[lo, hi]``, else :class:`CacheInputError` naming the argument ``name``
    (bools and floats are refused: ``True`` or ``2.5`` is never a count)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise CacheInputError(f"{name} must be an int, got {v!r} ({type(v).__name__})")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bound = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]"
        raise CacheInputError(f"{name} = {int(v)} must be {bound}")
    return int(v)


_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 1000,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 1 << 10,
    "MIB": 1 << 20,
    "GIB": 1 << 30,
    "TIB": 1 << 40,
}
_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*")


def parse_size(size: int | str, name: str = "size", lo: int = 0) -> int:
    """A byte count given as an int or a string such as ``"256MiB"``/``"1.5 GB"``; anything else
    (``"12 parsecs"``, a negative or too small value) is a :class:`CacheInputError` naming the
    argument ``name``."""
    if isinstance(size, str):
        m = _SIZE_RE.fullmatch(size)
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _SIZE_UNITS:
            raise CacheInputError(
                f"{name} = {size!r} is not a size: use a number of bytes or a number with a unit "
                '(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. "256MiB"'
            )
        value = float(m.group(1)) * _SIZE_UNITS[unit]
        if value >= 2**63:
            raise CacheInputError(f"{name} = {size!r} is too large")
        size = int(value)
    return check_int(name, size, lo, 2**63 - 1)


def check_wait(wait: bool | float) -> float:
    """``wait`` (False, True or seconds) as seconds for the native lock (0: refuse at once)."""
    if isinstance(wait, (bool, np.bool_)):
        return float("inf") if wait else 0.0
    if not isinstance(wait, (int, float, np.integer, np.floating)) or not wait >= 0:
        raise CacheInputError(
            f"wait must be False (refuse at once), True (wait as long as it takes) or a number "
            f"of seconds >= 0, got {wait!r}"
        )
    return float(wait)


def check_role(name: str, role: Any) -> str:
    """A cache role (the manifest's ``role``: ``"teacher"`` or ``"reference"``, the list kept by
    the native core, docs/FORMAT.md §1), checked before anything expensive starts."""
    if not isinstance(role, str) or role not in _core.CACHE_ROLES:
        roles = " or ".join(repr(r) for r in _core.CACHE_ROLES)
        raise CacheInputError(f"{name} must be {roles}, got {role!r}")
    return role
