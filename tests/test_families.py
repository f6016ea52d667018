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

E, INNER, H = 3, 8, 16  # DBRX experts, their width, the model width


def _dbrx():
    from transformers import DbrxConfig, DbrxForCausalLM

    torch.manual_seed(0)
    config = DbrxConfig(d_model=H, n_heads=4, n_layers=2, max_seq_len=32, vocab_size=64,
                        attn_config={"kv_n_heads": 2}, ffn_config={"ffn_hidden_size": INNER, "moe_num_experts": E})
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
