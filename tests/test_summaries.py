"""benchmarks/summaries.py: the committed summaries.md and .json are what it computes now from the result files, and
its figures agree with the raw runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def load_summaries():
    return load_script(ROOT / "benchmarks" / "summaries.py")


def test_committed_summaries_are_what_the_script_computes_now():
    """A hand edit of summaries.md/.json, or a result file changed without rerunning the script, fails here."""
    md, js = load_summaries().build()
    assert (RESULTS / "summaries.md").read_text(encoding="utf-8") == md, \
        "benchmarks/results/summaries.md is stale or edited by hand: run `python benchmarks/summaries.py`"
    assert (RESULTS / "summaries.json").read_text(encoding="utf-8") == js, \
        "benchmarks/results/summaries.json is stale or edited by hand: run `python benchmarks/summaries.py`"


def test_check_flag_reports_a_stale_file(tmp_path, monkeypatch):
    summaries = load_summaries()
    assert summaries.main(["--check"]) == 0
    stale = tmp_path / "summaries.md"
    stale.write_text((RESULTS / "summaries.md").read_text(encoding="utf-8").replace("2.", "3.", 1), encoding="utf-8")
    monkeypatch.setattr(summaries, "OUT_MD", stale)
    monkeypatch.setattr(summaries, "ROOT", tmp_path)
    assert summaries.main(["--check"]) == 1


def test_zclip_gap_closed_recomputed_from_the_raw_cells():
    """ZClip-style clipping's share of the gap at the largest LR, by hand from ``cells[]``: the mean over seeds of
    its runs against the mean of the retrained baseline's runs at each LR of stability_triggers."""
    zclip = json.loads((RESULTS / "stability_zclip_skip" / "stability.json").read_text())["cells"]
    trig = json.loads((RESULTS / "stability_triggers" / "stability.json").read_text())["cells"]

    def mean(cells, method, lr):
        values = [c["final_val_loss"] for c in cells if c["method"] == method and c["lr"] == lr]
        assert len(values) == 2
        return sum(values) / len(values)

    base = {lr: mean(trig, "baseline", lr) for lr in {c["lr"] for c in trig}}
    lr = max(c["lr"] for c in zclip)
    expected = (base[lr] - mean(zclip, "zclip", lr)) / (base[lr] - min(base.values()))

    tables = json.loads((RESULTS / "summaries.json").read_text())["tables"]
    table = next(t for t in tables if t["heading"] == "ZClip-style clipping and skip-step")
    value = next(v for v in table["values"] if v["method"] == "zclip")["gap_closed"][str(lr)]
    assert math.isclose(value, expected, rel_tol=1e-12)
    row = next(r for r in table["rows"] if r[0] == "ZClip-style")
    assert f"{expected:.0%}" in row[table["header"].index("gap closed at 0.03 / 0.1")]


def test_restated_gap_formula_is_that_of_the_benchmarks_analysis():
    """summaries.gap_closed, given a file's baseline means, gives the ``gap_closed`` that benchmarks/stability.py's
    analyse() stored for every method and LR of the main sweep and of the guards' sweep."""
    summaries = load_summaries()
    for rel in ("stability/stability.json", "stability_triggers/stability.json"):
        analysis = json.loads((RESULTS / rel).read_text())["analysis"]
        base = analysis["per_method"]["baseline"]["mean_final_loss"]
        for method, pm in analysis["per_method"].items():
            for lr, stored in pm["gap_closed"].items():
                mine = summaries.gap_closed(base, pm["mean_final_loss"][lr], float(lr), analysis["stable_margin"])
                assert math.isclose(mine, stored, rel_tol=1e-12, abs_tol=1e-12), (rel, method, lr)
