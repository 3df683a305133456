"""Named adapters on one model: choose the active one, switch all off for a while, delete one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from lightning_peft.core.injection import peft_layers, replace_module
from lightning_peft.core.layer import PEFTLayer, PEFTModule
from lightning_peft.core.ownership import adapter_refs, freeze_unclaimed, release


def adapter_names(module: nn.Module) -> list[str]:
    """Names of the adapters that train parameters of ``module``, in the order their parameters come."""
    return list(dict.fromkeys(ref.name for ref in adapter_refs(module)))


def _check_known(module: nn.Module, adapter_name: str) -> None:
    if adapter_name not in adapter_names(module):
        known = ", ".join(adapter_names(module)) or "none"
        raise ValueError(f"no adapter named '{adapter_name}'; this model has: {known}")


def set_adapter(module: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the only active adapter in every PEFT part of ``module``."""
    _check_known(module, adapter_name)
    for part in _peft_parts(module):
        part.set_active([adapter_name])


@contextmanager
def disable_adapters(module: nn.Module) -> Iterator[nn.Module]:
    """Inside this block ``module`` computes what its base model computes."""
    saved = [(part, list(part.active_adapters)) for part in _peft_parts(module)]
    try:
        for part, _ in saved:
            part.set_active([])
        yield module
    finally:
        for part, active in saved:
            part.set_active(active)


def delete_adapter(module: nn.Module, adapter_name: str, method: str | None = None) -> None:
    """Remove an adapter; a layer left with no adapter becomes its plain base layer again."""
    refs = [r for r in adapter_refs(module) if r.name == adapter_name and method in (None, r.method_name)]
    if not refs:
        _check_known(module, adapter_name)
        raise ValueError(f"no {method} adapter named '{adapter_name}'")
    methods = {r.method_name for r in refs}
    for ref in refs:
        release(module, ref)  # claims on base modules (selected parameters, modules_to_save)
    for name, layer in reversed(list(peft_layers(module))):
        if adapter_name in layer.adapters and layer.method in methods:
            layer.delete_adapter(adapter_name)
            if not layer.adapters:
                replace_module(module, name, layer.base_layer)
    for part in reversed(list(module.modules())):
        if not isinstance(part, PEFTLayer) and isinstance(part, PEFTModule) and adapter_name in part.adapters \
                and part.method in methods:
            part.delete_adapter(adapter_name)
    freeze_unclaimed(module)


def _peft_parts(module: nn.Module) -> list[PEFTModule]:
    return [m for m in module.modules() if isinstance(m, PEFTModule)]
