"""Tests for :func:`lightning_msign.functional.lowrank.block_krylov_topk` against the exact SVD."""

from __future__ import annotations

import pytest
import torch

from lightning_msign.functional.lowrank import block_krylov_topk


def matrix_with_spectrum(m: int, n: int, sigma: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, len(sigma), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, len(sigma), generator=g, dtype=torch.float64)).Q
    return U @ torch.diag(sigma) @ V.T


def test_exact_within_the_krylov_space_and_close_with_a_gap():
    sigma = torch.cat([torch.tensor([10.0, 8.0, 6.0, 5.0]), torch.full((60,), 0.1)]).double()
    M = matrix_with_spectrum(96, 80, sigma)
    U, S, V = block_krylov_topk(M, 4, iterations=2, oversample=4)
    torch.testing.assert_close(S, sigma[:4], rtol=1e-6, atol=1e-8)
    # The rank-4 approximation equals the SVD's (singular vectors up to sign).
    Ue, Se, Vhe = torch.linalg.svd(M)
    torch.testing.assert_close(U @ torch.diag(S) @ V.T, Ue[:, :4] @ torch.diag(Se[:4]) @ Vhe[:4], rtol=0, atol=1e-5)
    assert torch.allclose(U.T @ U, torch.eye(4, dtype=U.dtype), atol=1e-10)
    # A matrix of rank <= (q + 1) b: exact for any k.
    low = matrix_with_spectrum(50, 40, torch.linspace(3.0, 1.0, 10).double(), seed=1)
    _, S_low, _ = block_krylov_topk(low, 6, iterations=1, oversample=0)
    torch.testing.assert_close(S_low, torch.linalg.svdvals(low)[:6], rtol=1e-10, atol=1e-10)


def test_krylov_beats_the_plain_range_finder_and_a_warm_start_helps():
    torch.manual_seed(0)
    M = torch.randn(200, 150, dtype=torch.float64) @ torch.diag(torch.linspace(1.0, 0.9, 150).double() ** 20)
    exact = torch.linalg.svdvals(M)[:5]

    def error(**kwargs):
        return float((block_krylov_topk(M, 5, oversample=2, **kwargs)[1] - exact).abs().max() / exact[0])

    assert error(iterations=2) < error(iterations=0) / 5  # measured: 0.039 vs 0.29
    V_true = torch.linalg.svd(M)[2][:5].T
    assert error(iterations=0, start=V_true) < 1e-10  # the start spans the answer: exact with no iteration


def test_dtypes_and_errors():
    M = torch.randn(30, 20).to(torch.bfloat16)
    U, S, V = block_krylov_topk(M, 3)
    assert U.dtype == S.dtype == V.dtype == torch.float32 and U.shape == (30, 3) and V.shape == (20, 3)
    with pytest.raises(ValueError, match="`k`.*0"):
        block_krylov_topk(M, 0)
    with pytest.raises(ValueError, match="`iterations`.*-1"):
        block_krylov_topk(M, 2, iterations=-1)
    with pytest.raises(ValueError, match="`start`.*\\(7, 2\\)"):
        block_krylov_topk(M, 2, start=torch.randn(7, 2))
    with pytest.raises(ValueError, match="matrix"):
        block_krylov_topk(torch.randn(3, 4, 5), 2)
