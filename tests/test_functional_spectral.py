"""Stable rank, exact and by warm-started power iteration."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_msign.functional import initial_vector, spectral_norm_estimate, stable_rank, stable_rank_estimate


def test_stable_rank_of_known_matrices():
    assert stable_rank(torch.eye(7)).item() == pytest.approx(7.0)
    rank_one = torch.randn(9, 1) @ torch.randn(1, 6)
    assert stable_rank(rank_one).item() == pytest.approx(1.0, rel=1e-5)
    d = torch.tensor([4.0, 2.0, 1.0])
    assert stable_rank(torch.diag(d)).item() == pytest.approx(float((d**2).sum() / 16), rel=1e-6)
    assert stable_rank(torch.zeros(3, 4)).item() == 0.0


def test_stable_rank_is_batched_and_float32_for_bf16():
    W = torch.randn(5, 8, 6).bfloat16()
    out = stable_rank(W)
    assert out.shape == (5,) and out.dtype == torch.float32
    assert torch.all(out >= 1) and torch.all(out <= 6 + 1e-4)


def test_power_iteration_converges_to_exact_spectral_norm():
    W = torch.randn(60, 40, dtype=torch.float64)
    exact = torch.linalg.matrix_norm(W, ord=2)
    sigma, v = spectral_norm_estimate(W, num_iters=300)
    assert sigma.item() == pytest.approx(exact.item(), rel=1e-6)
    assert sigma.item() <= exact.item() * (1 + 1e-12)  # a lower bound
    assert v.shape == (40,) and v.norm().item() == pytest.approx(1.0)


def test_power_iteration_warm_start_tracks_a_slowly_moving_matrix():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 48, generator=g) + 3 * torch.randn(64, 1, generator=g) @ torch.randn(1, 48, generator=g)
    _, v = spectral_norm_estimate(W, num_iters=30)
    for _ in range(20):  # small training-like perturbations, one iteration each from the previous vector
        W = W + 0.01 * torch.randn(64, 48, generator=g)
        sigma, v = spectral_norm_estimate(W, v, num_iters=1)
        exact = torch.linalg.matrix_norm(W, ord=2)
        assert sigma.item() == pytest.approx(exact.item(), rel=1e-3)
    cold, _ = spectral_norm_estimate(W, None, num_iters=1)
    assert cold.item() < sigma.item()  # a single cold iteration is worse than a warm one


def test_stable_rank_estimate_upper_bounds_and_converges():
    W = torch.randn(32, 32) @ torch.diag(torch.linspace(1, 0.1, 32))
    exact = stable_rank(W).item()
    rough, v = stable_rank_estimate(W, num_iters=2)
    assert rough.item() >= exact * (1 - 1e-5)
    fine, _ = stable_rank_estimate(W, v, num_iters=200)
    assert fine.item() == pytest.approx(exact, rel=1e-4)


def test_batched_power_iteration_and_deterministic_start():
    W = torch.randn(4, 10, 7)
    sigma, v = spectral_norm_estimate(W, num_iters=100)
    torch.testing.assert_close(sigma, torch.linalg.matrix_norm(W, ord=2), rtol=1e-4, atol=0)
    assert v.shape == (4, 7)
    torch.testing.assert_close(initial_vector(W), initial_vector(W))


def test_bad_arguments():
    W = torch.randn(5, 4)
    with pytest.raises(ValueError, match="num_iters"):
        spectral_norm_estimate(W, num_iters=0)
    with pytest.raises(ValueError, match="`v` must have shape"):
        spectral_norm_estimate(W, torch.randn(5))


def test_spectral_norm_from_stable_rank_is_sigma_1():
    from lightning_msign.functional import spectral_norm_from_stable_rank

    W = torch.randn(9, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fro, srank = float(torch.linalg.matrix_norm(W)), float(stable_rank(W))
    assert spectral_norm_from_stable_rank(fro, srank) == pytest.approx(float(torch.linalg.matrix_norm(W, ord=2)))
    assert spectral_norm_from_stable_rank(0.0, 0.0) == 0.0
    assert math.isnan(spectral_norm_from_stable_rank(float("nan"), float("nan")))


def test_nonfinite_matrices_read_nan_never_zero():
    from lightning_msign.functional import finite_matrices

    W = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(2))
    W[1, 2, 2] = float("nan")
    W[2, 0, 0] = float("inf")
    assert finite_matrices(W).tolist() == [True, False, False]
    srank, _ = stable_rank_estimate(W, None, 5)
    assert math.isfinite(srank[0].item()) and math.isnan(srank[1].item()) and not math.isfinite(srank[2].item())
    assert stable_rank(torch.zeros(4, 4)).item() == 0.0 and stable_rank_estimate(torch.zeros(4, 4))[0].item() == 0.0
