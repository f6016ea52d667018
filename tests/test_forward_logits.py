"""The attention-logit trigger reads the training forward itself (``logits_from="training_forward"``).

On LitGPT and Hugging Face models read by hook probes (Llama, GPT-2) and at transformers' attention function
(GPT-NeoX, Gemma 2 with its sliding window and SDPA, DeepSeek-V3): the value a check reads equals a recomputation
by :class:`Diagnostics` on the same sequences with the weights the forward used; the run is bit-identical to one
without the guard; the model's attention functions are the originals again after every forward; gradient
accumulation takes the maximum over the step's micro-batches; a step whose forward the guard did not see falls back
to a second forward with a warning, or fails clearly without ids.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from lightning_msign import Diagnostics, LitGPTModule, MSign

from conftest import TINY_CONFIG, TINY_SEQ, tiny_module, transformers_major

transformers = pytest.importorskip("transformers")

VOCAB, T = 64, 12


def _litgpt(**config):
    if not config:
        return tiny_module().model
    return LitGPTModule({**TINY_CONFIG, **config}, vocab_size=256, block_size=TINY_SEQ).model


def _hf(arch: str):
    t = transformers
    common = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32}  # fmt: skip
    if arch == "gpt2":
        config = t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
                              embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
        return t.GPT2LMHeadModel(config)
    if arch == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(**common, attn_implementation="sdpa"))
    if arch == "gpt_neox":
        return t.GPTNeoXForCausalLM(t.GPTNeoXConfig(**common, rotary_pct=0.5, attn_implementation="eager"))
    if arch == "gemma2":
        return t.Gemma2ForCausalLM(t.Gemma2Config(**common, head_dim=8, sliding_window=4, query_pre_attn_scalar=4,
                                                  attn_implementation="sdpa" if transformers_major() < 5 else "eager"))
    if arch == "opt":
        return t.OPTForCausalLM(t.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
                                            max_position_embeddings=32, dropout=0.0, attn_implementation="sdpa"))
    if arch == "phi":
        return t.PhiForCausalLM(t.PhiConfig(**{**common, "num_key_value_heads": 4}, qk_layernorm=True,
                                            resid_pdrop=0.0, embd_pdrop=0.0, attn_implementation="sdpa"))
    if arch == "qwen2_moe":  # SDPA without a window or padding: no mask is passed, the causal pairs count
        return t.Qwen2MoeForCausalLM(t.Qwen2MoeConfig(**common, num_experts=2, num_experts_per_tok=1,
                                                      moe_intermediate_size=16, shared_expert_intermediate_size=16,
                                                      attn_implementation="sdpa"))
    if arch == "falcon":
        return t.FalconForCausalLM(t.FalconConfig(**common, alibi=False, new_decoder_architecture=True,
                                                  num_kv_heads=2, attn_implementation="sdpa"))
    if arch == "gptj":
        from test_diagnostics_hf import _hf_model

        return _hf_model("gptj", "eager")[0]
    if arch == "dbrx":  # its own forward, blocks at transformer.blocks
        from test_diagnostics_hf import _hf_model

        return _hf_model("dbrx", "sdpa")[0]
    if arch == "deepseek_v3":
        mla = {"kv_lora_rank": 8, "q_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 8, "v_head_dim": 8,
               "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
               "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "num_key_value_heads": 4}  # fmt: skip
        return t.DeepseekV3ForCausalLM(t.DeepseekV3Config(**{**common, **mla}, attn_implementation="eager"))
    raise ValueError(arch)


def _loss(model, ids):
    out = model(ids)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))


def _attention_functions(model) -> tuple:
    """What the model's attention calls: its modeling module's eager function and the interface's local entries."""
    modeling = sys.modules[type(model).__module__]
    interface = getattr(modeling, "ALL_ATTENTION_FUNCTIONS", None)
    return getattr(modeling, "eager_attention_forward", None), dict(getattr(interface, "_local_mapping", {}))


@pytest.mark.parametrize("arch", ["litgpt", "litgpt_qk_norm", "litgpt_olmo2", "gpt2",
                                  "llama", "gpt_neox", "gemma2", "deepseek_v3", "opt", "phi",
                                  "qwen2_moe", "falcon", "dbrx", "gptj"])
def test_the_check_reads_the_training_forward_and_changes_nothing(arch):
    torch.manual_seed(0)
    litgpt = {"litgpt": {}, "litgpt_qk_norm": {"norm_qk": True, "rotary_percentage": 0.5},
              "litgpt_olmo2": {"norm_qk": True, "norm_qk_type": "olmo2"}}
    model = _litgpt(**litgpt[arch]) if arch in litgpt else _hf(arch)
    vocab = 256 if arch in litgpt else VOCAB
    plain = copy.deepcopy(model)
    with torch.no_grad():  # logits well above 1, so a wrong scale or pair set would show
        for name, p in model.named_parameters():
            if p.ndim == 2 and any(s in name for s in ("qkv", "q_proj", "k_proj", "c_attn", "query_key_value",
                                                        "q_b_proj", "kv_b_proj")):
                p.mul_(10.0)
        plain.load_state_dict(model.state_dict())
    before = _attention_functions(model)
    reference = Diagnostics(copy.deepcopy(model), every_n_steps=1, output_logits=False, max_batch_size=2,
                            max_seq_len=8)
    guard = MSign(model, period=None, targets="qk", max_attn_logit=1e9, probe_batch_size=2, probe_seq_len=8)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, plain)]
    ids = torch.randint(0, vocab, (4, T), generator=torch.Generator().manual_seed(1))
    for step in range(1, 4):
        reference.model.load_state_dict(model.state_dict())
        expected = reference.compute(ids)["diag/attn_logit_max"]
        assert expected > 1.0
        for m, opt in zip((model, plain), opts):
            m.train()
            _loss(m, ids).backward()
            opt.step()
            opt.zero_grad()
        assert _attention_functions(model) == before  # the wrappers are gone once the forward has returned
        metrics = guard.step(step)  # no ids: the value can only come from the training forward
        assert metrics["msign/attn_logit_max"] == pytest.approx(expected, rel=1e-5)
        assert "msign/applications" not in metrics
    for (name, a), b in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(a, b), name  # the hooks and wrappers changed nothing of the training


