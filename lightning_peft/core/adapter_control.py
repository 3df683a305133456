"""Named adapters on one model: choose the active one, switch all off for a while, delete one."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from lightning_peft.core.injection import ModulePlaces, peft_layers
from lightning_peft.core.layer import SWITCHED_OFF, PEFTLayer, PEFTModule, check_not_switched_off
from lightning_peft.core.merging import check_unmerged
from lightning_peft.core.ownership import AdapterRef, adapter_refs, freeze_unclaimed, owners, release
from lightning_peft.core.rollback import all_or_nothing
from lightning_peft.core.saved_modules import SavedModule


def adapter_names(module: nn.Module) -> list[str]:
    """List the names of the adapters on ``module``: which ones `set_adapter` and `delete_adapter` can take.

    Args:
        module: a model with adapters, or a LightningModule holding one (both give the same answer).

    Returns:
        The names of the adapters that train parameters of ``module``, each once, in the order
        their parameters come; empty when there are none.

    Examples:
        ```python
        from lightning_peft import LoRA, adapter_names

        LoRA(r=8, adapter_name="sentiment").inject(model)
        adapter_names(model)  # ["sentiment"]
        ```
    """
    return list(dict.fromkeys(ref.name for ref in adapter_refs(module)))


def _check_known(module: nn.Module, adapter_name: str) -> None:
    if adapter_name not in adapter_names(module):
        known = ", ".join(adapter_names(module)) or "none"
        raise ValueError(f"no adapter named '{adapter_name}'; this model has: {known}")


def set_adapter(module: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the only active adapter of ``module``, to switch between adapters on one base.

    Every layer or part that a PEFT method added then computes with that adapter alone; parts
    without it compute as their base. It changes what the model computes, not which parameters
    are trainable. Each adapter's ``modules_to_save`` copies (its head) follow it. Selective and
    BitFit train the model's own parameters, which stay in use whatever is active.

    Args:
        module: a model with adapters, or a LightningModule holding one.
        adapter_name: the adapter to activate, one of `adapter_names` of ``module``.

    Raises:
        ValueError: when ``module`` has no adapter named ``adapter_name``, or has merged adapters.

    Examples:
        ```python
        from lightning_peft import load_adapter, set_adapter

        load_adapter(model, "adapters/sentiment", adapter_name="sentiment")
        load_adapter(model, "adapters/topic", adapter_name="topic")
        set_adapter(model, "topic")  # only "topic" is active
        ```
    """
    check_unmerged(module, "set_adapter")
    check_not_switched_off(module, "set_adapter")
    _check_known(module, adapter_name)
    for part in _peft_parts(module):
        part.set_active([adapter_name])


@contextmanager
def disable_adapters(module: nn.Module) -> Iterator[nn.Module]:
    """Switch every adapter of ``module`` off inside a ``with`` block, to compare with the base model.

    Inside the block no layer or part that a PEFT method added changes what ``module`` computes;
    on leaving it (also on an exception) the adapters that were active are active again. Inside a
    `per_row_adapters` block it switches the rows' adapters off too, and back on after.
    ``modules_to_save`` modules compute as the original, untrained modules. Selective and BitFit
    train the model's own parameters, which stay as trained inside the block, and a LoRA layer
    initialized with ``init="pissa"`` keeps its residual base weight. Inside the block,
    `set_adapter`, `delete_adapter`, `merge` and adding adapters (inject, `load_adapter`,
    `combine_adapters`) are refused: the block's end would undo half of them.

    Args:
        module: a model with adapters, or a LightningModule holding one.

    Yields:
        ``module`` itself, with its adapters off.

    Raises:
        ValueError: when ``module`` has merged adapters, which no switch reaches.

    Examples:
        ```python
        from lightning_peft import disable_adapters

        with disable_adapters(model):
            base_logits = model(**batch).logits
        ```
    """
    check_unmerged(module, "disable_adapters")
    saved = [(part, list(part.active_adapters), part.row_adapters) for part in _peft_parts(module)]
    try:
        for part, _, _ in saved:
            part.set_active([])
            part.row_adapters = None  # inside a `per_row_adapters` block too: no row uses an adapter
            SWITCHED_OFF[part] = SWITCHED_OFF.get(part, 0) + 1
        yield module
    finally:
        for part, active, routing in saved:
            part.set_active(active)
            part.row_adapters = routing
            SWITCHED_OFF[part] -= 1


