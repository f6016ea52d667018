"""Tests for :mod:`lightning_msign.report.figure`: room for the event lanes."""

from __future__ import annotations

import math

import pytest

from lightning_msign.report.figure import _widen


@pytest.mark.parametrize("log", [False, True])
def test_widen_leaves_the_lane_fractions_free(log):
    data = (1.0, 100.0) if log else (-2.0, 8.0)
    lo, hi = _widen(data, bottom=0.2, top=0.1, log=log)
    scale = math.log10 if log else (lambda x: x)
    span = scale(hi) - scale(lo)
    assert (scale(data[0]) - scale(lo)) / span == pytest.approx(0.2)
    assert (scale(hi) - scale(data[1])) / span == pytest.approx(0.1)
    assert _widen(data, 0.0, 0.0, log) == pytest.approx(data)
