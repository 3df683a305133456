"""The recipes that ship inside the package, so `--config lora_sentiment` works from any folder."""

from __future__ import annotations

import os
from pathlib import Path

RECIPES = Path(__file__).resolve().parent / "recipes"


def builtin_recipes() -> list[str]:
    """The names of the recipes that ship with the package."""
    return sorted(path.stem for path in RECIPES.glob("*.yaml"))


def recipe_path(value: str) -> str:
    """A ``--config`` value as a file: a path that exists, else the built-in recipe of that name."""
    if Path(value).exists():
        return value
    name = Path(value).name.removesuffix(".yaml")
    if os.sep in value:
        raise FileNotFoundError(f"--config {value}: the file does not exist")
    if name not in builtin_recipes():
        raise ValueError(f"--config {value}: no such file, and no built-in recipe of that name "
                         f"(built-in: {', '.join(builtin_recipes())})")
    return str(RECIPES / f"{name}.yaml")
