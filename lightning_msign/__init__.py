"""lightning_msign: watch and repair the weight spectra of transformers, in any PyTorch training loop.

Public API:

- Guards, usable in any loop (plain PyTorch, Fabric, Lightning): :class:`MSign` (periodic matrix-sign
  restoration of stable rank, arXiv 2602.01734), :class:`PSS` (gradient-spike-triggered smoothing of
  dominant singular values, arXiv 2602.01308), :class:`StableRank` (stable rank and gradient norm),
  :class:`Diagnostics` (attention- and output-logit magnitudes, Jacobian alignment), :class:`Curvature` (Adam's
  preconditioned sharpness and its edge of stability, arXiv 2606.16768), :class:`DepthWarmup` (architecture
  warm-up: part of the blocks first, the rest unlocked in groups, arXiv 2606.16768), :class:`Rollback`
  (snapshots in memory; on a divergence, back to the last good state, repaired), :class:`QKNormRetrofit`
  (qk-norm switched on in a running model when its attention logits run away).
- Lightning callbacks over them: :class:`MSignCallback`, :class:`PSSCallback`, :class:`StableRankMonitor`,
  :class:`DiagnosticsMonitor` (attention- and output-logit magnitudes, Jacobian alignment),
  :class:`CurvatureMonitor`, :class:`DepthWarmupCallback` and :class:`RollbackCallback`.
- :class:`LitGPTModule` and :class:`ShakespeareDataModule`: the embedded default model and corpus.
- :mod:`lightning_msign.optim`: :class:`~lightning_msign.optim.Muon` and :class:`~lightning_msign.optim.NuMuon`
  (rank-k Muon, arXiv 2603.03597), each with AdamW for the non-matrix parameters, as one optimizer.
- :mod:`lightning_msign.functional`: the math on plain tensors; :mod:`lightning_msign.targets` and
  :mod:`lightning_msign.layouts`: which matrices, and how fused weights split.
"""

from lightning_msign import functional, optim
from lightning_msign.callbacks import (
    CurvatureMonitor,
    DepthWarmupCallback,
    DiagnosticsMonitor,
    MSignCallback,
    PSSCallback,
    QKNormRetrofitCallback,
    RollbackCallback,
    StableRankMonitor,
    StepProgressBar,
)
from lightning_msign.data import ShakespeareDataModule
from lightning_msign.guards import (
    PSS,
    Curvature,
    DepthWarmup,
    Diagnostics,
    MSign,
    QKNormRetrofit,
    Rollback,
    StableRank,
)
from lightning_msign.layouts import Layout, parse_layout
from lightning_msign.litgpt_module import LitGPTModule
from lightning_msign.optim import Muon, NuMuon
from lightning_msign.targets import TargetMatrix, resolve_targets

__version__ = "0.1.0"

__all__ = [
    "PSS",
    "Curvature",
    "CurvatureMonitor",
    "DepthWarmup",
    "DepthWarmupCallback",
    "Diagnostics",
    "DiagnosticsMonitor",
    "Layout",
    "LitGPTModule",
    "MSign",
    "MSignCallback",
    "Muon",
    "NuMuon",
    "PSSCallback",
    "QKNormRetrofit",
    "QKNormRetrofitCallback",
    "Rollback",
    "RollbackCallback",
    "ShakespeareDataModule",
    "StableRank",
    "StableRankMonitor",
    "StepProgressBar",
    "TargetMatrix",
    "functional",
    "optim",
    "parse_layout",
    "resolve_targets",
]


def __getattr__(name: str) -> type:  # earlier names of callbacks (lightning_msign.callbacks.RENAMED)
    from lightning_msign.callbacks import renamed

    return renamed(__name__, name)