def test_gradient_accumulation_takes_the_maximum_over_the_micro_batches():
    torch.manual_seed(0)
    model = _hf("gpt_neox")
    guard = MSign(model, period=None, targets="qk", max_attn_logit=1e9, probe_batch_size=1, probe_seq_len=None)
    reference = Diagnostics(model, every_n_steps=1, output_logits=False, max_batch_size=1, max_seq_len=None)
    micro = [torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    expected = [reference.compute(ids)["diag/attn_logit_max"] for ids in micro]
    assert expected[0] != expected[1]
    model.train()
    for ids in micro:
        _loss(model, ids).backward()
    assert guard.step(1)["msign/attn_logit_max"] == pytest.approx(max(expected), rel=1e-5)


def test_a_step_whose_forward_was_not_seen_falls_back_or_fails_clearly():
    torch.manual_seed(0)
    model = _hf("llama")
    guard = MSign(model, period=None, targets="qk", max_attn_logit=1e9)
    ids = torch.randint(0, VOCAB, (2, T))
    with pytest.raises(ValueError, match="no training forward of optimizer step 1.*input_ids=ids"):
        guard.step(1)
    model.eval()  # a forward in eval mode (or without gradients) is not the training forward
    _loss(model, ids).backward()
    expected = Diagnostics(model, every_n_steps=1, output_logits=False).compute(ids)["diag/attn_logit_max"]
    with pytest.warns(UserWarning, match="second forward of `input_ids`.*logits_from='second_forward'"):
        metrics = guard.step(2, input_ids=ids)
    assert metrics["msign/attn_logit_max"] == pytest.approx(expected, rel=1e-6)
    second = MSign(model, period=None, targets="qk", max_attn_logit=1e9, logits_from="second_forward")
    with pytest.raises(ValueError, match="logits_from='second_forward'.*input_ids"):
        second.step(1)
    with pytest.raises(ValueError, match="`logits_from` must be one of"):
        MSign(model, period=None, max_attn_logit=1.0, logits_from="forward")


@pytest.mark.parametrize("arch", ["bart", "whisper", "vit", "bert", "t5", "bloom", "mpt"])
def test_encoders_and_encoder_decoders_are_read_in_their_training_forward(arch):
    """A model with two stacks (BART, Whisper: the decoder blocks' cross-attention counts) or one that takes no token
    ids (ViT pixels, Whisper audio features): each block's logits, read in the training forward, equal those of a
    no-grad forward with the weights before the step (the same probes attached by hand), and the check changes
    nothing; no second forward can be run, and the fallback says why."""
    from test_diagnostics_hf import _encoder_model

    from lightning_msign.models import attention_probe, find_decoder

    model, inputs = _encoder_model(arch, attn_implementation="sdpa")
    if arch == "t5" and transformers_major() >= 5:  # refused at setup (docs/diagnostics.md)
        with pytest.raises(ValueError, match="attention logits cannot be rebuilt|T5Attention"):
            MSign(model, period=None, targets="qk", max_attn_logit=1e9)
        return
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and any(s in name for s in ("q_proj", "k_proj", "query", "key", ".q.", ".k.", "Wqkv")):
                p.mul_(10.0)
    plain = copy.deepcopy(model)
    guard = MSign(model, period=None, targets="qk", max_attn_logit=1e9, probe_batch_size=2, probe_seq_len=None)
    reference = copy.deepcopy(model)
    decoder = find_decoder(reference)
    probes = [(i, attention_probe(a)) for i in range(len(decoder.blocks)) for a in decoder.attentions(i)]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, plain)]

    def loss(m):
        out = m(**inputs)
        hidden = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
        return hidden.square().mean()

    for step in range(1, 3):
        reference.load_state_dict(model.state_dict())
        reference.eval()
        handles = [h for _, p in probes for h in p.attach()]
        with torch.no_grad():
            reference(**inputs)
        for h in handles:
            h.remove()
        per_block = [max(p.value.item() for j, p in probes if j == i) for i in range(len(decoder.blocks))]
        for m, opt in zip((model, plain), opts):
            m.train()
            loss(m).backward()
            opt.step()
            opt.zero_grad()
        metrics = guard.step(step)
        assert metrics["msign/attn_logit_max"] == pytest.approx(max(per_block), rel=1e-5)
        assert guard._forward_logits.read(step) == pytest.approx(per_block, rel=1e-5)
    for (name, a), b in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(a, b), name
    if arch in ("whisper", "vit"):  # no token ids: the second forward is refused with the reason
        with pytest.raises(ValueError, match="takes no token ids.*logits_from='training_forward'"), \
                pytest.warns(UserWarning, match="saw no training forward"):
            guard.step(3, input_ids=torch.zeros(2, 4, dtype=torch.long))
