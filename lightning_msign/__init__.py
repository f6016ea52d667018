"""lightning_msign: Lightning callbacks that watch and repair the weight spectra of transformers.

Public API:

- :class:`MSignCallback`: periodic matrix-sign restoration of stable rank (arXiv 2602.01734).
- :class:`PSSCallback`: gradient-spike-triggered smoothing of dominant singular values (arXiv 2602.01308).
- :class:`StableRankMonitor`: per-step stable rank of weight matrices and the gradient norm.
- :class:`DiagnosticsMonitor`: attention-logit and output-logit magnitudes and the alignment of adjacent
  blocks' Jacobians, to tell which failure mode a run is in.
- :class:`LitGPTModule`: a LightningModule around ``litgpt.GPT`` with the options of the papers'
  failure setups; :class:`ShakespeareDataModule`: the shipped corpus (or any text), no network.
- :mod:`lightning_msign.functional`: the math on plain tensors (matrix sign backends, stable rank,
  power iteration); :mod:`lightning_msign.targets`: which matrices a callback acts on.
"""

from lightning_msign import functional
from lightning_msign.callbacks import DiagnosticsMonitor, MSignCallback, PSSCallback, StableRankMonitor
from lightning_msign.data import ShakespeareDataModule
from lightning_msign.litgpt_module import LitGPTModule
from lightning_msign.targets import TargetMatrix, resolve_targets

__version__ = "0.1.0"

__all__ = [
    "DiagnosticsMonitor",
    "LitGPTModule",
    "MSignCallback",
    "PSSCallback",
    "ShakespeareDataModule",
    "StableRankMonitor",
    "TargetMatrix",
    "functional",
    "resolve_targets",
]
