"""PSSCallback: detection, protection, smoothing functions, resume, errors (real Trainer, LitGPT, CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_msign import PSS, LitGPTModule, PSSCallback
from lightning_msign.functional import SMOOTHINGS

from conftest import TINY_CONFIG, TINY_SEQ, TINY_VOCAB, RecordingLogger, tiny_data, trainer_kwargs


class SpikyModule(LitGPTModule):
    """Multiplies the loss by ``factor`` on one optimizer step (a gradient spike at a known step), or on every
    step from it on (``level=True``: the gradient-norm level moves up for good)."""

    def __init__(self, *args, spike_at: int = 0, factor: float = 100.0, level: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.spike_at, self.factor, self.level = spike_at, factor, level

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        step = self.trainer.global_step + 1
        hit = step >= self.spike_at > 0 if self.level else step == self.spike_at
        return loss * self.factor if hit else loss


def spiky(spike_at: int, factor: float = 100.0, level: bool = False, **kwargs) -> SpikyModule:
    kwargs.setdefault("lr", 1e-3)
    kwargs.setdefault("warmup_steps", 10)
    return SpikyModule(dict(TINY_CONFIG), vocab_size=TINY_VOCAB, block_size=TINY_SEQ, spike_at=spike_at,
                       factor=factor, level=level, **kwargs)


class CheckedPSSGuard(PSS):
    """Asserts, at the protection itself, what must hold of each target and of everything else."""

    def __init__(self, *args, **kwargs):
        super().__init__(None, *args, **kwargs)
        self.protected = 0

    def protect(self):
        module = self.module
        before = {n: p.detach().clone() for n, p in module.named_parameters()}
        mats_before = [t.matrix().detach().clone().double() for t in self.matrices]
        metrics = super().protect()
        for t, W in zip(self.matrices, mats_before):
            W_star = t.matrix().double()
            k = int(metrics[f"pss/rank/{t.name}"])
            U, S, Vh = torch.linalg.svd(W)
            s_new = torch.linalg.svdvals(W_star)
            assert s_new[0] < S[0] * 0.999, t.name  # sigma_1 drops
            # the change lives in the top-k directions: outside them W is unchanged
            P_u = torch.eye(W.shape[0], dtype=W.dtype) - U[:, :k] @ U[:, :k].T
            P_v = torch.eye(W.shape[1], dtype=W.dtype) - Vh[:k].T @ Vh[:k]
            delta = W_star - W
            # (exactly so for the directions PSS found, see test_pss_smooth_changes_nothing_outside_found_directions;
            # against the exact SVD up to the randomized decomposition's accuracy on a weakly gapped spectrum)
            assert (P_u @ delta).norm() <= 2e-2 * delta.norm(), t.name
            assert (delta @ P_v).norm() <= 2e-2 * delta.norm(), t.name
            torch.testing.assert_close(P_u @ W_star @ P_v, P_u @ W @ P_v, atol=1e-5, rtol=0)
        untouched = {}  # parameter name -> mask of the entries outside every target
        for t in self.matrices:
            mask = untouched.setdefault(t.param_name, torch.ones(t.param.shape, dtype=torch.bool))
            t.view(mask).fill_(False)
        for name, p in module.named_parameters():
            if name not in untouched:
                assert torch.equal(p, before[name]), f"{name} changed but is not a target"
            else:  # the V block of a fused qkv is not a "qk" target
                mask = untouched[name]
                assert torch.equal(p[mask], before[name][mask]), name
        self.protected += 1
        return metrics


def CheckedPSS(*args, **kwargs) -> PSSCallback:
    return PSSCallback.from_guard(CheckedPSSGuard(*args, **kwargs))


def test_normal_run_at_sane_lr_never_triggers(tmp_path):
    seed_everything(0)
    logger = RecordingLogger()
    cb = PSSCallback(warmup_steps=10)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=60, logger=logger, gradient_clip_val=1.0), callbacks=[cb])
    trainer.fit(spiky(spike_at=-1), tiny_data(batch_size=16))
    assert cb.guard.triggers == 0 and cb.guard.trigger_steps == []
    ratios = [r for r in logger.values("pss/ratio") if not math.isnan(r)]
    assert len(ratios) == 59 and max(ratios[10:]) < cb.guard.tau
    assert logger.values("pss/triggers")[-1] == 0.0


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_injected_spike_triggers_once_at_that_step_and_smooths(tmp_path, smoothing):
    seed_everything(0)
    logger = RecordingLogger()
    cb = CheckedPSS(warmup_steps=10, smoothing=smoothing)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=30, logger=logger, gradient_clip_val=1.0), callbacks=[cb])
    trainer.fit(spiky(spike_at=25), tiny_data(batch_size=16))
    assert cb.guard.trigger_steps == [25] and cb.guard.triggers == 1 and cb.guard.protected == 1
    row = next(m for step, m in logger.records if m.get("pss/triggered") == 1.0)
    assert logger.steps_with("pss/time_ms") == [24]  # Lightning's step index of optimizer step 25
    assert row["pss/ratio"] >= 2.5 * 10
    names = [t.name for t in cb.guard.matrices]
    assert len(names) == 4 and all(n.endswith((".q", ".k")) for n in names)  # Q and K of 2 layers
    for n in names:
        assert row[f"pss/sigma1_after/{n}"] < row[f"pss/sigma1_before/{n}"]


def test_triggering_norm_does_not_enter_ewma_and_cooldown_blocks_retrigger(tmp_path):
    seed_everything(0)
    logger = RecordingLogger()
    cb = PSSCallback(warmup_steps=5, cooldown_steps=3)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=12, logger=logger), callbacks=[cb])
    trainer.fit(spiky(spike_at=10), tiny_data(batch_size=16))
    ewma = dict(zip(logger.steps_with("pss/ewma"), logger.values("pss/ewma")))
    assert ewma[9] == ewma[8]  # step index 9 = optimizer step 10, the trigger: average unchanged
    assert cb.guard.trigger_steps == [10]


@pytest.mark.parametrize("adapt_after", [None, 3])
def test_average_adapts_to_a_new_level_after_consecutive_triggers(tmp_path, adapt_after):
    """The gradient norm jumps 1000x for good at step 10: without adaptation the slow average makes PSS fire
    every cooldown_steps + 1 steps; with adapt_after=3 it fires 3 times, restarts the average at the new
    level, and stays quiet."""
    seed_everything(0)
    logger = RecordingLogger()
    cb = PSSCallback(warmup_steps=5, cooldown_steps=2, alpha=0.02, adapt_after=adapt_after, action="skip")
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=40, logger=logger), callbacks=[cb])
    if adapt_after is None:
        trainer.fit(spiky(spike_at=10, factor=1000.0, level=True), tiny_data(batch_size=16))
        assert cb.guard.trigger_steps == list(range(10, 41, 3)) and cb.guard.adaptations == 0
        return
    with pytest.warns(RuntimeWarning, match="3 consecutive triggers up to optimizer step 16; the gradient-norm"):
        trainer.fit(spiky(spike_at=10, factor=1000.0, level=True), tiny_data(batch_size=16))
    assert cb.guard.trigger_steps == [10, 13, 16] and cb.guard.adaptations == 1
    norms = dict(zip(logger.steps_with("pss/grad_norm"), logger.values("pss/grad_norm")))
    ewma = dict(zip(logger.steps_with("pss/ewma"), logger.values("pss/ewma")))
    assert ewma[15] == norms[15]  # optimizer step 16: the average restarts at that step's norm
    ratios = dict(zip(logger.steps_with("pss/ratio"), logger.values("pss/ratio")))
    assert max(ratios[s] for s in range(16, 40)) < cb.guard.tau
    assert logger.values("pss/adaptations")[-1] == 1.0
    assert cb.guard.state_dict()["adaptations"] == 1 and cb.guard.state_dict()["streak"] == 0


def test_a_quiet_step_between_triggers_resets_the_streak():
    guard = PSS(torch.nn.Linear(4, 4), tau=2.0, alpha=0.5, warmup_steps=0, cooldown_steps=0, adapt_after=2,
                targets="*weight", action="skip")
    levels = [1.0, 1.0, 10.0, 1.0, 10.0, 1.0, 10.0, 30.0]  # triggers at 3, 5, 7, 8: only 7-8 are consecutive
    for step, level in enumerate(levels, 1):
        for p in guard.module.parameters():
            p.grad = torch.full_like(p, level)
        guard.before_optimizer_step(step)
    assert guard.trigger_steps == [3, 5, 7, 8] and guard.adaptations == 1


def test_skip_action_drops_the_optimizer_step(tmp_path):
    seed_everything(0)
    cb = PSSCallback(warmup_steps=5, action="skip")
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=12), callbacks=[cb])
    module = spiky(spike_at=10)
    trainer.fit(module, tiny_data(batch_size=16))
    assert cb.guard.trigger_steps == [10]
    state = trainer.optimizers[0].state[module.model.lm_head.weight]
    assert int(state["step"]) == 11  # 12 optimizer steps, one skipped: Adam's step count lags by one


def test_nonfinite_gradient_is_reported_not_averaged_and_skipped(tmp_path):
    seed_everything(0)
    logger = RecordingLogger()
    cb = PSSCallback(warmup_steps=5)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=12, logger=logger), callbacks=[cb])
    module = spiky(spike_at=8, factor=float("nan"))
    with pytest.warns(RuntimeWarning, match="gradient norm is nan"):
        trainer.fit(module, tiny_data(batch_size=16))
    assert cb.guard.triggers == 0 and math.isfinite(cb.guard.ewma)
    assert logger.values("pss/nonfinite")[-1] == 1.0
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_resume_restores_ewma_and_counters(tmp_path):
    seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=14, save_top_k=-1)
    cb = PSSCallback(warmup_steps=5, cooldown_steps=50)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=14, enable_checkpointing=True), callbacks=[cb, ckpt])
    trainer.fit(spiky(spike_at=12), tiny_data(batch_size=16))
    saved = (cb.guard.ewma, cb.guard.triggers, cb.guard.state_dict()['cooldown_until'])
    assert saved[1] == 1 and saved[2] == 62

    resumed = PSSCallback(warmup_steps=5, cooldown_steps=50)

    class Probe(Callback):  # a separate callback: a subclass of PSSCallback would have another state_key
        def on_fit_start(self, trainer, pl_module):
            self.restored = (resumed.guard.ewma, resumed.guard.triggers, resumed.guard.state_dict()['cooldown_until'])

    probe = Probe()
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=16, enable_checkpointing=True), callbacks=[resumed, probe])
    trainer.fit(spiky(spike_at=12), tiny_data(batch_size=16), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=14.ckpt"))
    assert probe.restored == saved
    assert resumed.guard.triggers == 1  # still in cooldown until step 62: no new trigger


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tau": 1.0}, "tau"),
        ({"tau": 0.5}, "tau"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"smoothing": "gaussian"}, "smoothing"),
        ({"rank": 0}, "rank"),
        ({"rank": "full"}, "rank"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"cooldown_steps": 1.5}, "cooldown_steps"),
        ({"action": "stop"}, "action"),
        ({"smoothing": "softmax", "smoothing_kwargs": {"temperature": 0.5}}, "temperature"),
        ({"smoothing": "conv", "smoothing_kwargs": {"width": 3}}, "smoothing_kwargs"),
        ({"targets": "qk", "split_qkv": False}, "split_qkv"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PSSCallback(**kwargs)
