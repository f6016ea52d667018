"""Diagnostics on tiny Hugging Face models built from configs: attention logits against what HF computes."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

from lightning_msign import Diagnostics, DiagnosticsMonitor
from lightning_msign.functional.attention import causal_allowed
from lightning_msign.models import attention_module, attention_probe, output_logits

from conftest import DBRX_ATTENTION, RecordingLogger, trainer_kwargs, transformers_major

transformers = pytest.importorskip("transformers")

VOCAB = 64
MAX_LENGTH = 16
_COMMON = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": MAX_LENGTH,
}  # fmt: skip


_MLA = {"kv_lora_rank": 8, "q_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 8, "v_head_dim": 8,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "first_k_dense_replace": 1,
        "n_group": 1, "topk_group": 1, "num_key_value_heads": 4}  # fmt: skip


def _hf_model(arch: str, attn_implementation: str = "eager", **overrides):
    """A tiny causal LM of ``arch``; its expected sliding windows per layer."""
    t = transformers
    if arch.startswith("gpt2"):
        config = {"vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": MAX_LENGTH}
        if arch == "gpt2-inverse-layer-scale":
            config.update(scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True)
        model = t.GPT2LMHeadModel(t.GPT2Config(**{**config, **overrides}, attn_implementation=attn_implementation))
        return model, [None, None]
    builders = {
        "llama": (t.LlamaForCausalLM, t.LlamaConfig, {}, [None, None]),
        "mistral": (t.MistralForCausalLM, t.MistralConfig, {"sliding_window": 3}, [3, 3]),
        "qwen2": (
            t.Qwen2ForCausalLM, t.Qwen2Config,
            {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1}, [None, 3],
        ),
        "qwen3": (t.Qwen3ForCausalLM, t.Qwen3Config, {"head_dim": 8}, [None, None]),
        "mixtral": (t.MixtralForCausalLM, t.MixtralConfig, {"sliding_window": 3, "num_local_experts": 2}, [3, 3]),
        "phi3": (t.Phi3ForCausalLM, t.Phi3Config, {"sliding_window": 3, "pad_token_id": 0}, [3, 3]),
        "gemma": (t.GemmaForCausalLM, t.GemmaConfig, {"head_dim": 8}, [None, None]),
        "olmo2": (t.Olmo2ForCausalLM, t.Olmo2Config, {}, [None, None]),
        # its own forward (no attention function): the pairs are those of the 4-D mask the layer is passed
        "qwen2_moe": (t.Qwen2MoeForCausalLM, t.Qwen2MoeConfig,
                      {"num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 16,
                       "shared_expert_intermediate_size": 16, "use_sliding_window": True, "sliding_window": 3,
                       "max_window_layers": 1}, [3, 3] if transformers_major() < 5 else [3, None]),
        **{f"falcon-{kind}": (t.FalconForCausalLM, t.FalconConfig,
                              {"num_attention_heads": 4, "alibi": False, "bias": False, **options}, [None, None])
           for kind, options in (("grouped", {"new_decoder_architecture": True, "num_kv_heads": 2}),
                                 ("multi-query", {"new_decoder_architecture": False, "multi_query": True}),
                                 ("multi-head", {"new_decoder_architecture": False, "multi_query": False}))},
        "qwen3_moe": (t.Qwen3MoeForCausalLM, t.Qwen3MoeConfig,
                      {"head_dim": 8, "num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 16},
                      [None, None]),
        # read where they call the attention function (families/hf_attention.py): the window is in the mask
        "gpt_neox": (t.GPTNeoXForCausalLM, t.GPTNeoXConfig, {"rotary_pct": 0.5}, [None, None]),
        # query_pre_attn_scalar 4: scaling 0.5, not head_dim ** -0.5
        "gemma2": (t.Gemma2ForCausalLM, t.Gemma2Config,
                   {"head_dim": 8, "sliding_window": 3, "query_pre_attn_scalar": 4}, [3, None]),
        "gemma2-no-softcap": (t.Gemma2ForCausalLM, t.Gemma2Config,
                              {"head_dim": 8, "sliding_window": 3, "query_pre_attn_scalar": 4,
                               "attn_logit_softcapping": None}, [3, None]),
        "gemma3": (t.Gemma3ForCausalLM, t.Gemma3TextConfig,
                   {"head_dim": 8, "sliding_window": 3, "sliding_window_pattern": 2, "query_pre_attn_scalar": 4},
                   [3, None]),
        "phi": (t.PhiForCausalLM, t.PhiConfig, {"qk_layernorm": True}, [None, None]),
        "olmo": (t.OlmoForCausalLM, t.OlmoConfig, {"clip_qkv": 8.0}, [None, None]),
        "cohere": (t.CohereForCausalLM, t.CohereConfig, {"use_qk_norm": True}, [None, None]),
        "granite": (t.GraniteForCausalLM, t.GraniteConfig, {"attention_multiplier": 0.3}, [None, None]),
        "starcoder2": (t.Starcoder2ForCausalLM, t.Starcoder2Config, {"sliding_window": 3}, [3, 3]),
        "opt": (t.OPTForCausalLM, t.OPTConfig, {"ffn_dim": 64, "word_embed_proj_dim": 32, "num_key_value_heads": 4},
                [None, None]),
        "smollm3": (t.SmolLM3ForCausalLM, t.SmolLM3Config, {"pad_token_id": 0}, [None, None]),
        "glm4": (t.Glm4ForCausalLM, t.Glm4Config, {"head_dim": 8, "pad_token_id": 0}, [None, None]),
        "deepseek_v3": (t.DeepseekV3ForCausalLM, t.DeepseekV3Config, _MLA, [None, None]),
        "deepseek_v2": (t.DeepseekV2ForCausalLM, t.DeepseekV2Config, _MLA, [None, None]),
    }  # fmt: skip
    if arch == "dbrx":  # clip_qkv 2: the clamp is part of the queries and keys (and binds once scaled up)
        config = t.DbrxConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=MAX_LENGTH, vocab_size=VOCAB,
                              attn_config={**DBRX_ATTENTION, "clip_qkv": 2.0},
                              ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 2},
                              attn_implementation=attn_implementation)
        model = t.DbrxForCausalLM(config)
        with torch.no_grad():  # the experts are initialised empty in transformers 4.57
            for block in model.transformer.blocks:
                for p in (block.ffn.experts.mlp.w1, block.ffn.experts.mlp.v1, block.ffn.experts.mlp.w2):
                    p.normal_(std=0.2)
        return model, [None, None]
    if arch == "gptj":  # partial, every-two rotary on 4 of the 8 dimensions of each head
        config = t.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=MAX_LENGTH,
                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=attn_implementation)
        return t.GPTJForCausalLM(config), [None, None]
    if arch.startswith("gpt_bigcode"):
        config = {"vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": MAX_LENGTH,
                  "multi_query": arch == "gpt_bigcode"}
        config = t.GPTBigCodeConfig(**{**config, **overrides}, attn_implementation=attn_implementation)
        return t.GPTBigCodeForCausalLM(config), [None, None]
    model_cls, config_cls, extra, windows = builders[arch]
    config = config_cls(**{**_COMMON, **extra, **overrides}, attn_implementation=attn_implementation)
    return model_cls(config), windows


HOOKED = ["gpt2", "gpt2-inverse-layer-scale", "llama", "mistral", "qwen2", "qwen3", "mixtral", "gemma", "olmo2",
          "qwen3_moe", "phi3", "qwen2_moe", "falcon-grouped", "falcon-multi-query", "falcon-multi-head",
          "dbrx", "gptj"]
"""Rebuilt from the outputs of their projections (hook probes)."""
INTERFACE = ["gpt_neox", "gemma2", "gemma2-no-softcap", "gemma3", "phi", "olmo", "cohere", "granite", "starcoder2",
             "gpt_bigcode", "gpt_bigcode-multi-head", "opt", "smollm3", "glm4", "deepseek_v3", "deepseek_v2"]
"""Read where they call transformers' attention function."""
SUPPORTED = HOOKED + INTERFACE
# 4.57's Falcon broadcasts the key groups to the heads before its kernel, 5.x does not
_GROUPS = {"falcon-grouped": 4 if transformers_major() < 5 else 2, "falcon-multi-query": 1, "falcon-multi-head": 4,
           "gpt2": 4, "gpt2-inverse-layer-scale": 4, "gpt_neox": 4, "opt": 4, "gpt_bigcode": 1,
           "gpt_bigcode-multi-head": 4, "deepseek_v3": 4, "deepseek_v2": 4, "gptj": 4}


