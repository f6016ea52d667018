"""Optimizers: Muon and NuMuon (rank-k Muon), with AdamW for the non-matrix parameters, as one optimizer each."""

from lightning_msign.optim.numuon import Muon, NuMuon, muon_param_groups, rank_fraction_at, rank_of

__all__ = ["Muon", "NuMuon", "muon_param_groups", "rank_fraction_at", "rank_of"]
