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

Read automatically (see :func:`read_layouts`): LitGPT ``CausalSelfAttention`` (rows from its config,
grouped-query aware) and ``LLaMAMoE``; ``torch.nn.MultiheadAttention``; Hugging Face GPT-2 (``Conv1D``
columns, cross-attention included), GPTBigCode (multi-query rows and multi-head interleaving), GPT-NeoX
/ Pythia (per-head interleaving), Phi-3 (``qkv_proj`` rows with grouped-query sizes, ``gate_up_proj``
rows), transformers-5 expert tensors (``gate_up_proj`` / ``down_proj`` of shape ``(E, ., .)`` with the
library's ``is_transposed`` / ``is_concatenated`` flags), and nanoGPT's ``c_attn`` (``Linear(C, 3C)``
with the attention's ``n_embd``). Separate projections (``q_proj``/``k_proj``/``v_proj``/``o_proj``:
Llama, Mistral, Qwen, ...) need no layout.
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


# --------------------------------------------------------------------------------------------- readers
def _mro_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def _is_transformers(module: nn.Module, *names: str) -> bool:
    return any(
        cls.__name__ in names and cls.__module__.startswith("transformers.") for cls in type(module).__mro__
    )


def _int(obj: object, *path: str) -> Optional[int]:
    for attr in path:
        obj = getattr(obj, attr, None)
    return int(obj) if isinstance(obj, int) and not isinstance(obj, bool) else None


def _weight(module: Optional[nn.Module]) -> Optional[Tensor]:
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, Tensor) else None


# A reader returns {id(param): (role, layout or None)} for the parameters it recognises.
Found = dict[int, tuple[str, Optional[Layout]]]


def _rows(source: str, **sizes: int) -> Layout:
    return Layout("rows", tuple(sizes.items()), source=source)


def _read_litgpt_attention(mod: nn.Module) -> Optional[Found]:
    config, qkv = getattr(mod, "config", None), _weight(getattr(mod, "qkv", None))
    if config is None or qkv is None or not {"CausalSelfAttention"} & _mro_names(mod):
        return None
    hs, n_head, n_groups = _int(config, "head_size"), _int(config, "n_head"), _int(config, "n_query_groups")
    if None in (hs, n_head, n_groups):
        return None
    found: Found = {id(qkv): ("qkv", _rows("LitGPT config", q=n_head * hs, k=n_groups * hs, v=n_groups * hs))}
    proj = _weight(getattr(mod, "proj", None))
    if proj is not None:
        found[id(proj)] = ("attn_out", None)
    return found


def _read_multihead_attention(mod: nn.Module) -> Optional[Found]:
    if not isinstance(mod, nn.MultiheadAttention):
        return None
    found: Found = {}
    if mod.in_proj_weight is not None:
        e = mod.embed_dim
        found[id(mod.in_proj_weight)] = ("qkv", _rows("nn.MultiheadAttention", q=e, k=e, v=e))
    for role, p in (("q", mod.q_proj_weight), ("k", mod.k_proj_weight), ("v", mod.v_proj_weight)):
        if p is not None:
            found[id(p)] = (role, None)
    found[id(mod.out_proj.weight)] = ("attn_out", None)
    return found


def _read_hf_gpt2(mod: nn.Module) -> Optional[Found]:
    if not _is_transformers(mod, "GPT2Attention"):
        return None
    split = _int(mod, "split_size")
    c_attn, c_proj = _weight(getattr(mod, "c_attn", None)), _weight(getattr(mod, "c_proj", None))
    if split is None or c_attn is None:
        return None
    found: Found = {}
    source = "transformers GPT2Attention (Conv1D columns)"
    if getattr(mod, "is_cross_attention", False):
        found[id(c_attn)] = ("qkv", Layout("cols", (("k", split), ("v", split)), source=source))
        q_attn = _weight(getattr(mod, "q_attn", None))
        if q_attn is not None:
            found[id(q_attn)] = ("q", None)
    else:
        found[id(c_attn)] = ("qkv", Layout("cols", (("q", split), ("k", split), ("v", split)), source=source))
    if c_proj is not None:
        found[id(c_proj)] = ("attn_out", None)
    return found


def _read_hf_bigcode(mod: nn.Module) -> Optional[Found]:
    if not _is_transformers(mod, "GPTBigCodeAttention"):
        return None
    e, hd, kv = _int(mod, "embed_dim"), _int(mod, "head_dim"), _int(mod, "kv_dim")
    n_head = _int(mod, "num_heads")
    c_attn, c_proj = _weight(getattr(mod, "c_attn", None)), _weight(getattr(mod, "c_proj", None))
    if None in (e, hd, kv, n_head) or c_attn is None:
        return None
    found: Found = {}
    if getattr(mod, "is_cross_attention", False):
        # key, value = c_attn(encoder_states).split((head_dim, head_dim)) in transformers 4.57
        found[id(c_attn)] = ("qkv", _rows("transformers GPTBigCodeAttention (cross)", k=hd, v=hd)
                             if c_attn.shape[0] == 2 * hd else None)
        q_attn = _weight(getattr(mod, "q_attn", None))
        if q_attn is not None:
            found[id(q_attn)] = ("q", None)
    elif getattr(mod, "multi_query", False):
        found[id(c_attn)] = ("qkv", _rows("transformers GPTBigCodeAttention (multi-query)", q=e, k=kv, v=kv))
    else:  # view(B, T, n_head, 3 * head_dim).split(head_dim): rows interleaved per head
        found[id(c_attn)] = ("qkv", Layout("heads", (("q", hd), ("k", hd), ("v", hd)), heads=n_head,
                                           source="transformers GPTBigCodeAttention (multi-head)"))
    if c_proj is not None:
        found[id(c_proj)] = ("attn_out", None)
    return found


