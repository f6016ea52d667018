"""Diagnostics and DiagnosticsMonitor on LitGPT, and the Jacobian Lanczos: values against independent computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from litgpt.config import Config
from litgpt.model import GPT
from torch.utils.data import DataLoader, TensorDataset

from lightning_msign import Diagnostics, DiagnosticsMonitor
from lightning_msign.functional.jacobian import jacobian_alignment, jacobian_top_singular
from lightning_msign.guards.diagnostics import batch_input_ids
from lightning_msign.models import LitGPTAttentionProbe, attention_probe, litgpt_attention_scale, litgpt_query_key

from conftest import TINY_CONFIG, TINY_VOCAB, RecordingLogger, tiny_data, tiny_module, trainer_kwargs

# --- functional: power iteration against dense Jacobians ---------------------------------------


def _dense_power_iteration(J: torch.Tensor, v0: torch.Tensor, iters: int):
    """The same iteration as jacobian_top_singular, on an explicit matrix."""
    v = v0 / v0.norm()
    for _ in range(iters):
        u = J @ v
        u = u / u.norm()
        w = J.T @ u
        sigma, v = w.norm(), w / w.norm()
    return sigma, u, v


def _start_vector(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).reshape(-1)


def test_linear_map_with_known_svd():
    torch.manual_seed(0)
    n = 24
    U, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    s = torch.linspace(1.0, 0.1, n, dtype=torch.float64)
    s[0] = 3.0
    M = U @ torch.diag(s) @ V.T
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    f = lambda h: (M @ h.reshape(-1)).reshape(h.shape)  # noqa: E731
    sigma, u, v = jacobian_top_singular(f, x, num_iters=20)
    assert sigma.dtype == torch.float64 and u.shape == v.shape == (n,)
    assert sigma.item() == pytest.approx(3.0, rel=1e-10)
    assert jacobian_alignment(u, U[:, 0]).item() == pytest.approx(1.0, abs=1e-10)
    assert jacobian_alignment(v, V[:, 0]).item() == pytest.approx(1.0, abs=1e-10)
    # a few steps: a lower bound, at least as good as power iteration from the same seeded start, whose
    # iterate after k - 1 steps lies in the Krylov space Lanczos maximises over after k
    sigma3, u3, v3 = jacobian_top_singular(f, x, num_iters=3, seed=5)
    _, _, power_v = _dense_power_iteration(M, _start_vector(x.shape, 5).double(), 2)
    assert torch.linalg.vector_norm(M @ power_v).item() - 1e-12 <= sigma3.item() <= 3.0
    assert torch.linalg.vector_norm(M @ v3).item() == pytest.approx(sigma3.item(), rel=1e-10)  # a Ritz pair
    assert (M @ v3 / sigma3 - u3).abs().max().item() < 1e-10


def _tiny_gpt(**overrides) -> GPT:
    config = {**TINY_CONFIG, "vocab_size": TINY_VOCAB, "padded_vocab_size": TINY_VOCAB, "block_size": 16, **overrides}
    return GPT(Config(**config))


def test_litgpt_block_against_dense_jacobian():
    torch.manual_seed(0)
    gpt = _tiny_gpt()
    block = gpt.transformer.h[0]
    with torch.no_grad():  # a dominant direction, as in a collapsing block: boost one rank of the MLP output...
        block.mlp.proj.weight.add_(4.0 * torch.randn(32, 1) @ torch.randn(1, 128) / 32)
    x = torch.randn(2, 8, 32)
    x[0, 3] *= 0.3  # a small hidden state, which the block's pre-norms amplify: sigma_1 6.4, sigma_2 3.0
    cos, sin = gpt.cos[:8].unsqueeze(0), gpt.sin[:8].unsqueeze(0)
    f = lambda h: block(h, cos, sin)  # noqa: E731
    J = torch.autograd.functional.jacobian(f, x).reshape(x.numel(), x.numel())
    U, S, Vh = torch.linalg.svd(J.double())
    sigma, u, v = jacobian_top_singular(f, x, num_iters=30)
    assert sigma.item() == pytest.approx(S[0].item(), rel=1e-4)
    assert jacobian_alignment(u, U[:, 0]).item() > 0.999
    assert jacobian_alignment(v, Vh[0]).item() > 0.999
    # 5 steps: a lower bound, no worse than 4 power iterations from the same start (Krylov space)
    sigma5, u5, v5 = jacobian_top_singular(f, x, num_iters=5)
    _, _, power_v = _dense_power_iteration(J, _start_vector(x.shape), 4)
    power_sigma = torch.linalg.vector_norm(J @ power_v.to(J.dtype)).item()
    assert power_sigma * (1 - 1e-5) <= sigma5.item() <= S[0].item() * (1 + 1e-5)
    assert all(p.grad is None for p in block.parameters())


def test_functional_argument_checks():
    f = lambda h: h  # noqa: E731
    with pytest.raises(ValueError, match="num_iters.*0"):
        jacobian_top_singular(f, torch.ones(3), num_iters=0)
    with pytest.raises(TypeError, match="x"):
        jacobian_top_singular(f, torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="3 and 4"):
        jacobian_alignment(torch.ones(3), torch.ones(4))
    assert jacobian_alignment(torch.zeros(3), torch.ones(3)).item() == 0.0


# --- attention logits: q, k against LitGPT's own --------------------------------------------------


def _reference_attention(gpt: GPT, ids: torch.Tensor):
    """Run LitGPT's own forward, recording the q, k (after GQA expansion) and mask its SDPA receives."""
    seen = []
    for block in gpt.transformer.h:
        attn = block.attn
        original = attn.scaled_dot_product_attention

        def record(q, k, v, mask=None, _orig=original, _attn=attn):
            seen.append((q.detach(), k.detach(), mask, _attn))
            return _orig(q, k, v, mask)

        attn.scaled_dot_product_attention = record
    with torch.no_grad():
        logits = gpt(ids)
    for block in gpt.transformer.h:
        del block.attn.scaled_dot_product_attention
    maxima = []
    for q, k, mask, attn in seen:
        T = q.shape[2]
        allowed = torch.ones(T, T, dtype=torch.bool).tril() if mask is None else (mask == 0).reshape(T, T)
        scores = (q @ k.mT) / math.sqrt(attn.config.head_size)
        maxima.append(scores.abs().masked_fill(~allowed, 0).amax())
    return logits, seen, maxima


