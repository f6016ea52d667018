"""A griffe extension for the API pages (mkdocs.yml): the package's docstrings use reST roles
(``:class:`~lightning_msign.MSign```, ``:func:`msign```, ``:math:`v_t```), which markdown would print as they are;
each becomes inline code of what it names (the last dotted part where the role's target starts with ``~``). A reST
``Example::`` line becomes ``For example:`` and a ``.. math::`` line goes (the indented block under either stays a
code block)."""

from __future__ import annotations

import re

import griffe

EXAMPLE = re.compile(r"^([ \t]*)Example::$", re.MULTILINE)
MATH = re.compile(r"^[ \t]*\.\. math::\n", re.MULTILINE)
ROLE = re.compile(r":(?:class|func|meth|attr|mod|obj|data|exc|math|paramref):`(~?)([^`]+)`")


def _plain(match: re.Match) -> str:
    short, target = match.group(1), match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


class ReSTRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None and ":" in obj.docstring.value:
            text = ROLE.sub(_plain, obj.docstring.value)
            obj.docstring.value = MATH.sub("", EXAMPLE.sub(r"\1For example:", text))
