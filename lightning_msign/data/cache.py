"""The token cache: where it lives, how an entry is named, and how its files are written.

The trained BPE tokenizer and the tokenized corpus are cached under
``cache_dir`` (default ``$LIGHTNING_MSIGN_CACHE`` or
``~/.cache/lightning_msign``) in one folder per configuration::

    <cache_dir>/<tokenizer>-<16 hex digits>/
        tokenizer.json   # BPE only
        train.npy        # uint16 (int32 if vocab > 65536) token stream
        val.npy
        meta.json        # written last: marks the entry complete

The hex digits are the first 16 of :func:`cache_key`: a SHA-256 over the raw
bytes of every corpus file (in order, :func:`hash_corpus`) and every setting
that changes the tokens (``strip_markdown``, ``val_fraction``, ``tokenizer``,
``bpe_vocab_size``), so editing the corpus or a setting retrains and
re-tokenizes. Every file is written to a temporary name and moved into place
with :func:`os.replace`, so DDP ranks (or concurrent jobs) racing on the same
entry never see a half-written file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["default_cache_dir"]

#: Bumped whenever the on-disk format or the text processing changes.
CACHE_VERSION = 1
_CACHE_ENV = "LIGHTNING_MSIGN_CACHE"


def default_cache_dir() -> Path:
    """Return the cache folder: ``$LIGHTNING_MSIGN_CACHE`` or ``~/.cache/lightning_msign``."""
    env = os.environ.get(_CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/lightning_msign").expanduser()


def hash_corpus(files: Sequence[Path], raws: Sequence[bytes]) -> str:
    """SHA-256 (hex) over the files' suffixes, sizes and bytes, in order; the paths themselves do not count."""
    h = hashlib.sha256()
    for f, raw in zip(files, raws):
        # The suffix decides markdown stripping; the size delimits files.
        h.update(f"{f.suffix.lower()}:{len(raw)}:".encode())
        h.update(raw)
    return h.hexdigest()


def cache_key(
    corpus_hash: str, tokenizer: str, bpe_vocab_size: int, strip_markdown: bool, val_fraction: float
) -> str:
    """SHA-256 (hex) naming a cache entry: the corpus hash and every setting that changes the tokens.

    ``bpe_vocab_size`` counts for ``tokenizer="bpe"`` only. Changing this computation renames every
    existing entry, so users' caches would be rebuilt: bump ``CACHE_VERSION`` instead when the format must change.
    """
    settings = {
        "version": CACHE_VERSION,
        "corpus": corpus_hash,
        "tokenizer": tokenizer,
        "bpe_vocab_size": bpe_vocab_size if tokenizer == "bpe" else None,
        "strip_markdown": strip_markdown,
        "val_fraction": repr(val_fraction),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; cache entries are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """Save ``array`` as ``.npy`` (no pickle) through :func:`atomic_write_bytes`."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())
