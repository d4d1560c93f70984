"""The cache builder's documented path: ``from target_sft.build import build_teacher_cache, ...``.

The builder lives in the package :mod:`target_sft.builder` (a folder named ``build/`` is where
packaging tools and common ignore lists put build output); this module hands on its public names.
"""

from target_sft import builder as _builder
from target_sft.builder import *  # noqa: F403  (exactly the builder's public names)

__all__ = list(_builder.__all__)
