"""The model-family registry (lightning_msign.families): what a family reads is what every guard acts on.

DBRX's experts stacked in 2-D parameters and T5's feed-forward ``wo`` were read wrongly by name tables before the
families: these tests build the real models from tiny configs and compare with what their forwards compute.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _models import Blocks, ToQKVAttention
from torch import nn

from lightning_msign import MSign, StableRank, resolve_targets
from lightning_msign.families import (
    BUILT_IN,
    Family,
    linears,
    read_model,
    register_family,
    registered_families,
    unregister_family,
)
from lightning_msign.optim import muon_param_groups

from conftest import DBRX_ATTENTION, transformers_major

E, INNER, H = 3, 8, 16  # DBRX experts, their width, the model width


def _dbrx():
    from transformers import DbrxConfig, DbrxForCausalLM

    torch.manual_seed(0)
    config = DbrxConfig(d_model=H, n_heads=4, n_layers=2, max_seq_len=32, vocab_size=64,
                        attn_config=DBRX_ATTENTION, ffn_config={"ffn_hidden_size": INNER, "moe_num_experts": E})
    model = DbrxForCausalLM(config).eval()
    with torch.no_grad():  # the experts are initialised empty in transformers 4.57
        for block in model.transformer.blocks:
            for p in (block.ffn.experts.mlp.w1, block.ffn.experts.mlp.v1, block.ffn.experts.mlp.w2):
                p.normal_(std=0.2)
    return model


def _expert_views(model) -> dict[str, torch.Tensor]:
    """Each expert's matrix as DBRX's forward takes it: ``w.view(E, ffn_hidden_size, hidden)[e]``."""
    out = {}
    for i, block in enumerate(model.transformer.blocks):
        for tag in ("w1", "v1", "w2"):
            w = getattr(block.ffn.experts.mlp, tag)
            for e in range(E):
                out[f"transformer.blocks.{i}.ffn.experts.mlp.{tag}.e{e}"] = w.view(E, INNER, H)[e]
    return out


def test_dbrx_experts_are_one_matrix_each_and_the_router_is_not_an_mlp():
    model = _dbrx()
    views = _expert_views(model)
    mlp = {t.name: t for t in resolve_targets(model, "mlp")}
    assert set(mlp) == set(views)
    for name, t in mlp.items():
        assert t.role == "mlp" and torch.equal(t.matrix(), views[name]), name
    everything = {t.name: t.role for t in resolve_targets(model, "all_2d")}
    assert everything["transformer.blocks.0.ffn.router.layer.weight"] == "router"


def test_dbrx_msign_mlp_flattens_every_expert_and_leaves_the_rest():
    model = _dbrx()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    norms = {n: torch.linalg.matrix_norm(v.double()) for n, v in _expert_views(model).items()}
    MSign(model, period=1, targets="mlp").apply()
    for name, view in _expert_views(model).items():
        s = torch.linalg.svdvals(view.detach().double())
        assert float((s.max() - s.min()) / s.max()) < 1e-4, name
        torch.testing.assert_close(torch.linalg.matrix_norm(view.double()), norms[name], rtol=1e-5, atol=0)
    experts = {n for n in before if ".ffn.experts.mlp." in n}
    for name, p in model.named_parameters():
        if name not in experts:
            assert torch.equal(p, before[name]), name  # the router and the attention included


def test_dbrx_stable_ranks_and_muon_groups_are_per_expert():
    model = _dbrx()
    exact = StableRank(model, targets="mlp", mode="exact").compute()
    for name, view in _expert_views(model).items():
        s = torch.linalg.svdvals(view.double())
        assert exact[name] == pytest.approx(float(s.square().sum() / s[0].square()), rel=1e-5), name
    groups = {g["name"]: g for g in muon_param_groups(model)}
    names = {id(p): n for n, p in model.named_parameters()}
    layouts = dict(zip((names[id(p)] for p in groups["muon"]["params"]), groups["muon"]["layouts"]))
    per_expert = ",".join(f"e{e}={INNER}" for e in range(E))
    for tag in ("w1", "v1", "w2"):
        assert layouts[f"transformer.blocks.0.ffn.experts.mlp.{tag}"] == f"rows:{per_expert}"


def test_t5_attention_is_its_attention_and_its_feed_forward_is_mlp():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                                num_decoder_layers=2, num_heads=4))
    attention = {f"{n}.{p}.weight" for n, m in model.named_modules() if type(m).__name__ == "T5Attention"
                 for p in ("q", "k", "v", "o")}
    ffn = {f"{n}.{p}.weight" for n, m in model.named_modules() if type(m).__name__ == "T5DenseActDense"
           for p in ("wi", "wo")}
    assert len(attention) == 24 and len(ffn) == 8  # encoder self, decoder self and cross; 4 feed-forwards
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every attention layer is found whole: no warning
        chosen = resolve_targets(model, "attention")
    assert {t.name for t in chosen} == attention
    assert {t.name for t in resolve_targets(model, "qk")} == {n for n in attention if n.endswith((".q.weight",
                                                                                                  ".k.weight"))}
    assert {t.name for t in resolve_targets(model, "mlp")} == ffn


class _ToQKV(Family):
    """A user's family: the diffusers-style attention of tests/_models.py."""

    name = "test to_q/to_k/to_v"

    def read(self, module):
        if not isinstance(module, ToQKVAttention):
            return None
        return {**linears(module, "q", "to_q"), **linears(module, "k", "to_k"), **linears(module, "v", "to_v"),
                **linears(module.to_out, "attn_out", "0")}


