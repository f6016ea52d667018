"""What a model family is to the suite, and the registry every part of it asks.

A :class:`Family` says, for the modules it recognises (by class, read from the module and its config, never from a
parameter's name alone):

- :meth:`Family.read`: the role of each matrix parameter the module owns (``"q"``, ``"k"``, ``"v"``, ``"qkv"``,
  ``"attn_out"``, ``"mlp"``, ``"router"``, ``"embedding"``, ``"lm_head"``) and, for a fused or stacked weight, its
  :class:`~lightning_msign.layouts.Layout`;
- :meth:`Family.attention_probe`: how to rebuild an attention module's queries and keys (attention logits);
- :meth:`Family.block`: a block's output projections and the structure of its output (architecture warm-up);
- :meth:`Family.stack` and :meth:`Family.block_attentions`: where an encoder's or a decoder's blocks are and which
  attention modules' logits count for a block (self- and cross-attention), for the attention logits of models that
  are not decoder-only.

The catalog of targets, the presets, the warm-up, the diagnostics, Muon's parameter groups and the error messages
all ask the registry (:func:`read_model`, :func:`attention_probe`, :func:`block_info`); no other module holds a
family's names. A user's family is registered the same way (:func:`register_family`); it is asked before the
built-in ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

from torch import Tensor, nn

from lightning_msign.layouts import Layout

if TYPE_CHECKING:
    from lightning_msign.models.base import AttentionProbe

Found = dict[int, tuple[str, Optional[Layout]]]
"""What :meth:`Family.read` returns: ``{id(parameter): (role, layout or None)}``."""

ROLES: tuple[str, ...] = ("q", "k", "v", "qkv", "attn_out", "mlp", "router", "embedding", "lm_head", "other")
"""The roles a family can give a parameter (``"other"``: a plain matrix of no known role)."""

TENSOR = "tensor"
"""A block returning its hidden state (LitGPT, nanoGPT, HF Llama family in transformers 4.57)."""
HF_TUPLE = "hf_tuple"
"""A block returning ``(hidden, [self-attention weights, [cross-attention weights]])`` (HF GPT-2 in 4.57)."""


@dataclass(frozen=True)
class BlockInfo:
    """What the architecture warm-up needs of a block.

    Attributes:
        output_projections: names, relative to the block, of the modules writing into the residual stream.
        output: how its forward returns the hidden state (:data:`TENSOR` or :data:`HF_TUPLE`).
    """

    output_projections: tuple[str, ...]
    output: str = TENSOR


class Family:
    """One model family: override what applies and register an instance with :func:`register_family`.

    Every method is called on each submodule of a model and returns ``None`` for a module that is not the family's.
    A family recognises its modules by class (:func:`qualified_name`, :func:`is_transformers`) and reads their
    sizes from the module or its config; a parameter's name counts only inside a module it recognised.

    Attributes:
        name: shown in messages.
        attention_classes: the attention classes whose logits :meth:`attention_probe` rebuilds (for messages).
        qk_norm_classes: the attention classes :meth:`install_qk_norm` retrofits qk-norm into (for messages).
        model, splits, read_from: its row of README's table of families (:func:`readme_table`): the models, their
            roles and how their fused weights split, and what that is read from.
    """

    name: ClassVar[str] = ""
    attention_classes: ClassVar[tuple[str, ...]] = ()
    qk_norm_classes: ClassVar[tuple[str, ...]] = ()
    model: ClassVar[str] = ""
    splits: ClassVar[str] = ""
    read_from: ClassVar[str] = ""

    def read(self, module: nn.Module) -> Optional[Found]:
        """Roles and layouts of the parameters ``module`` owns, if it is one of the family's modules."""
        return None

    def attention_probe(self, attn: nn.Module, keep: bool = False) -> Optional[AttentionProbe]:
        """An :class:`~lightning_msign.models.AttentionProbe` for ``attn``, if it is one of the family's attentions."""
        return None

    def block(self, block: nn.Module) -> Optional[BlockInfo]:
        """The warm-up's view of ``block``, if it is one of the family's blocks."""
        return None

    def stack(self, module: nn.Module) -> Optional[nn.ModuleList]:
        """The blocks of ``module``, if it is one of the family's stacks of blocks (an encoder, a decoder)."""
        return None

    def block_attentions(self, block: nn.Module) -> Optional[tuple[nn.Module, ...]]:
        """The attention modules whose logits count for ``block`` (its self-attention, then a decoder block's
        cross-attention), if it is one of the family's blocks."""
        return None

    def install_qk_norm(self, attn: nn.Module) -> Optional[tuple[nn.Module, nn.Module]]:
        """Give the attention ``attn`` a query and a key norm that are the identity until switched on
        (:class:`~lightning_msign.families.qk_norm.SwitchedNorm`, where the family's own qk-norm would sit) and
        return them; the same two on a second call. ``None``: the family has no such retrofit for ``attn``.
        Raises ``ValueError`` for an attention that normalises q and k already."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


_REGISTRY: list[Family] = []


def register_family(family: Family, first: bool = True) -> Family:
    """Add ``family`` to the registry: asked before the families registered earlier (``first``, the default: a
    user's family overrides a built-in one for the modules both recognise) or after them. Returns it.

    Raises:
        TypeError: ``family`` is not a :class:`Family` instance.
    """
    if not isinstance(family, Family):
        raise TypeError(f"`family` must be an instance of lightning_msign.families.Family, got {family!r}")
    if family in _REGISTRY:
        _REGISTRY.remove(family)
    _REGISTRY.insert(0, family) if first else _REGISTRY.append(family)
    return family


def unregister_family(family: Family) -> None:
    """Remove a family added with :func:`register_family`.

    Raises:
        ValueError: it is not registered.
    """
    if family not in _REGISTRY:
        raise ValueError(f"`family` {family!r} is not registered; registered: {_REGISTRY}")
    _REGISTRY.remove(family)


def registered_families() -> tuple[Family, ...]:
    """The registered families, in the order they are asked."""
    return tuple(_REGISTRY)


def read_model(module: nn.Module) -> Found:
    """Roles and layouts of every parameter of ``module`` that a registered family describes.

    Each submodule is read by the first family that recognises it; a parameter keeps the first reading (an outer
    module's, when both an outer and an inner module describe it). Parameters no family describes are absent.
    """
    found: Found = {}
    for mod in module.modules():
        for family in _REGISTRY:
            hit = family.read(mod)
            if hit:
                for key, value in hit.items():
                    found.setdefault(key, value)
                break
    return found


def attention_probe(attn: Optional[nn.Module], keep: bool = False) -> Optional[AttentionProbe]:
    """A probe for ``attn`` from the first family that has one, else ``None``."""
    if attn is None:
        return None
    for family in _REGISTRY:
        probe = family.attention_probe(attn, keep=keep)
        if probe is not None:
            return probe
    return None


def supported_attention() -> tuple[str, ...]:
    """The attention classes whose logits a registered family rebuilds."""
    return tuple(c for family in _REGISTRY for c in family.attention_classes)


def install_qk_norm(attn: nn.Module) -> Optional[tuple[nn.Module, nn.Module]]:
    """The dormant query and key norms the first family that can retrofit qk-norm into ``attn`` installs (see
    :meth:`Family.install_qk_norm`), else ``None``."""
    for family in _REGISTRY:
        found = family.install_qk_norm(attn)
        if found is not None:
            return found
    return None


def qk_norm_classes() -> tuple[str, ...]:
    """The attention classes a registered family can retrofit qk-norm into."""
    return tuple(c for family in _REGISTRY for c in family.qk_norm_classes)


def block_info(block: nn.Module) -> Optional[BlockInfo]:
    """The warm-up's view of ``block`` from the first family that recognises it, else ``None``."""
    for family in _REGISTRY:
        info = family.block(block)
        if info is not None:
            return info
    return None


def block_stack(module: nn.Module) -> Optional[nn.ModuleList]:
    """The blocks of ``module`` from the first family that says it is a stack of blocks, else ``None``."""
    for family in _REGISTRY:
        blocks = family.stack(module)
        if blocks is not None:
            return blocks
    return None


def block_attentions(block: nn.Module) -> Optional[tuple[nn.Module, ...]]:
    """The attention modules of ``block`` from the first family that recognises it, else ``None``."""
    for family in _REGISTRY:
        found = family.block_attentions(block)
        if found is not None:
            return found
    return None


def readme_table(families: Optional[tuple[Family, ...]] = None) -> str:
    """The markdown table of README's "Supported models", one row per family (default: the registered
    ones, in the order they are asked): models, roles and fused weights, read from, attention logits."""
    rows = ["| model | roles and fused weights | read from | attention logits |", "|---|---|---|---|"]
    for family in registered_families() if families is None else families:
        logits = ", ".join(family.attention_classes) if family.attention_classes else "no"
        rows.append(f"| {family.model or family.name} | {family.splits} | {family.read_from} | {logits} |")
    return "\n".join(rows) + "\n"


# ------------------------------------------------------------------------------------------ reading helpers
def qualified_name(module: nn.Module) -> str:
    """``<module>.<qualname>`` of the module's class (exact class: a subclass may change the forward)."""
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def is_transformers(module: nn.Module, *names: str) -> bool:
    """Whether the module's class, or one it derives from, is transformers' class of one of these names."""
    return any(cls.__name__ in names and cls.__module__.startswith("transformers.") for cls in type(module).__mro__)


def int_attr(obj: object, *path: str) -> Optional[int]:
    """``obj.<path...>`` when it is an int (not a bool), else ``None``."""
    for attr in path:
        obj = getattr(obj, attr, None)
    return int(obj) if isinstance(obj, int) and not isinstance(obj, bool) else None


def weight_of(module: Optional[nn.Module]) -> Optional[Tensor]:
    """``module.weight`` when it is a tensor, else ``None``."""
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, Tensor) else None


def rows(source: str, **sizes: int) -> Layout:
    """Consecutive row blocks with these tags and sizes."""
    return Layout("rows", tuple(sizes.items()), source=source)


def linears(module: nn.Module, role: str, *names: str) -> Found:
    """``{id(weight): (role, None)}`` of the named child modules of ``module`` that have a weight."""
    found: Found = {}
    for name in names:
        weight = weight_of(getattr(module, name, None))
        if weight is not None:
            found[id(weight)] = (role, None)
    return found
