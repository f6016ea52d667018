"""Build hooks of the documentation site (mkdocs.yml ``hooks:``): measured tables come from the result files the
benchmarks write, and the generated tables from README, never retyped.

Two directives, each on a line of its own in a page's markdown:

``<!-- result-table: benchmarks/results/overhead.md -->``
    the first table of that result file (``table=N`` for the N-th; ``under="heading text"`` counts from the first
    heading containing that text), followed by the file's machine line and the command that wrote it.
``<!-- readme: families -->``
    README's section between ``<!-- families:start -->`` and ``<!-- families:end -->`` (tests keep it equal to what
    the code generates).
``<!-- readme: all -->``
    the whole README, its links into ``docs/`` made relative to the site (the home page is README).

A directive that names a missing file, table or section stops the build. The figures the benchmarks write
(``benchmarks/results/**/*.png``) are served at the same path below the site's root, so a page links them as
``benchmarks/results/...``.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
DIRECTIVE = re.compile(r"^<!-- (result-table|readme): (.+?) -->$", re.MULTILINE)


def tables(text: str) -> list[str]:
    """The markdown tables of ``text``: runs of lines starting with ``|``, in order."""
    found, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            found.append("\n".join(current))
            current = []
    if current:
        found.append("\n".join(current))
    return found


def result_table(spec: str, page: str) -> str:
    words = shlex.split(spec)
    path, options = words[0], dict(w.split("=", 1) for w in words[1:])
    unknown = set(options) - {"table", "under"}
    if unknown:
        raise PluginError(f"{page}: result-table {spec!r}: unknown option(s) {sorted(unknown)}; use table=, under=")
    file = ROOT / path
    if not file.is_file():
        raise PluginError(f"{page}: result-table names {path!r}, which does not exist")
    text = file.read_text(encoding="utf-8")
    body = text
    if "under" in options:
        heading = next((m for m in re.finditer(r"^#+ .*$", text, re.MULTILINE) if options["under"] in m.group(0)),
                       None)
        if heading is None:
            raise PluginError(f"{page}: {path} has no heading containing {options['under']!r}")
        body = text[heading.start():]
    number = int(options.get("table", "1"))
    found = tables(body)
    if not 1 <= number <= len(found):
        raise PluginError(f"{page}: {path} has {len(found)} table(s) there, not a table {number}")
    machine = re.search(r"^Machine: ([^,;.\n]+)", text, re.MULTILINE)  # the CPU: "AMD EPYC", "Intel(R) Xeon(R) ..."
    date = re.search(r"\b(20\d\d-\d\d-\d\d)\b", text)
    command = re.search(r"Command: `([^`]+)`", text)
    source = f"From `{path}`"
    if machine:
        source += f" (measured on {machine.group(1).strip()}" + (f", {date.group(1)})" if date else ")")
    if command:
        source += f", written by `{command.group(1)}`"
    return f"{found[number - 1]}\n\n<small>{source}.</small>\n"


def readme_section(name: str, page: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    if name == "all":
        return text.replace("](docs/", "](")
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise PluginError(f"{page}: README.md has no {start} ... {end} section")
    return text.split(start, 1)[1].split(end, 1)[0].strip() + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    where = page.file.src_uri

    def expand(match: re.Match) -> str:
        kind, spec = match.group(1), match.group(2).strip()
        return result_table(spec, where) if kind == "result-table" else readme_section(spec, where)

    return DIRECTIVE.sub(expand, markdown)


def on_files(files, config):
    for png in sorted((ROOT / "benchmarks" / "results").rglob("*.png")):
        files.append(File(png.relative_to(ROOT).as_posix(), src_dir=str(ROOT), dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    return files
