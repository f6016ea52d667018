"""Guard.hook_optimizer: the guards driven by ``optimizer.step()``'s own hooks end a run with the weights, metrics and
states of the same guards called by the loop; guards whose calls need more than a step are refused by name."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from litgpt.model import GPT, Config

from lightning_msign import PSS, Curvature, DepthWarmup, Diagnostics, MSign, QKNormRetrofit, Rollback, StableRank

from conftest import TINY_CONFIG, TINY_SEQ, TINY_VOCAB

STEPS = 6


def build() -> GPT:
    torch.manual_seed(0)
    return GPT(Config(**{**TINY_CONFIG, "n_layer": 4}, block_size=TINY_SEQ, vocab_size=TINY_VOCAB,
                      padded_vocab_size=TINY_VOCAB))


GUARDS: dict[str, Callable[[GPT], Any]] = {
    "msign": lambda m: MSign(m, period=2, targets="qk", max_grad_ratio=1.5, warmup_steps=1),
    "pss": lambda m: PSS(m, tau=1.05, warmup_steps=2, cooldown_steps=1),
    "stable_rank": lambda m: StableRank(m, targets="attention", every_n_steps=2),
    "warmup": lambda m: DepthWarmup(m, start_fraction=0.5, groups=2, interval=2, start_step=1),
    "qk_norm": lambda m: QKNormRetrofit(m, max_attn_logit=2.0),
}


def run(name: str, hooked: bool) -> tuple[GPT, Any, list[dict[str, float]]]:
    model = build()
    guard = GUARDS[name](model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    hooks = guard.hook_optimizer(optimizer) if hooked else None
    ids = torch.randint(0, TINY_VOCAB, (4, TINY_SEQ + 1), generator=torch.Generator().manual_seed(1))
    seen = []
    for step in range(1, STEPS + 1):
        logits = model(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        if hooked:
            optimizer.step()
            seen.append(dict(hooks.metrics))
        else:  # the loop's own calls, as each guard's docstring writes them
            before, after = guard._optimizer_calls()
            metrics = dict(before()) if before is not None else {}
            optimizer.step()
            metrics |= after() if after is not None else {}
            seen.append(metrics)
        optimizer.zero_grad()
    return model, guard, seen


def same(a: Any, b: Any) -> bool:
    """Equal states: tensors element for element, NaN equal to NaN, containers item by item."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a:
        return isinstance(b, float) and b != b
    return a == b


def comparable(seen: list[dict[str, float]]) -> list[dict[str, Any]]:
    """The metrics without wall times, NaN as None (NaN equals nothing)."""
    return [{k: None if v != v else v for k, v in m.items() if not k.endswith("time_ms")} for m in seen]


@pytest.mark.parametrize("name", sorted(GUARDS))
def test_hooks_give_what_the_loops_calls_give(name):
    plain_model, plain, plain_seen = run(name, hooked=False)
    model, guard, seen = run(name, hooked=True)
    assert guard.last_step == plain.last_step == STEPS
    assert comparable(seen) == comparable(plain_seen) and any(seen), seen  # the guard did something visible
    assert same(guard.state_dict(), plain.state_dict())
    theirs = dict(model.named_parameters())
    for n, p in plain_model.named_parameters():
        assert torch.equal(p, theirs[n]), n


def test_the_loops_calls_are_the_documented_ones():
    """What the hooks call is what a plain loop calls: before the step the gradient readers, after it step()."""
    m = build()
    msign = MSign(m, period=2, targets="qk", max_grad_ratio=1.5)
    assert msign._optimizer_calls() == (msign.before_optimizer_step, msign.step)
    assert MSign(m, period=2, targets="qk")._optimizer_calls()[0] is None
    pss = PSS(m)
    assert pss._optimizer_calls() == (pss.before_optimizer_step, None)
    monitor = StableRank(m, log_grad_norm=False)
    assert monitor._optimizer_calls() == (None, monitor.step)


def test_removed_hooks_leave_the_optimizer_alone():
    model = build()
    guard = MSign(model, period=1, targets="qk")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    hooks = guard.hook_optimizer(optimizer)
    hooks.remove()
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    assert guard.last_step == 0 and hooks.metrics == {}


def test_guards_that_need_more_than_a_step_are_refused_by_name():
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    cases = [
        (Rollback(model, optimizers=optimizer),
         "Rollback cannot be driven by optimizer hooks: it needs the step's loss"),
        (Curvature(model, optimizer), "Curvature cannot be driven by optimizer hooks: its step needs a loss closure"),
        (Diagnostics(model), "Diagnostics cannot be driven by optimizer hooks: its step needs the step's token ids"),
        (MSign(model, period=None, targets="qk", max_attn_logit=10.0, logits_from="second_forward"),
         "logits_from='second_forward' needs the step's token ids"),
        (DepthWarmup(model, start_step=1, curvature_margin=1.0), "with `curvature_margin` its step needs"),
    ]
    for guard, message in cases:
        with pytest.raises(NotImplementedError, match=message):
            guard.hook_optimizer(optimizer)
