"""nanoGPT (Karpathy's ``model.py``, which no package ships): an attention with ``c_attn = Linear(C, 3C)`` split in
its forward by ``n_embd`` into ``[q | k | v]``, and ``c_proj``; blocks ``ln_1, attn, ln_2, mlp`` whose MLP is
``c_fc``, ``c_proj``. Recognised by that structure (a class outside transformers)."""

from __future__ import annotations

from typing import Optional

from torch import nn

from lightning_msign.families.base import BlockInfo, Family, Found, int_attr, rows

_BLOCK_PARTS = ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class NanoGPT(Family):
    name = "nanoGPT"
    model = 'nanoGPT'
    splits = '`c_attn = Linear(C, 3C)`: rows `[Q \\| K \\| V]`'
    read_from = "the attention's `n_embd`"

    def read(self, module: nn.Module) -> Optional[Found]:
        c_attn, c_proj = getattr(module, "c_attn", None), getattr(module, "c_proj", None)
        n_embd = int_attr(module, "n_embd")
        if type(module).__module__.startswith("transformers."):
            return None
        if not isinstance(c_attn, nn.Linear) or n_embd is None or c_attn.out_features != 3 * n_embd:
            return None
        found: Found = {id(c_attn.weight): ("qkv", rows("nanoGPT c_attn (split(n_embd))", q=n_embd, k=n_embd,
                                                       v=n_embd))}
        if isinstance(c_proj, nn.Linear):
            found[id(c_proj.weight)] = ("attn_out", None)
        return found

    def block(self, block: nn.Module) -> Optional[BlockInfo]:
        cls = type(block)
        if cls.__name__ != "Block" or cls.__module__.startswith("transformers"):
            return None
        modules = dict(block.named_modules())
        if not all(n in modules for n in _BLOCK_PARTS):
            return None
        return BlockInfo(("attn.c_proj", "mlp.c_proj"))
