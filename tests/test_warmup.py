"""Tests for the architecture warm-up: :class:`DepthWarmup` (any loop) and :class:`DepthWarmupCallback` (Trainer).

Real LitGPT models (and HF GPT-2 / Llama and nanoGPT built from small configs), a real Trainer, the shipped
corpus. Identity is checked against a model built with only the active blocks (same weights).
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from _models import GPT, GPTConfig
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_msign import DepthWarmup, DepthWarmupCallback, LitGPTModule
from lightning_msign.guards.warmup import InactiveForward, unlock_plan
from lightning_msign.metric_keys import WARMUP_ACTIVE_BLOCKS, WARMUP_DEFERRED, WARMUP_UNLOCKED

from conftest import TINY_CONFIG, TINY_SEQ, TINY_VOCAB, RecordingLogger, load_ranks, tiny_data, trainer_kwargs


def litgpt(n_layer: int = 4, **kwargs: Any) -> LitGPTModule:
    kwargs.setdefault("lr", 3e-3)
    kwargs.setdefault("warmup_steps", 2)
    return LitGPTModule(dict(TINY_CONFIG, n_layer=n_layer), vocab_size=TINY_VOCAB, block_size=TINY_SEQ, **kwargs)


def ids(seed: int = 0, batch: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def with_blocks(small: nn.Module, big: nn.Module, blocks: list[int], path: str) -> nn.Module:
    """``small`` holding ``big``'s weights, its block ``j`` being ``big``'s block ``blocks[j]``."""
    state = {}
    prefix = path + "."
    for name, value in big.state_dict().items():
        if name.startswith(prefix):
            index, rest = name[len(prefix):].split(".", 1)
            if int(index) in blocks:
                state[f"{prefix}{blocks.index(int(index))}.{rest}"] = value
        else:
            state[name] = value
    small.load_state_dict(state)
    return small


# ----------------------------------------------------------------------------------------------- the plan
@pytest.mark.parametrize(
    ("n", "fraction", "groups", "order", "active", "plan"),
    [
        (8, 0.5, 2, "stack", [0, 1, 2, 3], [[4, 5], [6, 7]]),
        (8, 0.5, 4, "interleave", [0, 2, 4, 6], [[1], [3], [5], [7]]),
        (10, 0.3, 4, "stack", [0, 1, 2], [[3, 4], [5, 6], [7, 8], [9]]),  # near-equal, the first ones larger
        (7, 0.3, 2, "interleave", [0, 2, 4], [[1, 3], [5, 6]]),
        (4, 0.25, 9, "stack", [0], [[1], [2], [3]]),  # fewer blocks than groups: one block each
        (4, 1.0, 2, "stack", [0, 1, 2, 3], []),
        (1, 0.1, 2, "interleave", [0], []),
    ],
)
def test_unlock_plan(n, fraction, groups, order, active, plan):
    assert unlock_plan(n, fraction, groups, order) == (active, plan)


# ------------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize("order", ["stack", "interleave"])
def test_inactive_litgpt_blocks_are_the_identity(order):
    torch.manual_seed(0)
    big = litgpt(4)
    guard = DepthWarmup(big, start_fraction=0.5, groups=2, interval=3, start_step=0, order=order)
    active = list(guard.active_blocks)
    assert active == ([0, 1] if order == "stack" else [0, 2]) and guard.inactive_blocks == tuple(
        i for i in range(4) if i not in active
    )
    assert [b.output_projections for b in guard.blocks][0] == ("attn.proj", "mlp.proj")
    names = [n for n, _ in big.named_parameters()]
    small = with_blocks(litgpt(2), big, active, "model.transformer.h")
    x = ids()
    with torch.no_grad():
        assert torch.equal(big(x), small(x))
    # names and state_dict keys unchanged; no compute in an inactive block
    assert [n for n, _ in big.named_parameters()] == names
    assert "model.transformer.h.3.attn.proj.weight" in big.state_dict()
    calls = []
    big.model.transformer.h[guard.inactive_blocks[0]].attn.register_forward_hook(lambda *a: calls.append(1))
    big(x)
    assert calls == []



def test_litgpt_moe_unlock_zeroes_every_expert_and_keeps_the_output():
    torch.manual_seed(0)
    config = dict(TINY_CONFIG, n_layer=2, mlp_class_name="LLaMAMoE", n_expert=2, n_expert_per_token=1,
                  moe_intermediate_size=16, intermediate_size=16)
    module = LitGPTModule(config, vocab_size=TINY_VOCAB, block_size=TINY_SEQ)
    guard = DepthWarmup(module, start_fraction=0.5, groups=1, interval=1, start_step=0)
    assert guard.blocks[1].output_projections == ("attn.proj", "mlp.experts.0.proj", "mlp.experts.1.proj")
    x = ids()
    with torch.no_grad():
        before = module(x)
        assert guard.step(1) == {WARMUP_UNLOCKED: 1.0, WARMUP_ACTIVE_BLOCKS: 2.0}
        assert torch.equal(module(x), before)

def test_inactive_hf_gpt2_and_llama_blocks_are_the_identity():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    gpt2 = dict(vocab_size=TINY_VOCAB, n_positions=TINY_SEQ, n_embd=32, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, attn_implementation="eager")
    llama = dict(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=TINY_SEQ)
    cases = [
        (GPT2LMHeadModel, GPT2Config, gpt2, "n_layer", "transformer.h", ("attn.c_proj", "mlp.c_proj")),
        (LlamaForCausalLM, LlamaConfig, llama, "num_hidden_layers", "model.layers",
         ("self_attn.o_proj", "mlp.down_proj")),
    ]
    for model_cls, config_cls, kwargs, layers, path, projections in cases:
        big = model_cls(config_cls(**kwargs, **{layers: 4})).eval()
        guard = DepthWarmup(big, start_fraction=0.5, groups=1, interval=1, start_step=0, order="interleave")
        assert guard.blocks[0].output_projections == projections
        small = with_blocks(model_cls(config_cls(**kwargs, **{layers: 2})).eval(), big, [0, 2], path)
        x = ids()
        with torch.no_grad():
            assert torch.allclose(big(x, use_cache=False).logits, small(x, use_cache=False).logits, atol=1e-6)
            if model_cls is GPT2LMHeadModel:  # tuple outputs: one None more per requested attention map
                out = big(x, use_cache=False, output_attentions=True)
                assert [a is None for a in out.attentions] == [False, True, False, True]
        guard.step(1)  # unlock: the output is unchanged
        with torch.no_grad():
            assert torch.allclose(big(x, use_cache=False).logits, small(x, use_cache=False).logits, atol=1e-6)
        assert guard.fully_unlocked


def test_inactive_nanogpt_blocks_are_the_identity_and_pickle():
    torch.manual_seed(0)
    config = GPTConfig(n_layer=4, vocab_size=TINY_VOCAB)
    big = GPT(config).eval()
    guard = DepthWarmup(big, start_fraction=0.5, groups=2, interval=1, start_step=0)
    small = with_blocks(GPT(GPTConfig(n_layer=2, vocab_size=TINY_VOCAB)).eval(), big, [0, 1], "transformer.h")
    x = ids(length=8)
    with torch.no_grad():
        assert torch.equal(big(x), small(x))
        for clone in (pickle.loads(pickle.dumps(big)), copy.deepcopy(big)):  # ddp_spawn pickles the model
            assert isinstance(clone.transformer.h[3].__dict__["forward"], InactiveForward)
            assert torch.equal(clone(x), small(x))
    assert guard.blocks[0].output_projections == ("attn.c_proj", "mlp.c_proj")


class TupleBlock(nn.Module):
    """A block no reader knows, returning ``(hidden, extra)``."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(8, 8)
        self.out = nn.Linear(8, 8)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return hidden_states + self.out(torch.relu(self.inner(hidden_states))), hidden_states.sum()


