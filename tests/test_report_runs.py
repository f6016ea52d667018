"""Tests for :mod:`lightning_msign.report.runs`: reading a run from CSV or TensorBoard logs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_msign.report import load_run, summarize

from report_logs import synthetic_run, write_csv


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


def test_bad_label_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="`label`"):
        load_run(synthetic_run(tmp_path / "r"), label="")
