"""Tests for :mod:`lightning_msign.report.render`: the figure and the page drawn from runs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lightning_msign.report import Run, load_run, render_report

from report_logs import steps_of, summary_cells, synthetic_run


def test_diagnostics_panels_name_the_runs_that_lack_them_and_divergence_is_marked(tmp_path):
    healthy = load_run(synthetic_run(tmp_path / "healthy", diag=True), label="healthy")
    diverged = load_run(synthetic_run(tmp_path / "diverged", diverge_at=17), label="diverged")
    png, page_path = render_report([healthy, diverged], tmp_path / "out", title="t")
    page = page_path.read_text(encoding="utf-8")
    assert "<h3>Attention-logit max (no diag/attn_logit_max: diverged)</h3>" in page
    assert "<h3>Jacobian alignment (no diag/jacobian_alignment_max: diverged)</h3>" in page
    cells = summary_cells(page)
    assert cells[(0, "max_attn_logit")] == "31" and cells[(1, "max_attn_logit")] == "—"
    assert cells[(0, "first_nonfinite_loss_step")] == "—" and cells[(1, "first_nonfinite_loss_step")] == "17"
    assert cells[(1, "final_train_loss")] == "nan"
    assert steps_of(cells[(0, "msign_steps")]) == [9, 19, 29] and cells[(0, "msign_applications")] == "3"
    width, height = Image.open(png).size
    assert height > width * 0.9  # five panels stacked


def test_render_report_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="`runs`"):
        render_report([], tmp_path / "out")
    with pytest.raises(ValueError, match="`runs` must hold Run"):
        render_report(["not a run"], tmp_path / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="`out_dir`"):
        render_report([load_run(synthetic_run(tmp_path / "r"))], tmp_path / "file")
    lr_only = Run("lr", tmp_path, "csv", {"lr/weights": (np.array([0]), np.array([1e-3]))})
    with pytest.raises(ValueError, match="logged none of the report's keys"):
        render_report([lr_only], tmp_path / "out")