@pytest.mark.parametrize("arch", SUPPORTED)
def test_softmax_of_the_rebuilt_logits_is_the_attention_hf_computes(arch):
    """Eager attention's probabilities (``output_attentions``) equal the softmax of the probe's logits under the pairs
    it reduced over (causal, window, or the kernel's mask) and, for Gemma 2, the soft-capping: scale, key groups,
    RoPE and norms are the model's. The logits are made large so that an error shows in the softmax."""
    torch.manual_seed(0)
    model, windows = _hf_model(arch)
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and any(s in name for s in ("q_proj", "k_proj", "c_attn", "qkv_proj", "query_key_value",
                                                        "q_b_proj", "kv_b_proj", "kv_a_proj", "Wqkv")):
                p.mul_(10.0)
    decoder = Diagnostics(model).decoder
    probes = [attention_probe(decoder.attentions(i)[0], keep=True) for i in range(len(decoder.blocks))]
    handles = [h for p in probes for h in p.attach()]
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        out = model(ids, output_attentions=True, use_cache=False)
    for h in handles:
        h.remove()
    cap = getattr(model.config, "attn_logit_softcapping", None)
    for i, (probe, ref) in enumerate(zip(probes, out.attentions)):  # ref: HF's softmax probabilities (B, h, T, T)
        q, k, allowed = probe.query, probe.key, probe.allowed
        n_head, n_groups = q.shape[1], k.shape[1]
        assert n_head == 4 and n_groups == _GROUPS.get(arch, 2)
        expected = causal_allowed(10, windows[i])
        assert torch.equal(allowed.expand(2, 1, 10, 10), expected.expand(2, 1, 10, 10)), i
        logits = q @ k.repeat_interleave(n_head // n_groups, dim=1).mT * probe.scale
        capped = logits if cap is None else torch.tanh(logits / cap) * cap
        probs = capped.masked_fill(~allowed, float("-inf")).softmax(-1)
        assert (probs - ref).abs().max().item() < 1e-5
        assert probe.value.item() == pytest.approx(logits.abs().masked_fill(~allowed, 0).amax().item(), rel=1e-6)
        assert probe.value.item() > 1.0  # the softmax is far from uniform: the comparison means something
    if arch == "gpt2-inverse-layer-scale":
        assert probes[1].scale == pytest.approx(1 / (2 * math.sqrt(8)))
    if arch.startswith("gemma2") or arch == "gemma3":
        assert all(p.scale == 0.5 for p in probes)


class _HFCausalLM(LightningModule):
    """Next-token training of an HF causal LM on ``T + 1``-token batches."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.steps_run = 0

    def training_step(self, batch, batch_idx):
        self.steps_run += 1
        (x,) = batch
        logits = self.model(x[:, :-1]).logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _loader(n: int = 16, batch_size: int = 4) -> DataLoader:
    ids = torch.randint(0, VOCAB, (n, MAX_LENGTH + 1), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(ids), batch_size=batch_size)


def _hf_reference(model, ids: torch.Tensor, monkeypatch) -> tuple[torch.Tensor, list[float]]:
    """Output logits, and each layer's max |logit| from the q, k and mask HF's eager attention receives."""
    attn = attention_module(Diagnostics(model, attention_logits=False).decoder.blocks[0])
    modeling = sys.modules[type(attn).__module__]
    original = modeling.eager_attention_forward
    seen = []

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        seen.append((module, query, key, attention_mask, kwargs.get("scaling")))
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    model.eval()
    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(modeling, "eager_attention_forward", spy)
        logits = model(ids, use_cache=False).logits
    maxima = []
    for module, q, k, mask, scaling in seen:
        T = q.shape[2]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        allowed = torch.ones(T, T, dtype=torch.bool) if mask is None else mask == 0
        if scaling is None:  # GPT-2: scale and causal mask of its own
            scaling = 1 / math.sqrt(q.shape[-1])
            allowed = allowed & module.bias[:, :, :T, :T]
        scores = (q @ k.mT * scaling).abs().masked_fill(~allowed, 0)
        maxima.append(scores.amax().item())
    return logits, maxima


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_model_in_a_trainer_logs_what_hf_computes(tmp_path, arch, monkeypatch):
    seed_everything(0)
    model, _ = _hf_model(arch)
    module = _HFCausalLM(model)
    logger = RecordingLogger()
    monitor = DiagnosticsMonitor(every_n_steps=2, max_seq_len=None)  # batches of 17 tokens, 16 positions
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=4, logger=logger), callbacks=[monitor])
    trainer.fit(module, _loader())
    assert monitor.guard.model is model and monitor.guard.decoder.max_length == MAX_LENGTH
    keys = {
        "diag/attn_logit_max/0", "diag/attn_logit_max/1", "diag/attn_logit_max",
        "diag/output_logit_max", "diag/output_logit_rms", "diag/time_ms",
    }  # fmt: skip
    rows = [(step, m) for step, m in logger.records if "diag/time_ms" in m]
    assert [step for step, _ in rows] == [1, 3] and all(set(m) == keys for _, m in rows)
    assert model.training  # modes restored

    last = rows[-1][1]  # recomputed on the last batch, cut to 4 x 16 tokens (the weights have not changed since)
    ids = _loader().dataset.tensors[0][12:16, :MAX_LENGTH]
    ref_logits, ref_max = _hf_reference(model, ids, monkeypatch)
    for i, ref in enumerate(ref_max):
        assert last[f"diag/attn_logit_max/{i}"] == pytest.approx(ref, rel=1e-5)
    assert last["diag/attn_logit_max"] == pytest.approx(max(ref_max), rel=1e-5)
    assert last["diag/output_logit_max"] == pytest.approx(ref_logits.abs().max().item(), rel=1e-5)
    assert last["diag/output_logit_rms"] == pytest.approx(ref_logits.square().mean().sqrt().item(), rel=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_block_jacobians_against_dense(arch):
    """SDPA attention (HF's default); blocks called with the arguments the model passed them."""
    torch.manual_seed(0)
    width = {"n_embd": 16} if arch == "gpt2" else {"hidden_size": 16}
    model, _ = _hf_model(arch, attn_implementation="sdpa", **width)
    model.eval()
    ids = torch.randint(0, VOCAB, (1, 6))
    metrics = Diagnostics(model, jacobian=True, jacobian_iters=48, attention_logits=False).compute(ids)
    seen = []
    blocks = Diagnostics(model, attention_logits=False).decoder.blocks
    handles = [b.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)), with_kwargs=True) for b in blocks]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    vectors = []
    for i, (block, (args, kwargs)) in enumerate(zip(blocks, seen)):
        def f(h, block=block, args=args, kwargs=kwargs):
            out = block(h, *args[1:], **kwargs)
            return out[0] if isinstance(out, tuple) else out

        J = torch.autograd.functional.jacobian(f, args[0]).reshape(args[0].numel(), -1).double()
        U, S, Vh = torch.linalg.svd(J)
        assert metrics[f"diag/jacobian_norm/{i}"] == pytest.approx(S[0].item(), rel=1e-4)
        vectors.append((U[:, 0], Vh[0]))
    alignment = abs(vectors[0][0] @ vectors[1][1]).item()
    assert metrics["diag/jacobian_alignment/0"] == pytest.approx(alignment, rel=1e-3, abs=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_unsupported_attention_fails_at_setup_and_the_rest_works(tmp_path):
    seed_everything(0)
    t = transformers  # ALiBi Falcon: its position bias is inside its own forward (not read)
    config = t.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True,
                            new_decoder_architecture=False, multi_query=True, max_position_embeddings=MAX_LENGTH)
    module = _HFCausalLM(t.FalconForCausalLM(config))
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=2), callbacks=[DiagnosticsMonitor(every_n_steps=1)])
    with pytest.raises(ValueError, match="got FalconAttention in block 0 of `transformer.h`.*attention_logits=False"):
        trainer.fit(module, _loader())
    assert module.steps_run == 0  # raised at setup, before any step

    logger = RecordingLogger()
    monitor = DiagnosticsMonitor(every_n_steps=1, attention_logits=False, jacobian=True, jacobian_iters=2)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=2, logger=logger), callbacks=[monitor])
    trainer.fit(module, _loader())
    keys = {k for _, m in logger.records for k in m}
    assert keys == {
        "diag/output_logit_max", "diag/output_logit_rms", "diag/jacobian_norm/0", "diag/jacobian_norm/1",
        "diag/jacobian_alignment/0", "diag/jacobian_alignment_max", "diag/time_ms",
    }  # fmt: skip