class TupleModel(nn.Module):
    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList([TupleBlock() for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(hidden_states=x)[0]
        return x


def test_unknown_block_class_needs_output_projections_and_learns_its_structure():
    model = TupleModel()
    with pytest.raises(ValueError, match="block class TupleBlock.*`output_projections`"):
        DepthWarmup(model, start_step=0, blocks_attr="layers")
    with pytest.raises(ValueError, match="`output_projections` entry 'proj' matches no module"):
        DepthWarmup(model, start_step=0, blocks_attr="layers", output_projections=["proj"])
    guard = DepthWarmup(model, start_fraction=0.34, start_step=0, blocks_attr="layers", output_projections=["o*"])
    assert guard.active_blocks == (0, 1) and guard.blocks[0].output_projections == ("out",)
    x = torch.randn(2, 8)
    rng = torch.get_rng_state()
    out = model.layers[2](hidden_states=x)
    assert isinstance(out, tuple) and len(out) == 2 and out[0] is x and out[1] is None
    assert torch.equal(torch.get_rng_state(), rng)


# --------------------------------------------------------------------------------- optimizer, unlocking
def test_inactive_weights_get_no_update_and_no_weight_decay():
    torch.manual_seed(0)
    module = litgpt(4)
    guard = DepthWarmup(module, start_fraction=0.5, groups=2, interval=100, start_step=100)
    inactive = {n: p.detach().clone() for n, p in module.named_parameters() if ".h.2." in n or ".h.3." in n}
    active = {n: p.detach().clone() for n, p in module.named_parameters() if ".h.0." in n}
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.5)
    for step in range(1, 5):
        module(ids(step)).square().mean().backward()
        guard.clear_inactive_grads()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # zero tensors: AdamW would decay them without the clearing
        guard.step(step)
    params = dict(module.named_parameters())
    for name, value in inactive.items():
        assert torch.equal(params[name], value), name
        assert params[name] not in optimizer.state
    assert all(not torch.equal(params[n], v) for n, v in active.items() if n.endswith("weight"))


def test_unlock_preserves_the_output_and_the_unlocked_block_trains():
    torch.manual_seed(0)
    module = litgpt(4)
    guard = DepthWarmup(module, start_fraction=0.5, groups=2, interval=100, start_step=3)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.1)
    x = ids(99)

    def train(step: int) -> dict[str, float]:
        module(ids(step)).square().mean().backward()
        guard.clear_inactive_grads()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            before = module(x)
        metrics = guard.step(step)
        with torch.no_grad():
            assert torch.equal(module(x), before), f"step {step}: the output changed"
        return metrics

    assert [train(s) for s in (1, 2)] == [{WARMUP_ACTIVE_BLOCKS: 2.0}] * 2
    block = module.model.transformer.h[2]
    inner = block.mlp.fc.weight.detach().clone()
    assert train(3) == {WARMUP_UNLOCKED: 1.0, WARMUP_ACTIVE_BLOCKS: 3.0}
    assert guard.active_blocks == (0, 1, 2) and guard.unlock_steps == (3,) and not guard.fully_unlocked
    assert "forward" not in block.__dict__ and block.attn.proj.weight.abs().max() == 0
    assert torch.equal(block.mlp.fc.weight, inner)  # not zero: the block is no stationary point
    for step in (4, 5, 6):
        train(step)
    assert block.attn.proj.weight.abs().min() > 0 and block.mlp.proj.weight.abs().max() > 0
    assert not torch.equal(block.mlp.fc.weight, inner)  # the inner weights follow the output projection


