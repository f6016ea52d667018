"""StableRankMonitor: logged keys and values through real loggers."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from lightning_msign import MSignCallback, StableRankMonitor
from lightning_msign.functional import stable_rank

from conftest import RecordingLogger, tiny_data, tiny_module, trainer_kwargs


def test_logs_every_target_summaries_and_grad_norm_on_its_steps(tmp_path):
    seed_everything(0)
    logger = RecordingLogger()
    monitor = StableRankMonitor(every_n_steps=2)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=6, accumulate_grad_batches=2, logger=logger),
                      callbacks=[monitor])
    module = tiny_module()
    trainer.fit(module, tiny_data())
    # after optimizer steps 2, 4, 6 -> Lightning's step indices 1, 3, 5 (one row per optimizer step)
    assert logger.steps_with("srank/min") == [1, 3, 5]
    assert logger.steps_with("grad_norm/total") == [1, 3, 5]
    names = [f"srank/{t.name}" for t in monitor.guard.matrices]
    assert len(names) == 2 * (4 + 2)  # per layer: q, k, v, attn proj, mlp fc, mlp proj
    last = next(m for _, m in reversed(logger.records) if "srank/min" in m)
    assert set(names) <= set(last)
    per_matrix = torch.tensor([last[n] for n in names])
    assert last["srank/min"] == pytest.approx(per_matrix.min().item(), rel=1e-6)
    assert last["srank/mean"] == pytest.approx(per_matrix.mean().item(), rel=1e-5)
    # the warm-started estimate is an upper bound of the exact stable rank; near init (nearly equal top
    # singular values, weights moving fast; here one iteration every 2 steps) a few matrices read up to
    # ~40% high (42% measured for one, with the resumable sampler's data order), and most are tight
    errors = []
    for t in monitor.guard.matrices:
        exact = stable_rank(t.matrix()).item()
        got = last[f"srank/{t.name}"]
        assert exact * (1 - 1e-4) <= got <= exact * 1.5, t.name
        errors.append(got / exact - 1)
    assert sorted(errors)[len(errors) // 2] < 0.1  # 6.3% measured here
    assert all(v > 0 for v in logger.values("grad_norm/total"))


def test_grad_norm_is_before_clipping(tmp_path):
    seed_everything(0)
    logger = RecordingLogger()
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=3, logger=logger, gradient_clip_val=1e-6),
                      callbacks=[StableRankMonitor(targets="attention")])
    trainer.fit(tiny_module(), tiny_data())
    assert min(logger.values("grad_norm/total")) > 1e-3  # clipping to 1e-6 happens after it is read


def test_exact_mode_and_summaries_only(tmp_path):
    seed_everything(0)
    logger = RecordingLogger()
    monitor = StableRankMonitor(targets="qk", mode="exact", log_per_matrix=False, log_grad_norm=False)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=2, logger=logger), callbacks=[monitor])
    trainer.fit(tiny_module(), tiny_data())
    keys = {k for _, m in logger.records for k in m}
    assert {"srank/min", "srank/mean"} <= keys
    assert not any(k.startswith("srank/model.") for k in keys) and "grad_norm/total" not in keys
    exact = min(stable_rank(t.matrix()).item() for t in monitor.guard.matrices)
    assert logger.values("srank/min")[-1] == pytest.approx(exact, rel=1e-5)


@pytest.mark.parametrize("mode", ["exact", "power"])
def test_norms_are_the_matrices_frobenius_and_spectral_norms(tmp_path, mode):
    seed_everything(0)
    logger = RecordingLogger()
    monitor = StableRankMonitor(targets="attention", mode=mode, power_iters=30, log_norms=True)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=2, logger=logger), callbacks=[monitor])
    trainer.fit(tiny_module(), tiny_data())
    last = logger.records[-1][1]
    fro, spectral = [], []
    for t in monitor.guard.matrices:
        W = t.matrix().double()
        fro.append(W.norm().item())
        spectral.append(torch.linalg.matrix_norm(W, ord=2).item())
        assert last[f"fro_norm/{t.name}"] == pytest.approx(fro[-1], rel=1e-5), t.name
        # exact, or a power-iteration estimate of sigma_1 (a lower bound; 30 warm-started iterations)
        assert spectral[-1] * 0.98 <= last[f"spectral_norm/{t.name}"] <= spectral[-1] * (1 + 1e-4), t.name
    assert last["fro_norm/max"] == pytest.approx(max(fro), rel=1e-5)
    assert last["spectral_norm/max"] == pytest.approx(max(spectral), rel=2e-2)
    without = RecordingLogger()
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=2, logger=without),
                      callbacks=[StableRankMonitor(targets="attention", mode=mode)])
    trainer.fit(tiny_module(), tiny_data())
    assert not any(k.startswith(("fro_norm/", "spectral_norm/")) for _, m in without.records for k in m)


def test_after_msign_the_monitor_sees_restored_matrices(tmp_path):
    seed_everything(0)
    logger = RecordingLogger()
    monitor = StableRankMonitor(targets="attention", mode="exact")
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=2, logger=logger),
                      callbacks=[MSignCallback(period=2), monitor])
    trainer.fit(tiny_module(), tiny_data())
    step_rows = {step: m for step, m in logger.records if "srank/min" in m}
    # the Q block of a 4-head x 8 model is 32 x 32: a flat spectrum has stable rank 32 (min over blocks 16)
    assert step_rows[1]["srank/min"] == pytest.approx(16.0, rel=1e-3)
    assert step_rows[0]["srank/min"] < 16.0 * 0.9


@pytest.mark.slow
def test_csv_tensorboard_and_wandb_loggers_receive_the_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    seed_everything(0)
    csv = CSVLogger(tmp_path, name="csv")
    tb = TensorBoardLogger(tmp_path, name="tb")
    wandb = WandbLogger(save_dir=str(tmp_path), offline=True, project="lightning-msign-test")
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=2, logger=[csv, tb, wandb]),
                      callbacks=[MSignCallback(period=2), StableRankMonitor(targets="attention")])
    trainer.fit(tiny_module(), tiny_data())
    key = "srank/model.transformer.h.0.attn.qkv.weight.k"

    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"srank/min", "srank/mean", "grad_norm/total", key, "msign/applications"} <= set(header)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb.log_dir)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"srank/min", "grad_norm/total", key, "msign/time_ms"} <= tags
    assert [e.step for e in acc.Scalars("srank/min")] == [0, 1]

    summary = wandb.experiment.summary
    assert summary["srank/min"] == pytest.approx(acc.Scalars("srank/min")[-1].value, rel=1e-5)
    assert "msign/applications" in summary.keys()
    wandb.experiment.finish()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"mode": "svd"}, "mode"),
        ({"power_iters": 0}, "power_iters"),
        ({"warmup_iters": -1}, "warmup_iters"),
        ({"targets": "mlps"}, "targets"),
        ({"log_grad_norm": 1}, "log_grad_norm"),
        ({"log_norms": "yes"}, "log_norms"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StableRankMonitor(**kwargs)


def test_vectors_are_saved_and_restored():
    monitor = StableRankMonitor()
    monitor.guard.load_state_dict({"vectors": {"a": torch.ones(3)}, "last_step": 7})
    state = monitor.state_dict()
    other = StableRankMonitor()
    other.load_state_dict(state)
    assert other.state_dict()["last_step"] == 7 and torch.equal(other.state_dict()["vectors"]["a"], torch.ones(3))
    other.load_state_dict({})  # an older checkpoint without the keys still loads
    assert other.state_dict() == {"last_step": 0, "vectors": {}}


@pytest.mark.parametrize("monitor_cls", ["StableRankMonitor", "DiagnosticsMonitor"])
def test_monitors_warn_when_nothing_will_be_logged(tmp_path, monitor_cls):
    import lightning_msign

    monitor = getattr(lightning_msign, monitor_cls)()
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=1), callbacks=[monitor])  # logger=False
    with pytest.warns(UserWarning, match=f"{monitor_cls}: the Trainer has no logger"):
        trainer.fit(tiny_module(), tiny_data())
