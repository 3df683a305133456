"""A PiSSA adapter as the plain LoRA that gives the same weights from the original base (peft's conversion).

PiSSA starts from ``A0, B0``, the top-r singular part of W, and leaves ``W - s B0 A0`` in the
base. After training, ``W - s B0 A0 + s B A = W + s [B, -B0] [A; A0]``: a rank-2r LoRA on the
unchanged W, which any LoRA loader (vLLM, TGI, peft without redoing the SVD) applies as it is.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.core.adapter_files import split_layer_tensor
from lightning_peft.core.weights import is_quantized


def pissa_as_lora(settings: dict[str, Any], tensors: dict[str, Tensor],
                  root: nn.Module) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Settings and tensors (named from ``root``) of the rank-2r plain LoRA equal to this PiSSA adapter."""
    doubled = {**settings, "r": 2 * settings["r"], "init": "default",
               "alpha": settings["alpha"] * (math.sqrt(2) if settings["use_rslora"] else 2)}  # the same scale
    layers = {parts[0] for parts in map(split_layer_tensor, tensors) if parts}
    quantized = sorted(name for name in layers if is_quantized(root.get_submodule(name).base_layer))
    if quantized:
        warnings.warn(f"'{quantized[0]}' ({len(quantized)} PiSSA layer(s)) has a quantized base, whose residual was "
                      "rounded when it was quantized again: the plain LoRA equals the trained model only up to that "
                      "rounding; the PiSSA file itself (for_original_base=False) is exact", stacklevel=4)
    return doubled, {name: _stacked(name, tensor, root) for name, tensor in tensors.items()}


def _stacked(name: str, tensor: Tensor, root: nn.Module) -> Tensor:
    """``[A; A0]`` for an A, ``[B, -B0]`` for a B; anything else (DoRA's magnitude, a saved module) as it is."""
    parts = split_layer_tensor(name)
    if parts is None or parts[2] not in ("lora_A", "lora_B"):
        return tensor
    layer, adapter_name, which = parts
    adapter = root.get_submodule(layer).adapters[adapter_name]
    initial = getattr(adapter, "initial_A" if which == "lora_A" else "initial_B", None)
    if initial is None:
        raise ValueError(f"{layer}: its PiSSA adapter '{adapter_name}' has no initial factors (not made by init="
                         "'pissa' here), so the original weights it started from are unknown")
    return torch.cat([tensor, initial]) if which == "lora_A" else torch.cat([tensor, -initial], dim=1)
