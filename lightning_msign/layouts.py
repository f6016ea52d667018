"""How a parameter splits into the matrices the math acts on, read from the module that owns it.

A weight is not always one matrix. LitGPT stores an attention layer's query, key and value projections
in one ``attn.qkv.weight``; Hugging Face GPT-2 keeps them as *column* blocks of a ``Conv1D`` weight
``(in, 3 * out)``; GPT-NeoX interleaves them per head; multi-query attention (GPTBigCode) has a key
block of one head's width; transformers-5 mixture-of-experts layers hold every expert in one 3D tensor
whose matrices are themselves fused ``[gate | up]``. The matrix sign, the stable rank and the dominant
singular directions of such a fused weight are not those of its blocks, so each block is its own
matrix here, and its boundaries are *read* from the module (its class and config), never guessed
from the shape.

A :class:`Layout` says how to cut one parameter. Its string form, accepted wherever a user declares a
layout (``layouts={"<glob on parameter names>": "<layout>"}``, YAML-friendly), is one of:

``"matrix"``
    The 2D parameter is one matrix (also: treat a fused weight as one matrix, on purpose).
``"flatten"``
    A parameter with more than two dimensions (a convolution kernel) viewed as ``(shape[0], -1)``.
``"rows:q=768,k=128,v=128"``
    Consecutive row blocks with these tags and sizes (they must add up to the rows).
``"cols:q=768,k=768,v=768"``
    Consecutive column blocks (``Conv1D``-style ``(in, out)`` weights).
``"heads:12:q=64,k=64,v=64"``
    Rows interleaved per head: 12 repetitions of ``[q (64) | k (64) | v (64)]``; block ``q`` is the
    ``q`` rows of every head, in head order. ``"colheads:..."`` is the same on columns.
``"experts"`` / ``"experts/<layout>"``
    A 3D tensor ``(E, a, b)``: each ``[e]`` is an expert's matrix, cut further by the inner layout
    (``"experts/rows:gate=1024,up=1024"``).

Tags ``q``, ``k``, ``v`` give their blocks the roles of attention queries, keys and values; ``gate``,
``up`` and ``down`` the role ``"mlp"``; any other tag keeps the role of the parameter. A block's name is
the parameter's name with ``.<tag>`` appended, and ``.e<index>`` before it for an expert
(``model.layers.0.mlp.experts.gate_up_proj.e3.up``).

Read automatically from the module that owns a parameter, by the model families of
:mod:`lightning_msign.families` (one module per family: LitGPT, ``torch.nn.MultiheadAttention``, Hugging Face
GPT-2, GPTBigCode, GPT-NeoX, Phi-3, the Llama family, T5, DBRX, transformers-5 expert tensors, nanoGPT); a user's
family is registered there. Separate projections (``q_proj``/``k_proj``/``v_proj``/``o_proj``) need no layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Optional

from torch import Tensor, nn

LayoutKind = Literal["matrix", "flatten", "rows", "cols", "heads", "colheads"]

# Roles given by block tags; other tags keep the parameter's role.
TAG_ROLES: dict[str, str] = {"q": "q", "k": "k", "v": "v", "gate": "mlp", "up": "mlp", "down": "mlp"}

LAYOUT_HELP = (
    "declare it with the `layouts` argument, a dict from a glob on parameter names to a layout string:"
    " 'rows:q=<rows>,k=<rows>,v=<rows>' (row blocks), 'cols:...' (column blocks, Conv1D), 'heads:<n>:q=..,k=..,v=..'"
    " (rows interleaved per head), 'experts/<layout>' (3D expert tensors), 'matrix' (one matrix) or 'flatten'"
    " (a >2D kernel as (shape[0], -1)); see lightning_msign.layouts"
)


@dataclass(frozen=True)
class Layout:
    """How one parameter splits into matrices.

    Attributes:
        kind: ``"matrix"``, ``"flatten"``, ``"rows"``, ``"cols"``, ``"heads"`` (rows interleaved per head)
            or ``"colheads"``.
        blocks: ``(tag, size)`` per block (within one head for the interleaved kinds); empty for
            ``"matrix"`` and ``"flatten"``.
        heads: repetitions of the block pattern (interleaved kinds), else 1.
        experts: the parameter is ``(E, ...)`` and each ``[e]`` is cut by this layout.
        source: where the layout was read (``"LitGPT config"``, ``"declared"``, ...), for messages.
    """

    kind: LayoutKind
    blocks: tuple[tuple[str, int], ...] = ()
    heads: int = 1
    experts: bool = False
    source: str = ""

    @property
    def axis(self) -> int:
        """Axis of the (per-expert) 2D matrix the blocks are cut along: 0 rows, 1 columns."""
        return 1 if self.kind in ("cols", "colheads") else 0

    def spec(self) -> str:
        """The string form (see the module docstring)."""
        body = self.kind
        if self.blocks:
            sizes = ",".join(f"{tag}={size}" for tag, size in self.blocks)
            body = f"{self.kind}:{self.heads}:{sizes}" if self.kind in ("heads", "colheads") else f"{self.kind}:{sizes}"
        return f"experts/{body}" if self.experts else body

    def check(self, shape: tuple[int, ...], name: str) -> None:
        """Raise ``ValueError`` naming ``name`` when the layout does not fit a parameter of ``shape``."""
        ndim = len(shape) - (1 if self.experts else 0)
        where = f"Layout {self.spec()!r} ({self.source or 'declared'}) of parameter {name!r} with shape {tuple(shape)}"
        if self.experts and len(shape) < 3:
            raise ValueError(f"{where}: 'experts' needs a tensor of 3 or more dimensions (E, ...)")
        if self.kind == "flatten":
            if ndim < 2:
                raise ValueError(f"{where}: 'flatten' needs 2 or more dimensions")
            return
        if ndim != 2:
            raise ValueError(
                f"{where}: a {ndim}-D {'expert ' if self.experts else ''}tensor is not a matrix; use 'flatten' to view"
                " it as (shape[0], -1) on purpose"
            )
        if self.blocks:
            total = shape[-2 + self.axis]
            expected = self.heads * sum(size for _, size in self.blocks)
            if expected != total:
                axis = "columns" if self.axis else "rows"
                raise ValueError(f"{where}: the blocks add up to {expected} {axis}, the parameter has {total}")


_BLOCK_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=([1-9][0-9]*)$")


def parse_layout(spec: str, argument: str = "layouts") -> Layout:
    """Parse a layout string (see the module docstring); errors name ``argument`` and the string."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"`{argument}` values must be layout strings, got {spec!r}; {LAYOUT_HELP}")
    text, experts = spec.strip(), False
    if text == "experts" or text.startswith("experts/"):
        experts, text = True, text[len("experts/"):] if text != "experts" else "matrix"
    if text in ("matrix", "flatten"):
        return Layout(text, experts=experts, source="declared")  # type: ignore[arg-type]
    kind, _, rest = text.partition(":")
    heads = 1
    if kind in ("heads", "colheads"):
        count, _, rest = rest.partition(":")
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"`{argument}` layout {spec!r}: '{kind}:' must be followed by a head count, e.g. "
                             f"'{kind}:12:q=64,k=64,v=64'")
        heads = int(count)
    elif kind not in ("rows", "cols"):
        raise ValueError(f"`{argument}` layout {spec!r} is not a layout; {LAYOUT_HELP}")
    blocks = []
    for item in rest.split(","):
        match = _BLOCK_RE.match(item.strip())
        if match is None:
            raise ValueError(f"`{argument}` layout {spec!r}: block {item!r} must be '<tag>=<positive size>'")
        blocks.append((match.group(1), int(match.group(2))))
    tags = [tag for tag, _ in blocks]
    if len(set(tags)) != len(tags):
        raise ValueError(f"`{argument}` layout {spec!r}: block tags must be unique, got {tags}")
    return Layout(kind, tuple(blocks), heads=heads, experts=experts, source="declared")  # type: ignore[arg-type]


