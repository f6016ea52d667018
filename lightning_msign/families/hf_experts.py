"""transformers-5 mixture-of-experts tensors: every expert of a layer in ``gate_up_proj (E, 2I, H)``, fused
``[gate | up]``, and ``down_proj (E, H, I)``, read from ``num_experts`` / ``intermediate_dim`` and the storage flags the
library sets on the module (``is_transposed``, ``is_concatenated``, ``has_gate``); other storage conventions are left
to a declaration."""

from __future__ import annotations

from typing import Optional

from torch import nn

from lightning_msign.families.base import Family, Found, int_attr
from lightning_msign.layouts import Layout


class ExpertTensors(Family):
    name = "transformers-5 expert tensors"
    model = 'transformers-5 experts (Mixtral, Qwen3-MoE, ...)'
    splits = '3D `gate_up_proj (E, 2I, H)`: per expert `[gate \\| up]`; `down_proj (E, H, I)`'
    read_from = "`num_experts`, `intermediate_dim`, the library's `is_transposed` / `is_concatenated` flags"

    def read(self, module: nn.Module) -> Optional[Found]:
        gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        n_exp, inter = int_attr(module, "num_experts"), int_attr(module, "intermediate_dim")
        if not isinstance(gate_up, nn.Parameter) or gate_up.ndim != 3 or n_exp is None or inter is None:
            return None
        if getattr(module, "is_transposed", False) or not getattr(module, "is_concatenated", True) or not getattr(
            module, "has_gate", True
        ):
            return None
        source = f"{type(module).__name__} (num_experts, intermediate_dim)"
        found: Found = {id(gate_up): ("mlp", Layout("rows", (("gate", inter), ("up", inter)), experts=True,
                                                     source=source))}
        if isinstance(down, nn.Parameter) and down.ndim == 3:
            found[id(down)] = ("mlp", Layout("matrix", experts=True, source=source))
        return found
