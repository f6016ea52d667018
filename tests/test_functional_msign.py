"""Matrix-sign backends against the exact SVD reference, and the MSign restore step."""

from __future__ import annotations

import pytest
import torch

from lightning_msign.functional import msign, msign_restore
from lightning_msign.functional.msign import BACKENDS


def _with_spectrum(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A float64 m x n matrix with prescribed singular values ``s`` (len <= min(m, n))."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return U @ torch.diag(s.double()) @ V.T


def _col_projector(A: torch.Tensor, rank: int) -> torch.Tensor:
    U = torch.linalg.svd(A.double(), full_matrices=False)[0][:, :rank]
    return U @ U.T


@pytest.mark.parametrize("shape", [(64, 64), (96, 48), (40, 120), (3, 24, 16)])
def test_svd_backend_gives_unit_singular_values(shape):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    S_ = msign(W, "svd")
    assert S_.shape == W.shape and S_.dtype == W.dtype
    s = torch.linalg.svdvals(S_.double())
    torch.testing.assert_close(s, torch.ones_like(s), atol=1e-5, rtol=0)


def test_svd_backend_keeps_row_and_column_spaces_of_rank_deficient_matrix():
    W = _with_spectrum(50, 30, torch.tensor([5.0, 2.0, 1.0, 0.1])).float()  # rank 4
    S_ = msign(W, "svd")
    s = torch.linalg.svdvals(S_.double())
    torch.testing.assert_close(s[:4], torch.ones(4, dtype=torch.float64), atol=1e-5, rtol=0)
    assert s[4:].max() < 1e-5  # the sign of a zero singular value is zero: no new directions
    torch.testing.assert_close(_col_projector(S_, 4), _col_projector(W, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(_col_projector(S_.T, 4), _col_projector(W.T, 4), atol=1e-5, rtol=0)


def test_svd_backend_matches_polar_factor_definition():
    W = torch.randn(32, 20, dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(msign(W, "svd"), U @ Vh, atol=1e-10, rtol=0)


@pytest.mark.parametrize(("steps", "threshold"), [(8, 4.1e-4), (10, 1.2e-4), (12, 3.4e-5)])
def test_polar_express_meets_documented_bound(steps, threshold):
    # singular values from 1 down to just above the documented threshold (relative to ||W||_F)
    s = torch.logspace(0, -3, 24, dtype=torch.float64)
    s = s / s.norm()  # ||W||_F = 1 so sigma / ||W||_F = s
    s[-1] = threshold * 1.05
    W = _with_spectrum(48, 32, s).float()
    out = torch.linalg.svdvals(msign(W, "polar_express", steps=steps).double())[: len(s)]
    assert (out - 1).abs().max() < 1e-3 + 1e-4  # documented 1e-3, plus float32 rounding


def test_polar_express_close_to_svd_and_leaves_tiny_values_below_one():
    s = torch.cat([torch.linspace(1.0, 0.05, 20), torch.full((4,), 1e-7)]).double()
    W = _with_spectrum(40, 30, s).float()
    ref = msign(W, "svd")
    out = msign(W, "polar_express")
    sv = torch.linalg.svdvals(out.double())
    assert sv.max() <= 1 + 1e-4
    assert (sv[:20] - 1).abs().max() < 1e-3
    assert sv[20:24].max() < 0.5  # not lifted to one: noise-level directions are not amplified
    # against svd the only difference is in those tiny directions (svd lifts them to one)
    assert (out - ref).norm() / ref.norm() < 0.5


def test_newton_schulz_lands_in_documented_band_and_is_not_exact():
    s = torch.logspace(0, -2, 16, dtype=torch.float64)
    W = _with_spectrum(48, 32, s / s.norm()).float()
    out = torch.linalg.svdvals(msign(W, "newton_schulz").double())[:16]
    assert out.min() >= 0.68 - 1e-3 and out.max() <= 1.21
    assert (out - 1).abs().max() > 0.05  # what Muon returns is not the sign


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_msign_restore_keeps_frobenius_norm_and_dtype(backend, dtype):
    W = (torch.randn(3, 24, 40) * 0.02 + torch.randn(3, 24, 1) @ torch.randn(3, 1, 40)).to(dtype)
    out = msign_restore(W, backend)
    assert out.dtype == dtype and out.shape == W.shape
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(
        torch.linalg.matrix_norm(out.double()), torch.linalg.matrix_norm(W.double()), rtol=tol, atol=0
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_msign_raises_stable_rank_of_collapsed_matrix(backend):
    from lightning_msign.functional import stable_rank

    # a collapsed attention-like weight: one dominant direction over init-scale noise
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(64, 1, generator=g), dim=0)
    v = torch.nn.functional.normalize(torch.randn(1, 64, generator=g), dim=1)
    W = 0.02 * torch.randn(64, 64, generator=g) + 2 * u @ v
    assert stable_rank(W) < 1.5
    # exact and Polar Express flatten the spectrum; Muon's iteration leaves S' in [0.68, 1.21] above
    # ~1e-2 ||W||_F and shrinks the smallest noise directions, so it lifts less (measured ~36 of 64)
    assert stable_rank(msign_restore(W, backend)) > (20 if backend == "newton_schulz" else 60)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_matrix_maps_to_zero(backend):
    Z = torch.zeros(8, 5)
    assert torch.equal(msign(Z, backend), Z)
    assert torch.equal(msign_restore(Z, backend), Z)


def test_svd_exact_restore_equals_frobenius_over_sqrt_rank():
    W = _with_spectrum(20, 12, torch.tensor([3.0, 2.0, 1.0])).float()
    out = msign_restore(W, "svd")
    s = torch.linalg.svdvals(out.double())
    expected = W.double().norm() / 3**0.5
    torch.testing.assert_close(s[:3], torch.full((3,), float(expected), dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backend": "eig"}, "backend"),
        ({"backend": "svd", "steps": 3}, "steps"),
        ({"backend": "polar_express", "steps": 0}, "steps"),
        ({"backend": "newton_schulz", "steps": 2.5}, "steps"),
    ],
)
def test_bad_arguments_raise_value_error_naming_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        msign(torch.randn(4, 4), **kwargs)


def test_vector_input_raises():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        msign(torch.randn(5))


def test_svd_failure_is_retried_in_float64_then_falls_back(monkeypatch):
    """LAPACK's gesdd sometimes fails on repeated singular values; a run must not die of it."""
    real_svd = torch.linalg.svd
    calls = []

    def flaky_svd(X, *args, fail_float64=False, **kwargs):
        calls.append(X.dtype)
        if X.dtype == torch.float32 or fail_float64:
            raise torch.linalg.LinAlgError("linalg.svd: too many repeated singular values")
        return real_svd(X, *args, **kwargs)

    W = torch.randn(24, 16)
    expected = msign(W, "svd")
    monkeypatch.setattr(torch.linalg, "svd", flaky_svd)
    out = msign(W, "svd")
    assert calls == [torch.float32, torch.float64] and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)

    monkeypatch.setattr(torch.linalg, "svd", lambda X, *a, **k: flaky_svd(X, *a, fail_float64=True, **k))
    with pytest.warns(RuntimeWarning, match="Polar Express"):
        out = msign(W, "svd")
    s = torch.linalg.svdvals(out.double())
    torch.testing.assert_close(s, torch.ones_like(s), atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", ["svd", "polar_express", "newton_schulz"])
def test_sign_and_restore_matches_the_reference_and_masks_nonfinite(backend):
    from lightning_msign.functional import sign_and_restore, stable_rank

    gen = torch.Generator().manual_seed(3)
    X = torch.randn(4, 12, 7, generator=gen)
    X[1, 2, 3] = float("nan")
    X[2] = 0.0
    out = sign_and_restore(X, backend)
    assert out.written.tolist() == [True, False, True, True]
    for i in (0, 3):  # the reference: msign_restore of each matrix alone, and exact stable ranks
        torch.testing.assert_close(out.matrices[i], msign_restore(X[i], backend), rtol=1e-4, atol=1e-5)
        assert out.srank_before[i].item() == pytest.approx(stable_rank(X[i]).item(), rel=1e-5)
        assert out.srank_after[i].item() == pytest.approx(stable_rank(out.matrices[i]).item(), rel=1e-3)
    assert torch.equal(out.matrices[1].isnan(), X[1].isnan())  # returned as it was: never a fresh NaN
    assert torch.equal(out.matrices[2], X[2])  # a zero matrix stays zero
    assert out.srank_before[1] == 0 and out.srank_after[1] == 0
    none = sign_and_restore(X, backend, stable_ranks=False)
    assert torch.equal(none.srank_before, torch.zeros(4))
    torch.testing.assert_close(none.matrices, out.matrices, rtol=0, atol=0, equal_nan=True)


def test_sign_and_restore_svd_reuses_its_singular_values_exactly():
    from lightning_msign.functional import sign_and_restore

    gen = torch.Generator().manual_seed(4)
    low_rank = torch.randn(2, 16, 3, generator=gen, dtype=torch.float64) @ torch.randn(2, 3, 10, generator=gen,
                                                                                         dtype=torch.float64)
    out = sign_and_restore(low_rank, "svd")
    assert out.srank_after.tolist() == [3.0, 3.0]  # rank 3: the sign keeps three unit singular values
    s = torch.linalg.svdvals(out.matrices)
    assert torch.allclose(s[:, :3], s[:, :1].expand(-1, 3)) and bool((s[:, 3:] < 1e-10).all())


def test_sign_and_restore_rejects_unbatched_input():
    from lightning_msign.functional import sign_and_restore

    with pytest.raises(ValueError, match=r"batch \(G, m, n\)"):
        sign_and_restore(torch.randn(4, 4))
