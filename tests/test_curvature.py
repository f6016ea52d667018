"""Tests for the curvature math (:mod:`lightning_msign.functional.curvature`), the ``Curvature`` guard and
``CurvatureMonitor``: dense-Hessian references on tiny models, Adam's preconditioner read back from a real step,
warm starts, per-group learning rates, 2-process DDP, a real Trainer with LitGPT, resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_msign import Curvature, CurvatureMonitor
from lightning_msign import metric_keys as K
from lightning_msign.functional.curvature import (
    adam_preconditioner,
    edge_of_stability,
    hessian_matrix,
    hessian_vector_product,
    lanczos,
    power_iteration,
    random_unit_vector,
)

from conftest import RecordingLogger, tiny_data, tiny_module, trainer_kwargs


def mlp_problem(seed: int = 0, lrs=(0.05, 0.05), betas=(0.9, 0.99), n: int = 32):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(n, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    optimizer = torch.optim.AdamW(
        [{"params": model[0].parameters(), "lr": lrs[0]}, {"params": model[2].parameters(), "lr": lrs[1]}],
        betas=betas, weight_decay=0.01,
    )
    return model, x, y, optimizer


def train_step(model, optimizer, loss_fn) -> None:
    optimizer.zero_grad()
    loss_fn().backward()
    optimizer.step()


def dense_reference(model, optimizer, loss_fn) -> tuple[float, float]:
    """(stability ratio, preconditioned sharpness) from the dense Hessian and the optimizer's state."""
    params = list(model.parameters())
    H = hessian_matrix(loss_fn, params)
    P, D = [], []
    for group in optimizer.param_groups:
        b1, b2 = group["betas"]
        for p in group["params"]:
            s = optimizer.state[p]
            Pp = adam_preconditioner(s["exp_avg_sq"], int(s["step"]), b1, b2, group["eps"]).reshape(-1).double()
            P.append(Pp)
            D.append(group["lr"] / Pp / edge_of_stability(b1))
    P, D = torch.cat(P), torch.cat(D)
    sharp = torch.linalg.eigvalsh(H / P.sqrt()[:, None] / P.sqrt()[None, :])[-1]
    ratio = torch.linalg.eigvalsh(H * D.sqrt()[:, None] * D.sqrt()[None, :])[-1]
    return float(ratio), float(sharp)


# ------------------------------------------------------------------------------------------- functional
def test_adam_preconditioner_is_the_step_adamw_takes():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    optimizer = torch.optim.AdamW([w], lr=0.1, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.0)
    for _ in range(4):
        before = w.detach().clone()
        optimizer.zero_grad()
        (w.sin().sum() + (w**3).sum()).backward()
        optimizer.step()
        state = optimizer.state[w]
        P = adam_preconditioner(state["exp_avg_sq"], int(state["step"]), 0.8, 0.9, 1e-3)
        torch.testing.assert_close(before - w.detach(), 0.1 * state["exp_avg"] / P, rtol=1e-10, atol=1e-12)
    assert edge_of_stability(0.9) == pytest.approx(38.0)
    with pytest.raises(ValueError, match="`step`.*0"):
        adam_preconditioner(state["exp_avg_sq"], 0, 0.9, 0.9, 1e-8)
    with pytest.raises(ValueError, match="`beta1`.*1.0"):
        edge_of_stability(1.0)


def test_hvp_matches_the_dense_hessian():
    model, x, y, _ = mlp_problem()
    params = list(model.parameters())
    loss_fn = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    H = hessian_matrix(loss_fn, params)
    assert torch.allclose(H, H.T, atol=1e-10)
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    v = random_unit_vector(params, seed=3)
    hv = hessian_vector_product(grads, params, v)
    flat = torch.cat([t.reshape(-1) for t in v]).double()
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in hv]).double(), H @ flat)


