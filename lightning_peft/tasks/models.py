"""Where a task's model comes from: a built-in name resolved from the registry packages, or a folder."""

from __future__ import annotations

import functools
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
ENDS = 1 << 20  # of a pickled weights file, the bytes read at each end


def weights_fingerprint(folder: Path) -> str | None:
    """A short hash of the weights a model folder loads: each tensor's name, dtype, shape and bytes sampled evenly
    through it (``model.safetensors``, or the shards its index names), or, where there are none, each pickled
    weights file's name, size and first and last MiB; None for a folder without either.

    Cheap for any model size (and computed once per version of the files), the same for a moved copy or another
    sharding of one safetensors model; a fine-tune of the same architecture differs in the sampled values of every
    tensor it changed (a change confined to bytes between samples goes unseen).
    """
    files = _weights_files(Path(folder), "model.safetensors") or _weights_files(Path(folder), "pytorch_model.bin")
    if not files:
        return None
    return _fingerprint(tuple((str(path), path.stat().st_size, path.stat().st_mtime_ns) for path in files))


def _weights_files(folder: Path, name: str) -> list[Path]:
    """The weights files transformers loads for ``name``: that file, or the shards that ``name.index.json`` lists
    (not a variant such as ``model.fp16.safetensors``, nor stale shards beside a whole file)."""
    if (folder / name).is_file():
        return [folder / name]
    index = folder / f"{name}.index.json"
    if not index.is_file():
        return []
    return sorted({folder / shard for shard in json.loads(index.read_text())["weight_map"].values()})


@functools.lru_cache(maxsize=8)
def _fingerprint(files: tuple[tuple[str, int, int], ...]) -> str:
    """`weights_fingerprint` of these files (path, size, modification time), which a changed file misses the cache."""
    digest = hashlib.sha256()
    if files and files[0][0].endswith(".safetensors"):
        samples = [sample for path, *_ in files for sample in _sampled_tensors(Path(path))]
        for sample in sorted(samples):  # by tensor name, whichever file holds it (then the file's name)
            digest.update(sample[2])
        return digest.hexdigest()[:16]
    for path, size, _ in files:
        digest.update(f"{Path(path).name}:{size}".encode())
        with open(path, "rb") as file:
            digest.update(file.read(ENDS))
            file.seek(max(0, size - ENDS))
            digest.update(file.read(ENDS))
    return digest.hexdigest()[:16]


def _sampled_tensors(path: Path) -> list[tuple[str, str, bytes]]:
    """``(tensor name, file name, digest)`` for each tensor of a safetensors file, the digest of its name, dtype,
    shape and bytes read evenly through it."""
    out = []
    with path.open("rb") as file:
        length = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(length))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            sample = [f"{name}:{entry['dtype']}:{entry['shape']}".encode()]
            for offset in sorted({begin + (end - begin - SAMPLE_BYTES) * i // (SAMPLES - 1) for i in range(SAMPLES)}):
                file.seek(8 + length + max(begin, offset))
                sample.append(file.read(min(SAMPLE_BYTES, end - begin)))
            out.append((name, path.name, hashlib.sha256(b"".join(sample)).digest()))
    return out