@pytest.mark.parametrize(
    "overrides",
    [
        {"rotary_percentage": 1.0},  # GQA: 4 heads, 2 key groups
        {"rotary_percentage": 0.0},  # no positional encoding (the MSign paper's setup)
        {"rotary_percentage": 0.25, "n_query_groups": 1, "rope_interleave": True},  # MQA, partial interleaved RoPE
        {"norm_qk": True, "n_query_groups": 4},
        {"norm_qk": True, "norm_qk_type": "olmo2", "sliding_window_size": 3, "sliding_window_indices": [1, 0]},
    ],
    ids=["rope-gqa", "no-rope", "partial-rope-mqa", "qk-norm", "olmo2-norm-sliding-window"],
)
def test_query_key_and_logit_max_match_litgpt(overrides):
    torch.manual_seed(0)
    gpt = _tiny_gpt(**overrides)
    if gpt.config.norm_qk:  # non-trivial norm weights
        for block in gpt.transformer.h:
            torch.nn.init.uniform_(block.attn.norm_q.weight, 0.5, 2.0)
            torch.nn.init.uniform_(block.attn.norm_k.weight, 0.5, 2.0)
    ids = torch.randint(0, TINY_VOCAB, (3, 16))
    ref_logits, seen, ref_max = _reference_attention(gpt, ids)

    probes = [attention_probe(block.attn, keep=True) for block in gpt.transformer.h]
    assert all(isinstance(p, LitGPTAttentionProbe) for p in probes)
    handles = [h for p in probes for h in p.attach()]
    with torch.no_grad():
        gpt(ids)
    for h in handles:
        h.remove()
    for probe, (ref_q, ref_k, _, attn) in zip(probes, seen):
        q, k = probe.query, probe.key
        assert torch.allclose(q, ref_q, atol=1e-6)
        groups = k.shape[1]
        assert groups == gpt.config.n_query_groups
        assert torch.allclose(k.repeat_interleave(gpt.config.n_head // groups, dim=1), ref_k, atol=1e-6)
        assert probe.window == (gpt.config.sliding_window_size if attn.apply_sliding_window_attention else None)

    metrics = Diagnostics(gpt, jacobian=False, max_seq_len=None).compute(ids)
    for i, ref in enumerate(ref_max):
        assert metrics[f"diag/attn_logit_max/{i}"] == pytest.approx(ref.item(), rel=1e-5)
    assert metrics["diag/attn_logit_max"] == pytest.approx(max(r.item() for r in ref_max), rel=1e-5)
    assert metrics["diag/output_logit_max"] == pytest.approx(ref_logits.abs().max().item(), rel=1e-5)
    assert metrics["diag/output_logit_rms"] == pytest.approx(ref_logits.square().mean().sqrt().item(), rel=1e-5)


def test_softmax_of_logits_is_the_attention_of_the_model():
    """The logits' softmax, applied to LitGPT's values, gives LitGPT's attention output (no hook involved)."""
    torch.manual_seed(1)
    gpt = _tiny_gpt()
    ids = torch.randint(0, TINY_VOCAB, (2, 16))
    _, seen, _ = _reference_attention(gpt, ids)
    attn = gpt.transformer.h[0].attn
    ref_q, ref_k, _, _ = seen[0]
    x = gpt.transformer.h[0].norm_1(gpt.transformer.wte(ids))
    with torch.no_grad():
        qkv = attn.qkv(x)
        q, k = litgpt_query_key(attn, qkv, gpt.cos[:16].unsqueeze(0), gpt.sin[:16].unsqueeze(0))
        k = k.repeat_interleave(2, dim=1)
        logits = q @ k.mT * litgpt_attention_scale(attn)
        logits = logits.masked_fill(~torch.ones(16, 16, dtype=torch.bool).tril(), float("-inf"))
        v = qkv[..., -2 * 8 :].reshape(2, 16, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
        ours = (logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 16, 32)
        theirs = attn.scaled_dot_product_attention(ref_q, ref_k, v).reshape(2, 16, 32)
    assert torch.allclose(ours, theirs, atol=1e-6)


# --- the callback in a real Trainer ---------------------------------------------------------------


class _Watch(Callback):
    """Around DiagnosticsMonitor: gradients, modes and the global RNG must be what they were."""

    def __init__(self, after: bool, shared: dict) -> None:
        self.after, self.shared = after, shared

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        state = (
            {n: None if p.grad is None else p.grad.clone() for n, p in pl_module.named_parameters()},
            [m.training for m in pl_module.modules()],
            torch.get_rng_state(),
        )
        if not self.after:
            self.shared["before"] = state
            self.shared["batch"] = batch["input_ids"] if isinstance(batch, dict) else batch[0]
            return
        grads, modes, rng = self.shared["before"]
        for name, g in state[0].items():
            assert (g is None and grads[name] is None) or torch.equal(g, grads[name]), name
        assert state[1] == modes and all(modes)
        assert torch.equal(state[2], rng)
        self.shared["checked"] = self.shared.get("checked", 0) + 1


def _fit(tmp_path, callbacks, logger=False, max_steps=4):
    seed_everything(0)
    module = tiny_module()
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=max_steps, logger=logger), callbacks=callbacks)
    trainer.fit(module, tiny_data())
    return module, trainer


def test_logged_keys_steps_and_values(tmp_path):
    logger = RecordingLogger()
    shared: dict = {}
    monitor = DiagnosticsMonitor(every_n_steps=2, max_batch_size=1, max_seq_len=8, jacobian=True, jacobian_iters=60)
    module, _ = _fit(tmp_path, [_Watch(False, shared), monitor, _Watch(True, shared)], logger=logger)
    assert monitor.guard.model is module.model
    assert shared["checked"] == 4  # every batch, including the 2 with diagnostics
    # after optimizer steps 2 and 4 -> Lightning's step indices 1 and 3, those of the batches' train/loss
    keys = {
        "diag/attn_logit_max/0", "diag/attn_logit_max/1", "diag/attn_logit_max",
        "diag/output_logit_max", "diag/output_logit_rms",
        "diag/jacobian_norm/0", "diag/jacobian_norm/1", "diag/jacobian_alignment/0",
        "diag/jacobian_alignment_max", "diag/time_ms",
    }  # fmt: skip
    rows = [(step, m) for step, m in logger.records if "diag/time_ms" in m]
    assert [step for step, _ in rows] == [1, 3] and all(set(m) == keys for _, m in rows)
    last = rows[-1][1]

    # independent recomputation on the last batch (the weights have not changed since)
    gpt = module.model
    ids = shared["batch"][:1, :8]
    ref_logits, _, ref_max = _reference_attention(gpt, ids)
    for i in range(2):
        assert last[f"diag/attn_logit_max/{i}"] == pytest.approx(ref_max[i].item(), rel=1e-5)
    assert last["diag/output_logit_max"] == pytest.approx(ref_logits.abs().max().item(), rel=1e-5)
    assert last["diag/output_logit_rms"] == pytest.approx(ref_logits.square().mean().sqrt().item(), rel=1e-5)
    hidden = gpt.transformer.wte(ids).detach()
    cos, sin = gpt.cos[:8].unsqueeze(0), gpt.sin[:8].unsqueeze(0)
    vectors = []
    for i, block in enumerate(gpt.transformer.h):
        f = lambda h, block=block: block(h, cos, sin)  # noqa: E731
        J = torch.autograd.functional.jacobian(f, hidden).reshape(hidden.numel(), -1)
        U, S, Vh = torch.linalg.svd(J.double())  # dense reference: 60 Lanczos steps on N = 256 have converged
        assert last[f"diag/jacobian_norm/{i}"] == pytest.approx(S[0].item(), rel=1e-4)
        vectors.append((U[:, 0], Vh[0]))
        with torch.no_grad():
            hidden = f(hidden)
    alignment = abs(vectors[0][0] @ vectors[1][1]).item()
    assert last["diag/jacobian_alignment/0"] == pytest.approx(alignment, rel=1e-3, abs=1e-4)
    assert last["diag/jacobian_alignment_max"] == last["diag/jacobian_alignment/0"]


def test_training_is_bit_identical_with_and_without_the_callback(tmp_path):
    plain, plain_trainer = _fit(tmp_path / "a", [])
    watched, watched_trainer = _fit(tmp_path / "b", [DiagnosticsMonitor(every_n_steps=1)])
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values()):
        assert torch.equal(a, b), name
    opt_a = plain_trainer.optimizers[0].state_dict()["state"]
    opt_b = watched_trainer.optimizers[0].state_dict()["state"]
    assert opt_a.keys() == opt_b.keys()
    for key in opt_a:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_a[key][field], opt_b[key][field]), (key, field)