def test_a_users_family_is_registered_in_a_few_lines_and_asked_first():
    model = Blocks(ToQKVAttention(32, 4))
    assert not read_model(model.blocks[0].attn)  # no built-in family knows it
    family = register_family(_ToQKV())
    try:
        assert registered_families()[0] is family
        qk = resolve_targets(model, "qk")
        assert [(t.name, t.role) for t in qk] == [("blocks.0.attn.to_q.weight", "q"),
                                                  ("blocks.0.attn.to_k.weight", "k")]
        assert [t.role for t in resolve_targets(model, "attention")] == ["q", "k", "v", "attn_out"]
    finally:
        unregister_family(family)
    assert registered_families() == BUILT_IN
    with pytest.raises(ValueError, match="is not registered"):
        unregister_family(family)
    with pytest.raises(TypeError, match="`family` must be an instance"):
        register_family(nn.Linear)  # type: ignore[arg-type]


def _deepseek():
    import transformers

    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8,
        v_head_dim=8, n_group=1, topk_group=1, max_position_embeddings=64)
    return transformers.DeepseekV3ForCausalLM(config).eval()


def _mla_blocks(attn) -> dict[str, torch.Tensor]:
    """The key and value matrices as the MLA forward splits its fused outputs (transformers 4.57)."""
    lora, rope, nope, v = attn.kv_lora_rank, attn.qk_rope_head_dim, attn.qk_nope_head_dim, attn.v_head_dim
    kv_b = attn.kv_b_proj.weight.view(attn.num_heads, nope + v, lora)  # .view(..., -1, nope + v).split((nope, v))
    return {"kv_a_proj_with_mqa.weight.latent": attn.kv_a_proj_with_mqa.weight[:lora],
            "kv_a_proj_with_mqa.weight.k": attn.kv_a_proj_with_mqa.weight[lora:lora + rope],
            "kv_b_proj.weight.k": kv_b[:, :nope].reshape(-1, lora),
            "kv_b_proj.weight.v": kv_b[:, nope:].reshape(-1, lora)}


