"""Layouts: a fused weight nobody can read raises, a declared layout is honoured exactly, and NaN, ``split_qkv`` and
presets that miss attention layers behave as documented."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from _models import (
    Blocks,
    MixtralExperts,
    MoEConfig,
    MoEModel,
    MyAttention,
    Projection,
    TimmAttention,
    ToQKVAttention,
    experts_implementation,
    true_qkv,
)
from litgpt import GPT as LitGPT
from litgpt import Config as LitConfig
from torch import Tensor, nn

from lightning_msign import PSS, Layout, MSign, StableRank, parse_layout, resolve_targets
from lightning_msign.families import Family, linears, register_family, unregister_family
from lightning_msign.targets import validate_targets

C = 32
QKV_ROWS = {"*.qkv.weight": "rows:q=32,k=32,v=32"}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _spread(matrix: Tensor) -> float:
    s = torch.linalg.svdvals(matrix.detach().double())
    return float((s.max() - s.min()) / s.max())


def _no_bias(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    return model


def _run(model: nn.Module, length: int) -> Tensor:
    return model(torch.randn(1, length, C))


def _projections(module: str, target: str, layers: int = 2) -> list[Projection]:
    return [Projection(i, t, 4, module.format(i=i), target.format(i=i, t=t)) for i in range(layers) for t in "qkv"]


# ------------------------------------------------------------------------------ unreadable fused weights
@pytest.mark.parametrize(
    ("model", "param"),
    [
        (lambda: Blocks(TimmAttention(C, 4), TimmAttention(C, 4)), "blocks.0.attn.qkv.weight"),
        (lambda: Blocks(MyAttention(C, 4)), "blocks.0.attn.c_attn.weight"),
    ],
    ids=["timm-qkv", "MyAttention-c_attn"],
)
@pytest.mark.parametrize("targets", ["attention", "qk", "all_2d", "*.attn.*"])
def test_a_fused_weight_without_a_readable_layout_raises_naming_it(model, param, targets):
    model = model()
    pattern = rf"{param.replace('.', '[.]')}.*`layouts`"
    with pytest.raises(ValueError, match=pattern):
        resolve_targets(model, targets)
    with pytest.raises(ValueError, match=pattern):
        MSign(model, period=1, targets=targets)
    with pytest.raises(ValueError, match=pattern):
        StableRank(targets=targets).attach(model)  # constructed without a module: raises when attached
    with pytest.raises(ValueError, match=pattern):
        PSS(model, targets=targets)


def test_a_declared_layout_cuts_timm_attention_as_its_forward_does():
    model = _no_bias(Blocks(TimmAttention(C, 4), TimmAttention(C, 4)))
    projections = _projections("blocks.{i}.attn.qkv", "blocks.{i}.attn.qkv.weight.{t}")
    true = true_qkv(model, _run, projections, C)
    with pytest.warns(UserWarning, match=r"TimmAttention: no attn_out"):  # no family says what `proj` is
        targets = {t.name: t for t in resolve_targets(model, "attention", layouts=QKV_ROWS)}
    assert set(targets) == set(true)  # the declaration's tags give the roles of the blocks, and only those
    for name, weight in true.items():
        assert targets[name].role == name[-1]
        torch.testing.assert_close(targets[name].matrix(), weight, rtol=0, atol=0)
    norms = {name: torch.linalg.matrix_norm(w) for name, w in true.items()}
    MSign(model, period=1, targets="attention", layouts=QKV_ROWS).apply()
    for name, weight in true_qkv(model, _run, projections, C).items():
        assert _spread(weight) < 1e-4, name
        torch.testing.assert_close(torch.linalg.matrix_norm(weight), norms[name], rtol=1e-5, atol=0)
    ranks = StableRank(model, targets="qk", mode="exact", layouts=QKV_ROWS).compute()
    assert set(ranks) == {n for n in true if n[-1] in "qk"}
    assert all(r == pytest.approx(C, rel=1e-4) for r in ranks.values())  # flat 32 x 32: stable rank 32


def test_a_declared_per_head_layout_cuts_interleaved_rows():
    model = Blocks(MyAttention(C, 4))  # rows per head: [q (8) | k (8) | v (8)] x 4
    projections = _projections("blocks.{i}.attn.c_attn", "blocks.{i}.attn.c_attn.weight.{t}", layers=1)
    true = true_qkv(model, _run, projections, C)
    heads = {t.name: t for t in resolve_targets(model, "qk", layouts={"*.c_attn.weight": "heads:4:q=8,k=8,v=8"})}
    assert set(heads) == {"blocks.0.attn.c_attn.weight.q", "blocks.0.attn.c_attn.weight.k"}
    for name, t in heads.items():
        torch.testing.assert_close(t.matrix(), true[name], rtol=0, atol=0)
    thirds = {t.name: t for t in resolve_targets(model, "qk", layouts={"*.c_attn.weight": "rows:q=32,k=32,v=32"})}
    assert not torch.equal(thirds["blocks.0.attn.c_attn.weight.q"].matrix(), true["blocks.0.attn.c_attn.weight.q"])
    v = true["blocks.0.attn.c_attn.weight.v"].clone()
    MSign(model, period=1, targets="qk", layouts={"*.c_attn.weight": "heads:4:q=8,k=8,v=8"}).apply()
    after = true_qkv(model, _run, projections, C)
    assert torch.equal(after["blocks.0.attn.c_attn.weight.v"], v)
    assert _spread(after["blocks.0.attn.c_attn.weight.q"]) < 1e-4
    assert _spread(after["blocks.0.attn.c_attn.weight.k"]) < 1e-4


# ------------------------------------------------------------------------------------ bad declarations
@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("rowz:q=32,k=32,v=32", "is not a layout"),
        ("heads:x:q=8,k=8,v=8", "head count"),
        ("heads:0:q=8", "head count"),
        ("rows:q=0,k=48,v=48", "positive size"),
        ("rows:q=32;k=32;v=32", "positive size"),
        ("rows:q=32,q=32,v=32", "unique"),
        ("experts/cols", "positive size"),
        ("", "layout strings"),
        (96, "layout strings"),
    ],
)
def test_a_bad_layout_string_raises_at_construction_naming_it(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        MSign(period=1, targets="attention", layouts={"*.qkv.weight": spec})
    assert repr(spec) in str(info.value)
    with pytest.raises(ValueError, match=message):
        StableRank(layouts={"*.qkv.weight": spec})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("rows:q=32,k=32,v=16", "add up to 80 rows, the parameter has 96"),
        ("rows:q=32,k=32", "add up to 64 rows"),
        ("heads:5:q=8,k=8,v=8", "add up to 120 rows"),
        ("cols:q=32,k=32,v=32", "add up to 96 columns, the parameter has 32"),
        ("experts/rows:q=32,k=32,v=32", "3 or more dimensions"),
    ],
)
def test_a_layout_that_does_not_fit_raises_at_attach_naming_value_and_parameter(spec, message):
    model = Blocks(TimmAttention(C, 4))
    guard = MSign(period=1, targets="attention", layouts={"*.qkv.weight": spec})  # a valid string: accepted here
    with pytest.raises(ValueError, match=message) as info:
        guard.attach(model)
    assert repr(spec) in str(info.value) and "'blocks.0.attn.qkv.weight'" in str(info.value)


def test_layouts_must_be_a_dict_of_globs():
    with pytest.raises(ValueError, match="`layouts` must be a dict"):
        MSign(period=1, layouts=["rows:q=32,k=32,v=32"])
    with pytest.raises(ValueError, match="glob"):
        MSign(period=1, layouts={"": "matrix"})


def test_layout_strings_round_trip():
    for spec in ("matrix", "flatten", "rows:q=32,k=8,v=8", "cols:k=32,v=32", "heads:4:q=8,k=8,v=8",
                 "colheads:24:gate=1,up=1", "experts", "experts/rows:gate=24,up=24"):
        assert parse_layout(parse_layout(spec).spec()) == parse_layout(spec)
    assert parse_layout("heads:4:q=8,k=8,v=8") == Layout("heads", (("q", 8), ("k", 8), ("v", 8)), 4, False, "declared")


# --------------------------------------------------------------------- presets that miss attention layers
def test_a_preset_warns_naming_the_attention_layers_it_cannot_see():
    model = Blocks(nn.MultiheadAttention(C, 4, batch_first=True), ToQKVAttention(C, 4))
    with pytest.warns(UserWarning, match=r"blocks\.1\.attn \(ToQKVAttention: no attn_out, k, q, v\)"):
        names = MSign(model, period=1, targets="attention").target_names
    assert names == [f"blocks.0.attn.in_proj_weight.{t}" for t in "qkv"] + ["blocks.0.attn.out_proj.weight"]
    with pytest.warns(UserWarning, match=r"'qk' found 2 matrices.*blocks\.1\.attn \(ToQKVAttention: no k, q\)"):
        resolve_targets(model, "qk")
    with pytest.warns(UserWarning, match="ToQKVAttention"):
        StableRank(model, targets="attention")
    with pytest.raises(ValueError, match=r"match no matrix.*blocks\.0\.attn\.to_q\.weight"):
        resolve_targets(Blocks(ToQKVAttention(C, 4)), "attention")  # nothing found at all: an error, not a warning


def test_selecting_the_unrecognised_projections_by_pattern_silences_the_warning():
    model = Blocks(nn.MultiheadAttention(C, 4, batch_first=True), ToQKVAttention(C, 4))
    patterns = ["*.to_q.weight", "*.to_k.weight", "*.to_v.weight", "*.to_out.0.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        names = [t.name for t in resolve_targets(model, ["attention", *patterns])]
    assert names[4:] == [f"blocks.1.attn.{p}.weight" for p in ("to_q", "to_k", "to_v", "to_out.0")]


class _Timm(Family):
    """A user's family for timm's attention: ``qkv`` is its fused Q/K/V (layout declared), ``proj`` its output."""

    name = "test timm"

    def read(self, module):
        if not isinstance(module, TimmAttention):
            return None
        return {id(module.qkv.weight): ("qkv", None), **linears(module, "attn_out", "proj")}


def test_recognised_models_do_not_warn():
    model = Blocks(nn.MultiheadAttention(C, 4, batch_first=True), TimmAttention(C, 4))
    family = register_family(_Timm())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            attention = resolve_targets(model, "attention", layouts=QKV_ROWS)
            resolve_targets(model, "qk", layouts=QKV_ROWS)
        assert "blocks.1.attn.proj.weight" in {t.name for t in attention}
        # the family says what qkv is, not how it splits: without the declaration it is refused
        with pytest.raises(ValueError, match=r"blocks\.1\.attn\.qkv\.weight.*`layouts`"):
            resolve_targets(model, "qk")
    finally:
        unregister_family(family)


# ----------------------------------------------------------------------------------------------- NaN
def _litgpt() -> nn.Module:
    return LitGPT(LitConfig(n_layer=2, n_head=4, n_query_groups=2, n_embd=C, block_size=16, padded_vocab_size=64,
                            bias=False))


def _litgpt_blocks(model: nn.Module) -> dict[str, Tensor]:
    """Q, K, V of every layer cut as LitGPT's forward does: ``qkv.split((n_head * hs, groups * hs, groups * hs))``."""
    out = {}
    for i, block in enumerate(model.transformer.h):
        hs = model.config.head_size
        sizes = (model.config.n_head * hs, model.config.n_query_groups * hs, model.config.n_query_groups * hs)
        for tag, w in zip("qkv", block.attn.qkv.weight.split(sizes, dim=0)):
            out[f"transformer.h.{i}.attn.qkv.weight.{tag}"] = w
    return out


