"""Dormant q/k normalisation: a norm that is exactly the identity until switched on, for the qk-norm retrofit.

A family that can add qk-norm to a running model (:meth:`~lightning_msign.families.Family.install_qk_norm`) puts two
:class:`SwitchedNorm` modules where its attention applies a query and a key norm. They exist from the start of the
run (so an optimizer built afterwards holds their parameters and a checkpoint has their keys), pass q and k through
unchanged while off (no operation at all: a run that never switches is bit-identical to one without them), and
apply their norm from the step they are switched on. The switch is part of the module's state (its extra state
in ``state_dict``), so a model checkpoint says which norms are on.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

__all__ = ["SwitchedNorm", "norm_projection_heads"]


class SwitchedNorm(nn.Module):
    """``norm(x)`` once switched on, ``x`` itself before.

    The switch is the module's extra state (``get_extra_state``: a ``..._extra_state`` entry of the model's
    ``state_dict``), not a buffer: no device read in the forward, nothing for DDP to broadcast, and a snapshot of
    parameters and buffers restored in place (a rollback's) leaves it as it is.

    Args:
        norm: the normalisation to apply when on (its parameters train from then on; before, they get no gradient).
    """

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self._on = False

    @property
    def on(self) -> bool:
        """Whether the norm is applied."""
        return self._on

    def switch_on(self) -> None:
        """Apply the norm from the next forward on (switching back off is not offered: the run has moved on)."""
        self._on = True

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x) if self._on else x

    def get_extra_state(self) -> dict[str, Any]:
        return {"on": self._on}

    def set_extra_state(self, state: Any) -> None:
        self._on = bool(state["on"])

    def extra_repr(self) -> str:
        return f"on={self._on}"


def norm_projection_heads(
    projection: nn.Module, norm: SwitchedNorm, head_dim: int, columns: Optional[tuple[int, int]] = None
) -> None:
    """Apply ``norm`` to each head of ``projection``'s output (or of its columns ``[start, stop)``, the query or key
    block of a fused projection), ``(..., heads * head_dim)`` viewed as ``(..., heads, head_dim)``, by a forward hook:
    where a family's attention splits a query or key projection into heads before RoPE, this is qk-norm at the place
    Qwen3 / OLMo put theirs. Dormant, the hook returns nothing (the output as it is, no operation). Registered once
    per norm and place."""
    key = (id(projection), columns)
    if norm.__dict__.get("_hooked_to") == key:  # a plain attribute: not a submodule of the norm
        return

    def normed(x: Tensor) -> Tensor:
        shape = x.shape
        return norm(x.reshape(*shape[:-1], shape[-1] // head_dim, head_dim)).reshape(shape)

    def hook(module: nn.Module, args: Any, output: Tensor) -> Optional[Tensor]:
        if not norm.on:
            return None
        if columns is None:
            return normed(output)
        start, stop = columns
        return torch.cat((output[..., :start], normed(output[..., start:stop]), output[..., stop:]), dim=-1)

    projection.register_forward_hook(hook)
    norm.__dict__["_hooked_to"] = key