def test_options_select_the_metrics_and_accumulation_is_respected(tmp_path):
    logger = RecordingLogger()
    monitor = DiagnosticsMonitor(every_n_steps=3, jacobian=False, output_logits=False, model_attr="model")
    seed_everything(0)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=3, logger=logger, accumulate_grad_batches=2),
                      callbacks=[monitor])
    trainer.fit(tiny_module(), tiny_data())
    keys = {k for _, m in logger.records for k in m if k.startswith("diag/")}
    assert keys == {"diag/attn_logit_max/0", "diag/attn_logit_max/1", "diag/attn_logit_max", "diag/time_ms"}
    assert logger.steps_with("diag/time_ms") == [2]  # once, after optimizer step 3 (batch 6)


class _NextTokenGPT(LightningModule):
    """A LitGPTModule-like module whose batches hold T + 1 tokens: inputs ``x[:, :-1]``, targets ``x[:, 1:]``."""

    def __init__(self, block_size: int = 16) -> None:
        super().__init__()
        config = {**TINY_CONFIG, "vocab_size": TINY_VOCAB, "padded_vocab_size": TINY_VOCAB, "block_size": block_size}
        self.model = GPT(Config(**config))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        logits = self.model(x[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _token_loader(seq_len: int, n: int = 16, batch_size: int = 4) -> DataLoader:
    ids = torch.randint(0, TINY_VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(ids), batch_size=batch_size)


@pytest.mark.parametrize("max_seq_len", [128, None, 10])
def test_batches_of_block_size_plus_one_tokens_are_cut_to_the_model(tmp_path, max_seq_len):
    logger = RecordingLogger()
    seed_everything(0)
    module = _NextTokenGPT(block_size=16)
    monitor = DiagnosticsMonitor(every_n_steps=2, max_seq_len=max_seq_len, max_batch_size=2)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=4, logger=logger), callbacks=[monitor])
    trainer.fit(module, _token_loader(17))  # 17 tokens: one more than the GPT accepts
    assert monitor.guard.decoder.max_length == 16
    assert logger.steps_with("diag/time_ms") == [1, 3]
    last = [m for _, m in logger.records if "diag/time_ms" in m][-1]
    ids = _token_loader(17).dataset.tensors[0][12:14, : min(16, max_seq_len or 16)]  # the last batch, cut
    ref_logits, _, ref_max = _reference_attention(module.model, ids)
    assert last["diag/attn_logit_max"] == pytest.approx(max(r.item() for r in ref_max), rel=1e-5)
    assert last["diag/output_logit_max"] == pytest.approx(ref_logits.abs().max().item(), rel=1e-5)
    assert last["diag/output_logit_rms"] == pytest.approx(ref_logits.square().mean().sqrt().item(), rel=1e-5)


