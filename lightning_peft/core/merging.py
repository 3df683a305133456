"""Folding adapters into the base weights for zero added latency, and taking them back out.

A merged PEFT layer leaves the model (the plain base layer takes its place) and is kept on the
module that held it, under the name it had there, so :func:`unmerge` finds it from any module
above it, also after ``copy.deepcopy``.
"""

from __future__ import annotations

from torch import nn

from lightning_peft.core.injection import peft_layers, replace_module
from lightning_peft.core.layer import PEFTLayer, PEFTModule

_MERGED = "_lightning_peft_merged"  # on a parent module: {child name: the PEFT layer merged there}


def merge(module: nn.Module) -> nn.Module:
    """Fold every active adapter into its base weight and put the plain base layer back.

    A method that cannot merge raises before anything changes.
    """
    unmergeable = sorted({m.method for m in module.modules() if isinstance(m, PEFTModule) and not m.mergeable})
    if unmergeable:
        raise ValueError(f"{', '.join(unmergeable)} adapters cannot be merged into the base weights")
    for name, layer in reversed(list(peft_layers(module))):  # innermost first when layers are nested
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        replace_module(module, name, layer.merged_base_layer())
        parent.__dict__.setdefault(_MERGED, {})[child] = layer
    return module


def unmerge(module: nn.Module) -> nn.Module:
    """Undo :func:`merge`: take the deltas back out of the base weights and restore the adapters.

    The outermost merged layers come back first, the reverse of the order they were merged in.
    """
    restored = False
    while merged := _merged_layers(module):
        for parent, child, layer in merged:
            if getattr(parent, child) is not layer.base_layer:
                raise RuntimeError(f"unmerge: '{child}' was replaced after the merge; cannot restore its adapter")
            layer.unmerge()
            setattr(parent, child, layer)
            del parent.__dict__[_MERGED][child]
        restored = True
    if not restored:
        raise ValueError("unmerge: this module has no merged adapters")
    return module


def _merged_layers(module: nn.Module) -> list[tuple[nn.Module, str, PEFTLayer]]:
    """The merged layers kept by modules of ``module`` now, as ``(parent, child name, layer)``."""
    return [(parent, child, layer) for parent in module.modules()
            for child, layer in parent.__dict__.get(_MERGED, {}).items()]
