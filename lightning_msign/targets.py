"""Which weight matrices a guard acts on: presets, name patterns, and the blocks of fused weights.

A *target* is one matrix: a 2D parameter, or a block of a fused one cut by its
:class:`~lightning_msign.layouts.Layout` (read from the module that owns it, or declared by the user;
never guessed from the shape). Blocks are named ``<parameter name>.<tag>`` (``.e<i>.<tag>`` inside a
3D expert tensor), names that every logger accepts as metric keys.

Presets (a ``targets`` string, or an element of a ``targets`` list):

The presets select by *role*, and a role is what a model family reads from the module that owns the weight
(:mod:`lightning_msign.families`: its class and config), never a name alone: ``q_proj`` in a module no family
recognises is a plain matrix (``"other"``, in ``"all_2d"`` and reachable by pattern). Structure alone gives two
roles in any model: ``nn.Embedding`` weights are embeddings, and ``get_output_embeddings()`` is the LM head.

``"attention"``
    Query, key, value and output projections of every attention layer.
``"qk"``
    Query and key projections only (needs ``split_qkv=True`` when they are fused).
``"mlp"``
    Every matrix of the feed-forward blocks, mixture-of-experts experts included (each expert its own
    matrix, fused ``[gate | up]`` split); not the router.
``"all_2d"``
    Every matrix except token embeddings and the LM head: 2D weights and the matrices of 3D expert
    tensors (norm weights and biases are 1D and never targets; the kernels of ``torch.nn`` convolutions are not 2D
    and are targets only when declared, ``layouts={"<name>": "flatten"}``). To
    include embeddings and head, add their names: ``["all_2d", "*lm_head.weight", "*wte.weight"]``.

Any other string is a glob pattern on target names, where ``*`` matches any run of characters, ``?``
one character and everything else (brackets included) is literal: ``"*.attn.proj.weight"``,
``"*.h.0.attn.qkv.weight.k"``. A pattern on a fused parameter's name selects all of its blocks. Names
are those of ``module.named_parameters()`` of the unwrapped module (``torch.compile``'s ``_orig_mod``,
Fabric's ``_forward_module`` and DDP's ``module`` wrappers removed).

A selection that may include a parameter which looks fused (its name, e.g. ``qkv``, ``c_attn``,
``query_key_value``, or more than two dimensions: a suspicion used only to refuse) but whose layout no family
reads raises, naming the parameter and the kinds of declaration; a preset that finds fewer matrices than the
model's attention layers imply warns, naming what it missed.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Optional, Union

import torch
from torch import Tensor, nn

from lightning_msign.distributed import is_sharded
from lightning_msign.fsdp1 import FSDP1Units
from lightning_msign.layouts import (
    LAYOUT_HELP,
    TAG_ROLES,
    Layout,
    as_matrix,
    block_view,
    looks_fused,
    read_layouts,
    validate_layouts,
)

PRESETS: tuple[str, ...] = ("attention", "qk", "mlp", "all_2d")
TargetsArg = Union[str, Sequence[str]]
LayoutsArg = Optional[dict[str, str]]

_ROLE_PRESETS: dict[str, frozenset[str]] = {
    "attention": frozenset({"q", "k", "v", "qkv", "attn_out"}),
    "qk": frozenset({"q", "k"}),
    "mlp": frozenset({"mlp"}),
}
_EXCLUDED_FROM_ALL_2D = frozenset({"embedding", "lm_head"})



@dataclass(frozen=True)
class TargetMatrix:
    """One matrix a guard acts on: a parameter, or a block of a fused one.

    Attributes:
        name: display and logging name, e.g. ``model.transformer.h.0.attn.qkv.weight.q``.
        param_name: name of the parameter in the unwrapped module.
        param: the parameter itself.
        role: ``"q"``, ``"k"``, ``"v"``, ``"qkv"`` (fused, treated as one), ``"attn_out"``, ``"mlp"``,
            ``"router"``, ``"embedding"``, ``"lm_head"``, ``"adapter"`` (a LoRA ``lora_A`` / ``lora_B``) or
            ``"other"``.
        layout: how the parameter splits (``None``: it is one 2D matrix).
        expert: index along the first dimension of a 3D expert tensor, else ``None``.
        offset, size: the block's place along the layout's axis (within one head for interleaved layouts).
        adapted: the name of the adapter layer (peft LoRA) whose frozen base weight this is, or whose adapter
            matrix (role ``"adapter"``) this is; ``None`` outside adapter layers.
    """

    name: str
    param_name: str
    param: nn.Parameter
    role: str
    layout: Optional[Layout] = None
    expert: Optional[int] = None
    offset: int = 0
    size: int = 0
    adapted: Optional[str] = None

    @cached_property
    def param_shape(self) -> tuple[int, ...]:
        """The whole parameter's shape (also for a sharded one; under FSDP1 read while its unit is gathered)."""
        return tuple(int(s) for s in self.param.shape)

    @cached_property
    def shape(self) -> tuple[int, int]:
        """``(rows, columns)`` of the matrix (also for a sharded parameter)."""
        rows, cols = self.matrix(torch.empty(self.param_shape, device="meta")).shape
        return int(rows), int(cols)

    def _data(self, data: Optional[Tensor]) -> Tensor:
        if data is None:
            if is_sharded(self.param):
                raise ValueError(
                    f"Target {self.name!r} is a shard of a DTensor; pass the gathered whole parameter as `data`"
                )
            data = self.param.data
        return data

    def view(self, data: Optional[Tensor] = None) -> Tensor:
        """The target inside ``data`` (default: the parameter's own data) as a view sharing its storage."""
        data = self._data(data)
        if self.layout is None:
            return data
        return block_view(self.layout, data, self.expert, self.offset, self.size)

    def matrix(self, data: Optional[Tensor] = None) -> Tensor:
        """The target as a 2D tensor: a view where the layout allows, else a copy (interleaved heads).

        ``data`` is a tensor of the parameter's shape to read from instead of the parameter (a whole copy
        gathered from shards); a sharded parameter (``DTensor``) must be given one. Write with :meth:`write`.
        """
        view = self.view(data)
        return view if self.layout is None else as_matrix(view, self.layout)

    def write(self, value: Tensor, data: Optional[Tensor] = None) -> None:
        """Write the 2D ``value`` (the shape of :meth:`matrix`) into the target inside ``data`` (or the parameter)."""
        view = self.view(data)
        view.copy_(value.reshape(view.shape) if value.shape != view.shape else value)


_WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def clean_name(name: str) -> str:
    """Drop wrapper segments (``torch.compile``'s ``_orig_mod``, FSDP1's and activation checkpointing's) from a name."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def unwrap_module(module: nn.Module) -> nn.Module:
    """The user's module inside Fabric's ``_FabricModule``, ``torch.compile``'s ``OptimizedModule``, DDP, FSDP1.

    Parameters are the same objects, so what a guard writes reaches the wrapped model; names lose the
    wrappers' prefixes (``_forward_module.``, ``_orig_mod.``, ``module.``, ``_fsdp_wrapped_module.``).
    """
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    from lightning_msign.fsdp1 import fsdp_class

    fsdp = fsdp_class()

    while True:
        original = getattr(module, "_original_module", None)
        if type(module).__name__ == "_FabricModule" and isinstance(original, nn.Module):
            module = original
        elif isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
            module = module._orig_mod
        elif isinstance(module, (DistributedDataParallel, DataParallel)) or (
            fsdp is not None and isinstance(module, fsdp)
        ):
            module = module.module
        else:
            return module


def _glob_regex(pattern: str) -> re.Pattern[str]:
    escaped = re.escape(pattern).replace(r"\*", ".*").replace(r"\?", ".")
    return re.compile(f"^{escaped}$")


def _structural_roles(module: nn.Module) -> dict[int, str]:
    """Roles told by the module's structure alone, for any model: the weights of ``nn.Embedding`` modules
    (``"embedding"``, tied LM heads included) and what a model's ``get_output_embeddings()`` returns (``"lm_head"``,
    Hugging Face). Every other role comes from a model family (:mod:`lightning_msign.families`), never from a name."""
    roles: dict[int, str] = {}
    for mod in module.modules():
        if isinstance(mod, nn.Embedding):
            roles[id(mod.weight)] = "embedding"
    for mod in module.modules():
        get = getattr(mod, "get_output_embeddings", None)
        if not callable(get):
            continue
        try:
            head = get()
        except (AttributeError, NotImplementedError, TypeError):  # a base model or a wrapper without a head
            continue
        weight = getattr(head, "weight", None)
        if isinstance(weight, Tensor) and weight.ndim == 2:
            roles.setdefault(id(weight), "lm_head")
    return roles


def adapter_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The adapter layers of ``module`` (peft's ``BaseTunerLayer``: LoRA and its kin), with their cleaned names.

    Read from the classes peft has loaded (no import of peft: a model without it has none).
    """
    import sys

    tuner = getattr(sys.modules.get("peft.tuners.tuners_utils"), "BaseTunerLayer", None)
    if tuner is None:
        return []
    return [(clean_name(n), m) for n, m in module.named_modules() if isinstance(m, tuner)]


