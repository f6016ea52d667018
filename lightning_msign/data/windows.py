"""Fixed-length next-token windows over a token stream."""

from __future__ import annotations

from typing import Dict

import torch
from torch.utils.data import Dataset

from lightning_msign._validation import check_int

__all__ = ["TokenWindowDataset"]


class TokenWindowDataset(Dataset):
    """Non-overlapping next-token windows over a 1-D token stream.

    Window ``i`` covers tokens ``[i * seq_len, i * seq_len + seq_len + 1)``;
    ``input_ids`` are its first ``seq_len`` tokens and ``targets`` its last
    ``seq_len`` (the inputs shifted by one). A trailing remainder shorter than
    ``seq_len + 1`` tokens is dropped.

    Args:
        tokens: 1-D integer tensor (any integer dtype).
        seq_len: Window length.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        if tokens.ndim != 1:
            raise ValueError(f"`tokens` must be 1-D, got shape {tuple(tokens.shape)}")
        check_int(seq_len, "seq_len", 1)
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (self.tokens.numel() - 1) // self.seq_len)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"window index {index} out of range for {len(self)} windows")
        start = index * self.seq_len
        chunk = self.tokens[start : start + self.seq_len + 1].long()  # (seq_len + 1,)
        return {"input_ids": chunk[:-1], "targets": chunk[1:]}
