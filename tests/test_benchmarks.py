"""The benchmark scripts run (quick mode) and write their result files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_overhead_quick_runs_and_writes_results(tmp_path):
    out = tmp_path / "overhead_quick.json"
    env = {**os.environ, "LIGHTNING_MSIGN_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--quick", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result and out.with_suffix(".md").read_text().startswith("# lightning_msign overhead benchmark")
    assert "MSign P=100, backend svd" in proc.stdout and "svd_time / time" in proc.stdout