Q0 = "transformer.h.0.attn.qkv.weight.q"


@pytest.mark.parametrize("mode", ["exact", "power"])
def test_a_query_block_holding_nan_has_nan_stable_rank_and_nan_summaries(mode):
    model = _litgpt()
    with torch.no_grad():
        model.transformer.h[0].attn.qkv.weight[3, 5] = float("nan")  # inside the query rows of layer 0
    monitor = StableRank(model, targets="attention", mode=mode)
    ranks = monitor.compute()
    assert torch.isnan(torch.tensor(ranks[Q0]))
    assert all(torch.isfinite(torch.tensor(v)) and v >= 1 for n, v in ranks.items() if n != Q0)
    metrics = monitor.step(1)
    assert torch.isnan(torch.tensor(metrics["srank/min"])) and torch.isnan(torch.tensor(metrics["srank/mean"]))
    assert torch.isnan(torch.tensor(metrics[f"srank/{Q0}"]))


def test_msign_skips_a_query_block_holding_nan_and_signs_the_rest():
    model = _litgpt()
    with torch.no_grad():
        model.transformer.h[0].attn.qkv.weight[3, 5] = float("nan")
    before = {n: w.clone() for n, w in _litgpt_blocks(model).items()}
    guard = MSign(model, period=1, targets="attention")
    with pytest.warns(RuntimeWarning, match=r"skipped 1 matrices.*transformer\.h\.0\.attn\.qkv\.weight\.q"):
        metrics = guard.apply()
    after = _litgpt_blocks(model)
    torch.testing.assert_close(after[Q0], before[Q0], rtol=0, atol=0, equal_nan=True)  # bit-untouched, NaN included
    for name, w in after.items():
        if name != Q0:
            assert _spread(w) < 1e-4, name
    assert guard.skipped_nonfinite == 1 and metrics["msign/skipped_nonfinite"] == 1.0
    assert f"msign/srank_before/{Q0}" not in metrics
    assert "msign/srank_before/transformer.h.0.attn.qkv.weight.k" in metrics


