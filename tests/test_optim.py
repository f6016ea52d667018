"""lightning_msign.optim: NuMuon and Muon against their definitions, torch's own optimizers and real models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_msign import LitGPTModule
from lightning_msign.functional import rank_k_sign
from lightning_msign.optim import Muon, NuMuon, muon_param_groups, rank_fraction_at, rank_of

from conftest import RecordingLogger, tiny_data, tiny_module, trainer_kwargs


def exact_sign(M: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return (U @ Vh).to(M.dtype)


def grads_for(params, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]


def run_steps(opt, params, steps, start=0):
    for t in range(start, start + steps):
        for p, g in zip(params, grads_for(params, t)):
            p.grad = g
        opt.step()


# ----------------------------------------------------------------------------------------- the definition
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust", ["match_rms_adamw", "original", "none"])
def test_full_rank_is_a_muon_step_with_the_exact_sign(nesterov, adjust):
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(24, 16))
    lr, mu, wd = 0.05, 0.9, 0.1
    opt = NuMuon([W], lr=lr, momentum=mu, nesterov=nesterov, weight_decay=wd, rank_fraction=1.0,
                 adjust_lr_fn=adjust)
    scale = {"match_rms_adamw": 0.2 * math.sqrt(24), "original": math.sqrt(24 / 16), "none": 1.0}[adjust]
    ref, buf = W.detach().clone().double(), torch.zeros(24, 16, dtype=torch.float64)
    for t in range(4):
        g = grads_for([W], t)[0]
        W.grad = g
        opt.step()
        g = g.double()
        buf = mu * buf + (1 - mu) * g
        update = (mu * buf + (1 - mu) * g) if nesterov else buf
        ref = ref * (1 - lr * wd) - lr * scale * exact_sign(update)
        torch.testing.assert_close(W.detach().double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("shape", "fraction", "krylov"), [
    ((200, 160), 0.05, True),  # 3 * (8 + 8) < 160: the Krylov path (2 iterations, block k + 8)
    ((64, 64), 0.25, False),  # 3 * (16 + 8) >= 64: the Krylov space would be all of it, the exact SVD
    ((64, 64), 0.5, False),
    ((64, 256), 0.125, True),
])
def test_rank_fraction_step_has_rank_k_with_equal_singular_values(shape, fraction, krylov):
    torch.manual_seed(1)
    W = nn.Parameter(torch.randn(*shape, dtype=torch.float64))  # float64: the difference below is exact
    opt = NuMuon([W], lr=0.01, weight_decay=0.0, rank_fraction=fraction, adjust_lr_fn="original")
    k, scale = rank_of(fraction, shape), math.sqrt(max(1.0, shape[0] / shape[1]))
    assert (3 * (k + 8) < min(shape)) == krylov
    for t in range(3):
        before = W.detach().clone()
        W.grad = grads_for([W], t)[0]
        opt.step()
        S = torch.linalg.svdvals(before - W.detach())
        torch.testing.assert_close(S[:k], torch.full((k,), 0.01 * scale, dtype=torch.float64), rtol=1e-10, atol=0)
        assert S[k:].max() < 1e-10 * S[0]
    assert opt.state[W]["krylov_right_0"].shape == (shape[1], k)


def test_rank_k_update_follows_the_top_singular_directions_of_the_momentum():
    # A momentum with a clear gap after 5 directions: the rank-5 update is its exact U_5 V_5^T.
    torch.manual_seed(2)
    U = torch.linalg.qr(torch.randn(64, 64)).Q
    V = torch.linalg.qr(torch.randn(32, 32)).Q
    S = torch.cat([torch.tensor([10.0, 8.0, 6.0, 5.0, 4.0]), torch.full((27,), 0.1)])
    G = U[:, :32] @ torch.diag(S) @ V.T
    W = nn.Parameter(torch.zeros(64, 32))
    opt = NuMuon([W], lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.0, rank_fraction=5 / 32,
                 adjust_lr_fn="none", oversample=2)
    W.grad = G
    opt.step()
    expected = -(U[:, :5] @ V[:, :5].T)
    torch.testing.assert_close(W.detach(), expected, rtol=0, atol=1e-5)
    energy = float(S[:5].square().sum() / S.square().sum())
    assert opt.metrics()["numuon/captured_energy"] == pytest.approx(energy, rel=1e-5)


def test_rank_k_sign_against_the_svd_and_on_degenerate_matrices():
    torch.manual_seed(3)
    M = torch.randn(50, 30)
    U, S, Vh = torch.linalg.svd(M)
    # Within its bound: a block as wide as the space is exact, whatever the spectrum.
    full = rank_k_sign(M, 6, iterations=0, oversample=24)
    torch.testing.assert_close(full.sign, U[:, :6] @ Vh[:6], rtol=0, atol=1e-5)
    assert full.rank == 6 and full.captured == pytest.approx(float(S[:6].square().sum() / S.square().sum()), rel=1e-5)
    # Rank 3 < k = 5: the update has rank 3 (the sign of zero is zero), and zero gives zero.
    low = torch.randn(50, 3) @ torch.randn(3, 30)
    out = rank_k_sign(low, 5)
    assert out.rank == 3 and torch.linalg.matrix_rank(out.sign, rtol=1e-4) == 3
    assert out.captured == pytest.approx(1.0, abs=1e-6)
    zero = rank_k_sign(torch.zeros(20, 10), 4)
    assert zero.rank == 0 and torch.count_nonzero(zero.sign) == 0


def test_fused_weight_gets_one_update_per_block():
    # rows [q (16) | k (8) | v (8)] of a (32, 16) weight: each block its own sign and scale.
    torch.manual_seed(4)
    W = nn.Parameter(torch.randn(32, 16))
    opt = NuMuon([{"params": [W], "layouts": ["rows:q=16,k=8,v=8"]}], lr=0.1, momentum=0.0, nesterov=False,
                 weight_decay=0.0, rank_fraction=1.0, adjust_lr_fn="original")
    G = torch.randn(32, 16)
    before = W.detach().clone()
    W.grad = G
    opt.step()
    expected = torch.cat([0.1 * math.sqrt(max(1, r / 16)) * exact_sign(G[a:b])
                          for a, b, r in ((0, 16, 16), (16, 24, 8), (24, 32, 8))])
    torch.testing.assert_close(before - W.detach(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(before - W.detach(), 0.1 * exact_sign(G), atol=1e-3)  # not the whole-matrix sign


def test_muon_newton_schulz_matches_torch_muon():
    torch.manual_seed(5)
    W1 = nn.Parameter(torch.randn(32, 24))
    W2 = nn.Parameter(W1.detach().clone())
    ours = Muon([W1], lr=0.02, weight_decay=0.1, adjust_lr_fn="original")
    theirs = torch.optim.Muon([W2], lr=0.02, weight_decay=0.1, adjust_lr_fn="original")
    for t in range(3):
        g = grads_for([W1], t)[0]
        W1.grad, W2.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    # torch runs Newton-Schulz in bfloat16, this suite in float32: equal to bfloat16 rounding.
    delta = (W1 - W2).detach().abs().max()
    assert delta < 0.02 * 0.02 * 3 * math.sqrt(32 / 24)


# ----------------------------------------------------------------------------------------- AdamW groups
def test_adamw_groups_are_torch_adamw_bit_for_bit():
    torch.manual_seed(6)
    net = nn.Sequential(nn.Embedding(20, 8), nn.LayerNorm(8), nn.Linear(8, 20))
    ref = copy.deepcopy(net)
    mine = NuMuon([
        {"params": [net[0].weight, net[2].weight], "use_muon": False, "weight_decay": 0.1},
        {"params": [net[1].weight, net[1].bias, net[2].bias], "use_muon": False, "weight_decay": 0.0, "lr": 3e-3},
    ], lr=1e-2, betas=(0.9, 0.99), eps=1e-7)
    theirs = torch.optim.AdamW([
        {"params": [ref[0].weight, ref[2].weight], "weight_decay": 0.1},
        {"params": [ref[1].weight, ref[1].bias, ref[2].bias], "weight_decay": 0.0, "lr": 3e-3},
    ], lr=1e-2, betas=(0.9, 0.99), eps=1e-7)
    x = torch.randint(0, 20, (4, 6))
    for _ in range(5):
        for model, opt in ((net, mine), (ref, theirs)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
            opt.step()
    for a, b in zip(net.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert set(mine.state[net[0].weight]) == {"step", "exp_avg", "exp_avg_sq"}


# ----------------------------------------------------------------------------------------- schedules
def test_rank_schedules():
    assert rank_fraction_at(0.3, 1000) == 0.3
    cos = {"schedule": "cosine", "start": 1.0, "end": 0.25, "steps": 100}
    assert rank_fraction_at(cos, 0) == 1.0 and rank_fraction_at(cos, 100) == 0.25 and rank_fraction_at(cos, 500) == 0.25
    assert rank_fraction_at(cos, 50) == pytest.approx(0.625)
    pw = {"schedule": "piecewise", "start": 1.0, "milestones": [[10, 0.5], [20, 0.25]]}
    assert [rank_fraction_at(pw, s) for s in (0, 9, 10, 19, 20, 99)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert rank_fraction_at({"schedule": "constant", "value": 0.5}, 7) == 0.5
    assert rank_of(0.25, (64, 32)) == 8 and rank_of(0.01, (64, 32)) == 1 and rank_of(1.0, (10, 64)) == 10
    assert rank_of(0.3, (10, 10)) == 3  # 0.3 * 10 rounds to 3, not up to 4


def test_schedule_drives_the_rank_of_each_step():
    W = nn.Parameter(torch.randn(40, 40))
    opt = NuMuon([W], lr=0.01, weight_decay=0.0, rank_fraction={"schedule": "piecewise", "start": 0.5,
                                                                 "milestones": [[2, 0.1]]}, adjust_lr_fn="none")
    ranks, fractions = [], []
    for t in range(4):
        before = W.detach().clone()
        W.grad = grads_for([W], t)[0]
        assert opt.rank_fraction() == (0.5 if t < 2 else 0.1)
        opt.step()
        fractions.append(opt.metrics()["numuon/rank_fraction"])
        ranks.append(int(torch.linalg.matrix_rank((before - W.detach()).double(), rtol=1e-4)))
    assert fractions == [0.5, 0.5, 0.1, 0.1] and ranks == [20, 20, 4, 4]


# ----------------------------------------------------------------------------------------- state and resume
@pytest.mark.parametrize("cls", [NuMuon, Muon])
def test_resume_from_state_dict_is_exact(tmp_path, cls):
    torch.manual_seed(7)
    params = [nn.Parameter(torch.randn(40, 24)), nn.Parameter(torch.randn(48, 16)), nn.Parameter(torch.randn(16))]
    twin = [nn.Parameter(p.detach().clone()) for p in params]

    def build(ps):
        groups = [{"params": ps[:2], "layouts": ["rows:q=24,k=8,v=8", None]}, {"params": ps[2:], "use_muon": False}]
        kwargs = {"rank_fraction": 0.2} if cls is NuMuon else {}
        return cls(groups, lr=0.02, **kwargs)

    straight = build(params)
    run_steps(straight, params, 6)
    first = build(twin)
    run_steps(first, twin, 3)
    torch.save(first.state_dict(), tmp_path / "opt.pt")
    resumed = build(twin)
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    run_steps(resumed, twin, 3, start=3)
    for a, b in zip(params, twin):
        assert torch.equal(a, b)
    if cls is NuMuon:
        assert {"momentum_buffer", "krylov_right_0", "krylov_right_1", "krylov_right_2"} <= set(
            resumed.state[twin[0]])
        assert resumed.param_groups[0]["steps"] == 6


def test_nonfinite_gradient_skips_the_parameter(tmp_path):
    W, V = nn.Parameter(torch.randn(16, 16)), nn.Parameter(torch.randn(16, 16))
    opt = NuMuon([W, V], lr=0.01, rank_fraction=0.5)
    run_steps(opt, [W, V], 1)
    w, buf = W.detach().clone(), opt.state[W]["momentum_buffer"].clone()
    v = V.detach().clone()
    W.grad = torch.full((16, 16), float("nan"))
    V.grad = torch.randn(16, 16)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert torch.equal(W.detach(), w) and torch.equal(opt.state[W]["momentum_buffer"], buf)
    assert not torch.equal(V.detach(), v) and torch.isfinite(V).all()
    assert opt.metrics()["numuon/skipped_nonfinite"] == 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_any_float_dtype(dtype):
    W = nn.Parameter(torch.randn(24, 16, dtype=dtype))
    opt = NuMuon([W], lr=0.01, rank_fraction=0.5)
    before = W.detach().clone()
    run_steps(opt, [W], 2)
    assert W.dtype == dtype and opt.state[W]["momentum_buffer"].dtype == dtype
    assert opt.state[W]["krylov_right_0"].dtype == dtype
    assert torch.isfinite(W).all() and not torch.equal(W.detach(), before)


# ----------------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank_fraction": 0.0}, r"`rank_fraction` must be a finite float in \(0, 1\], got 0.0"),
        ({"rank_fraction": 1.5}, r"`rank_fraction` must be .* got 1.5"),
        ({"rank_fraction": "half"}, r"`rank_fraction` must be a float in \(0, 1\] or a schedule dict"),
        ({"rank_fraction": {"schedule": "cosine", "start": 1.0}}, r"needs the keys \['end', 'steps'\]"),
        ({"rank_fraction": {"schedule": "linear"}}, r"`rank_fraction\['schedule'\]` must be one of"),
        ({"rank_fraction": {"schedule": "piecewise", "milestones": [[5, 0.5], [5, 0.2]]}}, "increasing order"),
        ({"rank_fraction": {"schedule": "cosine", "start": 1.0, "end": 0.2, "steps": 10, "warm": 1}}, "got also"),
        ({"momentum": 1.0}, r"`momentum` must be in \[0, 1\), got 1.0"),
        ({"lr": -1.0}, r"`lr` must be .* got -1.0"),
        ({"backend": "qr"}, r"`backend` must be one of .* got 'qr'"),
        ({"ns_steps": 3}, "must be None with backend 'svd'"),
        ({"adjust_lr_fn": "rms"}, r"`adjust_lr_fn` must be one of"),
        ({"krylov_iterations": -1}, r"`krylov_iterations` must be a non-negative int, got -1"),
        ({"betas": (0.9, 1.0)}, r"`betas` must be two floats in \[0, 1\)"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NuMuon([nn.Parameter(torch.zeros(4, 4))], **kwargs)


def test_bad_param_groups():
    with pytest.raises(ValueError, match=r"parameter 1 \(shape \(8,\)\): a Muon group takes matrices, got a 1-D"):
        NuMuon([nn.Parameter(torch.zeros(8, 8)), nn.Parameter(torch.zeros(8))])
    with pytest.raises(ValueError, match="one layout string .* per parameter"):
        NuMuon([{"params": [nn.Parameter(torch.zeros(8, 8))], "layouts": []}])
    with pytest.raises(ValueError, match="the blocks add up to 12 rows, the parameter has 8"):
        NuMuon([{"params": [nn.Parameter(torch.zeros(8, 8))], "layouts": ["rows:q=4,k=4,v=4"]}])
    with pytest.raises(ValueError, match=r"param_groups\[1\] \('head'\)\.rank_fraction"):
        NuMuon([{"params": [nn.Parameter(torch.zeros(8, 8))]},
                {"name": "head", "params": [nn.Parameter(torch.zeros(8, 8))], "rank_fraction": 2.0}])
    with pytest.raises(ValueError, match="`layouts` applies to Muon groups only"):
        NuMuon([{"params": [nn.Parameter(torch.zeros(8))], "use_muon": False, "layouts": [None]}])


# ----------------------------------------------------------------------------------------- param groups from models
def test_param_groups_of_litgpt():
    module = tiny_module()
    groups = {g["name"]: g for g in muon_param_groups(module, weight_decay=0.05)}
    names = {id(p): n for n, p in module.named_parameters()}
    muon = [names[id(p)] for p in groups["muon"]["params"]]
    assert muon == [f"model.transformer.h.{i}.{w}" for i in range(2) for w in
                    ("attn.qkv.weight", "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight")]
    assert groups["muon"]["layouts"][0] == "rows:q=32,k=16,v=16" and groups["muon"]["layouts"][1] is None
    assert sorted(names[id(p)] for p in groups["adamw"]["params"]) == ["model.lm_head.weight",
                                                                       "model.transformer.wte.weight"]
    assert all(p.ndim == 1 for p in groups["adamw_no_decay"]["params"])
    assert groups["muon"]["weight_decay"] == 0.05 and groups["adamw_no_decay"]["weight_decay"] == 0.0
    NuMuon(muon_param_groups(module))  # builds


def test_param_groups_of_hf_gpt2_read_conv1d_columns():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64, n_positions=16))
    groups = {g["name"]: g for g in muon_param_groups(model)}
    names = {id(p): n for n, p in model.named_parameters()}
    muon = dict(zip((names[id(p)] for p in groups["muon"]["params"]), groups["muon"]["layouts"]))
    assert muon["transformer.h.0.attn.c_attn.weight"] == "cols:q=32,k=32,v=32"
    assert "transformer.wte.weight" in {names[id(p)] for p in groups["adamw"]["params"]}
    opt = NuMuon(muon_param_groups(model), lr=1e-3, rank_fraction=0.5)
    ids = torch.randint(0, 64, (2, 8))
    model(ids, labels=ids).loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_param_groups_refuse_an_unknown_fused_weight():
    from _models import TimmAttention

    with pytest.raises(ValueError, match=r"'qkv.weight' .* looks like a fused weight .* layouts="):
        muon_param_groups(TimmAttention(32, 4))
    groups = muon_param_groups(TimmAttention(32, 4), layouts={"qkv.weight": "rows:q=32,k=32,v=32"})
    assert groups[0]["layouts"] == ["rows:q=32,k=32,v=32", None]


# ----------------------------------------------------------------------------------------- Lightning
def test_litgpt_module_trains_with_numuon_and_logs_the_schedule(tmp_path):
    seed_everything(0)
    schedule = {"schedule": "cosine", "start": 1.0, "end": 0.25, "steps": 4}
    module = tiny_module(optimizer="numuon", optimizer_options={"rank_fraction": schedule, "momentum": 0.9})
    logger = RecordingLogger()
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=6, logger=logger, log_every_n_steps=1))
    trainer.fit(module, tiny_data())
    opt = trainer.optimizers[0]
    assert isinstance(opt, NuMuon) and opt.param_groups[0]["name"] == "weights" and opt.param_groups[0]["use_muon"]
    assert opt.param_groups[0]["momentum"] == 0.9
    logged = [m["numuon/rank_fraction"] for _, m in logger.records if "numuon/rank_fraction" in m]
    assert logged == pytest.approx([rank_fraction_at(schedule, s) for s in range(6)])
    losses = [m["train/loss"] for _, m in logger.records if "train/loss" in m]
    assert losses[-1] < losses[0]


def test_litgpt_module_resumes_numuon_exactly(tmp_path):
    def fit(max_steps, ckpt_path=None, callbacks=()):
        seed_everything(0)
        module = tiny_module(optimizer="numuon", optimizer_options={"rank_fraction": 0.25}, max_steps=6)  # one LR
        trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=max_steps, enable_checkpointing=bool(callbacks)),
                          callbacks=list(callbacks))
        trainer.fit(module, tiny_data(), ckpt_path=ckpt_path)
        return module, trainer

    straight, _ = fit(6)
    fit(3, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)])
    resumed, trainer = fit(6, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt"))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert trainer.optimizers[0].param_groups[0]["steps"] == 6


def test_litgpt_module_optimizer_arguments():
    with pytest.raises(ValueError, match=r"`optimizer` must be one of \('adamw', 'muon', 'numuon'\), got 'sgd'"):
        tiny_module(optimizer="sgd")
    with pytest.raises(ValueError, match="applies to optimizer='muon' or 'numuon'"):
        tiny_module(optimizer_options={"momentum": 0.9})
    with pytest.raises(ValueError, match=r"must not set \['lr'\]"):
        tiny_module(optimizer="muon", optimizer_options={"lr": 0.1})
    with pytest.raises(ValueError, match=r"keys \['rank_fraction'\] are not arguments of Muon"):
        tiny_module(optimizer="muon", optimizer_options={"rank_fraction": 0.5})
    with pytest.raises(ValueError, match=r"`rank_fraction` must be .* got 0.0"):
        tiny_module(optimizer="numuon", optimizer_options={"rank_fraction": 0.0})
    module = LitGPTModule({"n_layer": 1, "n_head": 2, "n_embd": 16}, vocab_size=64, block_size=8, optimizer="muon")
    groups = module.param_groups()
    assert [(g["name"], g["use_muon"]) for g in groups] == [("weights", True), ("embeddings", False),
                                                            ("no_decay", False)]


def test_curvature_monitor_refuses_muon_type_optimizers(tmp_path):
    from lightning_msign import CurvatureMonitor

    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=2), callbacks=[CurvatureMonitor(every_n_steps=1)])
    with pytest.raises(NotImplementedError, match="got NuMuon: .*Muon and NuMuon orthogonalise the momentum"):
        trainer.fit(tiny_module(optimizer="numuon"), tiny_data())
