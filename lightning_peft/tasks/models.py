"""Where a task's model comes from: a built-in name resolved from the registry packages, or a folder."""

from __future__ import annotations

import hashlib
import json
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


SAMPLES = 16  # evenly spaced samples of each tensor's bytes that the fingerprint reads
SAMPLE_BYTES = 64


def weights_fingerprint(folder: Path) -> str:
    """A short hash of the weights in a model folder: each tensor's name, dtype, shape and bytes sampled evenly
    through it (safetensors), or each file's name, size and first and last MiB (``pytorch_model*.bin``).

    Cheap for any model size, the same for a moved copy or another sharding of one safetensors
    model; a fine-tune of the same architecture differs in the sampled values of every tensor it
    changed (a change confined to bytes between samples goes unseen).
    """
    digest = hashlib.sha256()
    for name, entry, path, start in sorted(_safetensors_entries(folder), key=lambda item: item[0]):
        digest.update(f"{name}:{entry['dtype']}:{entry['shape']}".encode())
        begin, end = entry["data_offsets"]
        with path.open("rb") as file:
            for offset in sorted({begin + (end - begin - SAMPLE_BYTES) * i // (SAMPLES - 1) for i in range(SAMPLES)}):
                file.seek(start + max(begin, offset))
                digest.update(file.read(min(SAMPLE_BYTES, end - begin)))
    for path in sorted(Path(folder).glob("pytorch_model*.bin")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as file:
            digest.update(file.read(1 << 20))
            file.seek(max(0, size - (1 << 20)))
            digest.update(file.read(1 << 20))
    return digest.hexdigest()[:16]


def _safetensors_entries(folder: Path) -> list[tuple[str, dict, Path, int]]:
    """``(tensor name, header entry, file, where its data starts)`` for every tensor of the model's safetensors."""
    entries = []
    for path in Path(folder).glob("model*.safetensors"):
        with path.open("rb") as file:
            length = int.from_bytes(file.read(8), "little")
            header = json.loads(file.read(length))
        entries += [(name, entry, path, 8 + length) for name, entry in header.items() if name != "__metadata__"]
    return entries
