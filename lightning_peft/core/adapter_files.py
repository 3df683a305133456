"""Adapter folders: one adapter's settings (adapter_config.json) and tensors (adapter_model.safetensors).

Methods that Hugging Face peft has are written in peft's layout, so peft, transformers, vLLM
and TGI load them; a method registers an :class:`AdapterFormat` for that. Any other method is
written in the native layout: its own settings and tensor names. Files are safetensors only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from lightning_peft.core.files import PathLike, atomic_write
from lightning_peft.core.injection import adapter_records, owner_of

PEFT_PREFIX = "base_model.model."  # peft holds the transformers model as base_model.model
_LAYER_TENSOR = re.compile(r"^(?P<layer>.+)\.adapters\.(?P<adapter>[^.]+)\.(?P<tensor>[^.]+)$")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
NATIVE_KEY = "lightning_peft_method"


@dataclass(frozen=True)
class AdapterFormat:
    """How one method's adapter maps to Hugging Face peft's files.

    ``to_config(config, root, names)`` gives peft's adapter_config.json from our settings, the
    model root and our tensor names; ``to_callback(config, adapter_name)`` the inverse; and
    ``file_key(name, root)`` peft's tensor key for one of our tensor names (relative to ``root``).
    ``to_file(tensors, root)``, when given, turns our tensors into the ones peft's file holds.
    """

    method: str
    peft_type: str
    to_config: Callable[[dict, nn.Module, list[str]], dict]
    to_callback: Callable[[dict, str], Any]
    file_key: Callable[[str, nn.Module], str]
    to_file: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]] | None = None


PEFT_FORMATS: dict[str, AdapterFormat] = {}


def register_format(adapter_format: AdapterFormat) -> None:
    PEFT_FORMATS[adapter_format.method] = adapter_format


def split_layer_tensor(name: str) -> tuple[str, str, str] | None:
    """``(layer, adapter, tensor)`` for a tensor of a PEFT layer (``x.q_proj.adapters.default.lora_A``)."""
    match = _LAYER_TENSOR.match(name)
    return (match["layer"], match["adapter"], match["tensor"]) if match else None


def saved_module_key(name: str) -> str:
    """peft's key for a ``modules_to_save`` tensor: its own name under the model root."""
    return PEFT_PREFIX + name.replace(".base_layer.", ".")


def native_key(name: str, root: nn.Module) -> str:
    """Our tensor name without the adapter's name, so a file loads under any adapter_name."""
    return re.sub(r"\.adapters\.[^.]+\.", ".adapter.", name)


def anchored(pattern: str) -> str:
    """peft matches a regex against names inside the transformers model; ours may sit under a prefix."""
    return rf"(?:.*\.)?(?:{pattern})"


def model_root(module: nn.Module) -> tuple[str, nn.Module]:
    """The transformers model inside ``module`` (name and module), or ``module`` itself."""
    from transformers import PreTrainedModel

    for name, sub in module.named_modules():
        if isinstance(sub, PreTrainedModel):
            return name, sub
    return "", module


def _relative(name: str, prefix: str) -> str:
    return name[len(prefix) + 1:] if prefix else name


def _find_adapter(module: nn.Module, adapter_name: str, method: str | None) -> tuple[str, dict]:
    records = adapter_records(module)
    found = [(o, r) for o, r in records.items() if r["name"] == adapter_name and method in (None, r["method"])]
    if not found:
        raise ValueError(f"no adapter named '{adapter_name}'" + (f" of method {method}" if method else "")
                         + f"; this model has: {', '.join(records) or 'none'}")
    if len(found) > 1:
        raise ValueError(f"several methods use adapter_name '{adapter_name}' ({', '.join(o for o, _ in found)}); "
                         "pass method= to choose one")
    return found[0]


def adapter_tensors(module: nn.Module, owner: str) -> dict[str, torch.Tensor]:
    """The tensors of one adapter, named relative to the model root."""
    prefix, _ = model_root(module)
    owners = owner_of(module)
    return {_relative(name, prefix): param for name, param in module.named_parameters()
            if owners.get(id(param)) == owner}


