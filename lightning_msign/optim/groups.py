"""Param groups for Muon and NuMuon: every hidden matrix of a model (fused weights split by the layouts read from
the model, as MSign splits them) in the Muon group, everything else in the AdamW group."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from lightning_msign._validation import check_range
from lightning_msign.fsdp1 import is_fsdp1_managed
from lightning_msign.layouts import LAYOUT_HELP, validate_layouts
from lightning_msign.targets import (
    LayoutsArg,
    declaration_hint,
    target_catalog,
    unwrap_module,
)

__all__ = ["matrix_layouts", "muon_param_groups", "refuse_fsdp1"]


def matrix_layouts(module: nn.Module, layouts: LayoutsArg = None) -> dict[int, tuple[nn.Parameter, Optional[str]]]:
    """``{id(param): (param, layout string or None)}`` of every hidden matrix of ``module`` (model order).

    Hidden matrices are those of the suite's catalog (:func:`lightning_msign.targets.catalog`) except token
    embeddings and the LM head; the layout string says how a fused weight splits (``None``: one matrix).

    Raises:
        ValueError: a parameter that looks fused but whose layout cannot be read from the model (see
            :func:`muon_param_groups`).
    """
    entries, undetermined = target_catalog(module, split_qkv=True, layouts=validate_layouts(layouts))
    if undetermined:
        u = undetermined[0]
        raise ValueError(
            f"Parameter {u.name!r} of {u.owner} (shape {tuple(u.param.shape)}) looks like a fused weight whose layout"
            f" cannot be read from the model; a Muon update of it as one matrix would mix its blocks:"
            f" {declaration_hint(u.name, tuple(u.param.shape))}" + LAYOUT_HELP
        )
    out: dict[int, tuple[nn.Parameter, Optional[str]]] = {}
    for t in entries:
        if t.role not in ("embedding", "lm_head"):
            out.setdefault(id(t.param), (t.param, t.layout.spec() if t.layout is not None else None))
    return out


def refuse_fsdp1(params: Any, where: str) -> None:
    if any(is_fsdp1_managed(p) for p in params):
        raise NotImplementedError(
            f"{where}: parameters flattened by FSDP1 (FullyShardedDataParallel / Lightning's FSDPStrategy) are 1-D"
            " slices, not matrices: a Muon step on them would orthogonalise fragments, and grouping them would send"
            " every matrix to AdamW. NuMuon and Muon work on whole matrices under DDP and FSDP2"
            " (ModelParallelStrategy)."
        )


def muon_param_groups(
    module: nn.Module, layouts: LayoutsArg = None, weight_decay: Optional[float] = None
) -> list[dict[str, Any]]:
    """Param groups for :class:`NuMuon` / :class:`Muon` from a model: hidden matrices to Muon, the rest to AdamW.

    Groups (empty ones dropped; each dict may be edited before the optimizer is built, e.g. its ``lr``):

    - ``"muon"`` (``use_muon=True``): every matrix the suite's catalog finds except token embeddings and the
      LM head: attention and MLP weights, fused ones with their layouts (``layouts``: one entry per parameter,
      the layout string or ``None``), expert tensors per expert.
    - ``"adamw"`` (``use_muon=False``): token embeddings and the LM head (tied weights once).
    - ``"adamw_no_decay"`` (``use_muon=False``, ``weight_decay=0``): parameters with fewer than 2 dimensions
      (norm weights, biases) and biases of any shape.

    Args:
        module: the model (a LightningModule, a ``litgpt.GPT``, a Hugging Face model, ...).
        layouts: declared layouts of fused weights the readers do not know, ``{glob: layout string}``.
        weight_decay: set on the ``"muon"`` and ``"adamw"`` groups (default: the optimizer's).

    Raises:
        ValueError: a parameter that looks fused (or has more than 2 dimensions) but whose layout cannot be
            read from the model: its Muon update as one matrix would mix its blocks. Declare its layout
            (``"matrix"`` treats it as one matrix on purpose).
    """
    refuse_fsdp1(list(unwrap_module(module).parameters()), "muon_param_groups(module)")
    muon = {
        id(p): (p, spec) for p, spec in matrix_layouts(module, layouts).values() if p.requires_grad
    }
    adamw, no_decay = [], []
    seen = set(muon)
    for name, p in unwrap_module(module).named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or name.endswith("bias") else adamw).append(p)
    decay = {} if weight_decay is None else {"weight_decay": check_range(weight_decay, "weight_decay", low=0.0)}
    groups = [
        {"name": "muon", "params": [p for p, _ in muon.values()], "use_muon": True,
         "layouts": [spec for _, spec in muon.values()], **decay},
        {"name": "adamw", "params": adamw, "use_muon": False, **decay},
        {"name": "adamw_no_decay", "params": no_decay, "use_muon": False, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


