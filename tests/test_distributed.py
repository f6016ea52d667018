"""Multi-process correctness on CPU (2 processes, gloo): DDP, ddp_spawn and FSDP2.

Each Trainer test reads what tests/distributed_job.py wrote as a case of its strategy's one launch of
tests/jobs.py (Lightning's ``ddp``, ``ModelParallelStrategy`` and ``FSDPStrategy`` relaunch the script for every
rank) and compares what every process wrote with what one process computes from the same whole weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_msign import MSignCallback, PSSCallback
from lightning_msign.distributed import MatrixResult, WholeMatrixPlan, _chunk_sizes
from lightning_msign.functional import msign_restore, stable_rank
from lightning_msign.targets import resolve_targets

from conftest import load_ranks, tiny_module

PERIOD, STEPS = 4, 8  # tests/distributed_job.py's defaults, which tests/jobs.py keeps


def run_job(two_process_job, strategy: str, case: str = "distributed") -> tuple[dict, dict]:
    ranks = load_ranks(two_process_job(strategy, case))
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["world"] == 2
    return ranks[0], ranks[1]


def single_process(callback, weights: dict[str, torch.Tensor]):
    """A one-process copy of ``callback`` acting on a tiny LitGPT holding ``weights`` (whole matrices)."""
    module = tiny_module()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in weights:
                p.copy_(weights[name])
    callback.guard.attach(module, distributed=False)
    return module, callback


def check_msign_and_pss(r0: dict, r1: dict, exact: bool) -> None:
    same = torch.equal if exact else (lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6))
    # MSign: after each application both processes hold the sign a single process computes.
    assert sorted(r0["msign_before"]) == list(range(PERIOD, STEPS + 1, PERIOD))
    for step, before in r0["msign_before"].items():
        module, _ = single_process(MSignCallback(period=PERIOD, targets="attention"), before["whole"])
        _.guard.apply()
        expected = dict(module.named_parameters())
        for rec in (r0, r1):
            after = rec["msign_after"][step]["whole"]
            for name, value in after.items():
                assert same(value, expected[name].detach()), (step, name)
        # MSign really changed the attention weights (else the comparison proves little).
        assert not torch.equal(before["whole"]["model.transformer.h.0.attn.proj.weight"],
                               r0["msign_after"][step]["whole"]["model.transformer.h.0.attn.proj.weight"])
    # PSS: same trigger steps on both processes; each protection equals a single-process one.
    assert r0["pss_trigger_steps"] == r1["pss_trigger_steps"] and len(r0["pss_trigger_steps"]) >= 1
    assert r0["pss_state"] == r1["pss_state"]
    for step in r0["pss_trigger_steps"]:
        before, after = r0["pss_before"][step], r0["pss_after"][step]
        cb = PSSCallback(tau=1.0001, warmup_steps=2, cooldown_steps=2, alpha=0.5)
        module, cb = single_process(cb, before["whole"])
        steps = [s for s in r0["pss_trigger_steps"] if s <= step]  # the range finder's seed depends on the count
        assert len(steps) == after["triggers"]
        cb.guard.load_state_dict({"trigger_steps": steps})
        cb.guard.protect()
        expected = dict(module.named_parameters())
        for rec in (r0, r1):
            for name, value in rec["pss_after"][step]["whole"].items():
                assert same(value, expected[name].detach()), (step, name)
    # The logged gradient norm is the global one (the norm of the whole gradients).
    logged = {step + 1: m["pss/grad_norm"] for step, m in r0["records"] if "pss/grad_norm" in m}
    for step, norm in r0["grad_norm"].items():
        assert logged[step] == pytest.approx(norm, rel=1e-5)
    # Work is spread: each process owns half of the (symmetric) cost, and both own some matrices.
    for rec in (r0, r1):
        assert rec["share"]["MSignCallback"] == pytest.approx(0.5)
        assert set(rec["owners"]["MSignCallback"].values()) == {0, 1}
    assert r0["msign_state"] == r1["msign_state"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_ddp_ranks_identical_and_equal_to_one_process(two_process_job, strategy):
    r0, r1 = run_job(two_process_job, strategy)
    for name, value in r0["params"].items():  # every parameter, bit for bit
        assert torch.equal(value, r1["params"][name]), name
    for step in r0["msign_after"]:
        for name, value in r0["msign_after"][step]["whole"].items():
            assert torch.equal(value, r1["msign_after"][step]["whole"][name]), (step, name)
    check_msign_and_pss(r0, r1, exact=True)
    # StableRankMonitor: identical power-iteration state on both processes; values bound the exact ones.
    v0, v1 = r0["monitor_state"]["vectors"], r1["monitor_state"]["vectors"]
    assert v0.keys() == v1.keys() and all(torch.equal(v0[k], v1[k]) for k in v0)
    last = {k: v for step, m in r0["records"] if step == STEPS - 1 for k, v in m.items() if k.startswith("srank/")}
    weights = r0["whole_params"]
    module, cb = single_process(MSignCallback(targets="all_2d"), weights)
    for t in cb.guard.matrices:
        exact = float(stable_rank(t.matrix()))
        assert exact * (1 - 1e-4) <= last[f"srank/{t.name}"] <= exact * 1.3, t.name


@pytest.mark.slow
def test_fsdp2_shards_are_slices_of_the_whole_matrix_sign(two_process_job):
    r0, r1 = run_job(two_process_job, "fsdp2")  # (monitor in exact mode)
    check_msign_and_pss(r0, r1, exact=True)
    for step, before in r0["msign_before"].items():
        module, cb = single_process(MSignCallback(period=PERIOD, targets="attention"), before["whole"])
        cb.guard.apply()
        for name, full in module.named_parameters():
            if full.ndim < 2:
                continue
            chunks = torch.chunk(full.detach(), 2, dim=0)
            for r, rec in enumerate((r0, r1)):
                assert torch.equal(rec["msign_after"][step]["local"][name], chunks[r]), (step, name, r)
        # A shard-by-shard sign would differ: the test can tell the two apart.
        proj = "model.transformer.h.0.attn.proj.weight"
        shardwise = msign_restore(before["local"][proj])
        assert not torch.allclose(shardwise, r0["msign_after"][step]["local"][proj], atol=1e-3)
    # The monitor logs the stable rank of whole matrices (exact mode), on rank 0 only, without deadlock.
    logged = {k: v for step, m in r0["records"] if step == STEPS - 1 for k, v in m.items() if k.startswith("srank/")}
    module, cb = single_process(MSignCallback(targets="all_2d"), r0["whole_params"])
    for t in cb.guard.matrices:
        assert logged[f"srank/{t.name}"] == pytest.approx(float(stable_rank(t.matrix())), rel=1e-5), t.name
    assert r1["records"] == []


# ------------------------------------------------------------------------- WholeMatrixPlan directly
@dataclass
class SeenBy(MatrixResult):
    """What the owner saw: the rows of the whole matrix, and its own rank."""

    rows: int
    rank: int


def _plan_worker(rank: int, world: int, out: str) -> None:
    # A FileStore, not a TCPStore hosted by rank 0: with TCP, rank 0 exiting first could abort rank 1 in
    # destroy_process_group ("terminate called without an active exception", seen once in CI).
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        gen = torch.Generator().manual_seed(0)
        # Uneven shards on purpose: 7 rows over 2 processes, 3 rows over 2, a 1-row matrix, dim-1 sharding.
        full = [torch.randn(7, 5, generator=gen), torch.randn(3, 9, generator=gen), torch.randn(1, 4, generator=gen),
                torch.randn(6, 5, generator=gen)]
        module = torch.nn.Module()
        for i, w in enumerate(full):
            placement = Shard(1) if i == 3 else Shard(0)
            module.register_parameter(f"w{i}", torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [placement])))
        targets = resolve_targets(module, "*")
        plan = WholeMatrixPlan(targets, distributed=True)

        def sign(owned):
            for o in owned:
                o.write(msign_restore(o.matrix))
            return {o.index: SeenBy(o.matrix.shape[0], dist.get_rank()) for o in owned}

        results = plan.run(sign, SeenBy)
        table = [[float(results[t.name].rows), float(results[t.name].rank)] for t in targets]
        shards = {n: p.to_local().clone() for n, p in module.named_parameters()}
        torch.save({"table": table, "shards": shards, "owners": plan.owners(), "full": full}, f"{out}/plan{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_plan_gathers_uneven_shards_whole(tmp_path):
    mp.spawn(_plan_worker, args=(2, str(tmp_path)), nprocs=2)
    recs = [torch.load(tmp_path / f"plan{r}.pt", weights_only=False) for r in (0, 1)]
    assert recs[0]["table"] == recs[1]["table"]  # every process receives every result
    assert set(recs[0]["owners"].values()) == {0, 1}
    for i, w in enumerate(recs[0]["full"]):
        name, dim = f"w{i}", 1 if i == 3 else 0
        expected = msign_restore(w)
        # The row of results came from the owner, and says the owner saw the whole matrix.
        assert recs[0]["table"][i] == [float(w.shape[0]), float(recs[0]["owners"][name])]
        sizes = _chunk_sizes(w.shape[dim], 2)
        for r, part in enumerate(torch.split(expected, sizes, dim=dim)):
            assert torch.equal(recs[r]["shards"][name], part), (name, r)


# ------------------------------------------------------------------------------------------------- FSDP1
@pytest.mark.slow
@pytest.mark.parametrize(
    # (the cases of tests/jobs.py: Lightning's wrapping, manual wrapping, Lightning's wrapping under bf16-mixed)
    "case", ["distributed", "distributed_manual", "distributed_bf16"]
)
def test_fsdp1_slices_hold_the_whole_matrix_sign(two_process_job, case):
    """FSDP1 (flat parameters): root around the LightningModule (Lightning's wrapping) or inside it (manual).

    Under bf16-mixed the blocks compute in bf16 and the guards edit the fp32 values FSDP keeps (and casts from
    at the next forward): the same results as one process on the fp32 weights.
    """
    r0, r1 = run_job(two_process_job, "fsdp1", case)  # (monitor in exact mode)
    check_msign_and_pss(r0, r1, exact=True)
    assert {v.dtype for v in r0["whole_params"].values()} == {torch.float32}
    for step, after in r0["msign_after"].items():
        # Each process keeps its contiguous part of the flattened whole result: together, the whole of it.
        for name, full in after["whole"].items():
            mine, theirs = after["local"][name], r1["msign_after"][step]["local"][name]
            assert mine.ndim == theirs.ndim == 1 and mine.numel() + theirs.numel() == full.numel(), name
            assert torch.equal(torch.cat([mine, theirs]), full.reshape(-1)), (step, name)
            assert torch.equal(full, r1["msign_after"][step]["whole"][name]), (step, name)
        # Signing the processes' own fragments would differ: the test tells the two apart.
        qkv = "model.transformer.h.0.attn.qkv.weight"
        before = r0["msign_before"][step]["whole"][qkv]
        half = before.reshape(-1)[: r0["msign_after"][step]["local"][qkv].numel()].reshape(-1, before.shape[1])
        assert not torch.allclose(msign_restore(half), after["whole"][qkv][: half.shape[0]], atol=1e-3)
    # Some matrix lies across the two processes' slices (else gathering would not be exercised).
    sizes = {n: (v.numel(), r1["params"][n].numel()) for n, v in r0["params"].items()}
    assert any(a > 0 and b > 0 for a, b in sizes.values())
    logged = {k: v for step, m in r0["records"] if step == STEPS - 1 for k, v in m.items() if k.startswith("srank/")}
    module, cb = single_process(MSignCallback(targets="all_2d"), r0["whole_params"])
    assert {f"srank/{t.name}" for t in cb.guard.matrices} <= set(logged)
    for t in cb.guard.matrices:
        assert logged[f"srank/{t.name}"] == pytest.approx(float(stable_rank(t.matrix())), rel=1e-5), t.name
    assert r1["records"] == []
