"""Where a task's model comes from: a built-in name resolved from the registry packages, or a folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lightning_peft import assets

BUILT_IN_MODELS: dict[str, Callable[[], Path]] = {
    "minilm-l6": assets.minilm_path,
    "smollm2-135m": assets.smollm2_path,
}


def resolve_model(model: str) -> Path:
    """The transformers model folder for a built-in name or a local path, or one clear error."""
    if model in BUILT_IN_MODELS:
        return BUILT_IN_MODELS[model]()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {model!r} is neither a built-in name ({', '.join(BUILT_IN_MODELS)}) nor a transformers "
            f"model folder: {path / 'config.json'} does not exist"
        )
    return path