def test_power_iteration_on_a_known_spectrum():
    torch.manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    eigenvalues = torch.tensor([10.0, 5.0, -3.0] + [1.0] * 17, dtype=torch.float64)
    A = Q @ torch.diag(eigenvalues) @ Q.T
    operator = lambda u: [A @ u[0]]  # noqa: E731
    cold = power_iteration(operator, [torch.randn(20, dtype=torch.float64)], 40)
    assert cold.value == pytest.approx(10.0, rel=1e-10) and cold.residual < 1e-8 and cold.products == 40
    # From the eigenvector itself one product is exact; a Rayleigh quotient never exceeds lambda_max.
    warm = power_iteration(operator, [Q[:, 0] * 3.0], 1)
    assert warm.value == pytest.approx(10.0, rel=1e-12) and warm.residual < 1e-10
    for k in (1, 2, 3):
        assert power_iteration(operator, [torch.randn(20, dtype=torch.float64)], k).value <= 10.0 + 1e-9
    with pytest.raises(ValueError, match="`num_iters`.*0"):
        power_iteration(operator, [Q[:, 0]], 0)
    with pytest.raises(ValueError, match="`start`"):
        power_iteration(operator, [torch.zeros(20, dtype=torch.float64)], 3)


def test_lanczos_finds_the_largest_algebraic_eigenvalue_where_power_iteration_does_not():
    torch.manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64))
    eigenvalues = torch.tensor([4.0, 3.5, -9.0, -8.0] + list(torch.linspace(-1.0, 1.0, 26)), dtype=torch.float64)
    A = Q @ torch.diag(eigenvalues) @ Q.T
    operator = lambda u: [A @ u[0]]  # noqa: E731
    start = [torch.randn(30, dtype=torch.float64)]
    power = power_iteration(operator, start, 30)
    assert power.value == pytest.approx(-9.0, rel=1e-3)  # the largest magnitude: the wrong answer for lambda_max
    full = lanczos(operator, start, 30)
    assert full.value == pytest.approx(4.0, rel=1e-10) and full.residual < 1e-6 and full.products == 30
    y = full.vector[0]
    assert float(y.norm()) == pytest.approx(1.0) and float((A @ y - 4.0 * y).norm()) < 1e-6
    # Never below power iteration's Rayleigh quotient from the same products; never above lambda_max.
    for k in (1, 2, 3, 5, 8):
        s = [torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(k))]
        assert power_iteration(operator, s, k).value <= lanczos(operator, s, k).value + 1e-12 <= 4.0 + 1e-9
    # From the top eigenvector one step is exact; an invariant start stops early.
    warm = lanczos(operator, [Q[:, 0] * 2.0], 3)
    assert warm.value == pytest.approx(4.0, rel=1e-12) and warm.residual < 1e-9
    with pytest.raises(ValueError, match="`num_iters`.*0"):
        lanczos(operator, start, 0)
    with pytest.raises(ValueError, match="`start`"):
        lanczos(operator, [torch.zeros(30, dtype=torch.float64)], 3)


# ---------------------------------------------------------------------------------------------- guard
@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_guard_matches_the_dense_reference_after_warm_started_steps(method):
    model, x, y, optimizer = mlp_problem()
    loss_fn = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    guard = Curvature(model, optimizer, every_n_steps=1, iterations=4, cold_iterations=30, method=method)
    hvps = []
    for step in range(1, 16):
        train_step(model, optimizer, loss_fn)
        metrics = guard.step(loss_fn)
        hvps.append(metrics[K.CURV_HVPS])
        assert metrics[K.CURV_COLD_START] == float(step == 1)
        if step >= 3:
            ratio, sharp = dense_reference(model, optimizer, loss_fn)
            assert metrics[K.CURV_STABILITY_RATIO] == pytest.approx(ratio, rel=0.02)
            assert metrics[K.CURV_SHARPNESS] == pytest.approx(sharp, rel=0.02)
            lr = optimizer.param_groups[0]["lr"]
            assert metrics[K.CURV_THRESHOLD] == pytest.approx(edge_of_stability(0.9) / lr)
            assert metrics[K.CURV_SHARPNESS] * lr / metrics[K.CURV_THRESHOLD] == pytest.approx(
                metrics[K.CURV_STABILITY_RATIO] * lr, rel=1e-9)
    assert hvps == [30.0] + [4.0] * 14
    # Nothing of the training was touched: no gradient written.
    optimizer.zero_grad(set_to_none=True)
    guard.compute(loss_fn)
    assert all(p.grad is None for p in model.parameters())


