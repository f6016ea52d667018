"""Target resolution: presets, patterns, LitGPT fused-QKV blocks (GQA), other module layouts."""

from __future__ import annotations

import pytest
import torch
from litgpt import GPT, Config
from torch import nn

from lightning_msign.targets import PRESETS, catalog, resolve_targets, validate_targets


def _gpt(**kw) -> GPT:
    cfg = dict(n_layer=2, n_head=4, n_query_groups=2, n_embd=32, block_size=16, padded_vocab_size=64, bias=False)
    cfg.update(kw)
    return GPT(Config(**cfg))


def test_litgpt_qkv_is_split_into_gqa_blocks():
    model = _gpt()
    hs = 32 // 4
    blocks = {t.name: t for t in catalog(model) if ".qkv." in t.name}
    q, k, v = (blocks[f"transformer.h.0.attn.qkv.weight.{x}"] for x in "qkv")
    W = model.transformer.h[0].attn.qkv.weight
    assert q.matrix().data_ptr() == W[: 4 * hs].data_ptr() and q.shape == (4 * hs, 32)
    assert k.matrix().data_ptr() == W[4 * hs : 6 * hs].data_ptr() and k.shape == (2 * hs, 32)
    assert v.matrix().data_ptr() == W[6 * hs :].data_ptr() and v.shape == (2 * hs, 32)
    assert (q.role, k.role, v.role) == ("q", "k", "v")
    # the view shares storage: writing it writes the parameter
    k.matrix().fill_(7.0)
    assert torch.all(model.transformer.h[0].attn.qkv.weight[4 * hs : 6 * hs] == 7.0)
    assert not torch.any(model.transformer.h[0].attn.qkv.weight[: 4 * hs] == 7.0)


def test_presets_select_the_right_roles():
    model = _gpt(mlp_class_name="LLaMAMLP", intermediate_size=64)
    names = lambda targets, **kw: [t.name for t in resolve_targets(model, targets, **kw)]  # noqa: E731
    att = names("attention")
    assert len(att) == 2 * 4 and all(".attn." in n for n in att)
    assert names("qk") == [f"transformer.h.{i}.attn.qkv.weight.{x}" for i in range(2) for x in "qk"]
    mlp = names("mlp")
    assert len(mlp) == 2 * 3 and all(".mlp." in n for n in mlp)
    all_2d = names("all_2d")
    assert set(all_2d) == set(att) | set(mlp)  # no embedding, no LM head
    assert "lm_head.weight" in names(["all_2d", "*lm_head.weight"])
    unsplit = names("attention", split_qkv=False)
    assert "transformer.h.0.attn.qkv.weight" in unsplit and len(unsplit) == 2 * 2


def test_patterns_select_blocks_and_whole_fused_parameters():
    model = _gpt()
    got = [t.name for t in resolve_targets(model, ["*.h.1.attn.qkv.weight.k", "*.h.0.attn.qkv.weight"])]
    assert got == [
        "transformer.h.0.attn.qkv.weight.q",
        "transformer.h.0.attn.qkv.weight.k",
        "transformer.h.0.attn.qkv.weight.v",
        "transformer.h.1.attn.qkv.weight.k",
    ]


def test_no_match_lists_existing_matrices():
    with pytest.raises(ValueError, match=r"match no matrix.*transformer\.h\.0\.attn\.proj\.weight"):
        resolve_targets(_gpt(), "*.nothing_like_this")


@pytest.mark.parametrize("bad", ["attn", "", [], ["attention", 3], None])
def test_bad_targets_raise_at_validation(bad):
    with pytest.raises(ValueError, match="targets"):
        validate_targets(bad)


def test_qk_needs_split():
    with pytest.raises(ValueError, match="split_qkv"):
        validate_targets("qk", split_qkv=False)


def test_compiled_model_names_are_clean():
    model = _gpt()
    compiled = torch.compile(model)  # wrapping only: names gain `_orig_mod.`
    targets = resolve_targets(compiled, "attention")
    assert targets[0].name == "transformer.h.0.attn.qkv.weight.q"
    assert targets[0].param is model.transformer.h[0].attn.qkv.weight


def test_torch_multihead_attention_and_plain_linears():
    model = nn.Sequential(nn.MultiheadAttention(16, 2), nn.Linear(16, 16))
    roles = {t.name: t.role for t in catalog(model)}
    assert roles == {"0.in_proj_weight.q": "q", "0.in_proj_weight.k": "k", "0.in_proj_weight.v": "v",
                     "0.out_proj.weight": "attn_out", "1.weight": "other"}
    assert [t.name for t in resolve_targets(model, "1.*")] == ["1.weight"]


def test_names_alone_give_no_role():
    """``q_proj``, ``up_proj`` in modules no model family recognises are plain matrices: 'attention' finds nothing
    and says how to register the family; a glob pattern or 'all_2d' still reaches them."""

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(8, 8) for _ in range(4))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(16, 8)

    model = nn.ModuleDict({"embed_tokens": nn.Embedding(10, 8), "self_attn": Attn(), "mlp": MLP()})
    for preset in ("attention", "qk", "mlp"):
        with pytest.raises(ValueError, match=r"match no matrix .*register_family"):
            resolve_targets(model, preset)
    assert {t.role for t in resolve_targets(model, "all_2d")} == {"other"}
    assert "embed_tokens.weight" not in [t.name for t in resolve_targets(model, "all_2d")]
    assert [t.name for t in resolve_targets(model, "*.q_proj.weight")] == ["self_attn.q_proj.weight"]


def test_presets_constant():
    assert PRESETS == ("attention", "qk", "mlp", "all_2d")
