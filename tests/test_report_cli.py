"""Tests for :mod:`lightning_msign.report.cli`: ``lightning-msign report`` over two real short runs."""

from __future__ import annotations

import base64
import html
import io
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image

from lightning_msign import MSignCallback, PSSCallback, StableRankMonitor
from lightning_msign.cli import cli_main
from lightning_msign.report import load_run, summarize

from conftest import tiny_data, tiny_module, trainer_kwargs
from report_logs import csv_series, read_csv_rows, steps_of, summary_cells, synthetic_run

MAX_STEPS = 8


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-msign"])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Run A logs to CSV (MSign every 2 steps, PSS forced to trigger, gradient norm only from PSS);
    run B to TensorBoard and CSV (MSign every 3 steps, StableRankMonitor's gradient norm, no PSS)."""
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        common = dict(max_steps=MAX_STEPS, limit_val_batches=2, val_check_interval=4, log_every_n_steps=1)
        seed_everything(0)
        msign_a = MSignCallback(period=2)
        pss_a = PSSCallback(tau=1.01, warmup_steps=2, cooldown_steps=0)
        trainer = Trainer(
            **trainer_kwargs(root / "a", logger=CSVLogger(root / "logs_a", name="pss"), **common),
            callbacks=[msign_a, pss_a, StableRankMonitor(log_grad_norm=False)],
        )
        trainer.fit(tiny_module(), tiny_data())

        seed_everything(1)
        msign_b = MSignCallback(period=3)
        loggers = [TensorBoardLogger(root / "logs_b", name="tb"), CSVLogger(root / "logs_b_csv", name="tb")]
        callbacks = [msign_b, StableRankMonitor()]
        trainer = Trainer(**trainer_kwargs(root / "b", logger=loggers, **common), callbacks=callbacks)
        trainer.fit(tiny_module(), tiny_data())
    finally:
        torch.set_num_threads(threads)
    assert pss_a.guard.trigger_steps, "tau=1.01 after 2 warm-up steps triggers on a tiny model"
    return {
        "root": root,
        "a_parent": root / "logs_a",
        "a_csv": root / "logs_a" / "pss" / "version_0" / "metrics.csv",
        "b_tb": root / "logs_b" / "tb" / "version_0",
        "b_csv": root / "logs_b_csv" / "tb" / "version_0" / "metrics.csv",
        "msign_a": msign_a,
        "pss_a": pss_a,
        "msign_b": msign_b,
    }


def test_report_of_two_real_runs_through_the_cli(two_runs, tmp_path, capsys):
    out = tmp_path / "report"
    cli_main(
        ["report", str(two_runs["a_parent"]), str(two_runs["b_tb"]), "--out", str(out),
         "--label", "A (pss)", "--label", "B (tb)", "--title", "two runs"]
    )
    printed = capsys.readouterr().out.splitlines()
    png, page_path = out / "report.png", out / "report.html"
    assert printed[:2] == [str(png), str(page_path)] and len(printed) == 3
    # The verdict: the last run against the first, from what they logged.
    a, b = (summarize(load_run(p)) for p in (two_runs["a_parent"], two_runs["b_tb"]))
    assert printed[2].startswith("B (tb) vs A (pss): final val loss ")
    assert f"{b['final_val_loss']:.3f} vs {a['final_val_loss']:.3f}" in printed[2]
    assert printed[2].endswith(f"MSign applications {b['msign_applications']} vs {a['msign_applications']}")

    image = Image.open(png)
    image.verify()
    assert image.format == "PNG"
    width, height = image.size
    assert width >= 800 and 600 <= height <= 4000

    page = page_path.read_text(encoding="utf-8")
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == 1 and base64.b64decode(embedded[0]) == png.read_bytes()
    assert not re.search(r"https?://|<script|<link|@import|url\(", page, re.I), "self-contained: nothing fetched"
    assert "<title>two runs</title>" in page
    # panels: the three the runs logged; the diagnostics panels only when some run has their key
    for title in ("Loss", "Gradient norm (pss/grad_norm for A (pss))", "Min stable rank"):
        assert f"<h3>{html.escape(title)}</h3>" in page
    assert "Attention-logit max" not in page and "Jacobian alignment" not in page.replace("max Jacobian alignment", "")

    cells = summary_cells(page)
    assert cells[(0, "label")] == "A (pss)" and cells[(1, "label")] == "B (tb)"
    assert cells[(0, "source")] == "csv" and cells[(1, "source")] == "tensorboard"

    # run A, against its metrics.csv and its callbacks
    rows = read_csv_rows(two_runs["a_csv"])
    msign_steps, counts = csv_series(rows, "msign/applications")
    assert steps_of(cells[(0, "msign_steps")]) == msign_steps == [1, 3, 5, 7]  # after optimizer steps 2, 4, 6, 8
    assert int(cells[(0, "msign_applications")]) == counts[-1] == two_runs["msign_a"].guard.applications == 4
    pss_steps = [s for s, v in zip(*csv_series(rows, "pss/triggered")) if v == 1.0]
    pss_logged = [s - 1 for s in two_runs["pss_a"].guard.trigger_steps]
    assert steps_of(cells[(0, "pss_trigger_steps")]) == pss_steps == pss_logged
    steps, losses = csv_series(rows, "train/loss")
    assert steps[-1] == MAX_STEPS - 1
    assert float(cells[(0, "final_train_loss")]) == pytest.approx(losses[-1], rel=1e-5)
    assert float(cells[(0, "final_val_loss")]) == pytest.approx(csv_series(rows, "val/loss")[1][-1], rel=1e-5)
    assert float(cells[(0, "min_srank")]) == pytest.approx(min(csv_series(rows, "srank/min")[1]), rel=1e-5)
    assert float(cells[(0, "max_grad_norm")]) == pytest.approx(max(csv_series(rows, "pss/grad_norm")[1]), rel=1e-5)
    assert cells[(0, "first_nonfinite_loss_step")] == "—"
    assert cells[(0, "steps")] == f"0–{MAX_STEPS - 1}"

    # run B read from TensorBoard, against the CSV the same run wrote (float32 in the event file)
    rows = read_csv_rows(two_runs["b_csv"])
    msign_steps, counts = csv_series(rows, "msign/applications")
    assert steps_of(cells[(1, "msign_steps")]) == msign_steps == [2, 5]
    assert int(cells[(1, "msign_applications")]) == two_runs["msign_b"].guard.applications == 2
    assert cells[(1, "pss_trigger_steps")] == "—"  # no PSSCallback in run B
    assert float(cells[(1, "final_train_loss")]) == pytest.approx(csv_series(rows, "train/loss")[1][-1], rel=1e-5)
    assert float(cells[(1, "max_grad_norm")]) == pytest.approx(max(csv_series(rows, "grad_norm/total")[1]), rel=1e-5)
    assert cells[(1, "max_attn_logit")] == "—"


def test_tensorboard_reader_matches_csv_of_the_same_run(two_runs):
    """A check of :mod:`lightning_msign.report.runs`, kept beside the fixture whose real runs it reads (built once)."""
    tb = load_run(two_runs["b_tb"])
    from_csv = load_run(two_runs["b_csv"])
    assert tb.source == "tensorboard" and from_csv.source == "csv"
    assert tb.name == "tb/version_0" and from_csv.name == "tb/version_0"
    for key in ("train/loss", "val/loss", "grad_norm/total", "srank/min", "msign/applications"):
        np.testing.assert_array_equal(tb.metrics[key][0], from_csv.metrics[key][0])
        np.testing.assert_allclose(tb.metrics[key][1], from_csv.metrics[key][1], rtol=1e-6)
    assert summarize(tb)["msign_steps"] == summarize(from_csv)["msign_steps"]


def test_report_help_and_errors_exit_with_usage(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["report", "--help"])
    assert info.value.code == 0
    assert "usage: lightning-msign report" in capsys.readouterr().out

    with pytest.raises(SystemExit) as info:
        cli_main(["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    assert "error: `path` does not exist" in capsys.readouterr().err

    run_dir = synthetic_run(tmp_path / "r")
    with pytest.raises(SystemExit) as info:
        cli_main(["report", str(run_dir), str(run_dir), "--label", "x", "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    assert "--label was given 1 times for 2 runs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_python_dash_m_report(tmp_path):
    run_dir = synthetic_run(tmp_path / "exp")
    result = subprocess.run(
        [sys.executable, "-m", "lightning_msign", "report", str(run_dir.parent), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(tmp_path / "out" / "report.png"), str(tmp_path / "out" / "report.html")]
    assert Image.open(io.BytesIO((tmp_path / "out" / "report.png").read_bytes())).format == "PNG"
