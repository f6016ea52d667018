"""RollbackCallback / Rollback on a real Trainer and a tiny LitGPT: snapshots, detection, rollback, repairs, budget."""

from __future__ import annotations

import json
import math

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from lightning_msign import LitGPTModule, Rollback, RollbackCallback, ShakespeareDataModule
from lightning_msign.functional import stable_rank

from conftest import TINY_CONFIG, TINY_SEQ, TINY_VOCAB, RecordingLogger, load_ranks, trainer_kwargs

SCHEDULE = 40  # the LR schedule's length, the same in every run compared


class Injecting(LitGPTModule):
    """The tiny LitGPT, whose loss is multiplied by ``factor`` (NaN, or a spike) at the given optimizer steps."""

    def __init__(self, inject: dict[int, float], rank: int | None = None, **kwargs) -> None:
        super().__init__(dict(TINY_CONFIG), vocab_size=TINY_VOCAB, block_size=TINY_SEQ, lr=3e-3, warmup_steps=4,
                         max_steps=SCHEDULE, **kwargs)
        self.inject, self.inject_rank = inject, rank

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        step = self.trainer.global_step + 1  # the optimizer step this batch makes
        if step in self.inject and (self.inject_rank is None or self.trainer.global_rank == self.inject_rank):
            loss = loss * self.inject[step]
        return loss


class SkippingData(ShakespeareDataModule):
    """The shipped corpus, without the training batches at ``skip`` (batch indices of the first epoch)."""

    def __init__(self, skip: set[int], **kwargs) -> None:
        super().__init__(seq_len=TINY_SEQ, batch_size=4, num_workers=0, **kwargs)
        self.skip = set(skip)

    def train_dataloader(self):
        loader = super().train_dataloader()
        skip = self.skip

        class Skipping:
            def __iter__(self):
                return (b for i, b in enumerate(loader) if i not in skip)

            def __len__(self):
                return len(loader) - len(skip)

        return Skipping()


def data():
    return ShakespeareDataModule(seq_len=TINY_SEQ, batch_size=4, num_workers=0)


def fit(tmp_path, module, datamodule, steps, callbacks=(), logger=False, **kwargs):
    seed_everything(3, verbose=False)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=steps, logger=logger, **kwargs), callbacks=list(callbacks))
    trainer.fit(module, datamodule)
    return trainer


def params(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_nan_step_rolls_back_and_ends_as_a_run_that_skipped_those_batches(tmp_path):
    steps, every, bad = 14, 4, 7  # the NaN at optimizer step 7: back to the snapshot after step 4
    guard = RollbackCallback(snapshot_every=every, z_threshold=None, skipped_path=str(tmp_path / "skipped.json"))
    logger = RecordingLogger()
    seed_everything(3, verbose=False)
    rolled = Injecting({bad: float("nan")})
    trainer = fit(tmp_path / "a", rolled, data(), steps + (bad - every), [guard], logger=logger)
    g = guard.guard
    assert g.rollback_steps == [bad] and g.steps_lost == bad - every and g.rollbacks == 1
    assert trainer.global_step == steps + (bad - every)
    record = g.skipped[0]
    assert record["restored_to"] == every and [p["batch_idx"] for p in record["positions"]] == [4, 5, 6]
    assert "non-finite" in record["reasons"][0]
    assert json.loads((tmp_path / "skipped.json").read_text())["skipped"][0]["flagged_at"] == bad
    assert logger.values("rollback/rolled_back").count(1.0) == 1
    # The reference skipped batches 4, 5 and 6 (the steps 5-7 the rollback undid) from the start.
    seed_everything(3, verbose=False)
    reference = Injecting({})
    fit(tmp_path / "b", reference, SkippingData({4, 5, 6}), steps)
    for name, value in params(reference).items():
        assert torch.equal(dict(rolled.named_parameters())[name].detach(), value), name
    assert all(torch.isfinite(p).all() for p in rolled.parameters())


def test_spike_is_caught_by_the_z_score_and_nothing_else_is(tmp_path):
    spike = 26
    guard = RollbackCallback(snapshot_every=5, window=16, min_history=10, z_threshold=6.0)
    fit(tmp_path, Injecting({spike: 40.0}), data(), 34, [guard])
    g = guard.guard
    assert g.rollback_steps == [spike], g.skipped
    assert "loss" in g.skipped[0]["reasons"][0] and "sigma" in g.skipped[0]["reasons"][0]
    assert g.skipped[0]["restored_to"] == 25


def test_calm_run_is_bit_identical_to_an_unguarded_one(tmp_path):
    guard = RollbackCallback(snapshot_every=3, window=8, min_history=4)
    guarded = Injecting({})
    fit(tmp_path / "a", guarded, data(), 12, [guard])
    assert guard.guard.rollbacks == 0 and len(guard.guard.snapshots) == 2
    plain = Injecting({})
    fit(tmp_path / "b", plain, data(), 12)
    for name, value in params(plain).items():
        assert torch.equal(dict(guarded.named_parameters())[name].detach(), value), name


class LRRecorder(Callback):
    """The learning rate each optimizer step really used (read inside ``optimizer.step`` after the guard's hook)."""

    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}
        self.after: dict[int, float] = {}

    def on_fit_start(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]

        def record(opt, args, kwargs):
            self.lrs[trainer.global_step + 1] = opt.param_groups[0]["lr"]

        optimizer.register_step_pre_hook(record)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


