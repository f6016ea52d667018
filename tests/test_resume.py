"""Exact mid-epoch resume on CPU: a run killed and resumed with ``fit(ckpt_path=...)`` equals an uninterrupted one.

Real Trainer, real LitGPT model, real corpus, the suite's three callbacks, no mocks. Each scenario runs
one uninterrupted reference of ``N_STEPS`` optimizer steps and one chain of crashed and resumed segments
(a callback raises at a step after a ``ModelCheckpoint``; every resume builds a fresh Trainer, module,
data module and callbacks). The chains cover: a checkpoint at a step where MSign applies, a resume at
the exact end of an epoch, two resumes inside one epoch, a resumed segment crossing epoch boundaries,
both ways Lightning restores a loader (the fit loop's loader state, and, under Lightning issue #20550,
only the data module's own state), and the batches each step trains on.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_msign import MSignCallback, PSSCallback, ShakespeareDataModule, StableRankMonitor

from conftest import RecordingLogger, tiny_data, tiny_module, trainer_kwargs

N_STEPS = 24
SEED = 1234
MSIGN_PERIOD = 5
#: Wall-clock timings cannot repeat; every other logged value must, bit for bit.
_UNREPEATABLE = ("msign/time_ms", "pss/time_ms")
_NOT_RESUMABLE = "dataloader is not resumable"


class _SimulatedCrash(Exception):
    pass


class _Recorder(Callback):
    """Records, per optimizer step, what the step trained on; raises at ``crash_at`` (a simulated kill).

    Put first in the callback list: at the crash step it raises before any other callback's
    ``on_train_batch_end`` (Lightning runs ``ModelCheckpoint`` last anyway), as a kill would.
    """

    def __init__(self, crash_at: Optional[int] = None, check_position: bool = True) -> None:
        self.crash_at = crash_at
        self.check_position = check_position
        self.batches: dict[int, tuple[int, torch.Tensor]] = {}  # global step -> (epoch, input_ids)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches[trainer.global_step] = (trainer.current_epoch, batch["input_ids"].clone())
        # Lightning fetches no batch ahead of a sized loader: handed out == trained on, at every step.
        if self.check_position:
            assert trainer.datamodule.state_dict()["batches"] == batch_idx + 1
        if trainer.global_step == self.crash_at:
            raise _SimulatedCrash(f"killed after optimizer step {self.crash_at}")


class _Run:
    def __init__(self, module, data, trainer, recorder, logger, msign, pss, caught) -> None:
        self.module, self.data, self.trainer, self.recorder = module, data, trainer, recorder
        self.logger, self.msign, self.pss, self.warnings = logger, msign, pss, caught


def _run(
    root: Path,
    *,
    limit_train_batches: Optional[int] = None,
    max_epochs: Optional[int] = None,
    ckpt_path: Optional[Path] = None,
    every_n_train_steps: Optional[int] = None,
    crash_at: Optional[int] = None,
    seed: int = SEED,
    data_module: Optional[ShakespeareDataModule] = None,
) -> _Run:
    """One segment with fresh objects: to ``N_STEPS``, or to ``crash_at`` (raises, caught here)."""
    seed_everything(seed, verbose=False)
    recorder, logger = _Recorder(crash_at), RecordingLogger()
    msign = MSignCallback(period=MSIGN_PERIOD)
    pss = PSSCallback(warmup_steps=3, tau=1.05, cooldown_steps=2)
    callbacks: list[Callback] = [recorder, msign, pss, StableRankMonitor()]
    if every_n_train_steps is not None:
        callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=every_n_train_steps, save_top_k=-1))
    trainer = Trainer(
        **trainer_kwargs(
            root,
            max_steps=N_STEPS,
            max_epochs=max_epochs,
            limit_train_batches=limit_train_batches,
            gradient_clip_val=0.5,
            log_every_n_steps=1,
            logger=logger,
            callbacks=callbacks,
            enable_checkpointing=every_n_train_steps is not None,
        )
    )
    module, data = tiny_module(), data_module if data_module is not None else tiny_data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.fit(module, datamodule=data, ckpt_path=None if ckpt_path is None else str(ckpt_path))
        except _SimulatedCrash:
            assert crash_at is not None and trainer.global_step == crash_at
        else:
            assert crash_at is None and trainer.global_step == N_STEPS
    return _Run(module, data, trainer, recorder, logger, msign, pss, [str(w.message) for w in caught])


def _metrics_by_step(logger: RecordingLogger) -> dict[int, dict[str, list[float]]]:
    out: dict[int, dict[str, list[float]]] = {}
    for step, metrics in logger.records:
        for key, value in metrics.items():
            if key not in _UNREPEATABLE:
                out.setdefault(step, {}).setdefault(key, []).append(value)
    return out


def _same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))


def _assert_segment_matches(reference: _Run, resumed: _Run, start: int, stop: int) -> None:
    """``resumed`` continued from a checkpoint at ``start`` and ran to optimizer step ``stop``."""
    # The batches: the same windows, in the same epochs, at every step after the checkpoint.
    assert sorted(resumed.recorder.batches) == list(range(start + 1, stop + 1))
    for step, (epoch, ids) in resumed.recorder.batches.items():
        ref_epoch, ref_ids = reference.recorder.batches[step]
        assert epoch == ref_epoch, f"step {step}: epoch {epoch} != {ref_epoch}"
        assert torch.equal(ids, ref_ids), f"step {step} trained on other windows than the uninterrupted run"
    # Every metric, at the step index it is logged under (0-based: a step's metrics are logged at step - 1).
    ref, got = _metrics_by_step(reference.logger), _metrics_by_step(resumed.logger)
    assert got and min(got) == start and max(got) == stop - 1
    for step in range(start, stop):
        if step == stop - 1 and resumed.recorder.crash_at is not None:
            # The crash interrupted this step's on_train_batch_end: what was logged must still match.
            assert set(got[step]) <= set(ref[step])
            keys = set(got[step])
        else:
            assert set(got[step]) == set(ref[step]), f"step {step}: keys differ: {set(got[step]) ^ set(ref[step])}"
            keys = set(ref[step])
        for key in sorted(keys):
            assert _same(got[step][key], ref[step][key]), f"step {step}: {key} {got[step][key]} != {ref[step][key]}"


def _assert_same_end_state(reference: _Run, resumed: _Run) -> None:
    ref_params, params = dict(reference.module.named_parameters()), dict(resumed.module.named_parameters())
    assert ref_params.keys() == params.keys()
    for name, p in params.items():
        assert torch.equal(p, ref_params[name]), f"{name} differs from the uninterrupted run"
    ref_opt, opt = reference.trainer.optimizers[0].state_dict(), resumed.trainer.optimizers[0].state_dict()
    for index, state in opt["state"].items():
        for key, value in state.items():
            assert torch.equal(value, ref_opt["state"][index][key]), f"optimizer state {index}/{key} differs"
    assert resumed.trainer.lr_scheduler_configs[0].scheduler.state_dict() == (
        reference.trainer.lr_scheduler_configs[0].scheduler.state_dict()
    )
    assert resumed.msign.guard.applications == reference.msign.guard.applications == N_STEPS // MSIGN_PERIOD
    assert resumed.pss.guard.triggers == reference.pss.guard.triggers
    assert resumed.pss.guard.ewma == reference.pss.guard.ewma
    assert resumed.data.state_dict() == reference.data.state_dict()


def _ckpt(root: Path, step: int) -> Path:
    (path,) = (root / "ckpt").glob(f"epoch=*-step={step}.ckpt")
    return path


def _loader_state_in(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    checkpoint = torch.load(path, weights_only=True)
    return checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"], checkpoint["ShakespeareDataModule"]


def test_resume_twice_mid_epoch_from_an_msign_step(tmp_path):
    """Epochs far longer than the run: checkpoint at 10 (MSign applies there), crash at 12; resume,
    checkpoint at 12 (PSS in cooldown after its trigger at 11), crash at 14; resume to the end. The fit
    loop restores the loader's state."""
    reference = _run(tmp_path / "reference")
    assert reference.trainer.num_training_batches > N_STEPS  # every resume below is mid-epoch
    triggered = reference.pss.guard.trigger_steps
    assert reference.pss.guard.triggers >= 2 and any(s > 12 for s in triggered), triggered
    assert reference.msign.guard.applications == N_STEPS // MSIGN_PERIOD

    first = _run(tmp_path / "a", every_n_train_steps=MSIGN_PERIOD, crash_at=12)
    loader_states, dm_state = _loader_state_in(_ckpt(tmp_path / "a", 10))
    assert loader_states == [dm_state] and dm_state["batches"] == 10 and dm_state["epoch"] == 0
    assert first.msign.guard.applications == 2  # at 5 and 10: the checkpoint at 10 holds signed weights

    # A different global seed: the data seed must come from the checkpoint, not from the new draw.
    second = _run(tmp_path / "b", ckpt_path=_ckpt(tmp_path / "a", 10), every_n_train_steps=4, crash_at=14, seed=99)
    _assert_segment_matches(reference, second, start=10, stop=14)
    assert _loader_state_in(_ckpt(tmp_path / "b", 12))[1]["batches"] == 12

    third = _run(tmp_path / "c", ckpt_path=_ckpt(tmp_path / "b", 12), seed=7)
    _assert_segment_matches(reference, third, start=12, stop=N_STEPS)
    _assert_same_end_state(reference, third)
    assert third.pss.guard.trigger_steps == reference.pss.guard.trigger_steps  # restored from the checkpoint
    for run in (second, third):
        assert not [w for w in run.warnings if _NOT_RESUMABLE in w]
        assert run.trainer.fit_loop._combined_loader_states_to_load == []  # the fit loop applied the loader state