def test_deepseek_mla_qk_is_the_queries_and_the_key_rows_of_both_fused_weights():
    model = _deepseek()
    prefix = "model.layers.{i}.self_attn."
    qk = {t.name: t for t in resolve_targets(model, "qk")}
    assert set(qk) == {prefix.format(i=i) + n for i in range(2) for n in (
        "q_a_proj.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight.k", "kv_b_proj.weight.k")}
    attention = {t.name: t for t in resolve_targets(model, "attention")}
    for i, layer in enumerate(model.model.layers):
        for name, block in _mla_blocks(layer.self_attn).items():
            assert torch.equal(attention[prefix.format(i=i) + name].matrix(), block), name
    before = {i: {n: b.detach().clone() for n, b in _mla_blocks(layer.self_attn).items()}
              for i, layer in enumerate(model.model.layers)}
    MSign(model, period=1, targets="qk").apply()
    for i, layer in enumerate(model.model.layers):
        after = _mla_blocks(layer.self_attn)
        for name in ("kv_a_proj_with_mqa.weight.latent", "kv_b_proj.weight.v"):
            assert torch.equal(after[name], before[i][name]), name  # the latent and the values are not keys
        for name in ("kv_a_proj_with_mqa.weight.k", "kv_b_proj.weight.k"):
            s = torch.linalg.svdvals(after[name].detach().double())
            assert float((s.max() - s.min()) / s.max()) < 1e-4, name
    assert "model.layers.1.mlp.gate.weight" not in {t.name for t in resolve_targets(model, "mlp")}  # the router


@pytest.mark.parametrize(("config", "model"), [
    ("Gemma2Config", "Gemma2ForCausalLM"), ("Olmo2Config", "Olmo2ForCausalLM"),
])
def test_other_hf_families_with_separate_projections_are_read_from_their_config(config, model):
    import transformers

    net = getattr(transformers, model)(getattr(transformers, config)(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64))
    expected = {f"model.layers.{i}.self_attn.{p}_proj.weight": r for i in range(2)
                for p, r in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "attn_out"))}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert {t.name: t.role for t in resolve_targets(net, "attention")} == expected
    # The structure is checked against the config: an attention whose sizes disagree is not read.
    attn = net.model.layers[0].self_attn
    attn.k_proj = nn.Linear(32, 24, bias=False)
    assert id(attn.k_proj.weight) not in read_model(net) and id(attn.q_proj.weight) not in read_model(net)


def test_bloom_and_mpt_fused_weights_are_cut_as_their_attention_splits_them():
    import transformers

    torch.manual_seed(0)
    bloom = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4))
    attn = bloom.transformer.h[0].self_attention
    with torch.no_grad():
        attn.query_key_value.bias.zero_()
        # BloomAttention's own split of its fused output, on the identity: rows of each block, head by head
        q, k, v = attn._reshape(attn.query_key_value(torch.eye(32)[None]))  # (1, heads, 32, head_dim)
    want = {t: m[0].transpose(0, 1).reshape(32, -1).T for t, m in zip("qkv", (q, k, v))}
    got = {t.name.rsplit(".", 1)[1]: t for t in resolve_targets(bloom, "attention") if ".query_key_value." in t.name}
    assert set(got) == set("qkv")
    for tag, t in got.items():
        assert torch.equal(t.matrix(), want[tag]), tag

    mpt = transformers.MptForCausalLM(transformers.MptConfig(vocab_size=64, d_model=32, n_heads=4, n_layers=1))
    attn = mpt.transformer.blocks[0].attn
    with torch.no_grad():
        q, k, v = attn.Wqkv(torch.eye(32)[None]).chunk(3, dim=2)  # as MptAttention.forward splits it
    got = {t.name.rsplit(".", 1)[1]: t for t in resolve_targets(mpt, "qk")}
    assert set(got) == {"q", "k"}
    assert torch.equal(got["q"].matrix(), q[0].T) and torch.equal(got["k"].matrix(), k[0].T)


def _lora_llama():
    import peft
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2))
    return peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"]))


@pytest.mark.parametrize("preset", ["attention", "qk", "all_2d"])
def test_lora_layers_are_refused_by_presets_not_half_edited(preset):
    """A preset reaching a LoRA layer's frozen base weight (or its adapters) refuses at setup: W alone is not the
    layer's weight W + s B A, and the adapters are what peft saves."""
    model = _lora_llama()
    with pytest.raises(ValueError, match=r"selects '.*q_proj\.base_layer\.weight', the frozen base weight of the "
                                         r"adapter layer '.*q_proj' \(peft\).*merge_and_unload"):
        resolve_targets(model, preset)
    with pytest.raises(ValueError, match="adapter layer"):
        MSign(model, period=1, targets=preset)
    # What no adapter touches is selected as before; a pattern on the adapters is the user's choice.
    assert len(resolve_targets(model, "mlp")) == 3
    assert [t.role for t in resolve_targets(model, "*.lora_B.*")] == ["adapter"] * 3


