"""Tests for :mod:`lightning_msign.report.summary`: the numbers of the summary table."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from lightning_msign.report import Run, summarize


def make_run(**metrics: tuple[list[int], list[float]]) -> Run:
    """A run from ``key=(steps, values)``, keys spelled with ``__`` for ``/`` (``train__loss``)."""
    series = {
        key.replace("__", "/"): (np.asarray(s, dtype=np.int64), np.asarray(v, dtype=np.float64))
        for key, (s, v) in metrics.items()
    }
    return Run("r", Path("r"), "csv", series)


def test_events_and_extremes():
    run = make_run(
        train__loss=([0, 1, 2, 3], [5.0, 4.0, 3.0, 2.5]),
        val__loss=([1, 3], [4.5, math.inf]),
        srank__min=([0, 2], [9.0, float("nan")]),
        pss__grad_norm=([0, 1, 2, 3], [1.0, 7.0, float("inf"), 2.0]),
        pss__triggered=([0, 1, 2, 3], [0.0, 1.0, 0.0, 1.0]),
        msign__applications=([1, 3], [5.0, 6.0]),  # a resumed run: the count continues from its checkpoint
        diag__output_logit_max=([0, 2], [3.0, 4.0]),
    )
    summary = summarize(run)
    assert (summary["first_step"], summary["last_step"]) == (0, 3)
    assert summary["final_train_loss"] == 2.5 and summary["final_val_loss"] == math.inf
    assert summary["first_nonfinite_loss_step"] == 3
    assert summary["min_srank"] == 9.0  # finite values only
    assert summary["grad_norm_key"] == "pss/grad_norm" and summary["max_grad_norm"] == 7.0  # the fallback key
    assert summary["pss_trigger_steps"] == [1, 3]
    assert summary["msign_steps"] == [1, 3] and summary["msign_applications"] == 6  # the last logged count
    assert summary["max_output_logit"] == 4.0
    assert summary["max_attn_logit"] is None and summary["max_jacobian_alignment"] is None


def test_first_key_of_the_gradient_norm_panel_wins_and_missing_keys_are_none():
    run = make_run(
        grad_norm__total=([0, 1], [3.0, 2.0]), pss__grad_norm=([0, 1], [30.0, 20.0]), epoch=([0, 1], [0.0, 0.0])
    )
    summary = summarize(run)
    assert summary["grad_norm_key"] == "grad_norm/total" and summary["max_grad_norm"] == 3.0
    for key in ("final_train_loss", "final_val_loss", "first_nonfinite_loss_step", "min_srank", "msign_steps",
                "msign_applications", "pss_trigger_steps"):
        assert summary[key] is None, key
    with pytest.raises(ValueError, match="`run` must be a Run"):
        summarize({"train/loss": ([0], [1.0])})


def test_curvature_and_unlock_steps(tmp_path):
    from lightning_msign.report import render_report

    run = make_run(
        train__loss=([0, 1, 2, 3, 4, 5], [5.0, 4.0, 3.0, 2.5, 2.4, 2.3]),
        curvature__stability_ratio=([1, 3, 5], [0.2, 1.7, float("nan")]),
        warmup__active_blocks=([0, 1, 2, 3, 4, 5], [2.0, 2.0, 3.0, 3.0, 4.0, 4.0]),
        warmup__unlocked=([2, 4], [1.0, 1.0]),
    )
    summary = summarize(run)
    assert summary["max_stability_ratio"] == 1.7 and summary["unlock_steps"] == [2, 4]
    assert summarize(make_run(train__loss=([0], [1.0])))["unlock_steps"] is None
    png_path, html_path = render_report([run], tmp_path / "out")
    assert png_path.stat().st_size > 10_000
    page = Path(html_path).read_text(encoding="utf-8")
    for title in ("Curvature / edge of stability", "Active blocks", "block unlock steps"):
        assert title in page


def test_verdict_compares_the_last_run_with_the_first(tmp_path):
    from lightning_msign.report import load_run, verdict

    from report_logs import synthetic_run

    calm = load_run(synthetic_run(tmp_path / "calm", n=30, diag=True), label="guarded")
    failed = load_run(synthetic_run(tmp_path / "failed", n=30, diverge_at=20, diag=True), label="unguarded")
    # train losses only (no val/loss logged): the last finite-or-not values, the logits' maxima, the counts
    assert verdict([failed, calm]) == (
        "guarded vs unguarded: final train loss 2.1 vs nan; largest attention logit 31 vs 31; MSign applications 3 vs 3"
    )
    assert verdict([calm, calm]).startswith("guarded vs guarded: final train loss 2.100 vs 2.100 (the same)")
    with pytest.raises(ValueError, match="at least two runs"):
        verdict([calm])