def test_schedule_deferral_and_max_defer_steps():
    torch.manual_seed(0)
    guard = DepthWarmup(litgpt(4), start_fraction=0.25, groups=3, interval=2, start_step=1)
    unlocked = [s for s in range(1, 10) if WARMUP_UNLOCKED in guard.step(s)]
    assert unlocked == [1, 3, 5] == list(guard.unlock_steps) and guard.fully_unlocked
    assert guard.step(5) == {} and guard.step(10) == {WARMUP_ACTIVE_BLOCKS: 4.0}

    guard = DepthWarmup(litgpt(4), start_fraction=0.25, groups=3, interval=2, start_step=1, curvature_margin=0.8,
                        max_defer_steps=3)
    ratios = {1: None, 2: 0.9, 3: 0.5, 4: 0.1, 5: 0.1, 6: 2.0, 7: 2.0, 8: 2.0, 9: 2.0}
    log = {s: guard.step(s, stability_ratio=r) for s, r in ratios.items()}
    # due 1: deferred at 1 (no measurement) and 2 (0.9 >= 0.8), unlocked at 3; next due 5 (3 + interval)
    # due 5: unlocked at once (0.1); next due 7: deferred at 7, 8, 9, then forced at 7 + max_defer_steps = 10
    assert [s for s, m in log.items() if WARMUP_DEFERRED in m] == [1, 2, 7, 8, 9]
    assert list(guard.unlock_steps) == [3, 5] and log[5] == {WARMUP_UNLOCKED: 1.0, WARMUP_ACTIVE_BLOCKS: 3.0}
    assert WARMUP_UNLOCKED in guard.step(10, stability_ratio=2.0) and guard.unlock_steps == (3, 5, 10)


