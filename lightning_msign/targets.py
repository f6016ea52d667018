"""Which weight matrices a callback acts on: presets, name patterns, and fused-QKV row blocks.

A *target* is a 2D view of a parameter: the whole weight, or one row block of a fused projection.
LitGPT stores an attention layer's query, key and value projections in one ``attn.qkv.weight`` whose
rows are ``[Q | K | V]`` of sizes ``n_head * head_size``, ``n_query_groups * head_size`` and
``n_query_groups * head_size`` (grouped-query aware); ``torch.nn.MultiheadAttention`` stores them in
``in_proj_weight`` as three equal blocks, as nanoGPT's ``c_attn`` does. With ``split_qkv=True`` each
block is its own target, named ``<parameter name>.q``, ``.k`` and ``.v`` (names that every
logger accepts as metric keys).

Presets (a ``targets`` string, or an element of a ``targets`` list):

``"attention"``
    Query, key, value and output projections of every attention layer.
``"qk"``
    Query and key projections only (needs ``split_qkv=True`` when they are fused).
``"mlp"``
    Every 2D weight of the feed-forward blocks (LitGPT ``mlp.*``, including mixture-of-experts
    experts and routers; ``gate_proj``/``up_proj``/``down_proj``, ``fc1``/``fc2`` elsewhere).
``"all_2d"``
    Every 2D weight except token embeddings and the LM head (norm weights and biases are 1D and never
    targets). To include those, add their names: ``["all_2d", "*lm_head.weight", "*wte.weight"]``.

Any other string is a glob pattern on target names, where ``*`` matches any run of characters, ``?``
one character and everything else (brackets included) is literal: ``"*.attn.proj.weight"``,
``"*.h.0.attn.qkv.weight.k"``. A pattern on a fused parameter's name selects all of its blocks.
Names are those of ``module.named_parameters()`` with ``torch.compile``'s ``_orig_mod.`` removed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

PRESETS: tuple[str, ...] = ("attention", "qk", "mlp", "all_2d")
TargetsArg = Union[str, Sequence[str]]

_ROLE_PRESETS: dict[str, frozenset[str]] = {
    "attention": frozenset({"q", "k", "v", "qkv", "attn_out"}),
    "qk": frozenset({"q", "k"}),
    "mlp": frozenset({"mlp"}),
}
_EXCLUDED_FROM_ALL_2D = frozenset({"embedding", "lm_head"})

_Q_NAMES = frozenset({"q_proj", "query", "wq", "q_lin"})
_K_NAMES = frozenset({"k_proj", "key", "wk", "k_lin"})
_V_NAMES = frozenset({"v_proj", "value", "wv", "v_lin"})
_ATTN_OUT_NAMES = frozenset({"o_proj", "out_proj", "wo", "out_lin"})
_MLP_NAMES = frozenset({"gate_proj", "up_proj", "down_proj", "fc1", "fc2", "w1", "w2", "w3"})
_MLP_PARENTS = frozenset({"mlp", "feed_forward", "ffn", "experts"})
_ATTN_PARENTS = ("attn", "attention", "self_attn")


@dataclass(frozen=True)
class TargetMatrix:
    """One matrix a callback acts on: a parameter, or a row block of it.

    Attributes:
        name: display and logging name, e.g. ``model.transformer.h.0.attn.qkv.weight.q``.
        param_name: name of the parameter (``torch.compile``'s ``_orig_mod.`` removed).
        param: the parameter itself.
        rows: ``(start, stop)`` row range inside the parameter, or ``None`` for all of it.
        role: ``"q"``, ``"k"``, ``"v"``, ``"qkv"`` (fused, unsplit), ``"attn_out"``, ``"mlp"``,
            ``"embedding"``, ``"lm_head"`` or ``"other"``.
    """

    name: str
    param_name: str
    param: nn.Parameter
    rows: tuple[int, int] | None
    role: str

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, columns)`` of the whole matrix (also for a sharded parameter)."""
        shape = tuple(self.param.shape)
        rows = shape[0] if self.rows is None else self.rows[1] - self.rows[0]
        return rows, math.prod(shape[1:])

    def matrix(self, data: Optional[Tensor] = None) -> Tensor:
        """The target as a 2D tensor sharing storage with the parameter (``param.data``) or with ``data``.

        Parameters with more than two dimensions are viewed as ``(shape[0], -1)``. Writing into the
        returned tensor (``copy_``) writes the weight. ``data`` is a tensor of the parameter's shape to
        take the view of instead (for instance a whole copy gathered from shards); a sharded parameter
        (``DTensor``) must be given one, its local shard is not the matrix.
        """
        if data is None:
            if is_sharded(self.param):
                raise ValueError(
                    f"Target {self.name!r} is a shard of a DTensor; pass the gathered whole parameter as `data`"
                )
            data = self.param.data
        if data.ndim > 2:
            data = data.view(data.shape[0], -1)
        if self.rows is not None:
            data = data[self.rows[0] : self.rows[1]]
        return data


def clean_name(name: str) -> str:
    """Drop ``torch.compile``'s ``_orig_mod`` segments from a parameter or module name."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def _glob_regex(pattern: str) -> re.Pattern[str]:
    escaped = re.escape(pattern).replace(r"\*", ".*").replace(r"\?", ".")
    return re.compile(f"^{escaped}$")


def _litgpt_qkv_sizes(attn: nn.Module) -> tuple[int, int, int] | None:
    """Row sizes (q, k, v) of a LitGPT ``CausalSelfAttention``'s fused ``qkv``, duck-typed on its config."""
    config = getattr(attn, "config", None)
    qkv = getattr(attn, "qkv", None)
    if config is None or not isinstance(getattr(qkv, "weight", None), Tensor):
        return None
    try:
        hs, n_head, n_groups = int(config.head_size), int(config.n_head), int(config.n_query_groups)
    except (AttributeError, TypeError):
        return None
    return n_head * hs, n_groups * hs, n_groups * hs


def _split(name: str, sizes: Sequence[int], total: int) -> list[tuple[str, tuple[int, int], str]]:
    if sum(sizes) != total:
        raise ValueError(
            f"Cannot split fused projection {name!r}: it has {total} rows but the model's config gives"
            f" q/k/v blocks of {tuple(sizes)} rows. Pass `split_qkv=False` to treat it as one matrix."
        )
    out, start = [], 0
    for tag, size in zip(("q", "k", "v"), sizes):
        out.append((f"{name}.{tag}", (start, start + size), tag))
        start += size
    return out


def catalog(module: nn.Module, split_qkv: bool = True) -> list[TargetMatrix]:
    """Every matrix-shaped (ndim >= 2) parameter of ``module``, with its role, fused blocks split.

    Args:
        module: any ``nn.Module`` (a LightningModule, a ``litgpt.GPT``, a compiled module ...).
        split_qkv: split fused query/key/value parameters into their row blocks.

    Returns:
        Targets in ``named_parameters()`` order.
    """
    roles: dict[int, str] = {}  # id(param) -> role
    fused: dict[int, tuple[int, int, int]] = {}  # id(param) -> q/k/v row sizes
    embedding_ids = set()
    for mod_name, mod in module.named_modules():
        local = clean_name(mod_name).rsplit(".", 1)[-1]
        path = clean_name(mod_name).split(".")
        if isinstance(mod, nn.Embedding):
            embedding_ids.add(id(mod.weight))
            roles[id(mod.weight)] = "embedding"
            continue
        sizes = _litgpt_qkv_sizes(mod)
        if sizes is not None:  # LitGPT CausalSelfAttention: fused qkv + proj
            roles[id(mod.qkv.weight)] = "qkv"
            fused[id(mod.qkv.weight)] = sizes
            proj = getattr(mod, "proj", None)
            if isinstance(getattr(proj, "weight", None), Tensor):
                roles[id(proj.weight)] = "attn_out"
            continue
        if isinstance(mod, nn.MultiheadAttention):
            if mod.in_proj_weight is not None:
                roles[id(mod.in_proj_weight)] = "qkv"
                e = mod.embed_dim
                fused[id(mod.in_proj_weight)] = (e, e, e)
            for tag, p in (("q", mod.q_proj_weight), ("k", mod.k_proj_weight), ("v", mod.v_proj_weight)):
                if p is not None:
                    roles[id(p)] = tag
            roles[id(mod.out_proj.weight)] = "attn_out"
            continue
        weight = getattr(mod, "weight", None)
        if not isinstance(weight, Tensor) or weight.ndim < 2 or id(weight) in roles:
            continue
        in_attn = any(p.startswith(_ATTN_PARENTS) or p.endswith(_ATTN_PARENTS) for p in path[:-1])
        if local in _Q_NAMES:
            roles[id(weight)] = "q"
        elif local in _K_NAMES:
            roles[id(weight)] = "k"
        elif local in _V_NAMES:
            roles[id(weight)] = "v"
        elif local in _ATTN_OUT_NAMES or (in_attn and local in ("proj", "c_proj", "dense", "o")):
            roles[id(weight)] = "attn_out"
        elif local == "c_attn" and weight.shape[0] % 3 == 0 and isinstance(mod, nn.Linear):
            roles[id(weight)] = "qkv"  # nanoGPT: Linear(C, 3C), rows [q | k | v]
            third = weight.shape[0] // 3
            fused[id(weight)] = (third, third, third)
        elif local in ("lm_head", "output", "embed_out") or id(weight) in embedding_ids:
            roles[id(weight)] = "lm_head"
        elif local in _MLP_NAMES or any(p in _MLP_PARENTS for p in path[:-1]):
            roles[id(weight)] = "mlp"

    out: list[TargetMatrix] = []
    seen: set[int] = set()
    for raw_name, p in module.named_parameters():
        if p.ndim < 2 or id(p) in seen:  # tied weights are listed once
            continue
        seen.add(id(p))
        name = clean_name(raw_name)
        role = roles.get(id(p), "other")
        if role == "other" and id(p) in embedding_ids:
            role = "embedding"
        if role == "qkv" and split_qkv:
            for block_name, rows, tag in _split(name, fused[id(p)], p.shape[0]):
                out.append(TargetMatrix(block_name, name, p, rows, tag))
        else:
            out.append(TargetMatrix(name, name, p, None, role))
    return out


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


def resolve_targets(module: nn.Module, targets: TargetsArg, split_qkv: bool = True) -> list[TargetMatrix]:
    """The targets of ``module`` selected by presets and/or glob patterns (union, model order).

    Args:
        module: the model (any ``nn.Module``).
        targets: a preset name, a glob pattern, or a list mixing both (see the module docstring).
        split_qkv: act on Q, K and V blocks of fused projections separately.

    Raises:
        ValueError: bad ``targets``, or a selection that matches no matrix; the message lists the
            matrix-shaped parameters that exist.
    """
    items = validate_targets(targets, split_qkv)
    entries = catalog(module, split_qkv=split_qkv)
    selected: list[TargetMatrix] = []
    unmatched: list[str] = []
    for item in items:
        if item in _ROLE_PRESETS:
            hits = [t for t in entries if t.role in _ROLE_PRESETS[item]]
        elif item == "all_2d":
            hits = [t for t in entries if t.param.ndim == 2 and t.role not in _EXCLUDED_FROM_ALL_2D]
        else:
            rx = _glob_regex(item)
            hits = [t for t in entries if rx.match(t.name) or rx.match(t.param_name)]
        if not hits:
            unmatched.append(item)
        selected.extend(hits)
    if unmatched:
        names = sorted({t.param_name for t in entries})
        raise ValueError(
            f"`targets` entries {unmatched} match no matrix of {type(module).__name__}. Presets: {PRESETS};"
            f" matrix-shaped parameters: {names}"
        )
    unique: dict[str, TargetMatrix] = {}
    for t in selected:
        unique.setdefault(t.name, t)
    order = {t.name: i for i, t in enumerate(entries)}
    return sorted(unique.values(), key=lambda t: order[t.name])


def is_sharded(param: torch.Tensor) -> bool:
    """True for a parameter that holds only a shard of the logical weight (DTensor / FSDP flat param)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - very old torch
        DTensor = ()  # type: ignore[assignment]
    return isinstance(param, DTensor) or isinstance(getattr(param, "data", None), DTensor)
