"""IA3 adapters in Hugging Face peft's layout (adapter_config.json + adapter_model.safetensors)."""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_peft.core.adapter_files import (
    AdapterFormat,
    peft_key,
    peft_targets,
    split_layer_tensor,
)
from lightning_peft.core.models import name_or_path


def file_key(name: str, root: nn.Module) -> str:
    """peft's key: ``x.k_proj.adapters.default.ia3_l`` -> ``base_model.model.x.k_proj.ia3_l``."""
    return peft_key(name, lambda layer, tensor: f"{layer}.{tensor}")


def to_config(config: dict, root: nn.Module, names: list[str]) -> dict:
    """peft's IA3Config; targets and feed-forward layers listed by full name, which peft matches exactly."""
    adapted = {(p[0], p[1]) for p in map(split_layer_tensor, names) if p}
    layers = sorted(layer for layer, _ in adapted)
    feedforward = sorted(layer for layer, adapter in adapted if root.get_submodule(layer).adapters[adapter].feedforward)
    return {
        "peft_type": "IA3", "task_type": None, "base_model_name_or_path": name_or_path(root), "inference_mode": True,
        "target_modules": layers, "feedforward_modules": feedforward, "init_ia3_weights": True,
        "fan_in_fan_out": any(root.get_submodule(layer).transposed for layer in layers),
        "modules_to_save": config["modules_to_save"] or None,
    }


def to_settings(config: dict) -> dict[str, Any]:
    """Our IA3 arguments for a peft IA3Config."""
    return dict(
        target_modules=peft_targets(config["target_modules"]),
        feedforward_modules=peft_targets(config.get("feedforward_modules")),
        exclude_modules=peft_targets(config.get("exclude_modules")), modules_to_save=config.get("modules_to_save"),
    )


IA3_FORMAT = AdapterFormat(peft_type="IA3", to_config=to_config, to_settings=to_settings, file_key=file_key)
