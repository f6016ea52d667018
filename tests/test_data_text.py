"""Tests for :mod:`lightning_msign.data.text`: markdown cleaning and the per-document train/val split."""

from __future__ import annotations

import re

import torch

from lightning_msign.data import ShakespeareDataModule, strip_markdown_text

from data_corpora import numbered_corpus


def test_markdown_stripping(tmp_path):
    md = (
        "# Play\n\n## ACT I\n\n**HAMLET**  \nTo be, _or_ not\\-to be.  \n"
        "*Exit.*\n__\\[Aside]_  \nsnake_case 2 * 3\n"
    )
    expected = "Play\n\nACT I\n\nHAMLET\nTo be, or not-to be.\nExit.\n[Aside]\nsnake_case 2 * 3\n"
    assert strip_markdown_text(md) == expected

    folder = tmp_path / "md"
    folder.mkdir()
    (folder / "play.md").write_text(md * 30)
    stripped = ShakespeareDataModule(path=str(folder), seq_len=8, cache_dir=str(tmp_path))
    stripped.setup()
    text = stripped.decode(stripped.train_dataset.tokens)
    assert "**" not in text and "HAMLET\nTo be, or not" in text and "  \n" not in text

    raw = ShakespeareDataModule(path=str(folder), seq_len=8, strip_markdown=False, cache_dir=str(tmp_path))
    raw.setup()
    assert "**HAMLET**  \n" in raw.decode(raw.train_dataset.tokens)
    assert raw.cache_path != stripped.cache_path


def test_split_deterministic_and_disjoint(tmp_path):
    corpus = numbered_corpus(tmp_path)
    dms = []
    for name in ("a", "b"):
        dm = ShakespeareDataModule(path=str(corpus), seq_len=16, val_fraction=0.1, cache_dir=str(tmp_path / name))
        dm.setup("fit")
        dms.append(dm)
    a, b = dms
    assert torch.equal(a.train_dataset.tokens, b.train_dataset.tokens)
    assert torch.equal(a.val_dataset.tokens, b.val_dataset.tokens)

    train_lines = set(re.findall(r"line (\d+)", a.decode(a.train_dataset.tokens)))
    val_lines = set(re.findall(r"line (\d+)", a.decode(a.val_dataset.tokens)))
    assert not train_lines & val_lines
    assert len(train_lines) + len(val_lines) == 6000  # every line is in exactly one split
    # Contiguous: the tail of every file is validation.
    assert {"001999", "003999", "005999"} <= val_lines and {"000000", "002000", "004000"} <= train_lines
    assert 0.08 < len(val_lines) / 6000 < 0.12