def test_models_without_lm_head_or_differentiable_attention_fail_when_attached():
    t = transformers
    classifier = t.GPT2ForSequenceClassification(t.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="output_logits=True.*GPT2ForSequenceClassification.*output_logits=False"):
        Diagnostics(classifier)
    metrics = Diagnostics(classifier, output_logits=False).compute(torch.zeros(1, 4, dtype=torch.long))
    assert set(metrics) == {"diag/attn_logit_max/0", "diag/attn_logit_max", "diag/time_ms"}
    model, _ = _hf_model("llama")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="jacobian=True.*'flex_attention'.*jacobian=False"):
        Diagnostics(model, jacobian=True)
    Diagnostics(model)  # attention and output logits do not depend on the attention kernel


def test_output_logits_are_read_from_what_the_model_returns():
    z = torch.randn(2, 3, 5)
    assert output_logits(z) is z
    assert output_logits(transformers.modeling_outputs.CausalLMOutput(logits=z)) is z
    assert output_logits({"loss": torch.ones(()), "logits": z}) is z
    assert output_logits({"hidden": z}) is z
    assert output_logits((None, z, torch.ones(1))) is z
    with pytest.raises(TypeError, match="got str.*output_logits=False"):
        output_logits("logits")
    with pytest.raises(TypeError, match="got tuple"):
        output_logits((None, 1.0))