def test_warm_start_beats_a_cold_start_of_the_same_budget():
    model, x, y, optimizer = mlp_problem(seed=1)
    loss_fn = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    warm = Curvature(model, optimizer, every_n_steps=1, iterations=2, cold_iterations=20)
    warm_errors, cold_errors = [], []
    for step in range(1, 13):
        train_step(model, optimizer, loss_fn)
        metrics = warm.step(loss_fn)
        cold = Curvature(model, optimizer, iterations=2, cold_iterations=2, seed=step).compute(loss_fn)
        if step > 4:
            ratio, _ = dense_reference(model, optimizer, loss_fn)
            warm_errors.append(abs(metrics[K.CURV_STABILITY_RATIO] / ratio - 1))
            cold_errors.append(abs(cold[K.CURV_STABILITY_RATIO] / ratio - 1))
    assert max(warm_errors) < 0.02
    assert sum(warm_errors) < sum(cold_errors) / 3


def test_per_group_learning_rates_and_betas():
    model, x, y, optimizer = mlp_problem(lrs=(0.02, 0.2))
    loss_fn = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    guard = Curvature(model, optimizer, every_n_steps=1, iterations=5, cold_iterations=40)
    for _ in range(6):
        train_step(model, optimizer, loss_fn)
        metrics = guard.step(loss_fn)
    ratio, sharp = dense_reference(model, optimizer, loss_fn)
    assert metrics[K.CURV_STABILITY_RATIO] == pytest.approx(ratio, rel=0.02)
    assert metrics[K.CURV_SHARPNESS] == pytest.approx(sharp, rel=0.02)
    assert K.CURV_THRESHOLD not in metrics  # no single threshold with two learning rates
    assert metrics[K.CURV_HVPS] == 10.0  # one eigenproblem each
    # A muP-style multiplier moves the ratio, not the sharpness: the two are different problems.
    assert ratio != pytest.approx(sharp * 0.02 / 38, rel=0.05) and ratio != pytest.approx(sharp * 0.2 / 38, rel=0.05)


def test_targets_select_the_measured_parameters_and_stale_vectors_restart():
    model, x, y, optimizer = mlp_problem()
    loss_fn = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    guard = Curvature(model, optimizer, every_n_steps=1, iterations=3, cold_iterations=50, targets=["0.weight"],
                      max_gap=2)
    for _ in range(3):
        train_step(model, optimizer, loss_fn)
    metrics = guard.step(loss_fn, step=3)
    w = model[0].weight
    H = hessian_matrix(loss_fn, [w])
    s = optimizer.state[w]
    P = adam_preconditioner(s["exp_avg_sq"], int(s["step"]), 0.9, 0.99, 1e-8).reshape(-1).double()
    assert metrics[K.CURV_SHARPNESS] == pytest.approx(
        float(torch.linalg.eigvalsh(H / P.sqrt()[:, None] / P.sqrt()[None, :])[-1]), rel=0.02)
    assert guard.step(loss_fn, step=4)[K.CURV_COLD_START] == 0.0
    assert guard.step(loss_fn, step=7)[K.CURV_COLD_START] == 1.0  # 3 steps after the last: stale


def test_rng_is_restored_and_a_non_finite_loss_reports_nan():
    model, x, y, optimizer = mlp_problem()
    dropout = nn.Dropout(0.5)
    loss_fn = lambda: nn.functional.cross_entropy(dropout(model(x)), y)  # noqa: E731
    guard = Curvature(model, optimizer, every_n_steps=1, iterations=2, cold_iterations=3)
    train_step(model, optimizer, loss_fn)
    torch.manual_seed(5)
    guard.step(loss_fn)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after)
    metrics = guard.step(lambda: torch.tensor(float("nan"), requires_grad=True) * model[0].weight.sum())
    assert math.isnan(metrics[K.CURV_STABILITY_RATIO]) and metrics[K.CURV_HVPS] == 0.0
    assert guard.latest_stability_ratio is None
    assert guard.step(loss_fn)[K.CURV_COLD_START] == 1.0  # the vector was dropped


