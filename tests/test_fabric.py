"""The guards in Lightning Fabric loops: 2 CPU processes under DDP (gloo), and the example on one process.

tests/fabric_job.py is started once per rank (``LOCAL_RANK`` set, as ``fabric run`` does) so each process has
its own exit code and output, shown when anything fails; the 1-process runs are called in-process.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "fabric_job.py"
EXAMPLE = ROOT / "examples" / "fabric_loop.py"
STEPS, PERIOD, SPIKE, TIMEOUT = 8, 4, 6, 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(out: Path, world: int, *args: str) -> list[dict]:
    """Start tests/fabric_job.py once per rank; every rank's output is in the failure message."""
    out.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world), NODE_RANK="0")
    cmd = [sys.executable, str(JOB), "--out", str(out), "--devices", str(world), "--steps", str(STEPS),
           "--period", str(PERIOD), "--spike", str(SPIKE), *args]
    procs, logs = [], []
    for rank in range(world):
        log = open(out / f"rank{rank}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen(cmd, env=dict(env, LOCAL_RANK=str(rank)), stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True, cwd=ROOT))
    deadline = time.monotonic() + TIMEOUT
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.returncode not in (None, 0) for p in procs):  # one failed: the other would wait for it
                time.sleep(5)
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # its own session: the rank and anything it started
                p.wait()
    codes = [p.returncode for p in procs]
    report = []
    for rank, log in enumerate(logs):
        log.seek(0)
        report.append(f"----- rank {rank} (exit code {codes[rank]}) -----\n{log.read()[-6000:]}")
        log.close()
    assert codes == [0] * world, f"ranks did not all succeed within {TIMEOUT} s:\n" + "\n".join(report)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def same_metrics(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


@pytest.mark.slow
def test_fabric_ddp_two_processes(tmp_path):
    r0, r1 = run_ranks(tmp_path / "ddp", 2)
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)

    # Bit-identical weights on both ranks, after MSign writes and a PSS protection.
    assert r0["params"].keys() == r1["params"].keys()
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), name

    # Names of the user's model: Fabric's `_forward_module.` (and DDP's `module.`) are looked through.
    assert any("_forward_module." in n for n in r0["module_names"])  # the wrapper's own names carry it
    for names in r0["names"].values():
        assert names and all(n.startswith("transformer.h.") for n in names), names
    assert r0["names"] == r1["names"]

    # MSign applied after steps 4 and 8 on both ranks, with identical metrics; every signed block is flat.
    for rec in (r0, r1):
        assert sorted(rec["flatness"]) == [PERIOD, 2 * PERIOD] and rec["state"]["msign"]["applications"] == 2
        for step, spread in rec["flatness"].items():
            assert spread.keys() == set(rec["names"]["msign"])
            for name, ratio in spread.items():
                assert ratio == pytest.approx(1.0, abs=1e-4), (rec["rank"], step, name)
    assert r0["metrics"].keys() == r1["metrics"].keys() == set(range(1, STEPS + 1))
    for step in r0["metrics"]:
        assert same_metrics(r0["metrics"][step], r1["metrics"][step]), step
    assert r0["metrics"][PERIOD]["msign/applications"] == 1 and r0["metrics"][2 * PERIOD]["msign/applications"] == 2
    # PSS: the global gradient norm, the same trigger on both ranks.
    assert r0["state"]["pss"]["trigger_steps"] == r1["state"]["pss"]["trigger_steps"] == [SPIKE]

    # Work split: each rank owns some matrices of every guard; the plan is the same on both ranks.
    for guard in ("msign", "pss", "monitor"):
        assert set(r0["owners"][guard].values()) == {0, 1}, guard
        assert r0["owners"][guard] == r1["owners"][guard]
        assert 0 < r0["share"][guard] < 1 and r0["share"][guard] + r1["share"][guard] == pytest.approx(1.0)

    # Guard states agree, and come back from fabric.save / fabric.load into new guards.
    for guard in ("msign", "pss", "monitor"):
        for rec in (r0, r1):
            state, loaded = r0["state"][guard], rec["loaded_state"][guard]
            if guard == "monitor":
                assert state["last_step"] == loaded["last_step"] == STEPS
                mine = rec["state"][guard]["vectors"]
                assert all(torch.equal(v, loaded["vectors"][k]) and torch.equal(v, mine[k])
                           for k, v in state["vectors"].items())
            else:
                assert state == loaded == rec["state"][guard], (guard, rec["rank"])
    assert r0["checkpoint_keys"] == ["model", "optimizer", "step"]

    # One process on the same global batches: DDP averages the two half-batch gradients, which equals the
    # whole-batch gradient up to float rounding, so the runs agree closely but not bit for bit.
    one = load_script(JOB).main(["--out", str(tmp_path / "one"), "--devices", "1", "--steps", str(STEPS),
                                 "--period", str(PERIOD), "--spike", str(SPIKE)])
    assert set(one["owners"]["msign"].values()) == {0} and one["share"]["msign"] == 1.0
    assert one["state"]["pss"]["trigger_steps"] == [SPIKE] and one["state"]["msign"] == r0["state"]["msign"]
    for name, value in one["params"].items():
        torch.testing.assert_close(value, r0["params"][name], rtol=1e-4, atol=1e-5, msg=name)
    for step, m in one["metrics"].items():
        assert m.keys() == r0["metrics"][step].keys(), step
        for k, v in m.items():
            assert v == pytest.approx(r0["metrics"][step][k], rel=1e-4, abs=1e-6, nan_ok=True), (step, k)


