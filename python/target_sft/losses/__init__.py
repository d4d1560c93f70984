"""Q-target losses for supervised fine-tuning (PyTorch, CPU and GPU; Triton kernels on GPU).

Every token-level SFT loss drives the model toward a target distribution
``Q_t = γ_t δ_{y_t} + (1 − γ_t) π̃_t`` (§4–5 of *A Unifying Lens on Supervised Fine-Tuning Through
Target Distribution Design*); ``Q = p − ∂L/∂z`` recovers it from any loss (Eq. 6).

* :func:`target_sft_loss` — TARGET-SFT: γ = sg[p_y], π̃ ∝ π_θ^{1−η} π_T^η on the teacher support.
* :class:`QTargetLoss` — the composable framework: a trust choice (:mod:`.trust`) and a residual
  choice (:mod:`.residual`).
* Presets for every token-level row of Table 5 (:mod:`.presets`): :class:`SFT`, :class:`DFT`,
  :class:`BeyondLog`, :class:`ProFiT`, :class:`EAFT`, :class:`IwSFT`, :class:`CFT`,
  :class:`LabelSmoothing`, :class:`SFTKL`, :class:`ASFT`, :class:`ProximalSFT`, :class:`GEM`,
  :class:`KD`, :class:`HybridKD`, :class:`TargetSFT`; and Table 6's ablation
  :class:`TargetSFTConstant` (TARGET-SFT with a constant branch c).
* :func:`induced_target` (Eq. 6) and :func:`induced_target_curve` (Figure 3 data).
* :func:`fused_linear_target_sft_loss` and :func:`fused_linear_qtarget_loss` (:mod:`.fused_linear`):
  the same losses straight from the last hidden states and the LM head, without materialising the
  logits (Triton kernels on CUDA, the chunked PyTorch reference elsewhere; ``docs/KERNELS.md``).
* :class:`LossInputs`: the per-token tensors every loss takes besides logits and labels
  (:data:`LOSS_INPUT_NAMES`, the keyword arguments; :data:`DEPRECATED_INPUT_NAMES`, old names
  still accepted with a warning): teacher and reference top-k, reference / old-policy label
  log-probs, token / sequence weights and ``sequence_ids`` (the sample of each token).

Every loss runs one pipeline (:meth:`QTargetLoss.pipeline`) against a backend (:mod:`.backend`):
materialised logits (PyTorch reference or Triton row kernels) or the fused LM head. The sweeps
themselves and their contract (:class:`StatRequest`, :class:`DenseTerm`, …) live in
:mod:`target_sft.kernels` and are re-exported here.

All losses compute in float32 (float64 for float64 logits), form ``p − Q`` in float32, and
allocate no ``N × V`` tensor besides the logit gradient (see ``docs/LOSSES.md``).
"""

from __future__ import annotations

from ..kernels.contract import (
    DEFAULT_CHUNK_ELEMENTS,
    DEFAULT_CUDA_CHUNK_ELEMENTS,
    DenseTerm,
    FusedLinearBlocks,
    SharpenedSoftmax,
    StatRequest,
)
from ._inputs import DEPRECATED_INPUT_NAMES, LOSS_INPUT_NAMES, LossInputs
from .fused_linear import fused_linear_qtarget_loss, fused_linear_target_sft_loss
from .induced import InducedTargetCurve, induced_target, induced_target_curve, p_loss_closed_form
from .presets import (
    ASFT,
    CFT,
    DFT,
    EAFT,
    GEM,
    KD,
    PRESETS,
    SFT,
    SFTKL,
    BeyondLog,
    HybridKD,
    IwSFT,
    LabelSmoothing,
    ProFiT,
    ProximalSFT,
    TargetSFT,
    TargetSFTConstant,
    get_preset,
)
from .qtarget import QTarget, QTargetLoss, reduce_loss
from .residual import (
    GEMResidual,
    GuidedResidual,
    Residual,
    ResidualParts,
    SelfResidual,
    SparseResidual,
    UniformResidual,
)
from .target_sft import target_sft_loss
from .trust import (
    ClippedRatioTrust,
    ConstantTrust,
    ImportanceWeightTrust,
    ModelProbTrust,
    SequenceWeightTrust,
    ThresholdTrust,
    TokenContext,
    TokenWeightTrust,
    TopKEntropyTrust,
    Trust,
)

__all__ = [
    "ASFT",
    "CFT",
    "DEFAULT_CHUNK_ELEMENTS",
    "DEFAULT_CUDA_CHUNK_ELEMENTS",
    "DEPRECATED_INPUT_NAMES",
    "DFT",
    "EAFT",
    "GEM",
    "KD",
    "LOSS_INPUT_NAMES",
    "PRESETS",
    "SFT",
    "SFTKL",
    "BeyondLog",
    "ClippedRatioTrust",
    "ConstantTrust",
    "DenseTerm",
    "FusedLinearBlocks",
    "GEMResidual",
    "GuidedResidual",
    "HybridKD",
    "ImportanceWeightTrust",
    "InducedTargetCurve",
    "IwSFT",
    "LabelSmoothing",
    "LossInputs",
    "ModelProbTrust",
    "ProFiT",
    "ProximalSFT",
    "QTarget",
    "QTargetLoss",
    "Residual",
    "ResidualParts",
    "SelfResidual",
    "SequenceWeightTrust",
    "SharpenedSoftmax",
    "SparseResidual",
    "StatRequest",
    "TargetSFT",
    "TargetSFTConstant",
    "ThresholdTrust",
    "TokenContext",
    "TokenWeightTrust",
    "TopKEntropyTrust",
    "Trust",
    "UniformResidual",
    "fused_linear_qtarget_loss",
    "fused_linear_target_sft_loss",
    "get_preset",
    "induced_target",
    "induced_target_curve",
    "p_loss_closed_form",
    "reduce_loss",
    "target_sft_loss",
]