def test_errors_name_the_argument_and_the_value():
    model, x, y, optimizer = mlp_problem()
    loss_fn = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    for kwargs, match in [({"every_n_steps": 0}, "`every_n_steps`.*0"), ({"iterations": -1}, "`iterations`.*-1"),
                          ({"cold_iterations": 1.5}, "`cold_iterations`.*1.5"), ({"max_gap": 0}, "`max_gap`.*0"),
                          ({"seed": -2}, "`seed`.*-2"), ({"method": "arnoldi"}, "`method`.*'arnoldi'")]:
        with pytest.raises(ValueError, match=match):
            Curvature(**kwargs)
    with pytest.raises(ValueError, match="at least 2 with method='lanczos'.*iterations=1"):
        Curvature(iterations=1)
    Curvature(iterations=1, cold_iterations=1, method="power")  # power iteration moves its vector with 1
    with pytest.raises(NotImplementedError, match="SGD"):
        Curvature(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="needs the optimizer"):
        Curvature(model, every_n_steps=1).step(loss_fn)
    with pytest.raises(RuntimeError, match="no state"):
        Curvature(model, optimizer, every_n_steps=1).step(loss_fn)
    train_step(model, optimizer, loss_fn)
    with pytest.raises(ValueError, match="scalar tensor.*shape \\(32, 3\\)"):
        Curvature(model, optimizer, every_n_steps=1).step(lambda: model(x))
    with pytest.raises(ValueError, match="`loss_fn`.*'no.such:thing'"):
        CurvatureMonitor(loss_fn="no.such:thing")


# ----------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    try:
        model, x, y, optimizer = mlp_problem(n=32)
        full = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
        for _ in range(3):
            train_step(model, optimizer, full)  # the same step everywhere: identical weights and state
        half = slice(16 * rank, 16 * (rank + 1))
        local = lambda: nn.functional.cross_entropy(model(x[half]), y[half])  # noqa: E731
        guard = Curvature(every_n_steps=1, iterations=3, cold_iterations=10)
        guard.attach(model, distributed=True).set_optimizer(optimizer)
        results = [guard.step(local, step=s) for s in (3, 4)]
        # A non-finite loss on one process only: both report NaN and drop the vector, neither hangs.
        poisoned = (lambda: local() * float("nan")) if rank == 1 else local
        results.append(guard.step(poisoned, step=5))
        results.append(guard.step(local, step=6))
        from torch.distributed.fsdp import fully_shard

        sharded = fully_shard(nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3)))
        try:
            Curvature(sharded)
            refused = ""
        except NotImplementedError as error:
            refused = str(error)
        torch.save({"metrics": results, "vector": guard.state_dict()["vectors"], "fsdp2": refused},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_estimate_equals_one_process_on_the_concatenated_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    model, x, y, optimizer = mlp_problem(n=32)
    full = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    for _ in range(3):
        train_step(model, optimizer, full)
    guard = Curvature(model, optimizer, every_n_steps=1, iterations=3, cold_iterations=10)
    single = [guard.step(full, step=s) for s in (3, 4)]
    for got in (r0, r1):
        assert math.isnan(got["metrics"][2][K.CURV_STABILITY_RATIO]) and got["metrics"][2][K.CURV_HVPS] == 0.0
        assert got["metrics"][3][K.CURV_COLD_START] == 1.0
        for m, ref in zip(got["metrics"][:2], single):
            for key in (K.CURV_STABILITY_RATIO, K.CURV_SHARPNESS, K.CURV_RESIDUAL):
                assert m[key] == pytest.approx(ref[key], rel=1e-9)
    untimed = lambda ms: [{k: v for k, v in m.items() if k != K.CURV_TIME_MS} for m in ms]  # noqa: E731
    finite = [0, 1, 3]  # (NaN != NaN: the poisoned step is checked above)
    assert untimed([r0["metrics"][i] for i in finite]) == untimed([r1["metrics"][i] for i in finite])  # bit for bit
    for a, b in zip(r0["vector"]["stability"], r1["vector"]["stability"]):
        assert torch.equal(a, b)
    assert "sharded (DTensor) parameters" in r0["fsdp2"] and "'0.weight'" in r0["fsdp2"]  # FSDP2: refused


# ------------------------------------------------------------------------------------- Lightning
def _curvature_records(logger: RecordingLogger) -> dict[int, dict[str, float]]:
    return {step: m for step, m in logger.records if K.CURV_STABILITY_RATIO in m}


def test_monitor_on_litgpt_in_a_trainer_with_gradient_accumulation(tmp_path):
    seed_everything(0)
    logger = RecordingLogger()
    monitor = CurvatureMonitor(every_n_steps=2, iterations=3, cold_iterations=6)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=6, logger=logger, callbacks=[monitor],
                                       accumulate_grad_batches=2))
    module = tiny_module()
    trainer.fit(module, tiny_data())
    records = _curvature_records(logger)
    assert sorted(records) == [1, 3, 5]
    assert [records[s][K.CURV_HVPS] for s in (1, 3, 5)] == [6.0, 3.0, 3.0]
    assert [records[s][K.CURV_COLD_START] for s in (1, 3, 5)] == [1.0, 0.0, 0.0]
    for m in records.values():
        assert m[K.CURV_STABILITY_RATIO] > 0 and math.isfinite(m[K.CURV_SHARPNESS])
        assert m[K.CURV_SHARPNESS] / m[K.CURV_THRESHOLD] == pytest.approx(m[K.CURV_STABILITY_RATIO], rel=1e-9)
    assert monitor.guard.latest_stability_ratio == records[5][K.CURV_STABILITY_RATIO]


