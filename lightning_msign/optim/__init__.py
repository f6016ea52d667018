"""Optimizers: Muon and NuMuon (rank-k Muon), with AdamW for the non-matrix parameters, as one optimizer each.

``numuon``: the optimizers; ``groups``: their param groups built from a model; ``schedule``: NuMuon's rank schedule
and the per-matrix learning-rate scale.
"""

from lightning_msign.optim.groups import muon_param_groups
from lightning_msign.optim.numuon import Muon, NuMuon
from lightning_msign.optim.schedule import rank_fraction_at, rank_of

__all__ = ["Muon", "NuMuon", "muon_param_groups", "rank_fraction_at", "rank_of"]