def _adapter_output_layout(base: Optional[Layout]) -> Optional[Layout]:
    """The layout of a LoRA ``lora_B`` weight ``(out, r)`` over the output features of a fused base weight: its rows
    hold the base's output blocks (the base's rows, or a ``Conv1D``'s columns)."""
    if base is None or not base.blocks or base.experts:
        return None
    kind = {"rows": "rows", "cols": "rows", "heads": "heads", "colheads": "heads"}[base.kind]
    return Layout(kind, base.blocks, heads=base.heads, source=f"lora_B over the base's {base.source or base.kind}")


@dataclass(frozen=True)
class _Undetermined:
    """A parameter that looks fused but whose layout is unknown: selecting it is an error."""

    name: str
    param: nn.Parameter
    role: str
    owner: str
    shape: tuple[int, ...] = ()


def target_catalog(
    module: nn.Module, split_qkv: bool, layouts: dict[str, Layout]
) -> tuple[list[TargetMatrix], list[_Undetermined]]:
    module = unwrap_module(module)
    read = read_layouts(module)
    roles = _structural_roles(module)
    owners = {id(p): type(m).__name__ for m in module.modules() for p in m.parameters(recurse=False)}
    kernels = {id(m.weight) for m in module.modules()  # a torch convolution's kernel: known, and no matrix
               if isinstance(m, nn.modules.conv._ConvNd) and isinstance(getattr(m, "weight", None), Tensor)}
    declared = [(_glob_regex(pattern), pattern, layout) for pattern, layout in layouts.items()]
    out: list[TargetMatrix] = []
    undetermined: list[_Undetermined] = []
    seen: set[int] = set()
    adapted: dict[int, str] = {}  # id(param) -> its adapter layer: the frozen base weight and the adapter matrices
    for layer_name, layer in adapter_layers(module):
        base = layer.get_base_layer()
        base_weight = getattr(base, "weight", None)
        for p in layer.parameters():
            adapted[id(p)] = layer_name
            if p is not base_weight and all(p is not q for q in base.parameters()):
                role_b = read.get(id(base_weight), ("other", None))[1] if isinstance(base_weight, Tensor) else None
                is_b = any(p is w for d in (getattr(layer, "lora_B", {}) or {}).values() for w in d.parameters())
                read[id(p)] = ("adapter", _adapter_output_layout(role_b) if is_b else None)
    for raw_name, p in module.named_parameters():
        if p.ndim < 2 or id(p) in seen or raw_name.endswith("bias"):  # tied weights are listed once; biases
            continue  # are never matrices, 2D stacks of expert biases (E, out) included
        seen.add(id(p))
        name = clean_name(raw_name)
        role, layout = read.get(id(p), (roles.get(id(p), "other"), None))
        if roles.get(id(p)) == "embedding":  # a head tied to the embedding is the embedding
            role = "embedding"
        for rx, pattern, declared_layout in declared:
            if rx.match(name):
                layout = declared_layout
                break
        if layout is not None and layout.experts and role == "other":
            role = "mlp"  # declared a stack of experts' matrices (or read as one): 'mlp' selects them
        if layout is not None:
            layout.check(tuple(p.shape), name)
        elif id(p) in kernels:  # not a target unless declared ('flatten'): a kernel holds no fused matrices
            continue
        elif p.ndim > 2 and role == "embedding":  # learned tokens or positions (1, n, hidden): no matrices
            continue
        elif looks_fused(name, p) and role not in ("embedding", "lm_head"):
            undetermined.append(_Undetermined(name, p, role, owners.get(id(p), "?"), tuple(p.shape)))
            continue
        if layout is not None and role == "qkv" and not split_qkv and layout.blocks and not layout.experts:
            layout = Layout("matrix", source="split_qkv=False")
        out.extend(expand_targets(name, p, role, layout, adapted.get(id(p))))
    return out, undetermined