def save_adapter(module: nn.Module, path: PathLike, adapter_name: str = "default", method: str | None = None) -> Path:
    """Write one adapter's files into the folder ``path``: peft's layout where peft has the method."""
    owner, record = _find_adapter(module, adapter_name, method)
    tensors = adapter_tensors(module, owner)
    _, root = model_root(module)
    adapter_format = PEFT_FORMATS.get(record["method"])
    if adapter_format is not None:
        if adapter_format.to_file is not None:
            tensors = adapter_format.to_file(tensors, root)
        config = adapter_format.to_config(record["config"], root, list(tensors))
        tensors = {adapter_format.file_key(name, root): t for name, t in tensors.items()}
    else:
        config = {NATIVE_KEY: record["method"], **record["config"]}
        tensors = {native_key(name, root): t for name, t in tensors.items()}
    folder = Path(path)
    payload = save({k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()})
    atomic_write(folder / WEIGHTS_FILE, lambda f: f.write(payload))
    atomic_write(folder / CONFIG_FILE, lambda f: f.write(json.dumps(_jsonable(config), indent=2).encode()))
    return folder


def read_adapter_files(path: PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """An adapter folder's settings and tensors, or one error that names the file and the problem."""
    folder = Path(path)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for file in (config_path, weights_path):
        if not file.is_file():
            raise FileNotFoundError(f"adapter file {file} does not exist")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"adapter file {config_path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"adapter file {config_path} must hold a JSON object")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"adapter file {weights_path} is not a valid safetensors file (truncated or corrupt?): "
                         f"{err}") from None
    return config, tensors


def callback_for(config: dict, adapter_name: str, config_path: Path) -> Any:
    """The PEFT callback that an adapter_config.json describes."""
    import lightning_peft

    if NATIVE_KEY in config:
        settings = {k: v for k, v in config.items() if k != NATIVE_KEY}
        method = getattr(lightning_peft, config[NATIVE_KEY], None)
        if method is None:
            raise ValueError(f"adapter file {config_path}: unknown method {config[NATIVE_KEY]!r}")
        return method(**{**settings, "adapter_name": adapter_name})
    for adapter_format in PEFT_FORMATS.values():
        if adapter_format.peft_type == config.get("peft_type"):
            return adapter_format.to_callback(config, adapter_name)
    known = ", ".join(f.peft_type for f in PEFT_FORMATS.values())
    raise ValueError(f"adapter file {config_path}: peft_type {config.get('peft_type')!r} is not supported "
                     f"(supported: {known})")


def load_adapter(module: nn.Module, path: PathLike, adapter_name: str = "default") -> nn.Module:
    """Inject the adapter stored in the folder ``path`` into ``module`` and load its tensors.

    Reads peft's layout or the native one. A bad or mismatched file raises an error naming the
    file and the tensor, and leaves ``module`` as it was.
    """
    from lightning_peft.core.adapter_control import delete_adapter

    config, tensors = read_adapter_files(path)
    weights_path = Path(path) / WEIGHTS_FILE
    callback = callback_for(config, adapter_name, Path(path) / CONFIG_FILE)
    trainable = {id(p): p.requires_grad for p in module.parameters()}
    callback.inject(module)
    try:
        _copy_tensors(module, callback, tensors, weights_path)
    except BaseException:
        delete_adapter(module, adapter_name, type(callback).__name__)
        for param in module.parameters():
            param.requires_grad_(trainable[id(param)])
        raise
    return module


def _copy_tensors(module: nn.Module, callback: Any, tensors: dict[str, torch.Tensor], weights_path: Path) -> None:
    params = adapter_tensors(module, callback.owner)
    adapter_format = PEFT_FORMATS.get(type(callback).__name__)
    _, root = model_root(module)
    key = adapter_format.file_key if adapter_format else native_key
    expected = {key(name, root): param for name, param in params.items()}
    missing = sorted(expected.keys() - tensors.keys())
    if missing:
        raise ValueError(f"adapter file {weights_path} lacks tensor '{missing[0]}' "
                         f"({len(missing)} missing): it was saved for another model or settings")
    unexpected = sorted(k for k in tensors.keys() - expected.keys() if not k.endswith("base_layer.weight"))
    if unexpected:
        raise ValueError(f"adapter file {weights_path} holds tensor '{unexpected[0]}' that this model has no "
                         "place for: it was saved for another model")
    for file_key, param in expected.items():
        if tuple(tensors[file_key].shape) != tuple(param.shape):
            raise ValueError(f"adapter file {weights_path}: tensor '{file_key}' has shape "
                             f"{tuple(tensors[file_key].shape)}, but this model's has {tuple(param.shape)}")
    with torch.no_grad():
        for file_key, param in expected.items():
            param.copy_(tensors[file_key])


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    return value
