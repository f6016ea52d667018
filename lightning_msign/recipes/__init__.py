"""The recipes shipped with the package: LightningCLI YAML files that ``--config`` can name.

``lightning-msign fit --config shakespeare/high_lr`` runs ``shakespeare/high_lr.yaml`` from this folder (in a
checkout also reachable as ``recipes/``), so an installed wheel needs no repository. A ``--config`` value that is
an existing file is always that file; a name is looked up here only when no such file exists.

Example::

    >>> from lightning_msign.recipes import recipe_names, recipe_path
    >>> "shakespeare/high_lr_guarded" in recipe_names()
    True
    >>> recipe_path("debug").name
    'debug.yaml'
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["RECIPES_DIR", "recipe_names", "recipe_path"]

RECIPES_DIR = Path(__file__).resolve().parent
"""The folder holding the shipped recipes."""

_SUFFIXES = (".yaml", ".yml")


def recipe_names() -> list[str]:
    """Names of the shipped recipes (paths relative to :data:`RECIPES_DIR`, without ``.yaml``), sorted."""
    return sorted(p.relative_to(RECIPES_DIR).with_suffix("").as_posix() for p in RECIPES_DIR.rglob("*.yaml"))


def recipe_path(name: str) -> Path:
    """The file of the shipped recipe ``name`` (``"shakespeare/high_lr"``; ``.yaml`` and a leading ``recipes/``
    may be given).

    Raises:
        ValueError: no shipped recipe has that name (the message lists those that exist).
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"`name` must be a recipe name such as 'shakespeare/high_lr', got {name!r}")
    key = name.strip().replace("\\", "/")
    key = key[len("recipes/"):] if key.startswith("recipes/") else key
    key = key[: -len(Path(key).suffix)] if Path(key).suffix in _SUFFIXES else key
    if key in recipe_names():
        return RECIPES_DIR / f"{key}.yaml"
    raise ValueError(f"No such file and no shipped recipe {name!r}; the shipped recipes are: "
                     f"{', '.join(recipe_names())}")
