"""QKNormRetrofit: dormant q/k norms leave a run bit-identical; the switch comes exactly at the first crossing of the
threshold (read independently, on a second forward before each step) and makes the model LitGPT's ``norm_qk=True``
of the same weights; the gains train from then on; resume is exact; what it cannot do is refused by name."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from litgpt.model import GPT, Config

from lightning_msign import Diagnostics, LitGPTModule, QKNormRetrofit, QKNormRetrofitCallback
from lightning_msign import metric_keys as K
from lightning_msign.families import SwitchedNorm, install_qk_norm

from conftest import TINY_CONFIG, TINY_SEQ, TINY_VOCAB, RecordingLogger, load_ranks, tiny_data, trainer_kwargs

LR = 0.05  # high enough for the tiny model's logits to pass THRESHOLD within a few steps
THRESHOLD = 4.0


def module(**kwargs: Any) -> LitGPTModule:
    return LitGPTModule(dict(TINY_CONFIG, n_layer=3), vocab_size=TINY_VOCAB, block_size=TINY_SEQ, lr=LR,
                        warmup_steps=1, max_steps=8, **kwargs)  # one LR schedule, whatever steps a Trainer runs


class LogitRecorder(Callback):
    """Each layer's largest attention logit on the batch about to be trained on, with the weights it is trained
    from (a second, eval-mode forward of the same 4 x 128 slice the guard reads): independent of the guard."""

    def __init__(self) -> None:
        self.per_step: dict[int, list[float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        probe = Diagnostics(pl_module, every_n_steps=1, output_logits=False, max_batch_size=4, max_seq_len=128)
        values = probe.compute(batch["input_ids"])
        n = len(probe.decoder.blocks)
        self.per_step[trainer.global_step + 1] = [values[f"{K.DIAG_ATTN_LOGIT_MAX_PREFIX}{i}"] for i in range(n)]


def fit(tmp_path, callbacks: list, steps: int = 8, model: LitGPTModule | None = None, **kwargs: Any) -> LitGPTModule:
    seed_everything(5, verbose=False)
    model = model or module()
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=steps, callbacks=callbacks, **kwargs))
    trainer.fit(model, tiny_data(num_workers=0))
    return model


def test_dormant_norms_are_the_identity_and_a_calm_run_is_bit_identical(tmp_path):
    plain = fit(tmp_path / "plain", [])
    retrofit = QKNormRetrofitCallback(max_attn_logit=1e6)
    guarded = fit(tmp_path / "guarded", [retrofit])
    theirs = dict(guarded.named_parameters())
    for name, p in plain.named_parameters():
        assert torch.equal(p, theirs[name]), name
    extra = set(theirs) - dict(plain.named_parameters()).keys()
    assert extra and all(".attn.norm_q.norm." in n or ".attn.norm_k.norm." in n for n in extra)
    assert all(torch.equal(theirs[n], torch.ones_like(theirs[n])) or torch.equal(theirs[n], torch.zeros_like(theirs[n]))
               for n in extra)  # untouched: no gradient, no weight decay while dormant
    assert retrofit.guard.switched_layers == [] and retrofit.guard.last_step == 8


@pytest.mark.parametrize("scope", ["all", "layer"])
def test_the_switch_comes_at_the_first_crossing_and_is_litgpts_qk_norm(tmp_path, scope):
    threshold = THRESHOLD
    recorder, logger = LogitRecorder(), RecordingLogger()
    retrofit = QKNormRetrofitCallback(max_attn_logit=threshold, scope=scope)
    model = fit(tmp_path, [recorder, retrofit], logger=logger)
    g = retrofit.guard
    first = {}  # layer -> first step whose logit passed the threshold (the guard switches after that step)
    for step in sorted(recorder.per_step):
        for i, v in enumerate(recorder.per_step[step]):
            if v > threshold and i not in first and (scope == "layer" or not first):
                first[i] = step
        if scope == "all" and first:
            first = {i: min(first.values()) for i in range(len(g.switch_steps))}
            break
    assert first, f"no layer passed {threshold} in 8 steps: {recorder.per_step}"
    for i in range(len(g.switch_steps)):  # scope="layer": a layer that switched stops being compared
        if scope == "layer" and i not in first:
            assert g.switch_steps[i] is None
        else:
            assert g.switch_steps[i] == first[i], (i, g.switch_steps, recorder.per_step)
    assert sum(logger.values(K.QKNORM_SWITCHED_NOW)) == len(first)
    gpt = model.model
    for i, when in enumerate(g.switch_steps):
        attn = gpt.transformer.h[i].attn
        assert attn.norm_q.on == attn.norm_k.on == (when is not None)
    if None in g.switch_steps:
        return
    # every layer on: the model is LitGPT's norm_qk=True of the same weights
    fields = {f.name: getattr(gpt.config, f.name) for f in dataclasses.fields(gpt.config) if f.init}
    reference = GPT(Config(**{**fields, "norm_qk": True}))
    state = {k.replace(".norm_q.norm.", ".norm_q.").replace(".norm_k.norm.", ".norm_k."): v
             for k, v in gpt.state_dict().items() if not k.endswith("._extra_state")}
    reference.load_state_dict(state, strict=True)
    ids = torch.randint(0, TINY_VOCAB, (2, TINY_SEQ), generator=torch.Generator().manual_seed(0))
    gpt.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(gpt(ids), reference(ids))
    gains = [p for n, p in gpt.named_parameters() if ".norm_q.norm.weight" in n]
    assert any(not torch.equal(p, torch.ones_like(p)) for p in gains)  # they trained after the switch


def test_resume_after_the_switch_is_exact(tmp_path):
    """8 steps straight against 4 steps, a checkpoint, and 4 more from it: the same weights, gains and switch."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    straight = QKNormRetrofitCallback(max_attn_logit=THRESHOLD)
    a = fit(tmp_path / "a", [straight])
    assert straight.guard.all_switched and max(straight.guard.switch_steps) <= 4, straight.guard.switch_steps

    first = QKNormRetrofitCallback(max_attn_logit=THRESHOLD)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    fit(tmp_path / "b", [first, ckpt], steps=4, enable_checkpointing=True)
    resumed = QKNormRetrofitCallback(max_attn_logit=THRESHOLD)
    seed_everything(7, verbose=False)  # another seed on purpose: the checkpoint restores what matters
    b = module()
    trainer = Trainer(**trainer_kwargs(tmp_path / "b2", max_steps=8, callbacks=[resumed]))
    trainer.fit(b, tiny_data(num_workers=0), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    assert resumed.guard.switch_steps == straight.guard.switch_steps
    assert resumed.guard.all_switched
    theirs = dict(b.named_parameters())
    for name, p in a.named_parameters():
        assert torch.equal(p, theirs[name]), name


def test_a_plain_loop_with_the_guard(tmp_path):
    """The docstring's loop: attach before the optimizer; the guard reads the training forward's logits."""
    torch.manual_seed(0)
    gpt = GPT(Config(**{**TINY_CONFIG, "n_layer": 2}, block_size=TINY_SEQ, vocab_size=TINY_VOCAB,
                     padded_vocab_size=TINY_VOCAB))
    guard = QKNormRetrofit(gpt, max_attn_logit=THRESHOLD)
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=LR)
    ids = torch.randint(0, TINY_VOCAB, (4, TINY_SEQ + 1), generator=torch.Generator().manual_seed(1))
    seen = []
    for step in range(1, 9):
        logits = gpt(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
        seen.append(guard.step(step))
    assert all(m for m in seen[: min(s for s in guard.switch_steps)])  # a check every step until the switch
    assert guard.all_switched and seen[-1] == {}  # nothing is checked once every layer is on
    assert guard.state_dict()["switch_steps"] == guard.switch_steps


def test_what_cannot_be_retrofitted_is_refused_by_name(tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hf = GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=16,
                                          intermediate_size=32, vocab_size=32, max_position_embeddings=16))
    with pytest.raises(ValueError, match="no qk-norm retrofit for .*GPTNeoXAttention.*block 0.*HF LlamaAttention"):
        QKNormRetrofit(hf)
    normed = GPT(Config(**{**TINY_CONFIG, "n_layer": 1}, block_size=TINY_SEQ, vocab_size=TINY_VOCAB,
                        padded_vocab_size=TINY_VOCAB, norm_qk=True))
    with pytest.raises(ValueError, match="normalises q and k already"):
        QKNormRetrofit(normed)
    with pytest.raises(ValueError, match="`max_attn_logit`.*got 0"):
        QKNormRetrofit(max_attn_logit=0)
    with pytest.raises(ValueError, match="`scope`.*'every'"):
        QKNormRetrofit(scope="every")
    with pytest.raises(ValueError, match="`check_every`"):
        QKNormRetrofit(check_every=0)

    from _fsdp1 import CPUFSDPStrategy
    from lightning.pytorch.strategies import ModelParallelStrategy

    for strategy in (ModelParallelStrategy(), CPUFSDPStrategy()):  # FSDP2, FSDP1 (a subclass of FSDPStrategy)
        sharded = Trainer(**trainer_kwargs(tmp_path, strategy=strategy, devices=2))
        with pytest.raises(NotImplementedError, match=f"does not support {type(strategy).__name__}: new parameters"):
            QKNormRetrofitCallback().setup(sharded, module(), "fit")


