"""Muon / NuMuon on 2 CPU processes (gloo): DDP and FSDP2 take the whole-matrix step a single process takes.

tests/optim_distributed_job.py trains the tiny LitGPT with ``LitGPTModule(optimizer=...)`` and records, at every
step, the whole parameters and gradients; here one process replays the same steps from the same whole gradients.
Under FSDP2 a rank-``k`` update computed on each shard would have rank up to ``2k`` and differ from the replay.
"""

from __future__ import annotations

import pytest
import torch

from lightning_msign.optim import Muon, NuMuon

from conftest import load_ranks, tiny_module

STEPS = 4  # the cases' --steps in tests/jobs.py


def run_job(two_process_job, strategy: str, case: str) -> tuple[dict, dict]:
    ranks = load_ranks(two_process_job(strategy, case))
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["world"] == 2
    return ranks[0], ranks[1]


def replay(rec: dict, optimizer: str) -> dict[int, dict[str, torch.Tensor]]:
    """One process, the same optimizer, fed the recorded whole gradients: the weights after every step."""
    options = {"rank_fraction": 0.25, "oversample": 2, "krylov_iterations": 1} if optimizer == "numuon" else {}
    module = tiny_module(optimizer=optimizer, optimizer_options=options, lr=1e-2)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in rec["steps"][1]["before"].items():
            params[name].copy_(value)
    cls = NuMuon if optimizer == "numuon" else Muon
    opt = cls(module.param_groups(), lr=module.lr, weight_decay=module.weight_decay, betas=module.betas,
              eps=module.eps, distributed=False, **options)
    after = {}
    for step in sorted(rec["steps"]):
        for group, lr in zip(opt.param_groups, rec["steps"][step]["lrs"]):
            group["lr"] = lr
        for name, p in params.items():
            p.grad = rec["steps"][step]["grads"].get(name)
        opt.step()
        after[step] = {n: p.detach().clone() for n, p in params.items()}
    return after


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "optimizer"), [("ddp", "numuon"), ("fsdp2", "numuon"), ("ddp", "muon")])
def test_distributed_step_is_the_whole_matrix_step(two_process_job, strategy, optimizer):
    r0, r1 = run_job(two_process_job, strategy, f"optim_{optimizer}")
    assert sorted(r0["steps"]) == list(range(1, STEPS + 1))
    for name, value in r0["params"].items():  # both processes hold the same weights, bit for bit
        assert torch.equal(value, r1["params"][name]), name
    expected = replay(r0, optimizer)
    for step, weights in expected.items():
        for name, value in weights.items():
            got = r0["steps"][step]["after"][name]
            torch.testing.assert_close(got, value, rtol=1e-6, atol=1e-7, msg=f"step {step}, {name}")
        # the step moved the matrices (else the comparison proves little)
        qkv = "model.transformer.h.0.attn.qkv.weight"
        assert not torch.equal(r0["steps"][step]["before"][qkv], r0["steps"][step]["after"][qkv])
    assert r0["groups"] == r1["groups"] and r0["groups"][0]["steps"] == STEPS
    if optimizer == "numuon":
        # The warm-start vectors are shared: every process holds all of them, equal (a checkpoint from rank 0
        # resumes every matrix's warm start).
        assert r0["krylov"].keys() == r1["krylov"].keys() and len(r0["krylov"]) == 8
        for name, state in r0["krylov"].items():
            assert state.keys() == r1["krylov"][name].keys()
            assert all(torch.equal(v, r1["krylov"][name][k]) for k, v in state.items())
        logged = [m["numuon/rank_fraction"] for _, m in r0["records"] if "numuon/rank_fraction" in m]
        assert logged == [0.25] * STEPS


@pytest.mark.slow
def test_fsdp2_resume_is_exact(two_process_job):
    """A sharded (DCP) checkpoint holds the momentum shards, the Krylov warm starts and the group counters.

    The straight 4-step run, the 2-step run that saves and the run resumed from its checkpoint are cases of one
    launch (tests/jobs.py): the resumed one is a new Trainer and module whose state comes from the checkpoint only."""
    straight, _ = run_job(two_process_job, "fsdp2", "optim_numuon")
    resumed, resumed1 = run_job(two_process_job, "fsdp2", "optim_resumed")
    assert sorted(resumed["steps"]) == [3, 4] and resumed["groups"][0]["steps"] == 4
    for name, value in straight["params"].items():
        assert torch.equal(value, resumed["params"][name]) and torch.equal(value, resumed1["params"][name]), name
    for name, state in straight["krylov"].items():
        assert all(torch.equal(v, resumed["krylov"][name][k]) for k, v in state.items()), name