def test_the_guard_in_a_plain_loop_gives_the_numbers_of_the_callback(tmp_path):
    kwargs = {"every_n_steps": 2, "jacobian": True, "jacobian_iters": 8, "max_batch_size": 2, "max_seq_len": 12}
    logger = RecordingLogger()
    seed_everything(0)
    lit = _NextTokenGPT()
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=4, logger=logger), callbacks=[DiagnosticsMonitor(**kwargs)])
    trainer.fit(lit, _token_loader(17))
    logged = [m for _, m in logger.records if "diag/time_ms" in m]

    seed_everything(0)
    plain = _NextTokenGPT()  # the same initial weights, trained by hand on the same batches
    guard = Diagnostics(plain.model, **kwargs)
    optimizer = plain.configure_optimizers()
    rows = []
    for (x,) in _token_loader(17):
        loss = plain.training_step((x,), 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        metrics = guard.step(x)
        if metrics:
            rows.append(metrics)
    for (name, a), b in zip(lit.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    assert len(rows) == len(logged) == 2 and guard.last_step == 4
    for ours, theirs in zip(rows, logged):
        assert ours.keys() == theirs.keys()
        assert "diag/jacobian_alignment/0" in ours and "diag/attn_logit_max/1" in ours
        for key in set(ours) - {"diag/time_ms"}:
            assert ours[key] == theirs[key], key


def test_a_compiled_gpt_is_run_uncompiled():
    gpt = _tiny_gpt()
    holder = torch.nn.Module()
    holder.gpt = torch.compile(gpt)  # an OptimizedModule, which forwards `transformer` to the GPT
    guard = Diagnostics(holder)
    assert guard.model is gpt
    ids = torch.randint(0, TINY_VOCAB, (1, 8))
    assert guard.compute(ids)["diag/output_logit_max"] == pytest.approx(gpt(ids).abs().max().item(), rel=1e-6)


class _NoGPT(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)

    def training_step(self, batch, batch_idx):
        return self.layer(batch["input_ids"][:, :4].float()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _OtherBlocks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.transformer = torch.nn.Module()
        self.transformer.h = torch.nn.ModuleList([torch.nn.Linear(4, 4)])


def test_models_it_cannot_handle_fail_at_setup(tmp_path):
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=1), callbacks=[DiagnosticsMonitor()])
    with pytest.raises(ValueError, match="transformer.h"):
        trainer.fit(_NoGPT(), tiny_data())
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=1), callbacks=[DiagnosticsMonitor(model_attr="gpt")])
    with pytest.raises(ValueError, match="model_attr.*'gpt'"):
        trainer.fit(tiny_module(), tiny_data())
    with pytest.raises(ValueError, match="no `attn` or `self_attn` module in block 0.*attention_logits=False"):
        Diagnostics().attach(_OtherBlocks())
    Diagnostics(attention_logits=False).attach(_OtherBlocks())  # Jacobians and output logits only: fine
    with pytest.raises(RuntimeError, match="setup"):
        Diagnostics().compute(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids.*dtype torch.float32"):
        batch_input_ids({"input_ids": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="token ids.*got dict"):
        batch_input_ids({"ids": "abc"})
    with pytest.raises(ValueError, match="token ids.*shape \\(3,\\)"):
        Diagnostics(every_n_steps=5).attach(tiny_module()).step(torch.zeros(3, dtype=torch.long))  # due or not


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "every_n_steps.*0"),
        ({"jacobian": 1}, "jacobian.*1"),
        ({"jacobian_iters": -2}, "jacobian_iters.*-2"),
        ({"attention_logits": "yes"}, "attention_logits.*'yes'"),
        ({"output_logits": None}, "output_logits.*None"),
        ({"max_batch_size": 0}, "max_batch_size.*0"),
        ({"max_seq_len": 2.5}, "max_seq_len.*2.5"),
        ({"model_attr": "model."}, "model_attr.*'model.'"),
        ({"seed": -1}, "seed.*-1"),
        ({"jacobian": False, "attention_logits": False, "output_logits": False}, "At least one"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiagnosticsMonitor(**kwargs)


def test_state_is_saved_and_restored():
    monitor = DiagnosticsMonitor()
    monitor.load_state_dict({"last_step": 7})  # the format of older checkpoints
    assert monitor.state_dict() == {"last_step": 7}
    other = DiagnosticsMonitor()
    other.load_state_dict(monitor.state_dict())
    assert other.guard.last_step == 7
    other.load_state_dict({})
    assert other.guard.last_step == 0
    assert DiagnosticsMonitor(every_n_steps=5).state_key != DiagnosticsMonitor(every_n_steps=6).state_key
    with pytest.raises(RuntimeError, match="attach"):  # a forgotten attach() is noticed at once
        DiagnosticsMonitor().guard.step(torch.zeros(1, 4, dtype=torch.long), step=1)


def test_blocks_held_inactive_by_architecture_warmup_are_skipped():
    """A decoder under DepthWarmup: inactive blocks (the identity) report no attention logit and no Jacobian;
    the active ones report what they report without the warm-up's blocks."""
    from lightning_msign import DepthWarmup
    from lightning_msign.metric_keys import DIAG_ATTN_LOGIT_MAX, DIAG_ATTN_LOGIT_MAX_PREFIX, DIAG_JACOBIAN_NORM_PREFIX

    torch.manual_seed(0)
    module = tiny_module()
    n = len(module.model.transformer.h)
    DepthWarmup(module, start_fraction=0.5, groups=1, interval=1, start_step=5)
    ids = torch.randint(0, TINY_VOCAB, (2, 16))
    metrics = Diagnostics(module, every_n_steps=1, jacobian=True, jacobian_iters=3).compute(ids)
    active = [i for i in range(n) if f"{DIAG_ATTN_LOGIT_MAX_PREFIX}{i}" in metrics]
    assert active == list(range((n + 1) // 2))
    assert [i for i in range(n) if f"{DIAG_JACOBIAN_NORM_PREFIX}{i}" in metrics] == active
    assert metrics[DIAG_ATTN_LOGIT_MAX] == max(metrics[f"{DIAG_ATTN_LOGIT_MAX_PREFIX}{i}"] for i in active)