def delete_adapter(module: nn.Module, adapter_name: str, method: str | None = None) -> None:
    """Remove one adapter from ``module``; the other adapters stay as they are.

    What the adapter's method added goes: a layer left with no adapter becomes its plain base
    layer again, and a part left with none (a prompt encoder) leaves the model with its hooks.
    Its ``modules_to_save`` copies go with it (not another method's of the same name). The
    parameters of the model itself that the adapter trained (Selective's, BitFit's) stay, as
    trained, and are frozen. When it was the active adapter and the model is left with none
    active, another adapter with layers becomes active (of the same method where there is one),
    with a warning, as in peft.

    Args:
        module: a model with adapters, or a LightningModule holding one.
        adapter_name: name of the adapter to remove.
        method: registered name of the method whose adapter to remove (``"LoRA"``, ``"IA3"``, ...);
            ``None`` removes the adapters of that name of every method.

    Raises:
        ValueError: when ``module`` has no adapter named ``adapter_name`` (of ``method``, when given),
            has merged adapters, or is inside a `disable_adapters` or `per_row_adapters` block.

    Examples:
        ```python
        from lightning_peft import delete_adapter

        delete_adapter(model, "sentiment")
        ```
    """
    check_unmerged(module, "delete_adapter")
    check_not_switched_off(module, "delete_adapter")
    refs = [r for r in adapter_refs(module) if r.name == adapter_name and method in (None, r.method_name)]
    if not refs:
        _check_known(module, adapter_name)
        raise ValueError(f"no {method} adapter named '{adapter_name}'")
    was_active = any(adapter_name in part.active_adapters for part in _peft_parts(module))
    methods, claimed = {r.method_name for r in refs}, owners(module)
    with all_or_nothing(module):  # a failure half-way leaves every adapter as it was
        for ref in refs:
            release(module, ref)  # claims on the model's own parameters (Selective's, BitFit's)
        places = ModulePlaces(module)
        for _, layer in reversed(list(peft_layers(module))):
            if adapter_name in layer.adapters and (layer.method in methods or _trained_by(layer, adapter_name, refs,
                                                                                            claimed)):
                layer.delete_adapter(adapter_name)
                if not layer.adapters:
                    places.put_in_place_of(layer, layer.base_layer)
        for name, part in reversed(list(module.named_modules())):
            if not isinstance(part, PEFTLayer) and isinstance(part, PEFTModule) and adapter_name in part.adapters \
                    and part.method in methods:
                part.delete_adapter(adapter_name)
                if not part.adapters:  # a part left with no adapter leaves the model, with its hooks
                    parent_name, _, child = name.rpartition(".")
                    parent = module.get_submodule(parent_name)
                    part.detach_from(parent)
                    delattr(parent, child)
        freeze_unclaimed(module)
        parts = _peft_parts(module)
        if was_active and not any(part.active_adapters for part in parts):
            # another adapter with parts to switch on, of the deleted one's method where there is one (as peft)
            left = [name for first in (True, False) for part in parts if (part.method in methods) == first
                    for name in part.adapters]
            if left:
                set_adapter(module, left[0])
                warnings.warn(f"adapter '{adapter_name}' was active and is deleted; '{left[0]}' is active now",
                              stacklevel=2)


def _trained_by(layer: PEFTLayer, name: str, refs: list[AdapterRef], claimed: dict[int, AdapterRef]) -> bool:
    """Whether ``layer``'s copy ``name`` (a ``modules_to_save`` copy) belongs to one of ``refs``, by its claims."""
    return isinstance(layer, SavedModule) and any(claimed.get(id(p)) in refs for p in layer.adapters[name].parameters())


def _peft_parts(module: nn.Module) -> list[PEFTModule]:
    return [m for m in module.modules() if isinstance(m, PEFTModule)]
