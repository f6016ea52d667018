"""The loop-agnostic guards (MSign, PSS, StableRank) in a plain PyTorch loop, and against their Lightning callbacks.

A tiny LitGPT trained with AdamW on fixed random tokens; a loss scaled at one step (``SPIKE``) makes the
gradient norm jump, so PSS triggers there whatever the data.
"""

from __future__ import annotations

import io
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from litgpt import GPT, Config
from torch import nn
from torch.utils.data import DataLoader

from lightning_msign import PSS, MSign, MSignCallback, PSSCallback, StableRank, StableRankMonitor
from lightning_msign.guards.base import Guard

from conftest import RecordingLogger, trainer_kwargs

GPT_CONFIG = dict(
    n_layer=2, n_head=4, n_query_groups=2, n_embd=32, block_size=16, vocab_size=64, padded_vocab_size=64, bias=False
)
STEPS, PERIOD, EVERY, SPIKE = 12, 3, 2, 8
MSIGN_KW: dict[str, Any] = dict(period=PERIOD, targets="qk")
# The forced spike (loss x 10 at step SPIKE) gives a ratio near 10; tau=2.5 is the paper's threshold.
PSS_KW: dict[str, Any] = dict(tau=2.5, warmup_steps=2, cooldown_steps=2)
SRANK_KW: dict[str, Any] = dict(every_n_steps=EVERY)
QK = [f"model.transformer.h.{i}.attn.qkv.weight.{b}" for i in range(2) for b in ("q", "k")]


class TinyLM(LightningModule):
    """The tiny GPT as a LightningModule; the plain loops drive the same class as a plain ``nn.Module``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.model = GPT(Config(**GPT_CONFIG))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return lm_loss(self.model, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self)


def lm_loss(gpt: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = gpt(batch["input_ids"])
    return F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten()) * batch["scale"]


def make_optimizer(module: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(module.parameters(), lr=3e-3, weight_decay=0.1)


def make_batches(n: int, size: int = 4, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Optimizer step ``s`` (1-based) trains on ``batches[s - 1]``; the loss of step SPIKE is scaled by 10."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        tokens = torch.randint(0, GPT_CONFIG["vocab_size"], (size, GPT_CONFIG["block_size"] + 1), generator=gen)
        scale = torch.tensor(10.0 if i + 1 == SPIKE else 1.0)
        out.append({"input_ids": tokens[:, :-1], "targets": tokens[:, 1:], "scale": scale})
    return out


def make_guards(module: nn.Module) -> tuple[MSign, PSS, StableRank]:
    return MSign(module, **MSIGN_KW), PSS(module, **PSS_KW), StableRank(module, **SRANK_KW)


def train(
    module: TinyLM,
    optimizer: torch.optim.Optimizer,
    guards: tuple[MSign, PSS, StableRank],
    batches: Sequence[dict[str, torch.Tensor]],
    steps: range,
    explicit_steps: bool = True,
    on_step: Optional[Any] = None,
) -> dict[int, dict[str, float]]:
    """The plain loop: ``{optimizer step: every metric the guards returned for it}``.

    Calls are in the order of the callbacks' hooks for ``callbacks=[MSign, PSS, StableRank]``: PSS then
    the gradient norm before the optimizer step (``on_before_optimizer_step``), MSign then the stable ranks
    after it (``on_train_batch_end``).
    """
    msign, pss, srank = guards
    module.train()
    metrics: dict[int, dict[str, float]] = {}
    for step in steps:
        arg = step if explicit_steps else None
        module.training_step(batches[step - 1], step - 1).backward()
        m = pss.before_optimizer_step(arg)
        m.update(srank.grad_norm(arg))
        optimizer.step()
        optimizer.zero_grad()
        signed = msign.step(arg)
        if on_step is not None:
            on_step(step, signed)
        m.update(signed)
        m.update(srank.step(arg))
        metrics[step] = m
    return metrics


def comparable(metrics: dict[str, float]) -> dict[str, Any]:
    """Metrics without wall times, NaN made comparable (the ratio of the first step is NaN)."""
    return {k: ("nan" if math.isnan(v) else v) for k, v in metrics.items() if not k.endswith("time_ms")}


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def assert_same_state(a: Any, b: Any, where: str = "state") -> None:
    """Equal nested states: tensors bit for bit, everything else with ``==``."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, sorted(a), sorted(b) if isinstance(b, dict) else b)
        for k in a:
            assert_same_state(a[k], b[k], f"{where}[{k!r}]")
    else:
        assert a == b, (where, a, b)