def _gathered_catalog(
    module: nn.Module, split_qkv: bool, layouts: dict[str, Layout], units: Optional[FSDP1Units]
) -> tuple[list[TargetMatrix], list[_Undetermined], dict[str, tuple[nn.Module, set[int]]]]:
    """:func:`target_catalog` of a model whose parameters may be FSDP1 slices: one pass per gathered unit.

    Outside a gather an FSDP1-managed parameter is a 1-D slice, which the catalog skips; so each unit is
    gathered alone (read-only) and the pass keeps what it newly finds, with shapes read while gathered. Also
    returns the attention layers seen whole: ``{name: (module, ids of its matrix parameters)}``.
    """
    if units is None:
        entries, undetermined = target_catalog(module, split_qkv, layouts)
        return entries, undetermined, {n: (m, ids) for n, m, ids in _attention_modules(unwrap_module(module))}
    found: dict[str, TargetMatrix] = {}
    blocked: dict[str, _Undetermined] = {}
    attention: dict[str, tuple[nn.Module, set[int]]] = {}
    for index in range(len(units.units)):
        with units.summon(index, writeback=False):
            entries, undetermined = target_catalog(module, split_qkv, layouts)
            for t in entries:
                if t.name not in found:
                    t.param_shape, t.shape  # noqa: B018 - read (and cache) the whole shapes while gathered
                    found[t.name] = t
            for u in undetermined:
                blocked.setdefault(u.name, u)
            for name, mod, ids in _attention_modules(unwrap_module(module)):
                attention.setdefault(name, (mod, set()))[1].update(ids)
    order = {clean_name(n): i for i, (n, _) in enumerate(unwrap_module(module).named_parameters())}
    ordered = sorted(found.values(), key=lambda t: order.get(t.param_name, len(order)))
    return ordered, list(blocked.values()), attention


def expand_targets(name: str, p: nn.Parameter, role: str, layout: Optional[Layout],
            adapted: Optional[str] = None) -> list[TargetMatrix]:
    if layout is None or (layout.kind == "matrix" and not layout.experts):
        return [TargetMatrix(name, name, p, role, layout, adapted=adapted)]
    experts = range(p.shape[0]) if layout.experts else [None]
    out = []
    for e in experts:
        prefix = name if e is None else f"{name}.e{e}"
        if not layout.blocks:
            out.append(TargetMatrix(prefix, name, p, role, layout, expert=e, adapted=adapted))
            continue
        offset = 0
        for tag, size in layout.blocks:
            tag_role = role if role == "adapter" else TAG_ROLES.get(tag, role)
            out.append(TargetMatrix(f"{prefix}.{tag}", name, p, tag_role, layout, e, offset, size, adapted))
            offset += size
    return out


def catalog(module: nn.Module, split_qkv: bool = True, layouts: LayoutsArg = None) -> list[TargetMatrix]:
    """Every matrix of ``module`` whose layout is known, with its role, fused weights split.

    Args:
        module: any ``nn.Module`` (a LightningModule, a ``litgpt.GPT``, a Hugging Face model, a wrapped
            or compiled module ...).
        split_qkv: split fused query/key/value parameters into their blocks.
        layouts: declared layouts, ``{glob on parameter names: layout string}``; they override read ones.

    Returns:
        Targets in ``named_parameters()`` order. Parameters that look fused but have no known layout
        are left out (:func:`resolve_targets` raises when a selection includes one).
    """
    return target_catalog(module, split_qkv, validate_layouts(layouts))[0]


def _normalize_targets(targets: TargetsArg, argument: str = "targets") -> list[str]:
    items = [targets] if isinstance(targets, str) else list(targets) if isinstance(targets, Iterable) else None
    if not items or not all(isinstance(t, str) and t for t in items):
        raise ValueError(
            f"`{argument}` must be a preset {PRESETS}, a glob pattern on parameter names, or a non-empty list of"
            f" those, got {targets!r}"
        )
    return items


