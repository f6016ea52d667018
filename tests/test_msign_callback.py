"""MSignCallback on a real LitGPT model, real Trainer, real corpus (CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_msign import MSignCallback

from conftest import RecordingLogger, tiny_data, tiny_module, trainer_kwargs


class RecordingMSign(MSignCallback):
    """Checks the facts of each application at the hook where they hold."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.applied_at: list[int] = []
        self.checked = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        due = trainer.global_step > self.guard.last_step and trainer.global_step % self.guard.period == 0
        before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not due:
            return
        self.applied_at.append(trainer.global_step)
        after = dict(pl_module.named_parameters())
        touched = set()
        for t in self.guard.matrices:
            old = t.matrix(before[t.param_name])
            new = t.matrix().double()
            s = torch.linalg.svdvals(new)
            tol = 2e-2 if new.dtype == torch.bfloat16 or t.param.dtype == torch.bfloat16 else 1e-4
            # flat spectrum at ||W||_F / sqrt(rank), Frobenius norm kept
            assert (s.max() - s.min()) / s.max() < tol, t.name
            assert new.norm().item() == pytest.approx(old.double().norm().item(), rel=tol), t.name
            touched.add(t.param_name)
        for name, p in after.items():
            if name not in touched:
                assert torch.equal(p, before[name]), f"{name} changed but is not a target"
        self.checked += 1


def test_applied_exactly_at_multiples_of_period_with_accumulation(tmp_path):
    seed_everything(0)
    cb = RecordingMSign(period=3)
    logger = RecordingLogger()
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=7, accumulate_grad_batches=2, logger=logger), callbacks=[cb])
    trainer.fit(tiny_module(), tiny_data())
    assert trainer.global_step == 7
    assert cb.applied_at == [3, 6] and cb.guard.applications == 2 and cb.checked == 2
    # logged at Lightning's step index of that batch's training metrics (global_step - 1)
    assert logger.steps_with("msign/applications") == [2, 5]
    assert logger.values("msign/applications") == [1.0, 2.0]
    # attention targets of a 2-layer GQA model: Q, K, V blocks and the output projection per layer
    assert len(cb.guard.target_names) == 8
    after_keys = [k for _, m in logger.records for k in m if k.startswith("msign/srank_after/")]
    assert len(after_keys) == 2 * 8
    for _, m in logger.records:
        if "msign/srank_after_min" in m:
            assert m["msign/srank_after_min"] > m["msign/srank_before_min"]
            assert m["msign/time_ms"] > 0


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_precisions_keep_dtype_and_flatten_spectrum(tmp_path, precision):
    seed_everything(0)
    cb = RecordingMSign(period=2)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=4, precision=precision), callbacks=[cb])
    module = tiny_module()
    trainer.fit(module, tiny_data())
    assert cb.applied_at == [2, 4] and cb.checked == 2
    expected = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert module.model.transformer.h[0].attn.qkv.weight.dtype == expected


def test_mlp_untouched_with_attention_targets_and_touched_with_all_2d(tmp_path):
    seed_everything(0)
    cb = RecordingMSign(period=1, targets="all_2d")  # RecordingMSign asserts flatness of every target
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=2), callbacks=[cb])
    trainer.fit(tiny_module(), tiny_data())
    assert any(".mlp." in n for n in cb.guard.target_names) and cb.checked == 2
    assert not any("wte" in n or "lm_head" in n for n in cb.guard.target_names)


def test_fused_qkv_signed_as_one_matrix_when_not_split(tmp_path):
    module = tiny_module()
    cb = MSignCallback(period=1, split_qkv=False)
    cb.setup(Trainer(**trainer_kwargs(tmp_path)), module, "fit")
    assert "model.transformer.h.0.attn.qkv.weight" in cb.guard.target_names
    cb.guard.apply()
    s = torch.linalg.svdvals(module.model.transformer.h[0].attn.qkv.weight.double())
    assert (s.max() - s.min()) / s.max() < 1e-4


