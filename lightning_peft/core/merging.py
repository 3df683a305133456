"""Folding adapters into the base weights for zero added latency, and taking them back out."""

from __future__ import annotations

from torch import nn

from lightning_peft.core.injection import peft_layers, replace_module
from lightning_peft.core.layer import PEFTModule

_MERGED = "_lightning_peft_merged"


def merge(module: nn.Module) -> nn.Module:
    """Fold every active adapter into its base weight and put the plain base layer back.

    The adapter layers are kept aside (not as submodules) so that :func:`unmerge` can restore
    them. A method that cannot merge raises before anything changes.
    """
    layers = list(peft_layers(module))
    unmergeable = sorted({m.method for m in module.modules() if isinstance(m, PEFTModule) and not m.mergeable})
    if unmergeable:
        raise ValueError(f"{', '.join(unmergeable)} adapters cannot be merged into the base weights")
    merged = module.__dict__.setdefault(_MERGED, [])
    for name, layer in reversed(layers):  # innermost first when layers are nested
        replace_module(module, name, layer.merged_base_layer())
        merged.append((name, layer))
    return module


def unmerge(module: nn.Module) -> nn.Module:
    """Undo :func:`merge`: take the deltas back out of the base weights and restore the adapters."""
    merged = module.__dict__.get(_MERGED, [])
    if not merged:
        raise ValueError("unmerge: this module has no merged adapters")
    while merged:
        name, layer = merged[-1]
        if module.get_submodule(name) is not layer.base_layer:
            raise RuntimeError(f"unmerge: '{name}' was replaced after the merge; cannot restore its adapter")
        layer.unmerge()
        replace_module(module, name, layer)
        merged.pop()
    return module