# ------------------------------------------------------------------------------------------ split_qkv
def test_split_qkv_false_signs_the_fused_litgpt_matrix_as_one():
    model = _litgpt()
    guard = MSign(model, period=1, targets="attention", split_qkv=False)
    assert guard.target_names == [f"transformer.h.{i}.attn.{p}.weight" for i in range(2) for p in ("qkv", "proj")]
    assert [t.role for t in guard.matrices] == ["qkv", "attn_out"] * 2
    guard.apply()
    for block in model.transformer.h:
        assert _spread(block.attn.qkv.weight) < 1e-4  # the whole (64, 32) weight is flat ...
    assert max(_spread(w) for w in _litgpt_blocks(model).values()) > 0.01  # ... its blocks are not


def test_qk_with_split_qkv_false_raises():
    for make in (
        lambda: validate_targets("qk", split_qkv=False),
        lambda: resolve_targets(_litgpt(), "qk", split_qkv=False),
        lambda: MSign(period=1, targets="qk", split_qkv=False),
        lambda: StableRank(targets=["qk", "*.proj.weight"], split_qkv=False),
        lambda: PSS(targets="qk", split_qkv=False),
    ):
        with pytest.raises(ValueError, match="split_qkv=False"):
            make()


# ------------------------------------------------------------------------------- experts nobody can read
def _gpt_oss() -> nn.Module:
    config = transformers.GptOssConfig(
        hidden_size=C, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, num_local_experts=4, num_experts_per_tok=2, vocab_size=64, layer_types=["full_attention"] * 2,
    )
    return transformers.GptOssForCausalLM(config)