def test_lora_b_of_a_fused_conv1d_is_cut_into_the_base_blocks_for_muon():
    import peft
    import transformers

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64,
                                                                 n_positions=16))
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    groups = {g["name"]: g for g in muon_param_groups(model)}
    names = {id(p): n for n, p in model.named_parameters()}
    layouts = dict(zip((names[id(p)] for p in groups["muon"]["params"]), groups["muon"]["layouts"]))
    prefix = "base_model.model.transformer.h.0.attn.c_attn."
    # B's rows are c_attn's output features, [q | k | v] of split_size each (the base's Conv1D columns)
    assert layouts[prefix + "lora_B.default.weight"] == "rows:q=32,k=32,v=32"
    assert layouts[prefix + "lora_A.default.weight"] is None
    assert prefix + "base_layer.weight" not in layouts  # frozen: not in an optimizer group


def test_readme_table_of_families_is_the_registry():
    """README's "Models and fused weights" table is generated from the registry (`python -m lightning_msign.families
    README.md` rewrites it): a family added, changed or removed without regenerating fails here."""
    from pathlib import Path

    from lightning_msign.families import readme_table
    from lightning_msign.families.__main__ import END, START

    for family in BUILT_IN:
        assert family.model and family.splits and family.read_from, family
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split(START, 1)[1].split(END, 1)[0]
    assert section.strip() == readme_table(BUILT_IN).strip(), "regenerate: python -m lightning_msign.families README.md"


def test_bert_attention_output_and_feed_forward_dense_are_told_apart_by_class():
    import transformers

    model = transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                                                 num_attention_heads=4, intermediate_size=32))
    prefix = "bert.encoder.layer.{i}."
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention = {t.name: t.role for t in resolve_targets(model, "attention")}
    assert attention == {prefix.format(i=i) + n: r for i in range(2) for n, r in (
        ("attention.self.query.weight", "q"), ("attention.self.key.weight", "k"),
        ("attention.self.value.weight", "v"), ("attention.output.dense.weight", "attn_out"))}
    assert {t.name for t in resolve_targets(model, "mlp")} == {
        prefix.format(i=i) + n for i in range(2) for n in ("intermediate.dense.weight", "output.dense.weight")}


def _fairseq_like(name: str):
    """Tiny BART / mBART / Marian / Whisper / OPT / CLIP / SigLIP / Phi / ViT models and, from their module tree,
    the true roles: the attention class's own projections, the layer's (or MLP class's) ``fc1`` / ``fc2``."""
    import transformers as t

    seq2seq = dict(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                   decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=40, pad_token_id=0,
                   bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    tower = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    vision = dict(tower, image_size=8, patch_size=4)
    builders = {
        "bart": (t.BartForConditionalGeneration, t.BartConfig, seq2seq, "BartAttention", "Bart{}Layer"),
        "mbart": (t.MBartForConditionalGeneration, t.MBartConfig, seq2seq, "MBartAttention", "MBart{}Layer"),
        "marian": (t.MarianMTModel, t.MarianConfig, seq2seq, "MarianAttention", "Marian{}Layer"),
        "whisper": (t.WhisperForConditionalGeneration, t.WhisperConfig,
                    dict(seq2seq, num_mel_bins=8, max_source_positions=16, max_target_positions=16),
                    "WhisperAttention", "Whisper{}Layer"),
        "opt": (t.OPTForCausalLM, t.OPTConfig, dict(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, ffn_dim=48, word_embed_proj_dim=32),
                "OPTAttention", "OPT{}Layer"),
        "clip_text": (t.CLIPTextModel, t.CLIPTextConfig, dict(tower, vocab_size=64), "CLIPAttention", "CLIPMLP"),
        "clip_vision": (t.CLIPVisionModel, t.CLIPVisionConfig, vision, "CLIPAttention", "CLIPMLP"),
        "siglip_vision": (t.SiglipVisionModel, t.SiglipVisionConfig, vision, "SiglipAttention", "SiglipMLP"),
        "phi": (t.PhiForCausalLM, t.PhiConfig, dict(tower, vocab_size=64), "PhiAttention", "PhiMLP"),
        "gptj": (t.GPTJForCausalLM, t.GPTJConfig, dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4),
                 "GPTJAttention", "GPTJMLP"),
        "vit": (t.ViTModel, t.ViTConfig, vision, *(("ViTSelfAttention", "ViT{}") if transformers_major() < 5
                                                   else ("ViTAttention", "ViTMLP"))),
    }
    model_cls, config_cls, kwargs, attention_cls, mlp_cls = builders[name]
    torch.manual_seed(0)
    model = model_cls(config_cls(**kwargs))
    projections = {"q": ("q_proj", "query"), "k": ("k_proj", "key"), "v": ("v_proj", "value"),
                   "attn_out": ("out_proj", "dense", "o_proj")}
    mlp_classes = {mlp_cls.format(kind) for kind in ("Encoder", "Decoder", "Intermediate", "Output")}
    roles: dict[str, str] = {}
    for module_name, module in model.named_modules():
        kind = type(module).__name__
        if kind == attention_cls:
            for role, children in projections.items():
                for child in children:
                    if isinstance(getattr(module, child, None), nn.Linear):
                        roles[f"{module_name}.{child}.weight"] = role
        elif isinstance(module, nn.MultiheadAttention):  # SigLIP's pooling head (the torch family)
            roles.update({f"{module_name}.in_proj_weight.{tag}": tag for tag in "qkv"})
            roles[f"{module_name}.out_proj.weight"] = "attn_out"
        elif kind == "ViTSelfOutput":
            roles[f"{module_name}.dense.weight"] = "attn_out"
        elif kind in mlp_classes:
            for child in ("fc1", "fc2", "dense", "fc_in", "fc_out"):
                if isinstance(getattr(module, child, None), nn.Linear):
                    roles[f"{module_name}.{child}.weight"] = "mlp"
    return model, roles


