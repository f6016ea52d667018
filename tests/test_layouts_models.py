"""Layouts are read, never guessed: on real (tiny) models, the package's Q, K, V blocks are the matrices the forward
multiplies by, and the guards act on exactly those.

The true blocks are read from each model's own forward (:func:`_models.true_qkv`): the inputs of the projections are
replaced by the identity, so the queries, keys and values handed to ``scaled_dot_product_attention`` *are* the
weights. Nothing of the package is used to find them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import transformers
from _models import GPT, Blocks, GPTConfig, MixtralSparseMoeBlock, MoEConfig, MoEModel, Projection, true_qkv
from litgpt import GPT as LitGPT
from litgpt import Config as LitConfig
from torch import Tensor, nn

from lightning_msign import PSS, MSign, MSignCallback, PSSCallback, StableRank, StableRankMonitor, resolve_targets

from conftest import DBRX_ATTENTION

C, LAYERS, VOCAB = 32, 2, 64


# ------------------------------------------------------------------------------------------ architectures
@dataclass(frozen=True)
class Arch:
    """A tiny model, how to run it, where its attention's Q, K, V come from, and its output projections.

    ``wrong`` is a cut of the fused weight that a shape-based guess would make (equal thirds, or the whole weight),
    declared through ``layouts`` to show that the checks below would catch it.
    """

    id: str
    build: Callable[[], nn.Module]
    run: Callable[[nn.Module, int], object]
    projections: tuple[Projection, ...]
    out: tuple[str, ...]
    wrong: Optional[dict[str, str]] = None


def _projections(module: str, target: str, heads=(4, 4, 4), tags: str = "qkv", call=lambda i: i):
    """Projections of every layer ``i``; ``module`` and ``target`` are formats with ``{i}`` and ``{t}`` (the tag)."""
    return tuple(
        Projection(call(i), t, h, module.format(i=i, t=t), target.format(i=i, t=t))
        for i in range(LAYERS) for t, h in zip("qkv", heads) if t in tags
    )


def _outs(fmt: str) -> tuple[str, ...]:
    return tuple(fmt.format(i=i) for i in range(LAYERS))


def _zero_biases(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    return model


def _hf(config_cls, model_cls, **kw) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        config = getattr(transformers, config_cls)(vocab_size=VOCAB, attn_implementation="sdpa", **kw)
        return _zero_biases(getattr(transformers, model_cls)(config).eval())

    return build


def _run_hf(model: nn.Module, length: int, **kw) -> object:
    # Position 0 everywhere: rotary embeddings are the identity, so queries and keys are not rotated.
    ids = torch.randint(0, VOCAB, (1, length))
    return model(ids, position_ids=torch.zeros(1, length, dtype=torch.long), **kw)


def _run_hf_cross(model: nn.Module, length: int) -> object:
    return _run_hf(model, length, encoder_hidden_states=torch.randn(1, length, C))


def _litgpt() -> nn.Module:
    model = LitGPT(LitConfig(n_layer=LAYERS, n_head=4, n_query_groups=2, n_embd=C, block_size=64,
                             padded_vocab_size=VOCAB, bias=False))
    model.cos.fill_(1.0)  # rotary embeddings as the identity
    model.sin.zero_()
    return model


def _run_ids(model: nn.Module, length: int) -> object:
    return model(torch.randint(0, VOCAB, (1, length)))


def _mha() -> nn.Module:
    attns = [nn.MultiheadAttention(C, 4, batch_first=True) for _ in range(LAYERS)]
    return _zero_biases(Blocks(*attns, dim=C).train())  # train(): the fast path would bypass the SDPA kernel


def _run_embeddings(model: nn.Module, length: int) -> object:
    return model(torch.randn(1, length, C))


_SEPARATE = dict(module="model.layers.{i}.self_attn.{t}_proj", target="model.layers.{i}.self_attn.{t}_proj.weight",
                 heads=(4, 2, 2))
_GQA = dict(hidden_size=C, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=48, max_position_embeddings=64)
_GPT2 = dict(n_embd=C, n_layer=LAYERS, n_head=4, n_positions=64)
_GPT2_SELF = _projections("transformer.h.{i}.attn.c_attn", "transformer.h.{i}.attn.c_attn.weight.{t}")

ARCHS = [
    Arch("litgpt", _litgpt, _run_ids,
         _projections("transformer.h.{i}.attn.qkv", "transformer.h.{i}.attn.qkv.weight.{t}", heads=(4, 2, 2)),
         _outs("transformer.h.{i}.attn.proj.weight")),
    Arch("gpt2", _hf("GPT2Config", "GPT2LMHeadModel", **_GPT2), _run_hf, _GPT2_SELF,
         _outs("transformer.h.{i}.attn.c_proj.weight"), wrong={"*.attn.c_attn.weight": "matrix"}),
    Arch("gpt2-cross", _hf("GPT2Config", "GPT2LMHeadModel", add_cross_attention=True, **_GPT2), _run_hf_cross,
         _projections("transformer.h.{i}.attn.c_attn", "transformer.h.{i}.attn.c_attn.weight.{t}", call=lambda i: 2 * i)
         + _projections("transformer.h.{i}.crossattention.q_attn", "transformer.h.{i}.crossattention.q_attn.weight",
                        tags="q", call=lambda i: 2 * i + 1)
         + _projections("transformer.h.{i}.crossattention.c_attn",
                        "transformer.h.{i}.crossattention.c_attn.weight.{t}", tags="kv", call=lambda i: 2 * i + 1),
         _outs("transformer.h.{i}.attn.c_proj.weight") + _outs("transformer.h.{i}.crossattention.c_proj.weight"),
         wrong={"*.c_attn.weight": "matrix"}),
    Arch("bigcode-mqa", _hf("GPTBigCodeConfig", "GPTBigCodeForCausalLM", multi_query=True, **_GPT2), _run_hf,
         _projections("transformer.h.{i}.attn.c_attn", "transformer.h.{i}.attn.c_attn.weight.{t}", heads=(4, 1, 1)),
         _outs("transformer.h.{i}.attn.c_proj.weight"), wrong={"*.c_attn.weight": "rows:q=16,k=16,v=16"}),
    Arch("bigcode-mha", _hf("GPTBigCodeConfig", "GPTBigCodeForCausalLM", multi_query=False, **_GPT2), _run_hf,
         _projections("transformer.h.{i}.attn.c_attn", "transformer.h.{i}.attn.c_attn.weight.{t}"),
         _outs("transformer.h.{i}.attn.c_proj.weight"), wrong={"*.c_attn.weight": "rows:q=32,k=32,v=32"}),
    Arch("neox", _hf("GPTNeoXConfig", "GPTNeoXForCausalLM", hidden_size=C, num_hidden_layers=LAYERS,
                     num_attention_heads=4, intermediate_size=48, max_position_embeddings=64), _run_hf,
         _projections("gpt_neox.layers.{i}.attention.query_key_value",
                      "gpt_neox.layers.{i}.attention.query_key_value.weight.{t}"),
         _outs("gpt_neox.layers.{i}.attention.dense.weight"),
         wrong={"*.query_key_value.weight": "rows:q=32,k=32,v=32"}),
    Arch("llama", _hf("LlamaConfig", "LlamaForCausalLM", **_GQA), _run_hf, _projections(**_SEPARATE),
         _outs("model.layers.{i}.self_attn.o_proj.weight")),
    Arch("mistral", _hf("MistralConfig", "MistralForCausalLM", **_GQA), _run_hf, _projections(**_SEPARATE),
         _outs("model.layers.{i}.self_attn.o_proj.weight")),
    Arch("qwen2", _hf("Qwen2Config", "Qwen2ForCausalLM", **_GQA), _run_hf, _projections(**_SEPARATE),
         _outs("model.layers.{i}.self_attn.o_proj.weight")),
    Arch("phi3", _hf("Phi3Config", "Phi3ForCausalLM", pad_token_id=0, **_GQA), _run_hf,
         _projections("model.layers.{i}.self_attn.qkv_proj", "model.layers.{i}.self_attn.qkv_proj.weight.{t}",
                      heads=(4, 2, 2)),
         _outs("model.layers.{i}.self_attn.o_proj.weight")),
    Arch("mixtral", _hf("MixtralConfig", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2, **_GQA),
         _run_hf, _projections(**_SEPARATE), _outs("model.layers.{i}.self_attn.o_proj.weight")),
    Arch("dbrx", _hf("DbrxConfig", "DbrxForCausalLM", d_model=C, n_heads=4, n_layers=LAYERS, max_seq_len=64,
                     attn_config=DBRX_ATTENTION, ffn_config={"ffn_hidden_size": 8, "moe_num_experts": 3}),
         _run_hf,
         _projections("transformer.blocks.{i}.norm_attn_norm.attn.Wqkv",
                      "transformer.blocks.{i}.norm_attn_norm.attn.Wqkv.weight.{t}", heads=(4, 2, 2)),
         _outs("transformer.blocks.{i}.norm_attn_norm.attn.out_proj.weight"), wrong={"*.Wqkv.weight": "matrix"}),
    *(Arch(f"falcon-{kind}", _hf("FalconConfig", "FalconForCausalLM", hidden_size=C, num_hidden_layers=LAYERS,
                                 num_attention_heads=4, max_position_embeddings=64, **options), _run_hf,
           _projections("transformer.h.{i}.self_attention.query_key_value",
                        "transformer.h.{i}.self_attention.query_key_value.weight.{t}", heads=heads),
           _outs("transformer.h.{i}.self_attention.dense.weight"), wrong={"*.query_key_value.weight": wrong})
      for kind, options, heads, wrong in (
          ("grouped", dict(new_decoder_architecture=True, num_kv_heads=2), (4, 2, 2), "rows:q=32,k=16,v=16"),
          ("multi-query", dict(new_decoder_architecture=False, multi_query=True), (4, 1, 1), "matrix"),
          ("multi-head", dict(new_decoder_architecture=False, multi_query=False), (4, 4, 4), "rows:q=32,k=32,v=32"),
      )),
    Arch("nanogpt", lambda: _zero_biases(GPT(GPTConfig(n_layer=LAYERS, n_embd=C))), _run_ids,
         _projections("transformer.h.{i}.attn.c_attn", "transformer.h.{i}.attn.c_attn.weight.{t}"),
         _outs("transformer.h.{i}.attn.c_proj.weight")),
    Arch("multihead", _mha, _run_embeddings,
         _projections("blocks.{i}.attn", "blocks.{i}.attn.in_proj_weight.{t}"),
         _outs("blocks.{i}.attn.out_proj.weight"), wrong={"*.in_proj_weight": "matrix"}),
]
WRONG = [a for a in ARCHS if a.wrong]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _param_name(target: str) -> str:
    return target if target.endswith("weight") else target.rsplit(".", 1)[0]


def _holders(model: nn.Module, blocks: dict[str, Tensor]) -> set[str]:
    """Names of the parameters the ``blocks`` (views) live in."""
    pointers = {b.untyped_storage().data_ptr() for b in blocks.values()}
    return {n for n, p in model.named_parameters() if p.untyped_storage().data_ptr() in pointers}


def _true(arch: Arch, model: nn.Module) -> dict[str, Tensor]:
    return true_qkv(model, arch.run, arch.projections, C)


def _spread(matrix: Tensor) -> float:
    """``(s_max - s_min) / s_max`` of the singular values (in float64): 0 for a flat spectrum."""
    s = torch.linalg.svdvals(matrix.detach().double())
    return float((s.max() - s.min()) / s.max())


def _assert_flat(matrix: Tensor, norm_before: Tensor, name: str) -> None:
    assert _spread(matrix) < 1e-4, f"{name}: singular values not flat: {torch.linalg.svdvals(matrix.double())}"
    torch.testing.assert_close(torch.linalg.matrix_norm(matrix.double()), norm_before.double(), rtol=1e-5, atol=0,
                               msg=f"{name}: Frobenius norm not kept")


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _srank(m: Tensor) -> float:
    s = torch.linalg.svdvals(m.double())
    return float(s.square().sum() / s[0].square())


# ------------------------------------------------------------------------------------------- 1. the blocks
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.id)
def test_blocks_are_the_matrices_the_forward_multiplies_by(arch):
    model = arch.build()
    true = _true(arch, model)
    targets = {t.name: t for t in resolve_targets(model, "attention")}
    assert set(targets) == set(true) | set(arch.out)
    for p in arch.projections:
        assert targets[p.target].role == p.tag
        torch.testing.assert_close(targets[p.target].matrix(), true[p.target], rtol=0, atol=1e-6, msg=p.target)
    for name in arch.out:
        assert targets[name].role == "attn_out"


# ---------------------------------------------------------------------------------------------- 2. MSign
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.id)
def test_msign_attention_flattens_the_true_blocks_and_keeps_their_norms(arch):
    model = arch.build()
    before, params = _true(arch, model), _snapshot(model)
    MSign(model, period=1, targets="attention").apply()
    after, now = _true(arch, model), dict(model.named_parameters())
    for name, weight in after.items():
        _assert_flat(weight, torch.linalg.matrix_norm(before[name]), name)
    for name in arch.out:
        _assert_flat(now[name], torch.linalg.matrix_norm(params[name]), name)
    touched = {_param_name(p.target) for p in arch.projections} | set(arch.out)
    for name, p in now.items():
        if name not in touched:
            assert torch.equal(p, params[name]), f"{name} changed"


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.id)
def test_msign_qk_leaves_values_and_every_other_parameter_bit_untouched(arch):
    model = arch.build()
    before, params = _true(arch, model), _snapshot(model)
    MSign(model, period=1, targets="qk").apply()
    after, now = _true(arch, model), dict(model.named_parameters())
    qk_params = {_param_name(p.target) for p in arch.projections if p.tag in "qk"}
    for p in arch.projections:
        if p.tag == "v":
            assert torch.equal(after[p.target], before[p.target]), f"{p.target} changed"
        else:
            _assert_flat(after[p.target], torch.linalg.matrix_norm(before[p.target]), p.target)
    for name, p in now.items():
        if name not in qk_params:
            assert torch.equal(p, params[name]), f"{name} changed"


@pytest.mark.parametrize("arch", WRONG, ids=lambda a: a.id)
def test_a_guessed_cut_would_leave_the_true_blocks_unflat(arch):
    """The flatness checks above have teeth: cut by shape, the same MSign does not flatten the true blocks."""
    model = arch.build()
    MSign(model, period=1, targets="attention", layouts=arch.wrong).apply()
    spreads = {name: _spread(w) for name, w in _true(arch, model).items()}
    assert max(spreads.values()) > 0.05, spreads


# ------------------------------------------------------------------------------------- 3. measuring them
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.id)
def test_stable_rank_measures_the_true_blocks(arch):
    model = arch.build()
    true = _true(arch, model)
    exact = StableRank(model, targets="attention", mode="exact").compute()
    power = StableRank(model, targets="attention", mode="power", warmup_iters=100)
    estimates = [power.compute() for _ in range(3)]  # a cold start, then warm-started single iterations
    for name, weight in true.items():
        assert exact[name] == pytest.approx(_srank(weight), rel=1e-5), name
        for estimate in estimates:
            assert estimate[name] == pytest.approx(_srank(weight), rel=0.02), name
            assert estimate[name] >= _srank(weight) * (1 - 1e-5), name  # an upper bound


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.id)
def test_monitors_and_pss_resolve_the_blocks_msign_signs(arch):
    model = arch.build()
    for targets in ("attention", "qk"):
        names = MSign(model, period=1, targets=targets).target_names
        expected = {p.target for p in arch.projections if targets == "attention" or p.tag in "qk"}
        assert set(names) == expected | (set(arch.out) if targets == "attention" else set())
        assert StableRank(model, targets=targets).target_names == names
        assert PSS(model, targets=targets).target_names == names
        for callback in (StableRankMonitor(targets=targets), PSSCallback(targets=targets),
                         MSignCallback(targets=targets)):
            assert callback.guard.attach(model).target_names == names


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.id)
def test_pss_smooths_the_true_query_and_key_blocks_only(arch):
    model = arch.build()
    before = _true(arch, model)
    metrics = PSS(model, targets="qk", rank=2).protect()
    after = _true(arch, model)
    for p in arch.projections:
        top_before = torch.linalg.matrix_norm(before[p.target].double(), ord=2)
        top_after = torch.linalg.matrix_norm(after[p.target].double(), ord=2)
        if p.tag == "v":
            assert torch.equal(after[p.target], before[p.target]), p.target
        else:
            assert top_after < top_before, p.target
            assert metrics[f"pss/sigma1_before/{p.target}"] == pytest.approx(float(top_before), rel=1e-3)


# ------------------------------------------------------------------------------------------------ 4. MLPs
def _v5_moe() -> nn.Module:
    return MoEModel(MoEConfig())


def _v5_true(model: nn.Module) -> dict[str, Tensor]:
    """Each expert's gate, up and down matrix, cut as the forward's ``F.linear(x, gate_up_proj[e]).chunk(2)``."""
    out = {}
    for i, layer in enumerate(model.layers):
        experts = layer.mlp.experts
        for e in range(experts.num_experts):
            gate, up = experts.gate_up_proj[e].chunk(2, dim=0)
            prefix = f"layers.{i}.mlp.experts"
            out[f"{prefix}.gate_up_proj.e{e}.gate"] = gate
            out[f"{prefix}.gate_up_proj.e{e}.up"] = up
            out[f"{prefix}.down_proj.e{e}"] = experts.down_proj[e]
    return out


def _mixtral_true(model: nn.Module) -> dict[str, Tensor]:
    out = {}
    for i, layer in enumerate(model.model.layers):
        if not hasattr(layer, "block_sparse_moe"):  # transformers 5: 3-D expert tensors (E, 2I, H), (E, H, I)
            experts = layer.mlp.experts
            for e in range(experts.gate_up_proj.shape[0]):
                gate, up = experts.gate_up_proj[e].chunk(2, dim=0)
                prefix = f"model.layers.{i}.mlp.experts"
                out.update({f"{prefix}.gate_up_proj.e{e}.gate": gate, f"{prefix}.gate_up_proj.e{e}.up": up,
                            f"{prefix}.down_proj.e{e}": experts.down_proj[e]})
            continue
        for e, expert in enumerate(layer.block_sparse_moe.experts):
            for w in ("w1", "w2", "w3"):  # gate, down, up: act(w1 x) * (w3 x) -> w2
                out[f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"] = getattr(expert, w).weight
    return out


def _phi3_true(model: nn.Module) -> dict[str, Tensor]:
    out = {}
    for i, layer in enumerate(model.model.layers):
        gate, up = layer.mlp.gate_up_proj.weight.chunk(2, dim=0)  # as Phi3MLP.forward: gate_up(x).chunk(2, dim=-1)
        prefix = f"model.layers.{i}.mlp"
        out.update({f"{prefix}.gate_up_proj.weight.gate": gate, f"{prefix}.gate_up_proj.weight.up": up,
                    f"{prefix}.down_proj.weight": layer.mlp.down_proj.weight})
    return out


MLP_ARCHS = {
    "experts-v5": (_v5_moe, _v5_true, "layers.{i}.mlp.gate.weight"),
    "mixtral": (_hf("MixtralConfig", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2, **_GQA),
                _mixtral_true, "model.layers.{i}.block_sparse_moe.gate.weight"),  # transformers 5: mlp.gate
    "phi3": (_hf("Phi3Config", "Phi3ForCausalLM", pad_token_id=0, **_GQA), _phi3_true, None),
}


def test_v5_expert_blocks_reproduce_each_experts_forward():
    model = _v5_moe()
    targets = {t.name: t for t in resolve_targets(model, "mlp")}
    x = torch.randn(10, C)
    for i, layer in enumerate(model.layers):
        experts, prefix = layer.mlp.experts, f"layers.{i}.mlp.experts"
        for e in range(experts.num_experts):
            routed = experts(x, torch.full((10, 1), e), torch.ones(10, 1))  # every token to expert e alone
            gate = targets[f"{prefix}.gate_up_proj.e{e}.gate"].matrix()
            up = targets[f"{prefix}.gate_up_proj.e{e}.up"].matrix()
            down = targets[f"{prefix}.down_proj.e{e}"].matrix()
            torch.testing.assert_close(routed, (nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T)


def test_phi3_gate_up_blocks_reproduce_the_mlp_forward():
    model = MLP_ARCHS["phi3"][0]()
    mlp = model.model.layers[0].mlp
    targets = {t.name: t for t in resolve_targets(model, "mlp")}
    seen = {}
    handle = mlp.gate_up_proj.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    _run_hf(model, 8)
    handle.remove()
    gate, up = seen["out"].chunk(2, dim=-1)  # Phi3MLP.forward
    prefix = "model.layers.0.mlp.gate_up_proj.weight"
    torch.testing.assert_close(gate, seen["x"] @ targets[f"{prefix}.gate"].matrix().T)
    torch.testing.assert_close(up, seen["x"] @ targets[f"{prefix}.up"].matrix().T)


@pytest.mark.parametrize("arch", list(MLP_ARCHS))
def test_msign_mlp_flattens_every_expert_matrix_and_leaves_the_router(arch):
    build, true_blocks, router = MLP_ARCHS[arch]
    model = build()
    params, before = _snapshot(model), {n: w.detach().clone() for n, w in true_blocks(model).items()}
    names = MSign(model, period=1, targets="mlp").target_names
    assert set(names) == set(before)
    MSign(model, period=1, targets="mlp").apply()
    after = true_blocks(model)
    for name, weight in after.items():
        _assert_flat(weight, torch.linalg.matrix_norm(before[name]), name)
    holders = _holders(model, after)
    for name, p in model.named_parameters():
        if name not in holders:
            assert torch.equal(p, params[name]), f"{name} changed"
    if router is not None:
        for i in range(LAYERS):
            routers = (router.format(i=i), router.format(i=i).replace(".block_sparse_moe.", ".mlp."))
            assert not any(r in n for r in routers for n in names)


def test_a_sparse_moe_block_alone_is_found():
    block = MixtralSparseMoeBlock(MoEConfig())
    names = [t.name for t in resolve_targets(block, "mlp")]
    assert names == [f"experts.gate_up_proj.e{e}.{t}" for e in range(4) for t in ("gate", "up")] + [
        f"experts.down_proj.e{e}" for e in range(4)
    ]

