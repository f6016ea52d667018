"""Part 3 of the overhead benchmark: time per MSign application on 1 process vs 2 processes (CPU, gloo).

``MSign.apply()`` (attention targets, svd and polar_express) on a LitGPT, on 1 process and on 2 processes
started with ``torch.multiprocessing``: replicated weights as under DDP (each process signs its share and
broadcasts it), FSDP2 ``fully_shard`` DTensor weights (each whole matrix gathered on its owner, signed,
scattered back) and FSDP1 ``FullyShardedDataParallel`` flat parameters (one unit per block and the root,
``use_orig_params=True``: each unit gathered on every process in turn, its matrices signed by their owners and
broadcast, each process keeping its slice). An application ends when the slowest process is done. Each
process's own share of the math is timed by running the same signing through the guard's public plan
(``guard.plan.run``, read-only: no weight traffic) right after each application.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import torch
from common import log, median
from overhead_settings import Settings

DIST_BACKENDS = ("svd", "polar_express")


def _sign_share(backend: str, record: list[float]) -> Any:
    """A computation for ``plan.run``: sign this process's whole matrices batched by shape, as MSign does;
    appends its milliseconds to ``record``; writes nothing and returns no result."""
    from lightning_msign.functional import sign_and_restore

    def compute(owned: list[Any]) -> dict[int, Any]:
        t0 = time.perf_counter()
        groups: dict[tuple, list[torch.Tensor]] = {}
        for o in owned:
            m = o.matrix
            groups.setdefault((tuple(m.shape), m.dtype), []).append(m)
        for mats in groups.values():
            sign_and_restore(torch.stack(mats), backend, stable_ranks=False)
        record.append((time.perf_counter() - t0) * 1e3)
        return {}

    return compute


def _dist_worker(rank: int, world: int, layout: str, cfg: dict[str, Any], out_dir: str) -> None:
    """One process of the distributed part: time ``MSign.apply()`` on a (sharded) LitGPT model."""
    import torch.distributed as dist

    # A FileStore in the run's temporary folder: no port to find, and no store server on rank 0 whose exit
    # could abort the other process in destroy_process_group.
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world)
    torch.set_num_threads(cfg["threads"])
    try:
        from lightning_msign import LitGPTModule, MSign
        from lightning_msign.distributed import local_tensor

        torch.manual_seed(cfg["seed"])
        module = LitGPTModule(dict(cfg["model"]), vocab_size=256, block_size=cfg["seq_len"])
        if layout == "fsdp2" and world > 1:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for block in module.model.transformer.h:
                fully_shard(block, mesh=mesh)
            fully_shard(module.model, mesh=mesh)
        if layout == "fsdp1" and world > 1:
            from litgpt.model import Block
            from torch.distributed.fsdp import FullyShardedDataParallel
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            module.model = FullyShardedDataParallel(module.model, auto_wrap_policy=ModuleWrapPolicy({Block}),
                                                    device_id=torch.device("cpu"), use_orig_params=True)
        # Detached, sharing storage (FSDP1: each parameter's 1-D slice of its unit's flat buffer).
        local = [local_tensor(p) for p in module.parameters() if p.ndim >= 2 or layout == "fsdp1"]
        snapshot = [x.clone() for x in local]
        rows = []
        for backend in cfg["backends"]:
            guard = MSign(targets="attention", backend=backend, log_stable_rank=False)
            guard.attach(module, distributed=world > 1)
            compute_ms: list[float] = []
            share = _sign_share(backend, compute_ms)
            times = []
            for i in range(1 + cfg["repeats"]):  # the first call is a warm-up
                for x, y in zip(local, snapshot):
                    x.copy_(y)  # sign the same (unsigned) weights every time
                dist.barrier()
                t0 = time.perf_counter()
                guard.apply()
                elapsed = (time.perf_counter() - t0) * 1e3
                slowest = torch.tensor([elapsed])
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # an application ends when the last process is done
                before = len(compute_ms)
                guard.plan.run(share, write=False)  # this process's share of the math, timed alone
                total = sum(compute_ms[before:])  # one call per FSDP1 unit: their sum is the application's
                del compute_ms[before:]
                compute_ms.append(total)
                if i:
                    times.append(float(slowest))
            rows.append({"backend": backend, "apply_ms": times, "compute_ms": compute_ms[1:],
                         "share": guard.plan.local_share(), "matrices": len(guard.matrices)})
        torch.save(rows, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed_part(s: Settings) -> list[dict[str, Any]]:
    """Time per MSign application (attention) on 1 process vs 2 processes, replicated (DDP), FSDP2 and FSDP1.

    A layout whose processes fail is recorded with its error (and left out of the speed-ups), not raised.
    """
    import torch.multiprocessing as mp

    cfg = {"model": s.model, "seq_len": s.seq_len, "seed": s.seed, "threads": 1, "repeats": s.dist_repeats,
           "backends": list(DIST_BACKENDS)}
    out: list[dict[str, Any]] = []
    for world, layout in ((1, "single"), (2, "ddp"), (2, "fsdp2"), (2, "fsdp1")):
        log(f"  distributed: {world} process(es), {layout}")
        with tempfile.TemporaryDirectory(prefix="lightning_msign_dist_") as tmp:
            try:
                mp.spawn(_dist_worker, args=(world, layout, cfg, tmp), nprocs=world)
            except Exception as err:  # noqa: BLE001 - reported in the table and the JSON
                error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
                log(f"  distributed {layout} failed: {error}")
                out.extend({"layout": layout, "processes": world, "backend": b, "error": error}
                           for b in cfg["backends"])
                continue
            ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]
        for i, backend in enumerate(cfg["backends"]):
            per_rank = [r[i] for r in ranks]
            out.append({
                "layout": layout, "processes": world, "backend": backend, "matrices": per_rank[0]["matrices"],
                "apply_ms": median(per_rank[0]["apply_ms"]),
                "compute_ms_per_rank": [median(r["compute_ms"]) for r in per_rank],
                "share_per_rank": [r["share"] for r in per_rank],
                "error": None,
            })
    single = {r["backend"]: r["apply_ms"] for r in out if r["processes"] == 1 and not r["error"]}
    for r in out:
        if not r["error"] and r["backend"] in single:
            r["speedup_vs_1"] = single[r["backend"]] / r["apply_ms"]
    return out


def render_distributed(s: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "## 3. Distributed: time per MSign application, 1 vs 2 processes (CPU, gloo)",
        "",
        f"`MSign.apply()` on the attention matrices of a {s['model']['n_layer']} x {s['model']['n_embd']} "
        f"LitGPT ({s['model']['n_head']} heads; fresh init, restored before every "
        f"call), 1 torch thread per process, median of {s['dist_repeats']} calls after a warm-up; an application "
        "ends when the slowest process is done. `ddp`: replicated weights, each process signs its share and "
        "broadcasts it; `fsdp2`: `fully_shard`ed DTensor weights, each whole matrix gathered on its owner, "
        "signed, scattered back; `fsdp1`: FullyShardedDataParallel units (one per block, and the root), each "
        "gathered whole on every process in turn, its matrices signed by their owners and broadcast. Compute "
        "per process: the same signing of the matrices the process owns, run "
        "through `guard.plan.run` read-only right after each application and timed inside.",
        "",
        "| layout | processes | backend | matrices | ms per application | speed-up vs 1 process "
        "| compute ms per process | cost share per process |",
        "|---|---:|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['layout']} | {r['processes']} | {r['backend']} | - | failed: {r['error'][:160]} "
                         "| - | - | - |")
            continue
        speedup = f"{r['speedup_vs_1']:.2f}x" if "speedup_vs_1" in r else "-"
        lines.append(
            f"| {r['layout']} | {r['processes']} | {r['backend']} | {r['matrices']} | {r['apply_ms']:.1f} "
            f"| {speedup} | {' / '.join(f'{x:.1f}' for x in r['compute_ms_per_rank'])} "
            f"| {' / '.join(f'{x:.2f}' for x in r['share_per_rank'])} |"
        )
    lines += [
        "",
        "Expected on N GPUs (not measured here): compute per process falls as ~1/N while there are many more",
        "matrices than processes (owners are balanced by m*n*min(m, n), one parameter at a time, so a fused QKV",
        "weight is one unit); communication per application is one broadcast of every target matrix (DDP: each",
        "process receives the (N-1)/N it did not compute) or a gather plus a scatter of each matrix (FSDP2: each",
        "process sends and receives ~2/N of the target bytes; FSDP1: an all-gather of each unit holding targets,",
        "then a broadcast of its target matrices), i.e. about the traffic of one optimizer step's",
        "gradient all-reduce restricted to the target matrices, once every P steps.",
    ]
    return lines


def distributed_verdicts(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        if r["processes"] > 1 and r.get("error"):
            out.append(f"MSign ({r['backend']}) on {r['processes']} processes, {r['layout']}: FAILED ({r['error']}).")
        elif r["processes"] > 1 and "speedup_vs_1" in r:
            out.append(
                f"MSign ({r['backend']}) on {r['processes']} processes, {r['layout']}: {r['apply_ms']:.0f} ms per "
                f"application, {r['speedup_vs_1']:.2f}x the 1-process speed (cost share per process "
                f"{' / '.join(f'{x:.2f}' for x in r['share_per_rank'])})."
            )
    return out