GPT_OSS_LAYOUTS = {"*.experts.gate_up_proj": "experts/colheads:24:gate=1,up=1", "*.experts.down_proj": "experts"}


@pytest.mark.parametrize("targets", ["mlp", "all_2d"])
def test_transposed_interleaved_experts_raise_asking_for_their_layout(targets):
    # GPT-OSS: gate_up_proj (E, H, 2I) with gate and up interleaved by column; no reader knows it.
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj.*`layouts`"):
        resolve_targets(_gpt_oss(), targets)


def test_expert_bias_stacks_are_never_matrices():
    names = [t.name for t in resolve_targets(_gpt_oss(), "all_2d", layouts=GPT_OSS_LAYOUTS)]
    assert not [n for n in names if "bias" in n]
    assert "model.layers.0.mlp.experts.gate_up_proj.e3.up" in names and "model.layers.0.mlp.router.weight" in names


def test_declared_expert_layout_reproduces_gpt_oss_experts():
    model = _gpt_oss()
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():
        experts.gate_up_proj_bias.zero_()
        experts.down_proj_bias.zero_()
    targets = {t.name: t for t in resolve_targets(model, "mlp", layouts=GPT_OSS_LAYOUTS)}
    x = torch.randn(1, 6, C)
    prefix = "model.layers.0.mlp.experts"
    for e in range(4):
        weights = torch.zeros(6, 4)
        weights[:, e] = 1.0
        routed = experts(x, router_indices=torch.full((6, 1), e), routing_weights=weights)[0]
        gate = (x[0] @ targets[f"{prefix}.gate_up_proj.e{e}.gate"].matrix()).clamp(max=experts.limit)
        up = (x[0] @ targets[f"{prefix}.gate_up_proj.e{e}.up"].matrix()).clamp(-experts.limit, experts.limit)
        hidden = (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
        torch.testing.assert_close(routed, hidden @ targets[f"{prefix}.down_proj.e{e}"].matrix())
    router = model.model.layers[0].mlp.router.weight.clone()
    MSign(model, period=1, targets="mlp", layouts=GPT_OSS_LAYOUTS).apply()
    for e in range(4):
        assert _spread(experts.gate_up_proj[e][:, ::2]) < 1e-4 and _spread(experts.gate_up_proj[e][:, 1::2]) < 1e-4
        assert _spread(experts.down_proj[e]) < 1e-4
    assert torch.equal(model.model.layers[0].mlp.router.weight, router)


@pytest.mark.parametrize("flags", [{"is_transposed": True}, {"is_concatenated": False}, {"has_gate": False}])
def test_expert_flags_other_than_the_read_convention_ask_for_a_layout(flags):
    # The transformers-5 flags are read: a storage convention the reader does not cut is never assumed.
    variant = experts_implementation(**flags)(type("VariantExperts", (MixtralExperts,), {}))
    model = MoEModel(MoEConfig())
    for layer in model.layers:
        layer.mlp.experts = variant(MoEConfig())
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.experts\.gate_up_proj.*`layouts`"):
        resolve_targets(model, "mlp")
    names = [t.name for t in resolve_targets(model, "mlp", layouts={"*.gate_up_proj": "experts/rows:a=24,b=24",
                                                                     "*.down_proj": "experts"})]
    assert len(names) == 2 * 4 * 3 and "layers.1.mlp.experts.gate_up_proj.e3.b" in names