class _LoggingModule(LightningModule):
    """A LightningModule with no ``curvature_loss``: the monitor falls back to ``training_step``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.calls = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("my/loss", loss)
        self.calls += 1
        return {"loss": loss}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 4, generator=g)
        return torch.utils.data.DataLoader(list(zip(x, x.sum(1, keepdim=True).sin())), batch_size=16)


def mse_loss_fn(pl_module, batch):
    x, y = batch
    return nn.functional.mse_loss(pl_module.net(x), y)


@pytest.mark.parametrize("loss_fn", [None, "test_curvature:mse_loss_fn", "test_curvature.mse_loss_fn"])
def test_monitor_recomputes_training_step_silently_or_calls_loss_fn(tmp_path, loss_fn):
    seed_everything(0)
    logger = RecordingLogger()
    monitor = CurvatureMonitor(every_n_steps=1, iterations=2, cold_iterations=4, loss_fn=loss_fn)
    module = _LoggingModule()
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=3, logger=logger, callbacks=[monitor],
                                       log_every_n_steps=1))
    trainer.fit(module)
    records = _curvature_records(logger)
    assert sorted(records) == [0, 1, 2]
    assert module.calls == (6 if loss_fn is None else 3)
    assert [s for s, m in logger.records if "my/loss" in m] == [0, 1, 2]  # logged once per step, not twice
    assert "log" not in module.__dict__ and "log_dict" not in module.__dict__


def test_monitor_refuses_a_non_adam_optimizer(tmp_path):
    class SGDModule(_LoggingModule):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=2, callbacks=[CurvatureMonitor(every_n_steps=1)]))
    with pytest.raises(NotImplementedError, match="SGD"):
        trainer.fit(SGDModule())


def _fit(root: Path, max_steps: int, ckpt_path=None, save=False) -> tuple[RecordingLogger, CurvatureMonitor]:
    seed_everything(0)
    logger = RecordingLogger()
    monitor = CurvatureMonitor(every_n_steps=2, iterations=2, cold_iterations=5)
    callbacks = [monitor]
    if save:
        callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=4, save_top_k=-1))
    trainer = Trainer(**trainer_kwargs(root, max_steps=max_steps, logger=logger, callbacks=callbacks,
                                       enable_checkpointing=save))
    trainer.fit(tiny_module(max_steps=8), tiny_data(), ckpt_path=ckpt_path)  # one LR schedule for every segment
    return logger, monitor


def test_resume_is_exact(tmp_path):
    reference, ref_monitor = _fit(tmp_path / "a", 8)
    _fit(tmp_path / "b", 4, save=True)
    ckpt = next((tmp_path / "b" / "ckpt").glob("*step=4*.ckpt"))
    resumed, monitor = _fit(tmp_path / "c", 8, ckpt_path=str(ckpt))
    ref, got = _curvature_records(reference), _curvature_records(resumed)
    assert sorted(got) == [5, 7]
    for step in (5, 7):
        assert got[step][K.CURV_COLD_START] == 0.0  # the carried vector came back with the checkpoint
        for key in (K.CURV_STABILITY_RATIO, K.CURV_SHARPNESS, K.CURV_HVPS, K.CURV_RESIDUAL):
            assert got[step][key] == ref[step][key]
    for a, b in zip(monitor.guard.state_dict()["vectors"]["stability"],
                    ref_monitor.guard.state_dict()["vectors"]["stability"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("margin", [1e9, 1e-9])
def test_curvature_gates_architecture_warmup(tmp_path, margin):
    """A real CurvatureMonitor feeds DepthWarmupCallback: an unlock waits while the ratio is above the margin;
    inactive blocks are not measured, and an unlock changes the measured set (a cold start)."""
    from lightning_msign import DepthWarmupCallback

    seed_everything(0)
    logger = RecordingLogger()
    monitor = CurvatureMonitor(every_n_steps=1, iterations=2, cold_iterations=3)
    warmup = DepthWarmupCallback(start_fraction=0.5, groups=1, interval=1, start_step=2, curvature_margin=margin,
                                max_defer_steps=3)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=7, logger=logger, callbacks=[monitor, warmup]))
    module = tiny_module()
    n_blocks = len(module.model.transformer.h)
    trainer.fit(module, tiny_data())
    records = _curvature_records(logger)
    unlock_step = 2 if margin > 1 else 2 + 3  # deferred to the limit: every ratio is above 1e-9
    assert warmup.guard.unlock_steps == (unlock_step,)
    assert warmup.guard.active_blocks == tuple(range(n_blocks))
    cold = [s + 1 for s, m in sorted(records.items()) if m[K.CURV_COLD_START] == 1.0]
    assert cold == [1, unlock_step + 1]  # the first measurement, and the first after the unlock


@pytest.mark.slow
def test_monitor_under_lightning_ddp_equals_one_process_on_the_concatenated_batch(two_process_job):
    """A real 2-process ``strategy="ddp"`` run (tests/curvature_ddp_job.py, a case of tests/jobs.py): both processes
    log the same estimate, the one a single process computes from the same weights and optimizer state on the two
    processes' batches concatenated."""
    from conftest import load_ranks

    r0, r1 = load_ranks(two_process_job("ddp", "curvature"))
    untimed = lambda m: {k: v for k, v in m.items() if k != K.CURV_TIME_MS}  # noqa: E731
    assert untimed(r0["latest"]) == untimed(r1["latest"]) and r0["latest"][K.CURV_COLD_START] == 1.0
    for a, b in zip(r0["state"]["vectors"]["stability"], r1["state"]["vectors"]["stability"]):
        assert torch.equal(a, b)
    module = tiny_module()
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(r0["params"][name])
    optimizer = torch.optim.AdamW(module.param_groups(), betas=module.betas, eps=module.eps)
    optimizer.load_state_dict(r0["optimizer"])
    batch = {k: torch.cat([r0["batch"][k], r1["batch"][k]]) for k in r0["batch"]}
    assert not torch.equal(r0["batch"]["input_ids"], r1["batch"]["input_ids"])  # the processes had their own data
    single = Curvature(module, optimizer, iterations=3, cold_iterations=8).compute(lambda: module.curvature_loss(batch))
    for key in (K.CURV_STABILITY_RATIO, K.CURV_SHARPNESS, K.CURV_THRESHOLD):
        assert r0["latest"][key] == pytest.approx(single[key], rel=1e-5)
