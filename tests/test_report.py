"""``lightning-msign report``: the log loaders, and a report rendered from two real short runs."""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_data, tiny_module, trainer_kwargs
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image

from lightning_msign import MSignCallback, PSSCallback, StableRankMonitor
from lightning_msign.cli import cli_main
from lightning_msign.report import Run, load_run, render_report, summarize

MAX_STEPS = 8


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-msign"])


# ---------------------------------------------------------------------------------------------- helpers


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def csv_series(rows: list[dict[str, str]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
    return [s for s, _ in pairs], [v for _, v in pairs]


def summary_cells(page: str) -> dict[tuple[int, str], str]:
    """``{(run index, key): text}`` of the summary table (``<details>`` lists unfolded)."""
    cells = {}
    for m in re.finditer(r'<td[^>]*data-run="(\d+)" data-key="([a-z_]+)">(.*?)</td>', page, re.S):
        inner = re.sub(r"<summary>.*?</summary>", "", m.group(3), flags=re.S)
        cells[(int(m.group(1)), m.group(2))] = html.unescape(re.sub(r"<[^>]+>", "", inner)).strip()
    return cells


def steps_of(text: str) -> list[int]:
    return [] if text == "none" else [int(x) for x in text.split(", ")]


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([["" if x is None else x for x in row] for row in rows])
    return path


def synthetic_run(path: Path, n: int = 30, diverge_at: int | None = None, diag: bool = False) -> Path:
    """A CSVLogger-like metrics.csv: one row per ``log_metrics`` call, as Lightning writes them."""
    header = ["epoch", "step", "train/loss", "val/loss", "grad_norm/total", "srank/min", "msign/applications"]
    if diag:
        header += ["diag/attn_logit_max", "diag/jacobian_alignment_max"]
    rows = []
    for step in range(n):
        loss = float("nan") if diverge_at is not None and step >= diverge_at else 5.0 - 0.1 * step
        rows.append([0, step, loss, None, 1.0 + step, 10.0 - 0.2 * step, None] + ([None, None] if diag else []))
        if diag:
            rows.append([None, step, None, None, None, None, None, 2.0 + step, 0.5])
        if step % 10 == 9:
            rows.append([None, step, None, None, None, None, (step + 1) // 10] + ([None, None] if diag else []))
    return write_csv(path / "version_0" / "metrics.csv", header, rows).parent


# ---------------------------------------------------------------------------------------- two real runs


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
        trainer = Trainer(**trainer_kwargs(root / "b", logger=loggers, **common), callbacks=[msign_b, StableRankMonitor()])
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
    printed = capsys.readouterr().out.split()
    png, page_path = out / "report.png", out / "report.html"
    assert printed == [str(png), str(page_path)]

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
    assert steps_of(cells[(0, "pss_trigger_steps")]) == pss_steps == [s - 1 for s in two_runs["pss_a"].guard.trigger_steps]
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
    tb = load_run(two_runs["b_tb"])
    from_csv = load_run(two_runs["b_csv"])
    assert tb.source == "tensorboard" and from_csv.source == "csv"
    assert tb.name == "tb/version_0" and from_csv.name == "tb/version_0"
    for key in ("train/loss", "val/loss", "grad_norm/total", "srank/min", "msign/applications"):
        np.testing.assert_array_equal(tb.metrics[key][0], from_csv.metrics[key][0])
        np.testing.assert_allclose(tb.metrics[key][1], from_csv.metrics[key][1], rtol=1e-6)
    assert summarize(tb)["msign_steps"] == summarize(from_csv)["msign_steps"]


# ---------------------------------------------------------------------------------------------- loaders


def test_csv_sparse_rows_are_merged_per_key(tmp_path):
    path = write_csv(
        tmp_path / "metrics.csv",
        ["epoch", "grad_norm/total", "msign/applications", "step", "train/loss", "val/loss"],
        [
            [None, 3.5, None, 0, None, None],  # a callback's row
            [0, None, None, 0, 5.0, None],  # the Trainer's row of the same step
            [None, 2.5, None, 1, None, None],
            [0, None, None, 1, "nan", None],
            [None, None, 1, 1, None, None],
            [0, None, None, 1, None, 4.5],
            [0, None, None, 2, "inf", None],
            [None, 2.0, None, 2, None, None],
            [None, 9.0, None, 2, None, None],  # logged again at step 2: the later value wins
        ],
    )
    run = load_run(path)
    assert run.source == "csv" and run.name == tmp_path.name
    steps, values = run.metrics["train/loss"]
    assert steps.tolist() == [0, 1, 2] and values[0] == 5.0 and math.isnan(values[1]) and math.isinf(values[2])
    assert run.metrics["grad_norm/total"][0].tolist() == [0, 1, 2]
    assert run.metrics["grad_norm/total"][1].tolist() == [3.5, 2.5, 9.0]
    assert run.metrics["val/loss"][0].tolist() == [1]
    assert "step" not in run.metrics
    assert any("replaced by the later value" in n for n in run.notes)
    summary = summarize(run)
    assert summary["first_nonfinite_loss_step"] == 1
    assert summary["msign_steps"] == [1] and summary["msign_applications"] == 1
    assert summary["pss_trigger_steps"] is None and summary["min_srank"] is None
    assert summary["final_train_loss"] == math.inf and summary["final_val_loss"] == 4.5


def test_tensorboard_event_files_are_read(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    folder = tmp_path / "tb" / "version_2"
    writer = SummaryWriter(str(folder))
    for step in range(5):
        writer.add_scalar("train/loss", 4.0 - step, step)
        writer.add_scalar("pss/triggered", float(step == 3), step)
        writer.add_scalar("srank/min", 1.5 * step, step, new_style=True)  # tensor-valued scalar summaries
    writer.add_histogram("weights", torch.randn(10), 0)  # not a scalar: ignored
    writer.close()
    (event_file,) = folder.glob("events.out.tfevents.*")
    for path in (folder, event_file):
        run = load_run(path)
        assert run.source == "tensorboard" and run.name == "tb/version_2"
        assert set(run.metrics) == {"train/loss", "pss/triggered", "srank/min"}
        assert run.metrics["train/loss"][0].tolist() == [0, 1, 2, 3, 4]
        np.testing.assert_allclose(run.metrics["srank/min"][1], [0, 1.5, 3.0, 4.5, 6.0])
        assert summarize(run)["pss_trigger_steps"] == [3]


def test_parent_folder_takes_the_newest_version_and_says_so(tmp_path):
    for version, loss in ((0, 3.0), (2, 1.0), (10, 7.0)):
        write_csv(tmp_path / "csv" / "exp" / f"version_{version}" / "metrics.csv", ["step", "train/loss"], [[0, loss]])
    run = load_run(tmp_path, label="mine")
    assert run.name == "mine" and run.path.name == "version_10" and run.metrics["train/loss"][1].tolist() == [7.0]
    assert any("read the newest, version_10" in note for note in run.notes)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: p, "holds no run"),
        (lambda p: (p / "notes.txt").write_text("x") and p / "notes.txt", "neither a CSV file"),
        (lambda p: write_csv(p / "metrics.csv", ["loss", "value"], [[1, 2]]), "no 'step' column"),
        (lambda p: write_csv(p / "metrics.csv", ["step", "train/loss"], []), "holds no logged metrics"),
        (
            lambda p: (
                write_csv(p / "csv" / "a" / "version_0" / "metrics.csv", ["step", "x"], [[0, 1]]),
                write_csv(p / "csv" / "b" / "version_0" / "metrics.csv", ["step", "x"], [[0, 1]]),
            )
            and p,
            r"holds 2 runs in 2 places; pass one of them:\n  csv: .*a.version_0\n  csv: .*b.version_0",
        ),
    ],
    ids=["missing", "empty-folder", "other-file", "no-step-column", "no-rows", "two-runs"],
)
def test_bad_paths_are_rejected_clearly(tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        load_run(make(tmp_path))


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="`label`"):
        load_run(synthetic_run(tmp_path / "r"), label="")
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


# ------------------------------------------------------------------------------------- rendering, CLI


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