def assert_flat(matrix: torch.Tensor, name: str) -> None:
    """All singular values equal (to float32 rounding): the spectrum MSign leaves behind."""
    s = torch.linalg.svdvals(matrix.double())
    assert float(s.max() / s.min()) == pytest.approx(1.0, abs=1e-4), (name, s.min().item(), s.max().item())


@pytest.fixture
def restore_determinism():
    """``Trainer(deterministic=True)`` turns on deterministic algorithms process-wide; turn it back."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


# ------------------------------------------------------------------------------------------ (a) plain loop
def test_plain_loop_metrics_on_the_right_steps_and_flat_signed_blocks():
    module = TinyLM()
    optimizer = make_optimizer(module)
    msign, pss, srank = make_guards(module)
    assert msign.target_names == QK
    signed_steps = []

    def check_flat(step: int, signed: dict[str, float]) -> None:
        if signed:  # right after an application: every signed block has a flat spectrum
            signed_steps.append(step)
            for t in msign.matrices:
                assert_flat(t.matrix(), t.name)

    guards = (msign, pss, srank)
    metrics = train(module, optimizer, guards, make_batches(STEPS), range(1, STEPS + 1), on_step=check_flat)

    # MSign after steps 3, 6, 9, 12, counting its applications; signed blocks reach full stable rank.
    assert signed_steps == [3, 6, 9, 12] and msign.applications == 4
    for step, m in metrics.items():
        assert ("msign/applications" in m) == (step % PERIOD == 0), step
    for k, step in enumerate(signed_steps, start=1):
        m = metrics[step]
        assert m["msign/applications"] == k and m["msign/skipped_nonfinite"] == 0
        for name in QK:
            rows = 32 if name.endswith(".q") else 16  # 4 query heads x 8, 2 key groups x 8; 32 columns
            assert m[f"msign/srank_after/{name}"] == pytest.approx(rows, rel=1e-4)
            assert m[f"msign/srank_before/{name}"] < rows
        assert m["msign/srank_after_min"] == pytest.approx(16, rel=1e-4)

    # PSS returns its detector on every step (log_every_n_steps=1) and triggers on the forced spike only.
    assert pss.trigger_steps == [SPIKE] and pss.triggers == 1
    for step, m in metrics.items():
        assert m["pss/triggered"] == float(step == SPIKE), step
        assert m["pss/triggers"] == float(step >= SPIKE)
        assert m["pss/grad_norm"] > 0
    assert math.isnan(metrics[1]["pss/ratio"])  # no average before the first step
    assert metrics[SPIKE]["pss/ratio"] >= PSS_KW["tau"]
    assert all(metrics[s]["pss/ratio"] < PSS_KW["tau"] for s in range(2, STEPS + 1) if s != SPIKE)
    for name in QK:  # the protection smoothed the dominant singular value of every qk block
        assert metrics[SPIKE][f"pss/sigma1_after/{name}"] < metrics[SPIKE][f"pss/sigma1_before/{name}"]
        assert metrics[SPIKE][f"pss/rank/{name}"] >= 2

    # StableRank: the gradient norm before, the stable ranks after, every second optimizer step.
    for step, m in metrics.items():
        due = step % EVERY == 0
        assert ("grad_norm/total" in m) == due and ("srank/min" in m) == due, step
        if due:
            assert m["grad_norm/total"] == pytest.approx(m["pss/grad_norm"], rel=1e-6)
            per_matrix = {k: v for k, v in m.items() if k.startswith("srank/model.")}
            assert len(per_matrix) == len(srank.target_names) == 12  # q, k, v, proj, fc, proj per layer
            assert m["srank/min"] == min(per_matrix.values())
    # Measured after MSign on its steps (6 and 12): a flat block's power estimate is its exact stable rank.
    for step in (6, 12):
        assert metrics[step]["srank/model.transformer.h.0.attn.qkv.weight.k"] == pytest.approx(16, rel=1e-4)


def test_guard_names_are_those_of_the_unwrapped_module():
    module = TinyLM()
    wrapped = torch.compile(module)  # an OptimizedModule: names carry `_orig_mod.`
    assert MSign(wrapped, **MSIGN_KW).target_names == QK
    assert MSign(module.model, **MSIGN_KW).target_names == [n.removeprefix("model.") for n in QK]


# ------------------------------------------------------------------------------ (b) guards == callbacks
def lightning_run(tmp_path: Path, batches: list[dict[str, torch.Tensor]]):
    callbacks = [MSignCallback(**MSIGN_KW), PSSCallback(**PSS_KW), StableRankMonitor(**SRANK_KW)]
    logger = RecordingLogger()
    module = TinyLM()
    trainer = Trainer(
        **trainer_kwargs(tmp_path, max_steps=len(batches), logger=logger, deterministic=True), callbacks=callbacks
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    assert trainer.global_step == len(batches)
    logged: dict[int, dict[str, Any]] = {}
    for step, m in logger.records:
        merged = logged.setdefault(step, {})
        for k, v in comparable(m).items():
            assert merged.get(k, v) == v, (step, k)  # a key logged twice for one step holds one value
            merged[k] = v
    return module, callbacks, logged


def test_guards_and_callbacks_agree_bit_for_bit(tmp_path, restore_determinism):
    batches = make_batches(STEPS)
    lit_module, callbacks, logged = lightning_run(tmp_path, batches)

    module = TinyLM()  # the same initial weights (same seed), the same batches, the same optimizer
    guards = make_guards(module)
    metrics = train(module, make_optimizer(module), guards, batches, range(1, STEPS + 1))

    assert_same_weights(lit_module, module)
    # The callbacks log optimizer step s at index s - 1 (global_step before it, global_step - 1 after it).
    expected = {step - 1: comparable(m) for step, m in metrics.items() if m}
    assert sorted(logged) == sorted(expected)
    for step in expected:
        assert set(logged[step].items()) == set(expected[step].items()), step
    assert "pss/sigma1_after/" + QK[0] in logged[SPIKE - 1] and "msign/applications" in logged[PERIOD - 1]
    for callback, guard in zip(callbacks, guards):
        assert callback.guard.target_names == guard.target_names
        assert_same_state(callback.state_dict(), guard.state_dict(), type(guard).__name__)


# ----------------------------------------------------------------------------------------- (c) resume
def checkpoint(module: nn.Module, optimizer: torch.optim.Optimizer, guards: Sequence[Guard]) -> bytes:
    buffer = io.BytesIO()
    state = {"model": module.state_dict(), "optimizer": optimizer.state_dict()}
    state.update({type(g).__name__: g.state_dict() for g in guards})
    torch.save(state, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("explicit_steps", [True, False], ids=["step_given", "step_counted"])
def test_interrupted_plain_loop_resumes_exactly(explicit_steps):
    batches, stop = make_batches(STEPS), 7  # between MSign applications, before the spike, vectors warm
    module = TinyLM()
    optimizer = make_optimizer(module)
    guards = make_guards(module)
    metrics = train(module, optimizer, guards, batches, range(1, STEPS + 1), explicit_steps)

    first = TinyLM()
    first_opt = make_optimizer(first)
    first_guards = make_guards(first)
    train(first, first_opt, first_guards, batches, range(1, stop + 1), explicit_steps)
    saved = checkpoint(first, first_opt, first_guards)
    del first, first_opt, first_guards

    resumed = TinyLM(seed=123)  # other weights, fresh optimizer and guards: everything comes from the file
    resumed_opt = make_optimizer(resumed)
    resumed_guards = make_guards(resumed)
    state = torch.load(io.BytesIO(saved), weights_only=True)
    resumed.load_state_dict(state["model"])
    resumed_opt.load_state_dict(state["optimizer"])
    for g in resumed_guards:
        g.load_state_dict(state[type(g).__name__])
    assert resumed_guards[0].last_step == stop and resumed_guards[2].state_dict()["vectors"]
    tail = train(resumed, resumed_opt, resumed_guards, batches, range(stop + 1, STEPS + 1), explicit_steps)

    assert_same_weights(resumed, module)
    for step in tail:
        assert comparable(tail[step]) == comparable(metrics[step]), step
    for a, b in zip(resumed_guards, guards):
        assert_same_state(a.state_dict(), b.state_dict(), type(a).__name__)
    assert resumed_guards[0].applications == 4 and resumed_guards[1].trigger_steps == [SPIKE]


def test_state_dict_holds_plain_values_and_missing_keys_keep_defaults():
    module = TinyLM()
    msign, pss, srank = make_guards(module)
    train(module, make_optimizer(module), (msign, pss, srank), make_batches(STEPS), range(1, STEPS + 1))
    names = msign.target_names
    assert msign.state_dict() == {
        "last_step": 12, "applications": 4, "skipped_nonfinite": 0, "trigger_steps": [],
        "last_applied": {n: 12 for n in names}, "reference_srank": None, "grad_ewma": None,
    }
    state = pss.state_dict()
    assert "triggers" not in state and state["trigger_steps"] == [SPIKE] and isinstance(state["ewma"], float)
    assert pss.triggers == 1  # derived from the steps, not stored beside them
    assert all(isinstance(v, torch.Tensor) for v in srank.state_dict()["vectors"].values())
    fresh = MSign(TinyLM(), **MSIGN_KW)
    fresh.load_state_dict({})  # an older checkpoint without these keys
    assert fresh.state_dict() == {
        "last_step": 0, "applications": 0, "skipped_nonfinite": 0, "trigger_steps": [],
        "last_applied": {}, "reference_srank": None, "grad_ewma": None,
    }


# ------------------------------------------------------------------------------ (d) gradient accumulation
def test_a_step_seen_twice_acts_once():
    module = TinyLM()
    msign, pss, srank = make_guards(module)
    for step in (1, 2):
        assert msign.step(step) == {}
    signed = msign.step(3)
    after = weights(module)
    assert signed["msign/applications"] == 1
    assert msign.step(3) == {} and msign.applications == 1
    assert msign.step(2) == {}  # an older step too (a resumed loop replaying a batch)
    assert all(torch.equal(after[n], p) for n, p in module.named_parameters())
    assert srank.step(2) and srank.step(2) == {}

    batch = make_batches(1)[0]
    module.training_step(batch, 0).backward()
    assert pss.before_optimizer_step(1)
    ewma = pss.ewma
    assert pss.before_optimizer_step(1) == {} and pss.ewma == ewma and pss.last_step == 1


def test_gradient_accumulation_acts_once_per_optimizer_step():
    """Two micro-batches per optimizer step, the guards called after every one (as the callbacks' hooks
    are: ``global_step`` is ``s - 1`` after the first micro-batch of step ``s`` and ``s`` after the second),
    PSS twice before the step (two optimizers): the same run as calling each once per optimizer step."""
    micro = make_batches(2 * STEPS, size=2, seed=5)
    for i, b in enumerate(micro):  # the spike scales both micro-batches of optimizer step SPIKE
        b["scale"] = torch.tensor(10.0 if i // 2 + 1 == SPIKE else 1.0)
    runs = []
    for per_micro_batch in (True, False):
        module = TinyLM()
        optimizer = make_optimizer(module)
        msign, pss, srank = make_guards(module)
        metrics: dict[int, dict[str, float]] = {}
        for step in range(1, STEPS + 1):
            m = metrics.setdefault(step, {})
            for k in range(2):
                (module.training_step(micro[2 * step - 2 + k], 0) / 2).backward()
                if per_micro_batch and k == 0:
                    m.update(msign.step(step - 1))
                    m.update(srank.step(step - 1))
            m.update(pss.before_optimizer_step(step))
            if per_micro_batch:
                assert pss.before_optimizer_step(step) == {}
            m.update(srank.grad_norm(step))
            optimizer.step()
            optimizer.zero_grad()
            m.update(msign.step(step))
            m.update(srank.step(step))
        runs.append((module, {s: comparable(m) for s, m in metrics.items()}, msign, pss, srank))
    (a, ma, *ga), (b, mb, *gb) = runs
    assert_same_weights(a, b)
    assert ma == mb
    assert ga[0].applications == 4 and ga[1].trigger_steps == [SPIKE]
    for x, y in zip(ga, gb):
        assert_same_state(x.state_dict(), y.state_dict(), type(x).__name__)


# ------------------------------------------------------------------------------------------ (e) errors
@pytest.mark.parametrize(
    ("build", "argument", "value"),
    [
        (lambda: MSign(period=0), "period", 0),
        (lambda: MSign(period=True), "period", True),
        (lambda: MSign(period=2.5), "period", 2.5),
        (lambda: MSign(backend="qr"), "backend", "qr"),
        (lambda: MSign(backend="svd", steps=5), "steps", 5),
        (lambda: MSign(backend="newton_schulz", steps=0), "steps", 0),
        (lambda: MSign(targets="attn"), "targets", "attn"),
        (lambda: MSign(targets=[]), "targets", []),
        (lambda: MSign(targets="qk", split_qkv=False), "targets", False),  # names split_qkv=False
        (lambda: MSign(log_stable_rank="yes"), "log_stable_rank", "yes"),
        (lambda: PSS(tau=1.0), "tau", 1.0),
        (lambda: PSS(tau=float("nan")), "tau", float("nan")),
        (lambda: PSS(alpha=0.0), "alpha", 0.0),
        (lambda: PSS(alpha=1.5), "alpha", 1.5),
        (lambda: PSS(warmup_steps=-1), "warmup_steps", -1),
        (lambda: PSS(cooldown_steps=1.5), "cooldown_steps", 1.5),
        (lambda: PSS(rank=0), "rank", 0),
        (lambda: PSS(rank="top"), "rank", "top"),
        (lambda: PSS(max_rank=0), "max_rank", 0),
        (lambda: PSS(action="clip"), "action", "clip"),
        (lambda: PSS(smoothing="median"), "smoothing", "median"),
        (lambda: PSS(smoothing_kwargs={"nonsense": 1.0}), "smoothing_kwargs", {"nonsense": 1.0}),
        (lambda: PSS(power_iters=0), "power_iters", 0),
        (lambda: PSS(log_every_n_steps=0), "log_every_n_steps", 0),
        (lambda: StableRank(every_n_steps=0), "every_n_steps", 0),
        (lambda: StableRank(mode="svd"), "mode", "svd"),
        (lambda: StableRank(power_iters=-2), "power_iters", -2),
        (lambda: StableRank(warmup_iters=0), "warmup_iters", 0),
        (lambda: StableRank(log_norms=1), "log_norms", 1),
    ],
)
def test_bad_arguments_raise_naming_argument_and_value(build, argument, value):
    with pytest.raises(ValueError) as err:
        build()
    message = str(err.value)
    assert f"`{argument}`" in message and repr(value) in message, message


def test_targets_matching_nothing_raise_when_attached():
    guard = MSign(targets="*.no_such_weight")  # a valid pattern: only the model can tell it matches nothing
    with pytest.raises(ValueError, match=r"`targets` entries \['\*\.no_such_weight'\] match no matrix"):
        guard.attach(TinyLM())
    with pytest.raises(TypeError, match="`module` must be a torch.nn.Module, got dict"):
        MSign().attach({})


@pytest.mark.parametrize(
    ("guard", "call"),
    [
        (MSign(period=1), lambda g: g.step()),
        (MSign(), lambda g: g.apply()),
        (PSS(), lambda g: g.before_optimizer_step(1)),
        (PSS(), lambda g: g.protect()),
        (StableRank(), lambda g: g.step(1)),
        (StableRank(), lambda g: g.grad_norm(1)),
        (StableRank(), lambda g: g.compute()),
        (MSign(), lambda g: g.plan),
    ],
)
def test_using_a_guard_before_attaching_raises(guard, call):
    with pytest.raises(RuntimeError, match=r"needs a module: pass it to the constructor or call attach\(module\)"):
        call(guard)
    assert guard.module is None


def test_step_before_attaching_raises_on_any_step():
    with pytest.raises(RuntimeError):
        MSign(period=3).step(1)  # a forgotten attach() is noticed at once, not at step 3


# --------------------------------------------------------------------------------------- the plain example
def test_plain_loop_example_runs(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        import plain_loop
    finally:
        sys.path.pop(0)
    ckpt = tmp_path / "plain.pt"
    result = plain_loop.main(["--steps", "6", "--period", "3", "--log-every", "2", "--checkpoint", str(ckpt)])
    out = capsys.readouterr().out
    assert result["msign"].applications == 2 and result["monitor"].last_step == 6
    assert "msign/applications=2" in out and "srank/min" in out
    assert all(torch.isfinite(p).all() for p in result["model"].parameters())
    state = torch.load(ckpt, weights_only=True)
    assert state["msign"] == result["msign"].state_dict() and state["pss"]["last_step"] == 6
