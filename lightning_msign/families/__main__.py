"""``python -m lightning_msign.families [README]``: print README's table of model families, generated from the
registry, or rewrite it in place in README (between its ``<!-- families:start -->`` / ``<!-- families:end -->``)."""

from __future__ import annotations

import sys
from pathlib import Path

from lightning_msign.families import BUILT_IN, readme_table

START, END = "<!-- families:start -->", "<!-- families:end -->"


def main(argv: list[str]) -> int:
    table = readme_table(BUILT_IN)
    if not argv:
        print(table, end="")
        return 0
    path = Path(argv[0])
    text = path.read_text()
    if START not in text or END not in text:
        print(f"{path}: no {START} ... {END} section to write the table into", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    path.write_text(head + START + "\n" + table + END + rest.split(END, 1)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
