"""MSign on measured precursors: each trigger fires exactly when its quantity crosses the threshold, never on a calm
run (which stays bit-identical to an unguarded one), the same on every process, and resumes exactly.

Real Trainer, the tiny LitGPT of conftest.py on the shipped corpus; a learning rate of 0.1 makes its attention
logits run away within ~10 steps (layer 1 crosses 100 at step 8, layer 0 at step 10), as the 12-layer probe of
the stability benchmark does over hundreds.
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from test_pss_callback import spiky

from lightning_msign import CurvatureMonitor, Diagnostics, MSign, MSignCallback
from lightning_msign.functional import stable_rank
from lightning_msign.guards.diagnostics import batch_input_ids

from conftest import RecordingLogger, load_ranks, tiny_data, tiny_module, trainer_kwargs

HOT_LR = 0.1
STEPS = 24


class LogitRecorder(Callback):
    """Each layer's attention-logit max on the first ``batch_size`` sequences of a batch, with the weights the
    training forward of that batch uses (recomputed just before it, in eval mode): what MSign's check of that step
    reads from the training forward. Keyed by the optimizer step the batch belongs to (1-based)."""

    def __init__(self, batch_size: int = 4) -> None:
        self.per_layer: dict[int, list[float]] = {}
        self.batch_size = batch_size

    def on_fit_start(self, trainer, pl_module):
        # The strategy's model: under FSDP1 the root wrapping the LightningModule, through which it is gathered.
        self.diagnostics = Diagnostics(trainer.strategy.model, every_n_steps=1, output_logits=False,
                                       max_batch_size=self.batch_size)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        values = self.diagnostics.compute(batch_input_ids(batch))
        n = len(self.diagnostics.decoder.blocks)
        self.per_layer[trainer.global_step + 1] = [values[f"diag/attn_logit_max/{i}"] for i in range(n)]


class SrankRecorder(Callback):
    """Placed before the MSign callback: the exact stable rank of each of its targets after every step."""

    def __init__(self, msign: MSignCallback) -> None:
        self.msign = msign
        self.sranks: dict[int, dict[str, float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.sranks[trainer.global_step] = {
            t.name: float(stable_rank(t.matrix().float())) for t in self.msign.guard.matrices
        }


def layer_of(guard: MSign, name: str) -> int:
    return int(name.split(".h.")[1].split(".")[0])


def expected_from_logits(guard: MSign, per_layer: dict[int, list[float]], threshold: float, spacing: int):
    """Replay of the rule: after step s, the targets of each layer above ``threshold``, once per ``spacing`` at most."""
    last: dict[str, int] = {}
    out: dict[int, set[str]] = {}
    for step in sorted(per_layer):
        hot = {i for i, v in enumerate(per_layer[step]) if v > threshold}
        chosen = {n for n in guard.target_names
                  if layer_of(guard, n) in hot and step - last.get(n, -spacing) >= spacing}
        if chosen:
            out[step] = chosen
            last.update({n: step for n in chosen})
    return out


def fit(tmp_path, callbacks, make_module=None, max_steps=STEPS, ckpt_path=None, **kwargs):
    """Seed, build the module (``make_module()``, default the tiny LitGPT at ``HOT_LR``), train."""
    seed_everything(0)
    module = make_module() if make_module is not None else tiny_module(lr=HOT_LR, max_steps=STEPS)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=max_steps, **kwargs), callbacks=callbacks)
    trainer.fit(module, tiny_data(batch_size=8), ckpt_path=ckpt_path)
    return module, trainer


def applications(logger: RecordingLogger) -> dict[int, int]:
    """Optimizer step (1-based) -> matrices signed after it, from what the callback logged."""
    return {step + 1: int(m["msign/matrices"]) for step, m in logger.records if "msign/matrices" in m}


# ------------------------------------------------------------------------------------------- attention logits
def test_attention_logit_trigger_fires_exactly_at_the_crossing_on_the_hot_layers(tmp_path):
    threshold, spacing = 100.0, 10
    recorder, logger = LogitRecorder(), RecordingLogger()
    cb = MSignCallback(period=None, targets="qk", backend="svd", max_attn_logit=threshold, min_spacing=spacing)
    fit(tmp_path, [recorder, cb], logger=logger)
    guard = cb.guard
    expected = expected_from_logits(guard, recorder.per_layer, threshold, spacing)
    crossings = [s for s in sorted(recorder.per_layer) if max(recorder.per_layer[s]) > threshold]
    assert crossings and crossings[0] > 3, recorder.per_layer  # calm at first, then running away
    assert guard.trigger_steps == sorted(expected) and guard.trigger_steps[0] == crossings[0]
    assert applications(logger) == {s: len(names) for s, names in expected.items()}
    # Spacing held a step back (layer 1 hot again 9 steps after its application), and a step with one hot layer
    # signed only that layer's Q and K.
    assert len(guard.trigger_steps) < len(crossings)
    assert any(len(names) == 2 for names in expected.values())
    # The signal the trigger read, in the training forward, is the largest logit the recorder measured on the same
    # ids with the same weights.
    logged = {step + 1: m["msign/attn_logit_max"] for step, m in logger.records if "msign/attn_logit_max" in m}
    assert sorted(logged) == list(range(1, STEPS + 1))
    assert all(logged[s] == max(recorder.per_layer[s]) for s in logged)
    assert guard.triggers == guard.applications == len(expected)


def test_after_the_first_trigger_every_target_is_signed_every_n_steps(tmp_path):
    threshold, n = 100.0, 3
    recorder, logger = LogitRecorder(), RecordingLogger()
    cb = MSignCallback(period=None, targets="qk", max_attn_logit=threshold, min_spacing=1, period_after_trigger=n)
    fit(tmp_path, [recorder, cb], logger=logger)
    names = cb.guard.target_names
    first = min(s for s, values in recorder.per_layer.items() if max(values) > threshold)
    expected = {}
    for step, values in sorted(recorder.per_layer.items()):
        hot = {i for i, v in enumerate(values) if v > threshold}
        chosen = {x for x in names if layer_of(cb.guard, x) in hot}
        if step >= first and (step - first) % n == 0:
            chosen = set(names)
        if chosen:
            expected[step] = len(chosen)
    assert applications(logger) == expected
    assert all(expected[s] == len(names) for s in range(first, STEPS + 1, n)) and first > 3
    assert not any(s < first for s in expected)


def test_attention_logit_trigger_needs_the_ids_and_a_target_in_a_block():
    guard = MSign(tiny_module(), period=None, targets="qk", max_attn_logit=100.0)
    with pytest.raises(ValueError, match="input_ids"):
        guard.step(1)
    with pytest.raises(ValueError, match="none of the targets"):
        MSign(tiny_module(), period=None, targets="*lm_head*", max_attn_logit=100.0)


# ---------------------------------------------------------------------------------------------- stable rank
def test_stable_rank_trigger_fires_exactly_below_the_fraction_of_the_reference(tmp_path):
    warmup, fraction = 4, 0.95
    cb = MSignCallback(period=None, targets="qk", min_srank_fraction=fraction, warmup_steps=warmup, min_spacing=1)
    recorder, logger = SrankRecorder(cb), RecordingLogger()
    fit(tmp_path, [recorder, cb], logger=logger)
    reference = recorder.sranks[warmup]  # the first check at or after the warm-up
    expected = {}
    for step in range(warmup + 1, STEPS + 1):
        low = {n for n, s in recorder.sranks[step].items() if s < fraction * reference[n]}
        if low:
            expected[step] = low
    assert expected and len(expected) < STEPS - warmup, expected  # some checks fire, some do not
    assert cb.guard.trigger_steps == sorted(expected)
    assert applications(logger) == {s: len(names) for s, names in expected.items()}
    assert cb.guard.state_dict()["reference_srank"] == pytest.approx(reference, rel=1e-6)
    key = "msign/srank_fraction_min"
    fractions = {step + 1: m[key] for step, m in logger.records if key in m}
    for step, value in fractions.items():
        want = min(recorder.sranks[step][n] / reference[n] for n in reference)
        assert value == pytest.approx(want, rel=1e-5), step


# ------------------------------------------------------------------------------------- gradient-norm ratio
@pytest.mark.parametrize("spike_at", [0, 15])
def test_gradient_ratio_trigger_fires_at_the_spike_only(tmp_path, spike_at):
    cb = MSignCallback(period=None, targets="qk", max_grad_ratio=5.0, warmup_steps=5)
    logger = RecordingLogger()
    fit(tmp_path, [cb], make_module=lambda: spiky(spike_at=spike_at, factor=100.0), max_steps=20, logger=logger)
    assert cb.guard.trigger_steps == ([spike_at] if spike_at else [])
    if spike_at:
        assert applications(logger) == {spike_at: len(cb.guard.target_names)}  # every target
    ratios = {step + 1: m["msign/grad_ratio"] for step, m in logger.records if "msign/grad_ratio" in m}
    assert all(r < 5.0 for s, r in ratios.items() if s != spike_at and s > 5)
    assert math.isnan(ratios[1])  # no average before the first norm


def test_gradient_ratio_trigger_needs_the_norm_before_the_step():
    module = tiny_module()
    guard = MSign(module, period=None, targets="qk", max_grad_ratio=3.0)
    with pytest.raises(RuntimeError, match="before_optimizer_step"):
        guard.step(1)


# ------------------------------------------------------------------------------------------------ curvature
class CurvatureRecorder(Callback):
    def __init__(self, monitor: CurvatureMonitor) -> None:
        self.monitor, self.latest = monitor, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.latest[trainer.global_step] = self.monitor.guard.latest_stability_ratio


@pytest.mark.parametrize("threshold", [1e-9, 1e9])
def test_curvature_trigger_reads_the_monitors_latest_ratio(tmp_path, threshold):
    monitor = CurvatureMonitor(every_n_steps=3, iterations=3, cold_iterations=3)
    recorder = CurvatureRecorder(monitor)
    cb = MSignCallback(period=None, targets="qk", max_curvature_ratio=threshold, warmup_steps=4, min_spacing=4)
    fit(tmp_path, [monitor, recorder, cb], make_module=lambda: tiny_module(lr=3e-3), max_steps=14)
    last, expected = -4, []
    for step in range(5, 15):
        ratio = recorder.latest[step]
        if ratio is not None and ratio >= threshold and step - last >= 4:
            expected.append(step)
            last = step
    assert cb.guard.trigger_steps == expected
    assert (expected == [5, 9, 13]) if threshold < 1 else (expected == [])


def test_curvature_trigger_without_a_monitor_raises(tmp_path):
    cb = MSignCallback(period=None, targets="qk", max_curvature_ratio=1.0)
    with pytest.raises(ValueError, match="CurvatureMonitor"):
        fit(tmp_path, [cb], max_steps=2)


# -------------------------------------------------------------------------------------------- calm run, resume
def test_a_calm_run_never_triggers_and_is_bit_identical_to_an_unguarded_run(tmp_path):
    plain, _ = fit(tmp_path / "plain", [], make_module=lambda: tiny_module(lr=3e-3))
    cb = MSignCallback(period=None, targets="qk", max_attn_logit=100.0, min_srank_fraction=0.2, max_grad_ratio=10.0,
                       warmup_steps=5)
    logger = RecordingLogger()
    guarded, _ = fit(tmp_path / "guarded", [cb], make_module=lambda: tiny_module(lr=3e-3), logger=logger)
    assert cb.guard.triggers == cb.guard.applications == 0
    checked = [m for _, m in logger.records if "msign/attn_logit_max" in m]
    assert len(checked) == STEPS and all(m["msign/attn_logit_max"] < 100 for m in checked)  # every check ran
    for (name, a), (_, b) in zip(plain.named_parameters(), guarded.named_parameters()):
        assert torch.equal(a, b), name


def test_resume_continues_the_trigger_decisions_exactly(tmp_path):
    def callback():
        return MSignCallback(period=None, targets="qk", max_attn_logit=100.0, max_grad_ratio=3.0, warmup_steps=4,
                             min_spacing=4)

    reference_cb = callback()
    reference, _ = fit(tmp_path / "ref", [reference_cb])
    assert reference_cb.guard.triggers >= 3 and any(s > 12 for s in reference_cb.guard.trigger_steps)

    first_cb = callback()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=12, save_top_k=-1)
    fit(tmp_path / "a", [first_cb, ckpt], max_steps=12, enable_checkpointing=True)
    saved = first_cb.guard.state_dict()
    assert saved["last_applied"] and saved["grad_ewma"] is not None

    resumed_cb = callback()
    module, _ = fit(tmp_path / "b", [resumed_cb], ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=12.ckpt"))
    assert resumed_cb.guard.trigger_steps == reference_cb.guard.trigger_steps
    assert resumed_cb.guard.state_dict() == reference_cb.guard.state_dict()
    for (name, a), (_, b) in zip(reference.named_parameters(), module.named_parameters()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"period": None}, "period` or a trigger"),
        ({"max_attn_logit": 0.0}, "max_attn_logit"),
        ({"max_attn_logit": float("inf")}, "max_attn_logit"),
        ({"min_srank_fraction": 1.0}, "min_srank_fraction"),
        ({"min_srank_fraction": 0.0}, "min_srank_fraction"),
        ({"max_grad_ratio": 1.0}, "max_grad_ratio"),
        ({"max_curvature_ratio": -1.0}, "max_curvature_ratio"),
        ({"max_attn_logit": 50.0, "check_every": 0}, "check_every"),
        ({"max_attn_logit": 50.0, "min_spacing": 0}, "min_spacing"),
        ({"max_attn_logit": 50.0, "warmup_steps": -1}, "warmup_steps"),
        ({"max_grad_ratio": 2.0, "grad_alpha": 0.0}, "grad_alpha"),
        ({"max_attn_logit": 50.0, "probe_batch_size": 0}, "probe_batch_size"),
        ({"period": 0}, "period"),
        ({"period_after_trigger": 2}, "needs a trigger"),
        ({"max_attn_logit": 50.0, "period_after_trigger": 0}, "period_after_trigger"),
    ],
)
def test_bad_trigger_arguments_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MSignCallback(**kwargs)


# -------------------------------------------------------------------------------------------- 2 processes
# tests/triggers_job.py, run as cases of tests/jobs.py (one launch per strategy).
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "fsdp1"])
def test_every_process_takes_the_same_decision(two_process_job, strategy):
    """The threshold is read off this machine's calm run (tests/triggers_job.py ``--threshold split``): at its first
    crossing one process's own batch is above it and the other's is not, so only the reduction can agree."""
    r0, r1 = load_ranks(two_process_job(strategy, "triggers"))
    assert r0["threshold"] == r1["threshold"] and r0["split_step"] == r1["split_step"]
    assert r0["trigger_steps"] == r1["trigger_steps"] and r0["state"] == r1["state"]
    for name, value in r0["whole_params"].items():
        assert torch.equal(value, r1["whole_params"][name]), name
    # Each process measured its own batch; the decision follows the maximum over both.
    steps = sorted(r0["per_layer"])
    both = {s: [max(a, b) for a, b in zip(r0["per_layer"][s], r1["per_layer"][s])] for s in steps}
    assert any(r0["per_layer"][s] != both[s] for s in steps) and any(r1["per_layer"][s] != both[s] for s in steps)
    names = r0["target_names"]
    last: dict[str, int] = {}
    expected = []
    for s in steps:
        hot = {i for i, v in enumerate(both[s]) if v > r0["threshold"]}
        chosen = [n for n in names if int(n.split(".h.")[1].split(".")[0]) in hot
                  and s - last.get(n, -r0["spacing"]) >= r0["spacing"]]
        if chosen:
            expected.append(s)
            last.update({n: s for n in chosen})
    assert r0["trigger_steps"] == expected and expected[0] == r0["split_step"]
    # Up to its first trigger the guarded run is the calm one, bit for bit (MSign only measured until then).
    first, threshold = expected[0], r0["threshold"]
    for rank, r in enumerate((r0, r1)):
        for s in range(1, first + 1):
            assert r["per_layer"][s] == r0["calm_per_layer"][rank][s], (rank, s)
    # At the first trigger the processes' own measurements flag different layers: only the reduction agrees.
    own = [{i for i, v in enumerate(r["per_layer"][first]) if v > threshold} for r in (r0, r1)]
    assert own[0] != own[1], (first, r0["per_layer"][first], r1["per_layer"][first])


@pytest.mark.slow
def test_fsdp1_resume_from_a_sharded_checkpoint_is_exact(two_process_job):
    """FSDP1, a sharded (DCP) checkpoint between triggers: the resumed run decides and ends as the straight one.

    Both runs are cases of the same launch (tests/jobs.py): the resumed one is a new Trainer and a new module whose
    state comes from the checkpoint files only."""
    straight, _ = load_ranks(two_process_job("fsdp1", "triggers_straight"))
    resumed, resumed1 = load_ranks(two_process_job("fsdp1", "triggers_resumed"))
    # The first trigger (a logit threshold read off the calm run) comes by step 5, then every 3 steps: triggers on
    # both sides of the checkpoint at step 6.
    early = [s for s in straight["trigger_steps"] if s <= 6]
    assert straight["split_step"] <= 5 and early and len(straight["trigger_steps"]) > len(early)
    assert resumed["threshold"] == straight["threshold"]
    assert resumed["trigger_steps"] == straight["trigger_steps"] == resumed1["trigger_steps"]
    assert resumed["state"] == straight["state"]
    assert sorted(resumed["per_layer"]) == list(range(7, 13))
    for step in range(7, 13):
        assert resumed["per_layer"][step] == straight["per_layer"][step], step
    for name, value in straight["whole_params"].items():
        assert torch.equal(value, resumed["whole_params"][name]), name
