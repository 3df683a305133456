"""LoRA adapters in Hugging Face peft's layout (adapter_config.json + adapter_model.safetensors)."""

from __future__ import annotations

import re
import warnings
from typing import Any

from torch import nn

from lightning_peft.core.adapter_files import (
    AdapterFormat,
    peft_key,
    peft_targets,
    split_layer_tensor,
)
from lightning_peft.core.layer import innermost_base
from lightning_peft.core.models import name_or_path
from lightning_peft.lora.layers import LoRAEmbedding, LoRALinear
from lightning_peft.lora.parameters import LoRAParameter

UNSUPPORTED_OPTIONS = ("rank_pattern", "alpha_pattern", "bias", "lora_bias", "trainable_token_indices",
                       "layer_replication", "alora_invocation_tokens", "use_qalora", "use_bdlora", "velora_config",
                       "monteclora_config", "arrow_config", "kasa_config", "megatron_config",
                       "ensure_weight_tying")  # peft's, set otherwise
BASE_KEEPING_INITS = ("gaussian", "eva", "orthogonal", "mica")  # peft's other string inits rewrite the base weights
# (olora, corda, loftq, lora_ga, pissa_niter_N), some spelled in any case by peft: refused unless named here


def file_key(name: str, root: nn.Module) -> str:
    """peft's key for one of our tensor names: ``x.q_proj.adapters.default.lora_A`` -> ``...q_proj.lora_A.weight``."""

    def layer_key(layer: str, tensor: str) -> str:
        wrapper = root.get_submodule(layer)  # inside another method's wrapper, the layer stands for what it wraps
        module = layer if isinstance(wrapper, LoRAParameter) else _outside(layer)  # peft's parameter layers nest
        if isinstance(wrapper, LoRAParameter) and isinstance(innermost_base(wrapper), nn.MultiheadAttention):
            module = _attention_key(layer, wrapper.parameter_name)
        if tensor == "magnitude":
            return f"{module}.lora_magnitude_vector"
        if isinstance(wrapper, LoRAEmbedding):
            return f"{module}.lora_embedding_{tensor[-1]}"
        return f"{module}.{tensor}.weight"

    return peft_key(name, layer_key)


def _attention_key(layer: str, parameter_name: str) -> str:
    """peft's layer for an nn.MultiheadAttention weight: the attention's own (``in_proj_weight``), or its ``out_proj``.

    peft 0.21 adds the ``out_proj`` update twice in its forward and merge (huggingface/peft#3774),
    so such a file computes otherwise in peft than here, where the update is added once.
    """
    if parameter_name != "out_proj.weight":
        return _outside(layer)
    warnings.warn("LoRA on nn.MultiheadAttention: peft 0.21 adds the out_proj update twice (huggingface/peft#3774), "
                  "so in peft this adapter file computes otherwise than here, where it is added once", stacklevel=2)
    return f"{_outside(layer)}.base_layer.out_proj"


def to_config(config: dict, root: nn.Module, names: list[str]) -> dict:
    """peft's LoraConfig fields; the targets are listed by their full names, which peft matches exactly.

    A parameter's update is a ``target_parameters`` entry, except nn.MultiheadAttention's, whose
    module is the target (as it was named).
    """
    layers = sorted({parts[0] for parts in map(split_layer_tensor, names) if parts})
    transposed = any(isinstance(root.get_submodule(n), LoRALinear) and root.get_submodule(n).transposed
                     for n in layers)
    modules, parameters = _module_and_parameter_targets(root, layers)
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": name_or_path(root), "inference_mode": True,
        "r": config["r"], "lora_alpha": config["alpha"], "lora_dropout": config["dropout"],
        "target_modules": modules or None, "target_parameters": parameters or None,
        "use_rslora": config["use_rslora"], "use_dora": config["use_dora"],
        "fan_in_fan_out": transposed, "bias": "none",
        "init_lora_weights": "pissa" if config.get("init") == "pissa" else True,  # peft redoes PiSSA's SVD on load
        "modules_to_save": config["modules_to_save"] or None,
    }


def _module_and_parameter_targets(root: nn.Module, layers: list[str]) -> tuple[list[str], list[str]]:
    """The full names of the adapted modules and of the adapted parameters (wrappers' ``base_layer`` left out)."""
    modules, parameters = [], []
    for name in layers:
        layer = root.get_submodule(name)
        holder = _outside(name)
        if not isinstance(layer, LoRAParameter):
            modules.append(holder)
            continue
        if isinstance(innermost_base(layer), nn.MultiheadAttention):
            modules.append(holder)
        else:
            parameters.append(f"{holder}.{layer.parameter_name}")
    return sorted(set(modules)), sorted(parameters)


def _outside(layer: str) -> str:
    """The name of the module a (possibly nested) wrapper stands for: ``x.k_proj.base_layer`` -> ``x.k_proj``."""
    return re.sub(r"(?:\.base_layer)+$", "", layer)


def to_settings(config: dict) -> dict[str, Any]:
    """Our LoRA arguments for a peft LoraConfig (its targets, exclusions and layers included)."""
    unsupported = {k: config[k] for k in UNSUPPORTED_OPTIONS if config.get(k) not in (None, False, {}, [], "none")}
    if unsupported:
        hint = (" (bias='all' trains LoRA with BitFit; 'lora_only', LoRA with Selective over the targets' biases)"
                if "bias" in unsupported else "")
        raise ValueError(f"peft LoRA option(s) {', '.join(f'{k}={v!r}' for k, v in unsupported.items())} are not "
                         f"supported here{hint}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init != "pissa" and init.lower() not in BASE_KEEPING_INITS:
        raise ValueError(f"peft LoRA init_lora_weights={init!r} changed the base weights this adapter was trained "
                         "against (or is not known here), which cannot be rebuilt here; convert it to plain LoRA with "
                         "peft's save_pretrained(path_initial_model_for_weight_conversion=...)")
    return dict(
        r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
        target_modules=peft_targets(config.get("target_modules") or None),  # peft writes [] for parameters only
        target_parameters=config.get("target_parameters") or [],
        exclude_modules=peft_targets(config.get("exclude_modules")),
        layers=_layers(config.get("layers_to_transform")),
        use_dora=bool(config.get("use_dora")), use_rslora=bool(config.get("use_rslora")),
        modules_to_save=config.get("modules_to_save"), init="pissa" if init == "pissa" else "default",
    )


def _layers(value: int | list[int] | None) -> list[int] | None:
    return [value] if isinstance(value, int) else value


LORA_FORMAT = AdapterFormat(peft_type="LORA", to_config=to_config, to_settings=to_settings, file_key=file_key)
