"""The working precision of the math: float32 at least, float64 kept; matrix checks name the argument."""

from __future__ import annotations

import pytest
import torch

from lightning_msign.functional import as_compute, check_matrix, compute_dtype


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.float32),
     (torch.float64, torch.float64)],
)
def test_compute_dtype_is_float32_at_least(dtype, expected):
    W = torch.ones(2, 2, dtype=dtype)
    assert compute_dtype(W) == expected and as_compute(W).dtype == expected


def test_check_matrix_names_the_argument_and_value():
    with pytest.raises(ValueError, match=r"`X` must have at least 2 dimensions.*\(3,\)"):
        check_matrix(torch.ones(3), "X")
    with pytest.raises(ValueError, match=r"`W` must be a floating-point tensor.*torch.int64"):
        check_matrix(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="list"):
        check_matrix([[1.0]])