def _encoder_model(arch: str, attn_implementation: str = "eager"):
    """A tiny encoder or encoder-decoder of ``arch`` and the keyword arguments of a forward (a padded batch of 2)."""
    t = transformers
    seq2seq = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, pad_token_id=0,
                   bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, dropout=0.0,
                   attn_implementation=attn_implementation)
    tower = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 attn_implementation=attn_implementation)
    vision = dict(tower, image_size=16, patch_size=4, num_channels=3)
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0  # the second sequence is padded: its last 3 keys do not count
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    if arch == "bart":
        return t.BartForConditionalGeneration(t.BartConfig(**seq2seq)), {
            "input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids[:, :8]}
    if arch == "whisper":
        config = t.WhisperConfig(**seq2seq, num_mel_bins=8, max_source_positions=10, max_target_positions=16)
        features = torch.randn(2, 8, 20, generator=torch.Generator().manual_seed(3))
        return t.WhisperForConditionalGeneration(config), {"input_features": features, "decoder_input_ids": ids[:, :8]}
    if arch in ("bert", "roberta", "bert-decoder"):
        model_cls, config_cls = ((t.RobertaForMaskedLM, t.RobertaConfig) if arch == "roberta"
                                 else (t.BertForMaskedLM, t.BertConfig))
        config = config_cls(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            max_position_embeddings=32, pad_token_id=0, is_decoder=arch == "bert-decoder",
                            attn_implementation=attn_implementation)
        return model_cls(config), {"input_ids": ids, "attention_mask": mask}
    if arch == "t5":
        config = t.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                            num_heads=4, dropout_rate=0.0, decoder_start_token_id=0)
        return t.T5ForConditionalGeneration(config), {"input_ids": ids, "attention_mask": mask,
                                                      "decoder_input_ids": ids[:, :8]}
    if arch == "bloom":
        config = t.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0,
                               attention_dropout=0.0)
        return t.BloomForCausalLM(config), {"input_ids": ids, "attention_mask": mask}
    if arch == "mpt":  # clip_qkv 2: the clamp is part of the queries and keys (and binds once scaled up)
        config = t.MptConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=MAX_LENGTH,
                             attn_config={"clip_qkv": 2.0, "alibi": True})
        return t.MptForCausalLM(config), {"input_ids": ids, "attention_mask": mask}
    if arch == "vit":
        return t.ViTModel(t.ViTConfig(**vision)), {"pixel_values": pixels}
    if arch == "clip_vision":
        return t.CLIPVisionModel(t.CLIPVisionConfig(**vision)), {"pixel_values": pixels}
    if arch == "siglip_vision":
        return t.SiglipVisionModel(t.SiglipVisionConfig(**vision)), {"pixel_values": pixels}
    if arch == "clip_text":
        return t.CLIPTextModel(t.CLIPTextConfig(**tower, vocab_size=VOCAB)), {"input_ids": ids, "attention_mask": mask}
    raise ValueError(arch)


