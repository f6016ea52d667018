"""Byte-level BPE with the ``tokenizers`` package: training, loading, batch encoding."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Sequence


def train_bpe(texts: Sequence[str], vocab_size: int) -> Any:
    """A ``tokenizers.ByteLevelBPETokenizer`` trained on ``texts``.

    Merges pairs seen at least twice, no special tokens. A corpus too small to learn ``vocab_size - 256``
    merges yields fewer ids, all below ``vocab_size``.
    """
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=2, special_tokens=[], show_progress=False)
    return bpe


def load_bpe(path: Path) -> Any:
    """The ``tokenizers.Tokenizer`` serialized at ``path`` (a ``tokenizer.json``)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def encode_texts(bpe: Any, texts: Sequence[str]) -> List[List[int]]:
    """The token ids of each of ``texts``."""
    # ``encode_batch_fast`` (tokenizers >= 0.21) skips offset tracking, which we never use.
    encode_batch = getattr(bpe, "encode_batch_fast", None) or bpe.encode_batch
    return [e.ids for e in encode_batch(list(texts))]