# ------------------------------------------------------------------------------------------- the example
def test_fabric_example_one_process_and_exact_resume(tmp_path, capsys):
    example = load_script(EXAMPLE)
    common = ["--period", "3", "--log-every", "2", "--seq-len", "32", "--batch-size", "4"]
    whole = example.main(["--steps", "6", "--save-every", "3", "--out", str(tmp_path / "whole"), *common])
    out = capsys.readouterr().out
    assert "done: 6 steps, 2 MSign applications" in out
    model = whole["model"]
    assert whole["msign"].target_names[0] == "transformer.h.0.attn.qkv.weight.q"  # no `_forward_module.`
    assert any(n.startswith("_forward_module.") for n, _ in model.named_parameters())

    # The CSV log holds the guards' metrics on their steps.
    csv = (tmp_path / "whole" / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = csv[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in csv[1:]]
    assert {"train/loss", "msign/applications", "pss/grad_norm", "srank/min", "grad_norm/total"} <= set(header)
    assert [r["step"] for r in rows if r["msign/applications"]] == ["3", "6"]
    assert [r["step"] for r in rows if r["srank/min"]] == ["2", "4", "6"]

    # Resumed from the step-3 checkpoint (model, optimizer, data position, guards): the same run.
    ckpt = torch.load(tmp_path / "whole" / "step-3.ckpt", weights_only=True)
    msign = ckpt["msign"]
    assert {k: msign[k] for k in ("last_step", "applications", "skipped_nonfinite", "trigger_steps")} == {
        "last_step": 3, "applications": 1, "skipped_nonfinite": 0, "trigger_steps": []} and ckpt["step"] == 3
    assert set(msign["last_applied"].values()) == {3}
    resumed = example.main(["--steps", "6", "--resume", str(tmp_path / "whole" / "step-3.ckpt"),
                            "--out", str(tmp_path / "resumed"), *common])
    for (name, a), b in zip(model.named_parameters(), resumed["model"].parameters()):
        assert torch.equal(a, b), name
    for key in ("msign", "pss"):
        assert resumed[key].state_dict() == whole[key].state_dict(), key
    vectors = whole["monitor"].state_dict()["vectors"]
    assert all(torch.equal(v, resumed["monitor"].state_dict()["vectors"][k]) for k, v in vectors.items())
