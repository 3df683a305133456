"""Where a task's model comes from: a built-in name resolved from the registry packages, or a folder."""

from __future__ import annotations

import hashlib
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


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")
SAMPLED_BYTES = 1 << 20  # read at each end of each weights file: its header and its first and last values


def weights_fingerprint(folder: Path) -> str:
    """A short hash of the weights in a model folder, from each file's name, size and first and last MiB.

    Cheap for any model size, and the same for a copy or a moved folder; two models of one
    architecture and other weights (another fine-tune) differ in those bytes.
    """
    digest = hashlib.sha256()
    for path in sorted(p for pattern in WEIGHT_FILES for p in Path(folder).glob(pattern)):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as file:
            digest.update(file.read(SAMPLED_BYTES))
            file.seek(max(0, size - SAMPLED_BYTES))
            digest.update(file.read(SAMPLED_BYTES))
    return digest.hexdigest()[:16]