def test_resume_at_and_across_epoch_boundaries_under_lightning_20550(tmp_path):
    """Epochs of 7 batches: checkpoint at the end of epoch 0 (step 7), crash at 9; resume, checkpoint
    at 10 (mid-epoch 1, an MSign step), crash at 12; resume to 24, through epochs 2 and 3.

    ``max_epochs`` makes ``trainer.estimated_stepping_batches`` (read by LitGPTModule's
    ``configure_optimizers``, ``max_steps=None``) build the train loader before the loops are
    restored, so Lightning never hands the loader its saved state (Lightning issue #20550): only the
    data module's own ``load_state_dict`` can restore the position.
    """
    kw = dict(limit_train_batches=7, max_epochs=100)
    reference = _run(tmp_path / "reference", **kw)
    assert [reference.recorder.batches[s][0] for s in (7, 8, 14, 15, 21, 22)] == [0, 1, 1, 2, 2, 3]

    _run(tmp_path / "a", every_n_train_steps=7, crash_at=9, **kw)
    loader_states, dm_state = _loader_state_in(_ckpt(tmp_path / "a", 7))
    assert loader_states == [dm_state] and (dm_state["epoch"], dm_state["batches"]) == (0, 7)

    second = _run(tmp_path / "b", ckpt_path=_ckpt(tmp_path / "a", 7), every_n_train_steps=5, crash_at=12, seed=99, **kw)
    _assert_segment_matches(reference, second, start=7, stop=12)
    assert _loader_state_in(_ckpt(tmp_path / "b", 10))[1]["epoch"] == 1
    assert _loader_state_in(_ckpt(tmp_path / "b", 10))[1]["batches"] == 3

    third = _run(tmp_path / "c", ckpt_path=_ckpt(tmp_path / "b", 10), seed=5, **kw)
    _assert_segment_matches(reference, third, start=10, stop=N_STEPS)
    _assert_same_end_state(reference, third)
    for run in (second, third):
        assert not [w for w in run.warnings if _NOT_RESUMABLE in w]
        # Issue #20550 happened: the fit loop kept the saved loader state and never applied it
        # (a Lightning-private attribute, read only to prove the scenario is the one intended).
        assert run.trainer.fit_loop._combined_loader_states_to_load, "Lightning restored the loader itself"


def test_not_resumable_warning_is_gone(tmp_path):
    """Lightning warns on a mid-epoch resume with a loader that is not ``_Stateful``; not with this one."""

    class _PlainLoaderData(ShakespeareDataModule):  # the train loader this package used to return
        def train_dataloader(self):
            return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True)

    def crash_and_resume(make_data, root: Path) -> list[str]:
        kw = dict(max_steps=4, enable_checkpointing=True)
        ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_top_k=-1)
        crashing = Trainer(**trainer_kwargs(root, callbacks=[_Recorder(crash_at=3, check_position=False), ckpt], **kw))
        with pytest.raises(_SimulatedCrash):
            crashing.fit(tiny_module(), make_data())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = Trainer(**trainer_kwargs(root, **kw))
            trainer.fit(tiny_module(), make_data(), ckpt_path=str(_ckpt(root, 2)))
        assert trainer.global_step == 4
        return [str(w.message) for w in caught if _NOT_RESUMABLE in str(w.message)]

    assert crash_and_resume(lambda: _PlainLoaderData(seq_len=32, batch_size=4), tmp_path / "plain")
    assert crash_and_resume(tiny_data, tmp_path / "resumable") == []
