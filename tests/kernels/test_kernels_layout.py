"""``target_sft.kernels`` is a leaf: it imports neither the losses nor Triton, and the names that
moved to ``target_sft.losses`` are still served (with a DeprecationWarning)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from target_sft import kernels as K
from target_sft import losses as L


def test_importing_kernels_imports_neither_losses_nor_triton() -> None:
    code = (
        "import sys, target_sft.kernels\n"
        "bad = [m for m in ('target_sft.losses', 'triton') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_contract_is_one_object_under_both_names() -> None:
    for name in ("StatRequest", "DenseTerm", "SharpenedSoftmax", "FusedLinearBlocks"):
        assert getattr(L, name) is getattr(K, name)
    assert L.DEFAULT_CHUNK_ELEMENTS == K.DEFAULT_CHUNK_ELEMENTS


@pytest.mark.parametrize("name", ["fused_linear_qtarget_loss", "fused_linear_target_sft_loss"])
def test_moved_entry_points_warn_and_resolve_to_the_losses(name: str) -> None:
    with pytest.warns(DeprecationWarning, match=f"target_sft.losses.{name}"):
        fn = getattr(K, name)
    assert fn is getattr(L, name)


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        K.no_such_name  # noqa: B018