class _FixedOptimizer(LightningModule):
    """Builds its optimizer from the parameters it had at construction: the retrofitted gains are not in it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = module()
        self.model = self.inner.model
        self._params = list(self.model.parameters())

    def training_step(self, batch, batch_idx):
        return self.inner.training_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.AdamW(self._params, lr=1e-3)


def test_an_optimizer_without_the_gains_is_refused_before_the_first_step(tmp_path):
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=2, callbacks=[QKNormRetrofitCallback()]))
    with pytest.raises(ValueError, match="q/k norm parameters it installed are in no optimizer"):
        trainer.fit(_FixedOptimizer(), tiny_data(num_workers=0))
    assert trainer.global_step == 0


def test_switched_norm_state_travels_with_the_model():
    """The switch is model state: a model checkpoint loaded into a model with dormant norms switches them on."""
    torch.manual_seed(0)
    make = lambda: GPT(Config(**{**TINY_CONFIG, "n_layer": 1}, block_size=TINY_SEQ, vocab_size=TINY_VOCAB,  # noqa: E731
                              padded_vocab_size=TINY_VOCAB))
    a, b = make(), make()
    qa, ka = install_qk_norm(a.transformer.h[0].attn)
    qb, kb = install_qk_norm(b.transformer.h[0].attn)
    assert isinstance(qa, SwitchedNorm) and install_qk_norm(a.transformer.h[0].attn) == (qa, ka)  # idempotent
    qa.switch_on(), ka.switch_on()
    b.load_state_dict(a.state_dict())
    assert qb.on and kb.on and not math.isnan(float(qb.norm.weight.sum()))


@pytest.mark.slow
def test_under_ddp_refused_without_unused_parameter_detection_and_alike_on_both_ranks_with_it(two_process_job):
    """tests/qk_norm_ddp_job.py: plain DDP is refused at on_fit_start on both processes, before any step; with
    ``find_unused_parameters=True`` both processes switch the same layers after the same steps (the max-reduced
    decision) and end with bit-identical weights, the gains included."""
    r0, r1 = load_ranks(two_process_job("ddp", "qk_norm"))
    for r in (r0, r1):
        assert r["refused_steps"] == 0 and "find_unused_parameters=True" in r["refused"]
        assert r["steps"] == 8 and any(s is not None for s in r["switch_steps"])
    assert r0["switch_steps"] == r1["switch_steps"] and r0["on"] == r1["on"]
    assert r0["params"].keys() == r1["params"].keys()
    assert all(torch.equal(r0["params"][n], r1["params"][n]) for n in r0["params"])


def test_hf_llama_gets_qwen3s_qk_norm():
    """HF Llama: dormant norms leave the model's output bit-identical; after the switch (read from a training
    forward) the model is Qwen3 with the same weights, bit for bit; Qwen3 itself is refused (it has qk-norm)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, head_dim=8)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**sizes))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    llama.eval()
    with torch.no_grad():
        before = llama(ids).logits
    guard = QKNormRetrofit(llama, max_attn_logit=1e-6)  # any logit passes
    with torch.no_grad():
        assert torch.equal(llama(ids).logits, before)
    llama.train()
    llama(ids, labels=ids).loss.backward()
    metrics = guard.step(1)
    assert metrics[K.QKNORM_SWITCHED_NOW] == 2 and guard.all_switched
    qwen3 = Qwen3ForCausalLM(Qwen3Config(**sizes, attention_bias=False))
    state = {k.replace("q_norm.norm.", "q_norm.").replace("k_norm.norm.", "k_norm."): v
             for k, v in llama.state_dict().items() if not k.endswith("._extra_state")}
    qwen3.load_state_dict(state, strict=True)
    llama.eval(), qwen3.eval()
    with torch.no_grad():
        assert torch.equal(llama(ids).logits, qwen3(ids).logits)
        assert not torch.equal(llama(ids).logits, before)
    with pytest.raises(ValueError, match="Qwen3Attention normalises q and k already"):
        QKNormRetrofit(qwen3)


