"""Smoothing functions and the PSS reparameterization (functional/smoothing.py) against exact references."""

from __future__ import annotations

import pytest
import torch

from lightning_msign.functional import (
    SMOOTHINGS,
    protection_seed,
    pss_rank,
    pss_smooth,
    smooth_singular_values,
    stable_rank,
    top_singular_triplets,
)


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_smoothing_functions_keep_order_sign_and_reduce_dominance(smoothing):
    g = torch.Generator().manual_seed(0)
    for k in (2, 3, 7, 40):
        for _ in range(20):
            sigma = torch.rand(k, generator=g, dtype=torch.float64).pow(3).sort(descending=True).values * 10
            f = smooth_singular_values(sigma, smoothing)
            assert torch.all(f >= 0)
            assert torch.all(f[:-1] >= f[1:] - 1e-12)  # order kept
            assert f[0] <= sigma[0] + 1e-12
            assert f[0] / f.sum() <= sigma[0] / sigma.sum() + 1e-12  # sigma_1's share never grows
            if smoothing != "conv":  # conv may raise sigma_1 / sigma_2 while lowering sigma_1's share
                assert torch.all(f[0] / f <= sigma[0] / sigma + 1e-9)
            if smoothing in ("conv", "softmax"):
                torch.testing.assert_close(f.sum(), sigma.sum())
    strongly_dominated = torch.tensor([100.0, 1.0, 0.5], dtype=torch.float64)
    f = smooth_singular_values(strongly_dominated, smoothing)
    assert f[0] / f.sum() < 0.9 * (100.0 / 101.5)


def test_pss_smooth_leaves_the_tail_and_hits_target_values():
    g = torch.Generator().manual_seed(1)
    W = 0.02 * torch.randn(48, 32, generator=g) + torch.randn(48, 2, generator=g) @ torch.randn(2, 32, generator=g)
    W_star, sigma, new = pss_smooth(W, 2, "softmax")
    torch.testing.assert_close(sigma, torch.linalg.svdvals(W)[:2], rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.linalg.svdvals(W_star)[:2], new, rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.linalg.svdvals(W_star)[2:], torch.linalg.svdvals(W)[2:], rtol=1e-4, atol=1e-6)
    U, S, V = top_singular_triplets(W, 3)
    assert U.shape == (48, 3) and S.shape == (3,) and V.shape == (32, 3)


def test_pss_smooth_changes_nothing_outside_found_directions():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(40, 30, generator=g)  # no spectral gap: the found directions are approximate
    U, _, V = top_singular_triplets(W, 4, power_iters=1, seed=5)
    W_star, _, _ = pss_smooth(W, 4, "conv", power_iters=1, seed=5)
    delta = (W_star - W).double()
    P_u = torch.eye(40, dtype=torch.float64) - U.double() @ U.double().T
    P_v = torch.eye(30, dtype=torch.float64) - V.double() @ V.double().T
    assert delta.norm() > 1e-2
    assert (P_u @ delta).norm() < 1e-5 and (delta @ P_v).norm() < 1e-5


def test_pss_rank_is_floor_of_stable_rank_at_least_two_and_capped():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(40, 30, generator=gen, dtype=torch.float64)
    sigma_1 = torch.linalg.matrix_norm(W, ord=2)
    k = int(torch.floor(stable_rank(W)))
    assert pss_rank(W, sigma_1) == max(2, k)
    assert pss_rank(W, sigma_1, max_rank=3) == min(max(2, k), 3)
    rank_one = torch.outer(torch.randn(40, generator=gen), torch.randn(30, generator=gen))
    assert pss_rank(rank_one, torch.linalg.matrix_norm(rank_one, ord=2)) == 2  # srank 1: two values kept
    assert pss_rank(torch.zeros(5, 4), 0.0) == 2


def test_protection_seed_depends_only_on_the_counts():
    seeds = {protection_seed(p, i) for p in range(1, 6) for i in range(50)}
    assert len(seeds) == 5 * 50  # distinct for every (protection, target) of a run of this size
