"""The recipes that ship inside the package, so `--config lora_sentiment` works from any folder."""

from __future__ import annotations

import os
from pathlib import Path

RECIPES = Path(__file__).resolve().parent / "recipes"


def builtin_recipes() -> list[str]:
    """The names of the recipes that ship with the package."""
    return sorted(path.stem for path in RECIPES.glob("*.yaml"))


def recipe_path(value: str) -> str:
    """A ``--config`` value as a file: a file that exists, else the built-in recipe of that name; YAML given inline
    (``--config 'trainer: {max_steps: 3}'``) and other paths go on as they are."""
    name = Path(value).name.removesuffix(".yaml")
    if Path(value).is_file() or _inline_yaml(value):
        return value
    if os.sep not in value and name in builtin_recipes():  # a folder of that name here is no recipe
        return str(RECIPES / f"{name}.yaml")
    if Path(value).exists():
        return value  # a folder: jsonargparse says it is no file
    if os.sep in value:
        raise FileNotFoundError(f"--config {value}: the file does not exist")
    raise ValueError(f"--config {value}: no such file, and no built-in recipe of that name "
                     f"(built-in: {', '.join(builtin_recipes())})")


def _inline_yaml(value: str) -> bool:
    """Whether a ``--config`` value is YAML itself (a mapping), which jsonargparse takes as the settings."""
    return "\n" in value or ": " in value or value.lstrip().startswith("{")
