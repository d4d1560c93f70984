"""Deprecated path of :mod:`target_sft.testing.synthetic` (synthetic teacher top-k data).

The generator moved to the ``target_sft.testing`` subpackage (test and benchmark helpers). This
module only re-exports its public names and warns; import ``target_sft.testing.synthetic``
instead. It will be removed in a later release.
"""

from __future__ import annotations

import warnings

from target_sft.testing import synthetic as _synthetic
from target_sft.testing.synthetic import *  # noqa: F403  (exactly its public names)

warnings.warn(
    "target_sft.synthetic moved to target_sft.testing.synthetic; import it from there "
    "(the old path will be removed in a later release)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = list(_synthetic.__all__)