ENCODERS = ["bart", "whisper", "vit", "clip_vision", "siglip_vision", "clip_text", "bert", "roberta", "bert-decoder",
            "t5", "bloom", "mpt"]


@pytest.mark.parametrize("arch", ENCODERS)
def test_encoder_and_cross_attention_logits_are_the_attention_hf_computes(arch):
    """Encoders (all pairs, the padding mask), decoders (causal) and cross-attention (decoder queries to encoder keys,
    the encoder's padding): the softmax of the probe's logits under the pairs it reduced over is HF's eager
    attention."""
    from lightning_msign.models import find_decoder

    model, inputs = _encoder_model(arch)
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and any(s in name for s in ("q_proj", "k_proj", "query", "key", ".q.", ".k.", "Wqkv")):
                p.mul_(10.0)
    if arch == "t5" and transformers_major() >= 5:  # the mask travels in the bias argument: refused, clearly
        with pytest.raises(ValueError, match="T5Attention in block 0"):
            Diagnostics(model, output_logits=False)
        return
    decoder = find_decoder(model)
    assert decoder.n_stacks == (2 if arch in ("bart", "whisper", "t5") else 1)
    if decoder.n_stacks == 2:  # a chain of blocks is what the Jacobians measure
        with pytest.raises(ValueError, match="jacobian=True.*2 stacks.*pass jacobian=False"):
            Diagnostics(model, jacobian=True, output_logits=False)
    probes = [attention_probe(a, keep=True) for i in range(len(decoder.blocks)) for a in decoder.attentions(i)]
    handles = [h for p in probes for h in p.attach()]
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    for h in handles:
        h.remove()
    if arch in ("bart", "whisper", "t5"):  # encoder self, then each decoder block's self and cross
        refs = list(out.encoder_attentions) + [r for pair in zip(out.decoder_attentions, out.cross_attentions)
                                                for r in pair]
    else:
        refs = list(out.attentions)
    assert len(probes) == len(refs) == (6 if arch in ("bart", "whisper", "t5") else 2)
    kinds = set()
    for i, (probe, ref) in enumerate(zip(probes, refs)):
        q, k, allowed = probe.query, probe.key, probe.allowed
        logits = q @ k.repeat_interleave(q.shape[1] // k.shape[1], dim=1).mT * probe.scale
        allowed = allowed.expand(logits.shape[0], 1, *logits.shape[2:])
        bias = getattr(probe, "bias", None)  # T5's relative position bias: an offset outside the logits read
        probs = (logits if bias is None else logits + bias).masked_fill(~allowed, float("-inf")).softmax(-1)
        assert (probs - ref).abs().max().item() < 1e-5, i
        assert probe.value.item() == pytest.approx(logits.abs().masked_fill(~allowed, 0).amax().item(), rel=1e-6)
        assert probe.value.item() > 1.0
        kinds.add(("cross" if q.shape[2] != k.shape[2] else "causal" if not allowed[0, 0, 0, 1] else "all")
                  + ("+pad" if not torch.equal(allowed[0], allowed[1]) else ""))  # the padded sequence differs
    seq2seq = {"all+pad", "causal", "cross+pad"}
    expected = {"bart": seq2seq, "t5": seq2seq, "whisper": {"all", "causal", "cross"}, "clip_text": {"causal+pad"},
                "bert": {"all+pad"}, "roberta": {"all+pad"}, "bert-decoder": {"causal+pad"}, "bloom": {"causal+pad"},
                "mpt": {"causal+pad"}}.get(arch, {"all"})
    assert kinds == expected
