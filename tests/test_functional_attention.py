"""functional.attention: the attention-logit maximum against a brute-force loop, output-logit statistics."""

from __future__ import annotations

import pytest
import torch

from lightning_msign.functional import LogitScratch, attention_logit_max, attention_logit_max_per_head
from lightning_msign.functional.attention import causal_allowed, output_logit_stats


def _brute_force(q: torch.Tensor, k: torch.Tensor, scale: float, window=None) -> float:
    """max |q.k| * scale over every (sequence, head, query t, key j) with j <= t (and t - j < window)."""
    B, n_head, T, _ = q.shape
    per_group = n_head // k.shape[1]
    best = 0.0
    for b in range(B):
        for h in range(n_head):
            for t in range(T):
                for j in range(t + 1):
                    if window is not None and t - j >= window:
                        continue
                    best = max(best, abs(float(q[b, h, t] @ k[b, h // per_group, j])) * scale)
    return best


@pytest.mark.parametrize(
    ("n_head", "n_groups", "window"),
    [(4, 4, None), (4, 2, None), (6, 1, None), (4, 2, 3), (2, 2, 1)],
    ids=["mha", "gqa", "mqa", "gqa-window", "window-1"],
)
def test_attention_logit_max_matches_brute_force(n_head, n_groups, window):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, n_head, 7, 5, generator=gen, dtype=torch.float64)
    k = torch.randn(2, n_groups, 7, 5, generator=gen, dtype=torch.float64)
    # the largest |q.k| of all pairs sits on a forbidden one (key after the query): it must not count
    k[1, 0, 5] *= 10.0
    q[1, 0, 2] = 100.0 * k[1, 0, 5]
    result = attention_logit_max(q, k, scale=0.3, window=window)
    assert result.dtype == torch.float64 and result.shape == ()
    assert result.item() == pytest.approx(_brute_force(q, k, 0.3, window), rel=1e-12)
    unmasked = (q.reshape(2, n_groups, -1, 7, 5) @ k[:, :, None].mT).abs().amax().item() * 0.3
    assert result.item() < unmasked


def test_group_of_a_head_is_the_repeat_interleave_order():
    """Head h reads group h // (n_head // n_groups): one large key in group 1 shows only through heads 2, 3."""
    q = torch.zeros(1, 4, 2, 2)
    k = torch.zeros(1, 2, 2, 2)
    k[0, 1, 0] = torch.tensor([10.0, 0.0])
    q[0, 0, 1] = torch.tensor([1.0, 0.0])  # head 0 (group 0): sees a zero key
    assert attention_logit_max(q, k, 1.0).item() == 0.0
    q[0, 3, 1] = torch.tensor([2.0, 0.0])  # head 3 (group 1)
    assert attention_logit_max(q, k, 1.0).item() == 20.0
    expanded = k.repeat_interleave(2, dim=1)
    assert attention_logit_max(q, expanded, 1.0).item() == 20.0  # same as the expanded keys, one group per head


def test_causal_allowed():
    assert causal_allowed(3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert causal_allowed(4, window=2).tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [False, True, True, False],
        [False, False, True, True],
    ]
    assert causal_allowed(3, window=10).equal(causal_allowed(3))


def test_output_logit_stats():
    z = torch.tensor([[3.0, -4.0], [0.0, 0.0]], dtype=torch.bfloat16)
    z_max, z_rms = output_logit_stats(z)
    assert z_max.dtype == z_rms.dtype == torch.float32
    assert z_max.item() == 4.0 and z_rms.item() == pytest.approx(2.5)
    assert output_logit_stats(z.double())[0].dtype == torch.float64


@pytest.mark.parametrize(
    ("q_shape", "k_shape", "window", "match"),
    [
        ((1, 2, 3), (1, 2, 3, 4), None, "4-dimensional.*\\(1, 2, 3\\)"),
        ((1, 4, 3, 4), (1, 3, 3, 4), None, "n_groups dividing n_head.*\\(1, 3, 3, 4\\)"),
        ((1, 2, 3, 4), (1, 2, 5, 4), None, "\\(1, 2, 5, 4\\)"),
        ((1, 2, 3, 4), (1, 2, 3, 4), 0, "window.*0"),
        ((1, 2, 3, 4), (1, 2, 3, 4), True, "window.*True"),
    ],
)
def test_attention_logit_max_argument_checks(q_shape, k_shape, window, match):
    with pytest.raises(ValueError, match=match):
        attention_logit_max(torch.ones(q_shape), torch.ones(k_shape), 1.0, window=window)


def test_a_scratch_gives_the_same_values_and_is_reused():
    scratch, g = LogitScratch(), torch.Generator().manual_seed(0)
    cases = [((2, 4, 9, 8), (2, 4, 9, 8), {}), ((3, 6, 7, 4), (3, 2, 7, 4), {"window": 3}),
             ((1, 4, 5, 4), (1, 1, 6, 4), {"allowed": torch.rand(1, 1, 5, 6, generator=g) > 0.3}),
             ((2, 2, 3, 4), (2, 2, 3, 4), {})]  # fmt: skip
    for q_shape, k_shape, kw in cases:
        q, k = torch.randn(q_shape, generator=g), torch.randn(k_shape, generator=g)
        expected = attention_logit_max_per_head(q, k, 0.3, **kw)
        assert torch.equal(attention_logit_max_per_head(q, k, 0.3, scratch=scratch, **kw), expected)
    largest = max(q[0] * q[1] * q[2] * k[2] for q, k, _ in cases)
    assert scratch._buffer is not None and scratch._buffer.numel() == largest  # kept, grown to the largest once
    q64 = torch.randn(2, 4, 9, 8, dtype=torch.float64, generator=g)
    assert attention_logit_max_per_head(q64, q64, 0.3, scratch=scratch).dtype == torch.float64