FAIRSEQ_LIKE = ["bart", "mbart", "marian", "whisper", "opt", "clip_text", "clip_vision", "siglip_vision", "phi",
                "vit", "gptj"]


@pytest.mark.parametrize("name", FAIRSEQ_LIKE)
def test_out_proj_and_fc_families_roles_and_qk_msign(name):
    model, roles = _fairseq_like(name)
    n_attention = sum(r == "q" for r in roles.values())
    assert n_attention >= 2 and sum(r == "mlp" for r in roles.values()) >= 4  # every layer's (self and cross)
    if name in ("bart", "mbart", "marian", "whisper"):
        assert n_attention == 6  # 2 encoder self, 2 decoder self, 2 decoder cross
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every attention found whole: no warning
        attention = {t.name: t.role for t in resolve_targets(model, "attention")}
    assert attention == {n: r for n, r in roles.items() if r != "mlp"}
    assert {t.name: t.role for t in resolve_targets(model, "mlp")} == {n: r for n, r in roles.items() if r == "mlp"}
    blocks = {t.name: t for t in resolve_targets(model, "attention")}
    before = {n: t.matrix().detach().clone() for n, t in blocks.items()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    signed = {t.param_name for t in blocks.values() if t.role in ("q", "k")}
    MSign(model, period=1, targets="qk").apply()
    for n, t in blocks.items():
        if t.role in ("q", "k"):
            s = torch.linalg.svdvals(t.matrix().detach().double())
            assert float((s.max() - s.min()) / s.max()) < 1e-4, n
            torch.testing.assert_close(torch.linalg.matrix_norm(t.matrix().detach().double()),
                                       torch.linalg.matrix_norm(before[n].double()), rtol=1e-5, atol=0)
        else:
            assert torch.equal(t.matrix(), before[n]), n  # V and the outputs (V's rows of a fused weight too)
    for n, p in model.named_parameters():
        if n not in signed:
            assert torch.equal(p, params[n]), n  # the feed-forward, norms, embeddings, convolutions


def test_qwen2_moe_routers_experts_and_shared_expert():
    import transformers

    net = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=3, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, max_position_embeddings=64))
    roles = {t.name: t.role for t in resolve_targets(net, "all_2d")}
    for i in range(2):
        block = f"model.layers.{i}."
        assert roles[block + "mlp.gate.weight"] == roles[block + "mlp.shared_expert_gate.weight"] == "router"
        for p, r in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "attn_out")):
            assert roles[f"{block}self_attn.{p}_proj.weight"] == r
        if transformers_major() < 5:
            mlp = [f"{block}mlp.experts.{e}.{m}_proj.weight" for e in range(3) for m in ("gate", "up", "down")]
        else:  # 3-D expert tensors, one matrix per expert (and [gate | up] cut)
            mlp = [f"{block}mlp.experts.{n}" for e in range(3) for n in (f"gate_up_proj.e{e}.gate",
                                                                          f"gate_up_proj.e{e}.up", f"down_proj.e{e}")]
        mlp += [f"{block}mlp.shared_expert.{m}_proj.weight" for m in ("gate", "up", "down")]
        assert all(roles[n] == "mlp" for n in mlp)
    assert len(resolve_targets(net, "mlp")) == 2 * 12  # the routers are not selected by "mlp"