def validate_layouts(layouts: Optional[dict[str, str]], argument: str = "layouts") -> dict[str, Layout]:
    """Check a ``layouts`` argument at construction: ``{glob on parameter names: layout string}``."""
    if layouts is None:
        return {}
    if not isinstance(layouts, dict):
        raise ValueError(f"`{argument}` must be a dict from a parameter-name glob to a layout string, got {layouts!r}")
    out = {}
    for pattern, spec in layouts.items():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"`{argument}` keys must be non-empty glob patterns on parameter names, got {pattern!r}")
        out[pattern] = parse_layout(spec, argument)
    return out


# ----------------------------------------------------------------------------------------------- views
def block_view(layout: Layout, data: Tensor, expert: Optional[int], offset: int, size: int) -> Tensor:
    """The N-D view of one block inside ``data`` (the whole parameter); shares storage with it.

    Row blocks of the interleaved kinds are ``(heads, size, cols)`` views (``(rows, heads, size)`` for
    columns); contiguous kinds give a 2D view. :func:`as_matrix` turns a view into the 2D matrix.
    """
    if layout.experts:
        data = data[expert]
    if layout.kind == "flatten":
        return data.reshape(data.shape[0], -1) if data.ndim > 2 else data
    if not layout.blocks:
        return data
    axis = layout.axis
    if layout.kind in ("rows", "cols"):
        return data.narrow(axis, offset, size)
    period = sum(s for _, s in layout.blocks)
    return data.unflatten(axis, (layout.heads, period)).narrow(axis + 1, offset, size)


def as_matrix(view: Tensor, layout: Layout) -> Tensor:
    """The 2D matrix of a block view: the view itself, or (interleaved kinds) its heads stacked (a copy)."""
    if layout.kind in ("heads", "colheads") and layout.blocks:
        return view.flatten(layout.axis, layout.axis + 1)
    return view


# Names of fused weights whose blocks cannot be found without a layout (their parameter, or owning module).
FUSED_NAMES = frozenset(
    {"c_attn", "qkv", "qkv_proj", "query_key_value", "in_proj_weight", "in_proj", "Wqkv", "W_pack", "wqkv",
     "gate_up_proj", "w13", "fused_qkv", "qkv_linear", "c_fc_gate_up"}
)


def read_layouts(module: nn.Module) -> dict[int, tuple[str, Optional[Layout]]]:
    """Roles and layouts of the parameters that the module's own classes and configs describe: what the registered
    model families read (:func:`lightning_msign.families.read_model`).

    Returns ``{id(parameter): (role, layout or None)}``; parameters of no recognised module are absent.
    """
    from lightning_msign.families import read_model

    return read_model(module)


def looks_fused(param_name: str, param: Tensor) -> bool:
    """True for a parameter whose name or shape says it may hold several matrices (needs a layout)."""
    parts = param_name.split(".")
    local = parts[-2] if parts[-1] == "weight" and len(parts) > 1 else parts[-1]  # the module's name for a weight
    return param.ndim > 2 or local in FUSED_NAMES


__all__ = [
    "LAYOUT_HELP",
    "Layout",
    "as_matrix",
    "block_view",
    "looks_fused",
    "parse_layout",
    "read_layouts",
    "validate_layouts",
]