def test_lr_repair_lowers_then_ramps_back_and_the_schedule_resumes_from_the_snapshot(tmp_path):
    bad, every = 6, 4
    guard = RollbackCallback(snapshot_every=every, z_threshold=None, lr_factor=0.25, lr_steps=2, lr_ramp_steps=3)
    recorder = LRRecorder()  # registered after the guard's hooks: sees the scaled rate
    fit(tmp_path / "a", Injecting({bad: float("nan")}), data(), 16, [guard, recorder])
    plain = LRRecorder()
    fit(tmp_path / "b", Injecting({}), data(), 16, [plain])
    lost = bad - every
    scale = {7: 0.25, 8: 0.25, 9: 0.4375, 10: 0.625, 11: 0.8125}
    for step in range(bad + 1, 17):
        scheduled = plain.lrs[step - lost]  # the schedule resumed from the snapshot after step 4
        assert recorder.lrs[step] == pytest.approx(scheduled * scale.get(step, 1.0), rel=1e-12), step
        assert recorder.after[step] == pytest.approx(plain.after[step - lost], rel=1e-12), step  # unscaled outside


class Inspect(Callback):
    """After the guard (placed after it): optimizer state and Q/K stable ranks at the rollback step."""

    def __init__(self, step: int) -> None:
        self.step, self.seen = step, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        optimizer = trainer.optimizers[0]
        self.seen["state"] = {n: p in optimizer.state for n, p in pl_module.named_parameters()}
        q = TINY_CONFIG["n_embd"]
        w = pl_module.model.transformer.h[0].attn.qkv.weight.detach()
        self.seen["srank_q"] = float(stable_rank(w[:q]))
        self.seen["srank_v"] = float(stable_rank(w[q + q // 2:]))


def test_repairs_sign_qk_and_restart_their_moments(tmp_path):
    bad = 6
    guard = RollbackCallback(snapshot_every=4, z_threshold=None, repair_msign="qk", restart_moments="qk",
                          msign_backend="svd")
    inspect = Inspect(bad)
    fit(tmp_path, Injecting({bad: float("nan")}), data(), 10, [guard, inspect])
    state = inspect.seen["state"]
    qkv = [n for n in state if n.endswith("attn.qkv.weight")]
    assert qkv and not any(state[n] for n in qkv)  # restarted: Adam starts them again at step 1
    assert all(state[n] for n in state if n not in qkv)
    assert inspect.seen["srank_q"] == pytest.approx(TINY_CONFIG["n_embd"], rel=1e-4)  # signed: flat spectrum
    assert inspect.seen["srank_v"] < 0.9 * (TINY_CONFIG["n_embd"] // 2)  # V is not a target


def test_retry_budget_stops_the_run_with_the_message(tmp_path):
    guard = RollbackCallback(snapshot_every=4, z_threshold=None, max_retries=2, keep=2)
    module = Injecting({s: float("nan") for s in range(10, 40)})
    with pytest.warns(UserWarning, match="did not hold"):
        trainer = fit(tmp_path, module, data(), 30, [guard])
    g = guard.guard
    assert g.should_stop and trainer.global_step == 12  # 10, 11 rolled back; 12 spends the budget
    assert g.rollback_steps == [10, 11] and [s["restored_to"] for s in g.skipped] == [8, 4]
    assert "max_retries=2" in g.stop_reason and "restored to step 4" in g.stop_reason
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_guard_state_resumes_exactly_and_snapshots_cost_three_weights(tmp_path):
    guard = RollbackCallback(snapshot_every=3, window=8, min_history=4, z_threshold=None)
    module = Injecting({5: float("nan")})
    fit(tmp_path, module, data(), 9, [guard])
    state = guard.state_dict()
    fresh = RollbackCallback(snapshot_every=3, window=8, min_history=4, z_threshold=None)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state and fresh.guard.rollbacks == 1 and "rollbacks" not in state  # from skipped
    assert len(state["history"]["loss"]) == 7  # steps 1-3, then 6-9: the snapshot after step 3 was restored
    weights = sum(p.numel() * 4 for p in module.parameters())
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    assert guard.guard.snapshots[-1].nbytes == 3 * weights + buffers + 4 * len(list(module.parameters()))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"snapshot_every": 0}, "snapshot_every"),
        ({"keep": 0}, "keep"),
        ({"z_threshold": -1.0}, "z_threshold"),
        ({"window": 8, "min_history": 9}, "min_history"),
        ({"watch": ["loss", "lr"]}, "watch"),
        ({"lr_factor": 0.5}, "lr_steps"),
        ({"lr_factor": 1.5, "lr_steps": 2}, "lr_factor"),
        ({"max_retries": -1}, "max_retries"),
        ({"repair_msign": "attn"}, "repair_msign"),
        ({"msign_backend": "qr"}, "backend"),
        ({"snapshot_device": "nowhere"}, "snapshot_device"),
        ({"max_curvature_ratio": 0.0}, "max_curvature_ratio"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RollbackCallback(**kwargs)


def test_plain_loop_rollback_equals_skipping(tmp_path):
    """The guard in a plain PyTorch loop: a NaN step undone, the run equal to one without those batches."""

    def run(bad: set[int], skip: set[int]):
        seed_everything(5, verbose=False)
        module = Injecting({})
        model = module.model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        guard = Rollback(model, optimizers=opt, schedulers=sched, snapshot_every=3, z_threshold=None)
        guard.snapshot(0)
        gen = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, TINY_VOCAB, (2, TINY_SEQ + 1), generator=gen) for _ in range(12)]
        step = 0
        for i, ids in enumerate(batches):
            if i in skip:
                continue
            step += 1
            logits = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
            if i in bad:
                loss = loss * math.nan
            loss.backward()
            guard.before_optimizer_step(step)
            opt.step()
            sched.step()
            opt.zero_grad()
            guard.after_step(loss, step, position=i)
        return model, guard

    rolled, guard = run(bad={7}, skip=set())
    reference, _ = run(bad=set(), skip={6, 7})
    assert guard.skipped[0]["positions"] == [6, 7] and guard.skipped[0]["restored_to"] == 6
    for (name, a), (_, b) in zip(rolled.named_parameters(), reference.named_parameters()):
        assert torch.equal(a, b), name


# -------------------------------------------------------------------------------------------- 2 processes
# tests/rollback_job.py, run as a case of tests/jobs.py (one launch per strategy).
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "fsdp1"])
def test_processes_agree_when_only_one_sees_the_nan(two_process_job, strategy):
    """NaN on process 1 only: both roll back at the same step (no hang) and end as a run that skipped the batches."""
    out = two_process_job(strategy, "rollback")
    r0, r1 = load_ranks(out / "rolled")
    ref0, _ = load_ranks(out / "reference")
    assert r0["state"] == r1["state"] and [s["flagged_at"] for s in r0["state"]["skipped"]] == [7]
    assert r0["state"]["skipped"][0]["restored_to"] == 4
    for name, value in r0["whole_params"].items():
        assert torch.equal(value, r1["whole_params"][name]), name
        assert torch.equal(value, ref0["whole_params"][name]), name
    assert all(torch.isfinite(v).all() for v in r0["whole_params"].values())