def validate_targets(targets: TargetsArg, split_qkv: bool = True, argument: str = "targets") -> list[str]:
    """Check a ``targets`` argument at construction time; returns it as a list of strings.

    Raises:
        ValueError: empty or non-string entries; a bare word that is no preset (a misspelt preset
            such as ``"attn"``: patterns contain ``.``, ``*`` or ``?``); ``"qk"`` with ``split_qkv=False``.
    """
    items = _normalize_targets(targets, argument)
    for item in items:
        if item not in PRESETS and re.fullmatch(r"[A-Za-z0-9_]+", item):
            raise ValueError(
                f"`{argument}` entry {item!r} is not a preset {PRESETS}; a pattern on parameter names contains"
                f" '.', '*' or '?' (e.g. '*.attn.proj.weight' or 'weight*'), got {targets!r}"
            )
    if "qk" in items and not split_qkv:
        raise ValueError(
            f"`{argument}` preset 'qk' selects the query and key blocks of fused projections and needs"
            f" `split_qkv=True`, got split_qkv={split_qkv!r}"
        )
    return items


def _selects(item: str, role: str, name: str, ndim_ok: bool) -> bool:
    if item in _ROLE_PRESETS:
        return role in _ROLE_PRESETS[item]
    if item == "all_2d":
        return ndim_ok and role not in _EXCLUDED_FROM_ALL_2D
    rx = _glob_regex(item)
    return bool(rx.match(name))


def resolve_targets(
    module: nn.Module,
    targets: TargetsArg,
    split_qkv: bool = True,
    layouts: LayoutsArg = None,
    units: Optional[FSDP1Units] = None,
) -> list[TargetMatrix]:
    """The targets of ``module`` selected by presets and/or glob patterns (union, model order).

    Args:
        module: the model (any ``nn.Module``).
        targets: a preset name, a glob pattern, or a list mixing both (see the module docstring).
        split_qkv: act on Q, K and V blocks of fused projections separately.
        layouts: declared layouts of fused parameters the readers do not know
            (``{glob on parameter names: layout string}``, see :mod:`lightning_msign.layouts`).
        units: the FSDP1 units of the model (:class:`~lightning_msign.fsdp1.FSDP1Units`) when it is sharded
            by FSDP1: each unit is gathered in turn (a collective, on every process) to read whole shapes.

    Raises:
        ValueError: bad ``targets`` or ``layouts``; a declared layout that does not fit its parameter;
            a selection that matches no matrix (the message lists the matrix-shaped parameters); a
            selection that includes a fused-looking parameter whose layout is unknown (the message names
            it and how to declare its layout).
    """
    items = validate_targets(targets, split_qkv)
    entries, undetermined, attention = _gathered_catalog(module, split_qkv, validate_layouts(layouts), units)
    selected: list[TargetMatrix] = []
    unmatched: list[str] = []
    for item in items:
        hits = [t for t in entries if any(_selects(item, t.role, name, True) for name in (t.name, t.param_name))]
        blocked = [u for u in undetermined if _may_select(item, u)]
        if blocked:
            u = blocked[0]
            raise ValueError(
                f"`targets` entry {item!r} selects parameter {u.name!r} of {u.owner} (shape {u.shape}),"
                f" which looks like a fused weight whose layout cannot be read from the model; signing or measuring"
                f" it as one matrix would be wrong; {declaration_hint(u.name, u.shape)}"
                + LAYOUT_HELP
                + (f". Also undetermined: {[b.name for b in blocked[1:4]]}" if len(blocked) > 1 else "")
            )
        adapted = [t for t in hits if t.adapted is not None] if item in PRESETS else []
        if adapted:
            t = adapted[0]
            what = "an adapter matrix" if t.role == "adapter" else "the frozen base weight"
            raise ValueError(
                f"`targets` preset {item!r} selects {t.name!r}, {what} of the adapter layer {t.adapted!r} (peft)."
                " The layer computes W + s * B @ A: signing, smoothing or measuring W alone would ignore the trainable"
                " adapters (the weights save_pretrained keeps), and acting on A or B alone is not acting on the"
                " effective weight. Merge the adapters first (`merge_and_unload()`), or select matrices by glob"
                " pattern on purpose (e.g. '*.lora_B.*')"
            )
        if not hits:
            unmatched.append(item)
        selected.extend(hits)
    if unmatched:
        names = sorted({t.param_name for t in entries})
        unread = (
            f"; parameters that look fused and whose layout no model family reads (not cut, so not selectable):"
            f" {[u.name for u in undetermined]}: {declaration_hint(undetermined[0].name, undetermined[0].shape)}"
            + LAYOUT_HELP
            if undetermined else ""
        )
        raise ValueError(
            f"`targets` entries {unmatched} match no matrix of {type(unwrap_module(module)).__name__}. Presets:"
            f" {PRESETS} select by the roles a model family reads (lightning_msign.families): where no registered"
            " family recognises the modules, register one (a few lines: `register_family`) or select the matrices"
            f" by glob pattern; matrix-shaped parameters: {names}{unread}"
        )
    unique: dict[str, TargetMatrix] = {}
    for t in selected:
        unique.setdefault(t.name, t)
    order = {t.name: i for i, t in enumerate(entries)}
    result = sorted(unique.values(), key=lambda t: order[t.name])
    _warn_missing_attention(attention, items, result)
    return result


