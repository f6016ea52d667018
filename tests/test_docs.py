"""The documentation: README stays a page a user can read, its links resolve, and the site builds with ``--strict``
(mkdocs-material, API pages from the docstrings, measured tables read from benchmarks/results/) with no network."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def load_hooks():
    return load_script(ROOT / "docs" / "hooks.py")


def test_readme_is_at_most_20_kb():
    size = len(README.read_bytes())
    assert size <= 20 * 1024, f"README.md is {size} bytes: move detail to docs/ (the limit is 20 KB)"


def test_readme_links_resolve():
    """Every relative link of README names a file of the checkout (what GitHub renders), and every ``#anchor`` into
    a docs page names one of its headings."""
    links = re.findall(r"\]\(([^)\s]+)\)", README.read_text(encoding="utf-8"))
    relative = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert len(relative) >= 10
    for link in relative:
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.exists(), f"README links {link!r}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", target.read_text(encoding="utf-8"), re.MULTILINE)
            slugs = {re.sub(r"[^\w\- ]", "", h.lower().replace("`", "")).strip().replace(" ", "-") for h in headings}
            assert anchor in slugs, f"README links {link!r}: {path} has no heading {anchor!r}"


def test_measured_tables_are_read_from_result_files():
    """A table whose header is that of a table a benchmark writes is included from its result file
    (``<!-- result-table: ... -->``), never typed into a docs page; every directive resolves."""
    hooks = load_hooks()
    written = {}
    for result in sorted((ROOT / "benchmarks" / "results").rglob("*.md")):
        for table in hooks.tables(result.read_text(encoding="utf-8")):
            written.setdefault(table.splitlines()[0], result.relative_to(ROOT).as_posix())
    assert len(written) > 10
    included = 0
    for page in sorted((ROOT / "docs").rglob("*.md")):
        source = page.read_text(encoding="utf-8")
        for table in hooks.tables(source):
            header = table.splitlines()[0]
            assert header not in written, (
                f"{page.relative_to(ROOT)}: a table typed by hand with the header of one in {written[header]}; "
                "include it with <!-- result-table: PATH table=N -->"
            )
        for match in hooks.DIRECTIVE.finditer(source):
            if match.group(1) == "result-table":
                text = hooks.result_table(match.group(2), page.name)
                assert text.splitlines()[0] in written, text
                included += 1
    assert included >= 5


def test_a_directive_that_names_nothing_stops_the_build():
    from mkdocs.exceptions import PluginError

    hooks = load_hooks()
    with pytest.raises(PluginError, match="does not exist"):
        hooks.result_table("benchmarks/results/no_such_file.md", "page.md")
    with pytest.raises(PluginError, match="not a table 99"):
        hooks.result_table("benchmarks/results/overhead.md table=99", "page.md")
    with pytest.raises(PluginError, match="no heading containing"):
        hooks.result_table("benchmarks/results/overhead.md under='no such heading'", "page.md")
    with pytest.raises(PluginError, match="no <!-- nothing:start -->"):
        hooks.readme_section("nothing", "page.md")


@pytest.mark.slow  # griffe asks git for the package's repository
def test_the_site_builds_strict(tmp_path):
    """``make docs``'s build, in this process (no network: no plugin here fetches anything): a broken link or
    anchor, a docstring naming a parameter the signature lacks, a missing result table or API object fails it."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    site = tmp_path / "site"
    config = load_config(config_file=str(ROOT / "mkdocs.yml"), strict=True, site_dir=str(site))
    build(config)  # raises mkdocs.exceptions.Abort on any warning under strict
    callbacks = html.unescape(re.sub(r"<[^>]+>", "", (site / "api" / "callbacks" / "index.html").read_text()))
    # the callback's signature is its guard's (built at import), not the adapter's (guard)
    assert re.search(r"MSignCallback\(\s*period: Optional\[int\] = 100,", callbacks), callbacks[:2000]
    assert ":class:" not in callbacks
    home = (site / "index.html").read_text()
    assert "Guards and their callbacks" in home and 'src="figures/main_job_high_lr.png"' in home
    overhead = (site / "overhead" / "index.html").read_text()
    assert "benchmarks/results/overhead.md" in overhead


def test_readme_quick_start_runs(tmp_path, monkeypatch):
    """README's Lightning quick start, as printed, for 2 steps (only the step count and the Trainer's output
    options changed): the first code a user copies works."""
    text = README.read_text(encoding="utf-8").split("## Quick start", 1)[1]
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert "max_steps=2000," in code and "trainer.fit(model, data)" in code
    code = code.replace("max_steps=2000,", "max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,"
                        " enable_progress_bar=False, enable_model_summary=False,")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md (quick start)", "exec"), scope)
    trainer = scope["trainer"]
    assert trainer.global_step == 2
    guard = next(cb for cb in trainer.callbacks if type(cb).__name__ == "MSignCallback").guard
    assert guard.max_attn_logit == 100.0 and guard.targets == ["qk"]
