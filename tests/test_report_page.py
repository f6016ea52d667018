"""Tests for :mod:`lightning_msign.report.page`: the text of the page's cells and its summary columns."""

from __future__ import annotations

import math

import numpy as np

from lightning_msign.report import Run
from lightning_msign.report.page import _SUMMARY_COLUMNS, _fmt
from lightning_msign.report.summary import summarize


def test_cell_text():
    assert _fmt(None) == "—" and _fmt(True) == "True" and _fmt(np.int64(7)) == "7"
    assert _fmt(math.nan) == "nan" and _fmt(math.inf) == "inf" and _fmt(-math.inf) == "-inf"
    assert _fmt(1 / 3) == "0.333333" and _fmt(123456789.0) == "1.23457e+08"
    assert _fmt([]) == "none" and _fmt([1, 5, 9]) == "1, 5, 9"


def test_summary_columns_are_summary_entries(tmp_path):
    run = Run("r", tmp_path, "csv", {"train/loss": (np.array([0]), np.array([1.0]))})
    entries = set(summarize(run)) | {"steps"}  # "steps" shows first_step–last_step
    assert {key for key, _ in _SUMMARY_COLUMNS} <= entries
    assert dict(_SUMMARY_COLUMNS)["final_train_loss"] == "final train/loss"