def test_hf_gpt2_gets_a_layer_norm_over_each_head_of_its_query_and_key_columns():
    """GPT-2 (fused `c_attn`, no RoPE): dormant, bit-identical; once on, the query and key column blocks of c_attn's
    output are layer-normed per head (mean 0, variance 1 at the initial gains) and the value block is untouched."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=32, n_positions=16))
    gpt2.eval()
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = gpt2(ids).logits
    guard = QKNormRetrofit(gpt2, max_attn_logit=1e-6, scope="layer")
    attn = gpt2.transformer.h[0].attn
    with torch.no_grad():
        assert torch.equal(gpt2(ids).logits, before)
        x = torch.randn(2, 8, 16)
        plain = attn.c_attn(x)
    guard.load_state_dict({"last_step": 0, "switch_steps": [3, None]})  # layer 0 on, as a checkpoint would say
    assert guard.switched_layers == [0] and attn.q_norm.on and not gpt2.transformer.h[1].attn.q_norm.on
    with torch.no_grad():
        out = attn.c_attn(x)
    split, hd = attn.split_size, attn.head_dim
    for block in (out[..., :split], out[..., split:2 * split]):
        per_head = block.reshape(2, 8, -1, hd)
        assert torch.allclose(per_head.mean(-1), torch.zeros(()), atol=1e-5)
        # v / (v + eps): the initial c_attn's outputs are small beside layer_norm_epsilon
        assert torch.allclose(per_head.var(-1, unbiased=False), torch.ones(()), atol=0.02)
    assert torch.equal(out[..., 2 * split:], plain[..., 2 * split:])