@pytest.mark.parametrize("backend", ["polar_express", "newton_schulz"])
def test_fast_backends_raise_stable_rank_and_keep_norm(tmp_path, backend):
    from lightning_msign.functional import stable_rank

    module = tiny_module()
    q = module.model.transformer.h[0].attn.qkv.weight.data[:32]
    with torch.no_grad():  # collapse the Q block: dominant direction over small noise
        q.copy_(0.02 * torch.randn_like(q) + torch.randn(32, 1) @ torch.randn(1, 32))
    norm, srank = q.norm().item(), stable_rank(q).item()
    cb = MSignCallback(period=1, backend=backend)
    cb.setup(Trainer(**trainer_kwargs(tmp_path)), module, "fit")
    cb.guard.apply()
    assert q.norm().item() == pytest.approx(norm, rel=1e-5)
    assert stable_rank(q).item() > 5 * srank


def test_nonfinite_matrix_is_skipped_and_counted_zero_matrix_left_as_is(tmp_path):
    module = tiny_module()
    cb = MSignCallback(period=1)
    cb.setup(Trainer(**trainer_kwargs(tmp_path)), module, "fit")
    qkv = module.model.transformer.h[0].attn.qkv.weight.data
    with torch.no_grad():
        qkv[0, 0] = float("nan")  # Q block of layer 0
        qkv[32:48] = 0.0  # K block of layer 0
    v_block = qkv[48:64].detach().clone()
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        metrics = cb.guard.apply()
    assert metrics["msign/skipped_nonfinite"] == 1.0
    assert math.isnan(qkv[0, 0].item())  # left as it was, never a freshly written non-finite value
    assert torch.equal(qkv[32:48], torch.zeros_like(qkv[32:48]))
    assert not torch.equal(qkv[48:64], v_block)  # the healthy V block was signed
    assert all(torch.isfinite(p).all() for n, p in module.named_parameters() if "h.0.attn.qkv" not in n)
    assert "msign/srank_after/model.transformer.h.0.attn.qkv.weight.q" not in metrics


def test_counters_resume_from_checkpoint(tmp_path):
    seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    cb = RecordingMSign(period=2)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=3, enable_checkpointing=True), callbacks=[cb, ckpt])
    trainer.fit(tiny_module(), tiny_data())
    assert cb.applied_at == [2]
    resumed = RecordingMSign(period=2)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=6, enable_checkpointing=True), callbacks=[resumed])
    trainer.fit(tiny_module(), tiny_data(), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"))
    assert resumed.applied_at == [4, 6] and resumed.guard.applications == 3


def test_logs_reach_csv_logger_whatever_log_every_n_steps(tmp_path):
    seed_everything(0)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=3, logger=logger, log_every_n_steps=50),
                      callbacks=[MSignCallback(period=3)])
    trainer.fit(tiny_module(), tiny_data())
    text = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "msign/applications" in text and "msign/srank_after_min" in text


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"period": 0}, "period"),
        ({"period": -5}, "period"),
        ({"period": 2.5}, "period"),
        ({"period": True}, "period"),
        ({"backend": "qr"}, "backend"),
        ({"backend": "svd", "steps": 4}, "steps"),
        ({"backend": "polar_express", "steps": 0}, "steps"),
        ({"targets": "attn"}, "targets"),
        ({"targets": []}, "targets"),
        ({"targets": "qk", "split_qkv": False}, "split_qkv"),
        ({"split_qkv": "yes"}, "split_qkv"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        MSignCallback(**kwargs)
    bad_value = kwargs.get(match, list(kwargs.values())[-1])
    assert repr(bad_value) in str(info.value)  # the message names the value received


def test_targets_matching_nothing_raise_at_setup_with_names(tmp_path):
    trainer = Trainer(**trainer_kwargs(tmp_path), callbacks=[MSignCallback(targets="*.no_such.weight")])
    with pytest.raises(ValueError, match=r"match no matrix.*attn\.qkv\.weight"):
        trainer.fit(tiny_module(), tiny_data())
    assert trainer.global_step == 0