def _read_hf_neox(mod: nn.Module) -> Optional[Found]:
    if not _is_transformers(mod, "GPTNeoXAttention"):
        return None
    hs = _int(mod, "head_size")
    n_head = _int(mod, "config", "num_attention_heads")
    qkv, dense = _weight(getattr(mod, "query_key_value", None)), _weight(getattr(mod, "dense", None))
    if hs is None or n_head is None or qkv is None:
        return None
    found: Found = {id(qkv): ("qkv", Layout("heads", (("q", hs), ("k", hs), ("v", hs)), heads=n_head,
                                            source="transformers GPTNeoXAttention (per-head interleaving)"))}
    if dense is not None:
        found[id(dense)] = ("attn_out", None)
    return found


def _read_hf_phi3(mod: nn.Module) -> Optional[Found]:
    if _is_transformers(mod, "Phi3Attention"):
        hd, n_kv = _int(mod, "head_dim"), _int(mod, "num_key_value_heads")
        n_head = _int(mod, "config", "num_attention_heads")
        qkv, o = _weight(getattr(mod, "qkv_proj", None)), _weight(getattr(mod, "o_proj", None))
        if None in (hd, n_kv, n_head) or qkv is None:
            return None
        found: Found = {id(qkv): ("qkv", _rows("transformers Phi3Attention", q=n_head * hd, k=n_kv * hd, v=n_kv * hd))}
        if o is not None:
            found[id(o)] = ("attn_out", None)
        return found
    if _is_transformers(mod, "Phi3MLP"):
        inter = _int(mod, "config", "intermediate_size")
        gate_up, down = _weight(getattr(mod, "gate_up_proj", None)), _weight(getattr(mod, "down_proj", None))
        if inter is None or gate_up is None:
            return None
        found = {id(gate_up): ("mlp", _rows("transformers Phi3MLP", gate=inter, up=inter))}
        if down is not None:
            found[id(down)] = ("mlp", None)
        return found
    return None


def _read_expert_tensors(mod: nn.Module) -> Optional[Found]:
    """transformers-5 experts: ``gate_up_proj (E, 2I, H)`` fused ``[gate | up]``, ``down_proj (E, H, I)``."""
    gate_up, down = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
    n_exp, inter = _int(mod, "num_experts"), _int(mod, "intermediate_dim")
    if not isinstance(gate_up, nn.Parameter) or gate_up.ndim != 3 or n_exp is None or inter is None:
        return None
    if getattr(mod, "is_transposed", False) or not getattr(mod, "is_concatenated", True) or not getattr(
        mod, "has_gate", True
    ):
        return None  # other storage conventions: left to a declaration
    source = f"{type(mod).__name__} (num_experts, intermediate_dim)"
    found: Found = {id(gate_up): ("mlp", Layout("rows", (("gate", inter), ("up", inter)), experts=True, source=source))}
    if isinstance(down, nn.Parameter) and down.ndim == 3:
        found[id(down)] = ("mlp", Layout("matrix", experts=True, source=source))
    return found


def _read_nanogpt(mod: nn.Module) -> Optional[Found]:
    c_attn, c_proj = getattr(mod, "c_attn", None), getattr(mod, "c_proj", None)
    n_embd = _int(mod, "n_embd")
    if not isinstance(c_attn, nn.Linear) or n_embd is None or c_attn.out_features != 3 * n_embd:
        return None
    found: Found = {id(c_attn.weight): ("qkv", _rows("nanoGPT c_attn (split(n_embd))", q=n_embd, k=n_embd, v=n_embd))}
    if isinstance(c_proj, nn.Linear):
        found[id(c_proj.weight)] = ("attn_out", None)
    return found


READERS = (
    _read_litgpt_attention,
    _read_multihead_attention,
    _read_hf_gpt2,
    _read_hf_bigcode,
    _read_hf_neox,
    _read_hf_phi3,
    _read_expert_tensors,
    _read_nanogpt,
)

# Names of fused weights whose blocks cannot be found without a layout (their parameter, or owning module).
FUSED_NAMES = frozenset(
    {"c_attn", "qkv", "qkv_proj", "query_key_value", "in_proj_weight", "in_proj", "Wqkv", "W_pack", "wqkv",
     "gate_up_proj", "w13", "fused_qkv", "qkv_linear", "c_fc_gate_up"}
)


def read_layouts(module: nn.Module) -> Found:
    """Roles and layouts of the parameters that the module's own classes and configs describe.

    Returns ``{id(parameter): (role, layout or None)}``; parameters of no recognised module are absent.
    """
    found: Found = {}
    for mod in module.modules():
        for reader in READERS:
            hit = reader(mod)
            if hit:
                for key, value in hit.items():
                    found.setdefault(key, value)
                break
    return found


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