def _may_select(item: str, u: _Undetermined) -> bool:
    """Whether ``item`` could mean the unread fused-looking parameter ``u`` (selecting it is then an error)."""
    if u.role != "other":  # a family said what it is, not how it splits
        return _selects(item, "q" if u.role == "qkv" else u.role, u.name, True)  # fused Q/K/V holds the 'qk' blocks
    if item in ("attention", "qk"):  # no family read it: a fused 2-D weight may be an attention's Q/K/V
        return len(u.shape) == 2
    if item == "mlp":  # ... and a stack of more than two dimensions a mixture of experts
        return len(u.shape) > 2
    return _selects(item, u.role, u.name, True)


def declaration_hint(name: str, shape: tuple[int, ...]) -> str:
    """How to declare the layout of an unread fused parameter: ``layouts={name: ...}`` and the kinds to choose from.

    No concrete example of a 2-D cut is given: contiguous blocks, blocks interleaved per head or per key group are
    all in use (a rows example copied for an interleaved weight gives wrong math that looks right); the kind is read
    from the model's forward, which splits the weight's output.
    """
    if len(shape) > 2:
        kinds = "'experts/<layout of one expert>' when each [e] is an expert's matrix, 'flatten' for a kernel"
    else:
        kinds = ("'rows:...' / 'cols:...' (contiguous blocks), 'heads:<n>:...' / 'colheads:<n>:...' (interleaved per"
                 " head or per key group), or 'matrix' (one matrix on purpose)")
    return (f"declare it as layouts={{{name!r}: '<layout>'}}, the kind read from how the model's forward splits it:"
            f" {kinds}; ")


def _attention_modules(module: nn.Module) -> list[tuple[str, nn.Module, set[int]]]:
    """Outermost attention layers (class name ending in ``Attention``, or ``MultiheadAttention``) with matrices.

    Returns ``(name, module, ids of its parameters with two or more dimensions)``.
    """
    found: list[tuple[str, nn.Module, set[int]]] = []
    for raw, mod in module.named_modules():
        cls = type(mod).__name__
        if not (cls.endswith("Attention") or isinstance(mod, nn.MultiheadAttention)):
            continue
        name = clean_name(raw)
        if any(name.startswith(prefix + ".") for prefix, _, _ in found):
            continue
        matrices = {id(p) for p in mod.parameters() if p.ndim >= 2}
        if matrices:
            found.append((name, mod, matrices))
    return found


def _warn_missing_attention(
    attention: dict[str, tuple[nn.Module, set[int]]], items: list[str], selected: list[TargetMatrix]
) -> None:
    wanted = {"attention": {"q", "k", "v", "attn_out"}, "qk": {"q", "k"}}
    for preset, roles in wanted.items():
        if preset not in items:
            continue
        by_param: dict[int, set[str]] = {}
        for t in selected:
            if t.role == "qkv":
                got = {"q", "k", "v"}
            elif t.role in _ROLE_PRESETS["attention"]:
                got = {t.role}
            else:  # chosen by a pattern: the user has taken charge of it
                got = roles
            by_param.setdefault(id(t.param), set()).update(got)
        missing = []
        for name, (attn, _) in attention.items():
            have: set[str] = set()
            for p in attn.parameters():
                have |= by_param.get(id(p), set())
            lacking = sorted(roles - have)
            if lacking:
                missing.append(f"{name or '<root>'} ({type(attn).__name__}: no {', '.join(lacking)})")
        if missing:
            warnings.warn(
                f"targets preset {preset!r} found {len(selected)} matrices, but {len(missing)} attention layers lack"
                f" some of theirs: {missing[:4]}{' ...' if len(missing) > 4 else ''}. No registered model family says"
                " what their projections are: register one (lightning_msign.families.register_family), select them"
                " with glob patterns, or declare the layout of a fused weight with `layouts` (see"
                " lightning_msign.layouts).",
                UserWarning,
                stacklevel=3,
            )