def test_state_dict_restores_the_active_set():
    torch.manual_seed(0)
    module = litgpt(4)
    guard = DepthWarmup(module, start_fraction=0.25, groups=3, interval=2, start_step=1, order="interleave")
    for s in (1, 2, 3):
        guard.step(s)
    state = guard.state_dict()
    assert state["active"] == [0, 1, 2] and state["unlock_steps"] == [1, 3] and state["last_step"] == 3
    fresh_module = copy.deepcopy(module)
    for block in fresh_module.model.transformer.h:
        block.__dict__.pop("forward", None)
    fresh = DepthWarmup(fresh_module, start_fraction=0.25, groups=3, interval=2, start_step=1, order="interleave")
    assert fresh.active_blocks == (0,)
    fresh.load_state_dict(state)
    assert fresh.active_blocks == (0, 1, 2) and fresh.unlock_steps == (1, 3)
    h = fresh_module.model.transformer.h
    assert [isinstance(b.__dict__.get("forward"), InactiveForward) for b in h] == [False, False, False, True]
    assert fresh.step(5) == {WARMUP_UNLOCKED: 1.0, WARMUP_ACTIVE_BLOCKS: 4.0}


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"start_fraction": 0.0}, "`start_fraction`.*got 0.0"),
        ({"start_fraction": 1.5}, "`start_fraction`.*got 1.5"),
        ({"groups": 0}, "`groups`.*got 0"),
        ({"interval": 0}, "`interval`.*got 0"),
        ({"start_step": -1}, "`start_step`.*got -1"),
        ({"order": "random"}, "`order`.*'random'"),
        ({"curvature_margin": 0.0}, "`curvature_margin`.*got 0.0"),
        ({"curvature_margin": 1.0, "max_defer_steps": 0}, "`max_defer_steps`.*got 0"),
        ({"max_defer_steps": 5}, "`max_defer_steps`.*`curvature_margin`"),
        ({"blocks_attr": "a..b"}, "`blocks_attr`.*'a..b'"),
        ({"output_projections": "attn.proj"}, "`output_projections`.*'attn.proj'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DepthWarmup(**kwargs)
    with pytest.raises(ValueError, match=match):
        DepthWarmupCallback(**kwargs)


def test_models_without_a_block_list_and_start_step_none():
    with pytest.raises(ValueError, match=r"looked for .*`transformer.h` or `model.layers`.*Linear.*`blocks_attr`"):
        DepthWarmup(nn.Linear(4, 4), start_step=0)
    model = TupleModel()
    with pytest.raises(ValueError, match="`blocks_attr`.*'layers.0'.*TupleBlock"):
        DepthWarmup(model, start_step=0, blocks_attr="layers.0")
    with pytest.raises(ValueError, match="`blocks_attr`.*'layer'.*no attribute 'layer'"):
        DepthWarmup(model, start_step=0, blocks_attr="layer")
    with pytest.raises(ValueError, match="`start_step` must be set"):
        DepthWarmup(litgpt(2))
    with pytest.warns(UserWarning, match="nothing to unlock"):
        guard = DepthWarmup(litgpt(2), start_fraction=1.0, start_step=0)
    assert guard.fully_unlocked and guard.step(1) == {WARMUP_ACTIVE_BLOCKS: 2.0}


# ----------------------------------------------------------------------------------------------- Trainer
class _Checks(DepthWarmupCallback):
    """Asserts at the hooks: inactive blocks have no gradient at the optimizer step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[int, tuple[int, ...]]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        blocks = pl_module.model.transformer.h
        for i in self.guard.inactive_blocks:
            assert all(p.grad is None for p in blocks[i].parameters())
        for i in self.guard.active_blocks:
            assert blocks[i].attn.proj.weight.grad is not None
        self.seen.append((trainer.global_step + 1, self.guard.active_blocks))


def test_callback_with_gradient_accumulation(tmp_path):
    seed_everything(0, verbose=False)
    logger = RecordingLogger()
    callback = _Checks(start_fraction=0.25, groups=2, interval=2)  # start_step: the module's warmup_steps=2
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=6, accumulate_grad_batches=2, logger=logger,
                                       callbacks=[callback]))
    trainer.fit(litgpt(4), datamodule=tiny_data())
    guard = callback.guard
    assert guard.start_step == 2 and guard.unlock_steps == (2, 4) and guard.fully_unlocked
    # one check per optimizer step: steps 1-2 on block 0, 3-4 with blocks 1-2, 5-6 with all
    assert callback.seen == [(1, (0,)), (2, (0,)), (3, (0, 1, 2)), (4, (0, 1, 2)), (5, (0, 1, 2, 3)),
                             (6, (0, 1, 2, 3))]
    assert logger.steps_with(WARMUP_ACTIVE_BLOCKS) == [0, 1, 2, 3, 4, 5]
    assert logger.values(WARMUP_ACTIVE_BLOCKS) == [1.0, 3.0, 3.0, 4.0, 4.0, 4.0]
    assert list(zip(logger.steps_with(WARMUP_UNLOCKED), logger.values(WARMUP_UNLOCKED))) == [(1, 2.0), (3, 1.0)]


class _Curvature(Callback):
    """Stands in for the curvature monitor: a guard exposing ``latest_stability_ratio``."""

    class _Guard:
        latest_stability_ratio: Optional[float] = None

    def __init__(self, ratios: dict[int, float]) -> None:
        self.guard = self._Guard()
        self.ratios = ratios

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.guard.latest_stability_ratio = self.ratios.get(trainer.global_step)


def test_callback_curvature_driven(tmp_path):
    seed_everything(0, verbose=False)
    logger = RecordingLogger()
    callback = DepthWarmupCallback(start_fraction=0.5, groups=2, interval=1, start_step=1, curvature_margin=1.0,
                                  max_defer_steps=2)
    curvature = _Curvature({1: 3.0, 2: 0.5, 3: 3.0})  # measured before the warm-up reads it (list order)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=6, logger=logger, callbacks=[curvature, callback]))
    trainer.fit(litgpt(4), datamodule=tiny_data())
    # due 1: 3.0 defers, 0.5 at 2 unlocks; next due 3: deferred at 3 and 4 (no measurement), forced at 5
    assert callback.guard.unlock_steps == (2, 5)
    assert logger.steps_with(WARMUP_DEFERRED) == [0, 2, 3]

    bare = DepthWarmupCallback(start_step=1, curvature_margin=1.0)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=1, callbacks=[bare]))
    with pytest.raises(ValueError, match="needs a CurvatureMonitor"):
        trainer.fit(litgpt(4), datamodule=tiny_data())


class _NoWarmupSteps(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = litgpt(2).model


def test_callback_start_step_and_strategy_checks(tmp_path):
    trainer = Trainer(**trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match="`warmup_steps`.*_NoWarmupSteps has warmup_steps=None: pass `start_step`"):
        DepthWarmupCallback().setup(trainer, _NoWarmupSteps(), "fit")
    DepthWarmupCallback(start_step=3).setup(trainer, _NoWarmupSteps(), "fit")

    from lightning.pytorch.strategies import ModelParallelStrategy

    fsdp2 = Trainer(**trainer_kwargs(tmp_path, strategy=ModelParallelStrategy(), devices=2))
    with pytest.raises(NotImplementedError, match="ModelParallelStrategy"):
        DepthWarmupCallback().setup(fsdp2, litgpt(4), "fit")


@pytest.mark.slow
def test_ddp_without_unused_parameter_detection_is_refused_and_with_it_trains(two_process_job):
    """Under DDP the inactive blocks get no gradient: DDP without ``find_unused_parameters`` is refused at
    ``on_fit_start`` (read off the wrapped module, on every process, before any step); with it, 3 steps train
    blocks 0 and 1, unlock block 2 after step 1 (the module's ``warmup_steps``) and train it, leave block 3 as it
    was, and keep the ranks bit-identical (tests/warmup_ddp_job.py)."""
    r0, r1 = load_ranks(two_process_job("ddp", "warmup"))
    for r in (r0, r1):
        assert r["refused"] is not None and r["refused_steps"] == 0
        assert "find_unused_parameters=True" in r["refused"] and "ddp_find_unused_parameters_true" in r["refused"]
        assert r["steps"] == 3 and r["active_blocks"] == (0, 1, 2)
        moved = {n.split(".h.")[1].split(".")[0] for n in r["before"]
                 if ".h." in n and not torch.equal(r["before"][n], r["after"][n])}
        assert moved == {"0", "1", "2"}
    assert all(torch.equal(r0["after"][n], r1["after"][n]) for n in r0["after"])


# ------------------------------------------------------------------------------------------------ resume
def _fit(root: Path, max_steps: int, ckpt: Optional[Path] = None, save_every: Optional[int] = None):
    seed_everything(1234 if ckpt is None else 7, verbose=False)  # the resumed seed differs on purpose
    module = litgpt(4, warmup_steps=1, max_steps=7)
    callback = DepthWarmupCallback(start_fraction=0.25, groups=3, interval=2, order="interleave")
    callbacks: list[Callback] = [callback]
    if save_every is not None:
        callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=save_every, save_top_k=-1))
    trainer = Trainer(**trainer_kwargs(root, max_steps=max_steps, callbacks=callbacks,
                                       enable_checkpointing=save_every is not None))
    trainer.fit(module, datamodule=tiny_data(), ckpt_path=None if ckpt is None else str(ckpt))
    return module, callback


def test_resume_is_exact(tmp_path):
    reference, ref_cb = _fit(tmp_path / "ref", 7)
    assert ref_cb.guard.unlock_steps == (1, 3, 5)
    _, first = _fit(tmp_path / "a", 4, save_every=4)
    assert first.guard.unlock_steps == (1, 3)
    (ckpt,) = (tmp_path / "a" / "ckpt").glob("*step=4.ckpt")
    resumed, second = _fit(tmp_path / "b", 7, ckpt=ckpt)
    assert second.guard.unlock_steps == ref_cb.guard.unlock_steps
    assert second.guard.active_blocks == ref_cb.guard.active_blocks == (0, 1, 2, 3)
    ref_params = dict(reference.named_parameters())
    for name, p in resumed.named_parameters():
        assert torch.equal(p, ref_params[name]), f"{name} differs from the uninterrupted run"