def test_qwen3_moe_router_is_a_router():
    import transformers

    net = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=3, num_experts_per_tok=2, moe_intermediate_size=16))
    roles = {t.name: t.role for t in resolve_targets(net, "all_2d")}
    assert [roles[f"model.layers.{i}.mlp.gate.weight"] for i in range(2)] == ["router", "router"]
    assert not any(t.name.endswith("mlp.gate.weight") for t in resolve_targets(net, "mlp"))


def test_litgpt_latent_attention_blocks_are_what_its_forward_splits():
    """LitGPT's MultiheadLatentAttention: ``kv_a_proj_with_mqa`` -> ``[latent | k_rope]``, ``kv_b_proj`` -> per key
    group ``[k_nope | v]``: each block times the layer's input is the piece its forward splits off."""
    from litgpt import GPT, Config

    torch.manual_seed(0)
    config = Config(n_layer=2, n_embd=32, n_head=4, n_query_groups=4, vocab_size=64, padded_vocab_size=64, bias=False,
                    block_size=16, latent_attention={"q_lora_rank": 16, "kv_lora_rank": 8, "qk_rope_head_dim": 4,
                                                     "qk_nope_head_dim": 6, "v_head_dim": 10})
    model = GPT(config)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    attn = model.transformer.h[0].attn
    handles = [m.register_forward_hook(lambda mod, a, out, n=n: seen.__setitem__(n, (a[0], out)))
               for n, m in (("kv_a", attn.kv_a_proj_with_mqa), ("kv_b", attn.kv_b_proj))]
    model(torch.randint(0, 64, (2, 8)))
    for h in handles:
        h.remove()
    blocks = {t.name: t for t in resolve_targets(model, "attention")}
    prefix = "transformer.h.0.attn."
    x_a, out_a = seen["kv_a"]
    latent, k_rope = out_a.split([8, 4], dim=-1)  # as the forward splits it
    x_b, out_b = seen["kv_b"]
    k_nope, v = out_b.view(2, 8, 4, -1).split([6, 10], dim=-1)
    pieces = {"kv_a_proj_with_mqa.weight.latent": (x_a, latent), "kv_a_proj_with_mqa.weight.k": (x_a, k_rope),
              "kv_b_proj.weight.k": (x_b, k_nope.flatten(2)), "kv_b_proj.weight.v": (x_b, v.flatten(2))}
    for name, (x, piece) in pieces.items():
        torch.testing.assert_close(x @ blocks[prefix + name].matrix().T, piece, rtol=1e-5, atol=1e-6, msg=name)
    assert {n[len(prefix):] for n, t in blocks.items() if n.startswith(prefix) and t.role in ("q", "k")} == {
        "q_a_proj.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight.k", "kv_b_proj.weight.k"}
    before = {n: t.matrix().detach().clone() for n, t in blocks.items()}
    MSign(model, period=1, targets="qk").apply()
    for n, t in blocks.items():
        if t.role in ("q", "k"):
            s = torch.linalg.svdvals(t.matrix().detach().double())
            assert float((s.max() - s.min()) / s.max()) < 1e-4, n
        else:
            assert torch.equal(t.matrix(), before[n]), n  # the latent, the values and the output
