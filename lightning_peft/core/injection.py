"""Putting PEFT layers into a model and recording which parameters each method owns.

Ownership is what freezing follows: a parameter that no method claims is frozen, so several
methods on one model train the union of what each adds. Claims are kept on the root module
by parameter identity, which survives the renaming that wrapping a layer causes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from torch import nn

from lightning_peft.core.layer import PEFTLayer

_OWNERS = "_lightning_peft_owners"
_ADAPTERS = "_lightning_peft_adapters"


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` of ``root`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def wrap_modules(
    root: nn.Module,
    chosen: list[tuple[str, nn.Module]],
    layer_for: Callable[[nn.Module], PEFTLayer],
    layer_type: type[PEFTLayer],
    innermost: bool = False,
) -> list[tuple[str, PEFTLayer]]:
    """Wrap each chosen module in a ``layer_type`` layer, reusing one that is already there.

    A module already wrapped by another method is wrapped again on the outside, or, with
    ``innermost`` (methods that change the weight itself, like LoRA), right around its base layer.
    """
    layers = []
    for name, module in chosen:
        while innermost and isinstance(module, PEFTLayer) and not isinstance(module, layer_type):
            name, module = f"{name}.base_layer", module.base_layer
        layer = module if isinstance(module, layer_type) else layer_for(module)
        if layer is not module:
            replace_module(root, name, layer)
        layers.append((name, layer))
    return layers


def peft_layers(root: nn.Module) -> Iterator[tuple[str, PEFTLayer]]:
    """Every PEFT layer in ``root`` with its name."""
    for name, module in root.named_modules():
        if isinstance(module, PEFTLayer):
            yield name, module


def check_unclaimed(root: nn.Module, owner: str, params: Iterable[nn.Parameter]) -> None:
    """Raise if another owner than ``owner`` already trains one of ``params``."""
    owners: dict[int, tuple[str, nn.Parameter]] = root.__dict__.get(_OWNERS, {})
    for param in params:
        previous = owners.get(id(param))
        if previous is not None and previous[0] != owner:
            raise ValueError(
                f"parameter '{_name_of(root, param)}' is claimed by both {previous[0]} and {owner}; "
                "a parameter can be trained by one PEFT method only"
            )


def claim(root: nn.Module, owner: str, params: Iterable[nn.Parameter]) -> None:
    """Record that ``owner`` (e.g. ``"LoRA[default]"``) trains ``params``; a second owner is an error."""
    params = list(params)
    check_unclaimed(root, owner, params)
    owners: dict[int, tuple[str, nn.Parameter]] = root.__dict__.setdefault(_OWNERS, {})
    for param in params:
        owners[id(param)] = (owner, param)


def release(root: nn.Module, owner: str) -> None:
    """Forget every claim of ``owner`` (its adapter was deleted)."""
    owners: dict = root.__dict__.get(_OWNERS, {})
    for key in [k for k, (o, _) in owners.items() if o == owner]:
        del owners[key]


def owner_of(root: nn.Module) -> dict[int, str]:
    """Map from ``id(param)`` to its owner, for the parameters that ``root`` still holds."""
    owners: dict = root.__dict__.get(_OWNERS, {})
    present = {id(p) for p in root.parameters()}
    return {key: owner for key, (owner, _) in owners.items() if key in present}


def freeze_unclaimed(root: nn.Module) -> None:
    """Train exactly the claimed parameters of ``root``: set ``requires_grad`` from ownership."""
    claimed = owner_of(root)
    for param in root.parameters():
        param.requires_grad_(id(param) in claimed)


def _name_of(root: nn.Module, param: nn.Parameter) -> str:
    return next((n for n, p in root.named_parameters() if p is param), "<unnamed>")


def record_adapter(root: nn.Module, owner: str, method: str, adapter_name: str, config: dict) -> None:
    """Remember which method and settings made the adapter ``owner``, for saving it later."""
    root.__dict__.setdefault(_ADAPTERS, {})[owner] = {"method": method, "name": adapter_name, "config": config}


def adapter_records(root: nn.Module) -> dict[str, dict]:
    """Every adapter injected into ``root``: owner -> {"method", "name", "config"}."""
    return root.__dict__.get(_ADAPTERS, {})


def forget_adapter(root: nn.Module, owner: str) -> None:
    root.__dict__.get(_ADAPTERS, {}).pop(owner, None)
