"""The bases of what PEFT methods add to a model: wrapping layers and other added parts."""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from lightning_peft.core.checks import check_adapter_name
from lightning_peft.core.rows import RowMask, RowSet


class PEFTModule(nn.Module):
    """A part that a PEFT method adds to a model, holding named adapters of which some are active.

    ``method`` is the registered name of the method (e.g. ``"LoRA"``). Parts that are not
    wrapped layers (a prompt encoder, say) subclass this directly; merging refuses them.
    """

    method: str = "PEFT"
    mergeable: bool = False
    per_row: bool = False  # whether its forward follows `per_row_adapters`' routing
    trained_whole: bool = False  # a module that adapters train whole (modules_to_save): no target of a method
    row_adapters = None  # the routing of `per_row_adapters` while its block lasts (a RowAdapters)

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []

    def register_adapter(self, name: str, adapter: nn.Module) -> None:
        """Store ``adapter`` under ``name`` and make it active."""
        check_adapter_name(f"{self.method}[{name}]", name)
        self.adapters[name] = adapter
        self.active_adapters.append(name)

    def delete_adapter(self, name: str) -> None:
        del self.adapters[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def set_active(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapters]

    def detach_from(self, model: nn.Module) -> None:
        """Take the hooks this part put on ``model`` (the module holding it) off again, when its last adapter goes."""
        for hooks in (model._forward_pre_hooks, model._forward_hooks):
            for key in [k for k, hook in hooks.items() if getattr(hook, "__self__", None) is self]:
                del hooks[key]
                for flags in (model._forward_pre_hooks_with_kwargs, model._forward_hooks_with_kwargs,
                              model._forward_hooks_always_called):
                    flags.pop(key, None)

    def swapped(self, tensor: str, value: Tensor, adapter: nn.Module, settings: dict, where: str) -> Tensor:
        """The value that makes ``adapter``'s ``tensor`` compute what a file's adapter (``settings``) computes.

        For `hotswap_adapter`; by default the file's tensor itself, of the same shape.
        """
        return self.same_shape(value, getattr(adapter, tensor), where)

    @staticmethod
    def same_shape(value: Tensor, slot: Tensor, where: str) -> Tensor:
        """``value``, once it has ``slot``'s shape; else an error naming both shapes."""
        if tuple(value.shape) != tuple(slot.shape):
            raise ValueError(f"{where} has shape {tuple(value.shape)}, but the adapter slot's has {tuple(slot.shape)}")
        return value

    def packs_rows(self) -> bool:
        """Whether under `per_row_adapters` this part moves rows' tokens to other positions (soft prompts of several
        lengths), so that the model's outputs are gathered back per row."""
        return False

    def row_groups(self, batch: Tensor) -> list[tuple[nn.Module, RowSet | RowMask]]:
        """Under `per_row_adapters`: ``(adapter, row indices)`` for each routed adapter this part holds."""
        return self.row_adapters.groups(self, batch)

    def with_resting(self, out: Tensor) -> Tensor:
        """Under `per_row_adapters`: ``out``, joined under FSDP2 by the adapters that no row here names."""
        return self.row_adapters.with_resting(self, out)

    def extra_repr(self) -> str:
        return f"active={self.active_adapters}"


SWITCHED_OFF: weakref.WeakKeyDictionary[PEFTModule, int] = weakref.WeakKeyDictionary()  # open disable_adapters
# blocks per part (beside the parts, not on them: a copy or a pickle made inside a block is not inside one)


def open_block(module: nn.Module) -> str | None:
    """The block ``module``'s adapters are inside, whose end makes those active at its start active again:
    ``"disable_adapters"``, ``"per_row_adapters"``, or None."""
    switched_off = any(SWITCHED_OFF.get(m) for m in module.modules() if isinstance(m, PEFTModule))
    return "disable_adapters" if switched_off else "per_row_adapters" if routed_per_row(module) else None


def routed_per_row(module: nn.Module) -> bool:
    """Whether ``module``'s adapters are inside a `per_row_adapters` block, each row to its own."""
    return any(m.row_adapters is not None for m in module.modules() if isinstance(m, PEFTModule))


def check_not_switched_off(module: nn.Module, what: str) -> None:
    """Refuse to switch adapters inside a `disable_adapters` or `per_row_adapters` block, whose end restores those
    active at its start."""
    if block := open_block(module):
        raise ValueError(f"{what} inside a {block} block: the block ends by making the adapters active at its "
                         "start active again, so this change would be half undone; do it after the block")


class PEFTLayer(PEFTModule):
    """A frozen ``base_layer`` plus named adapters; subclasses add adapters and compute the forward.

    Attributes the wrapper lacks (``weight``, ``bias``, ``in_features``, ...) are the base
    layer's, so model code that reads them off a targeted layer works after injection.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":  # not set yet (inside __init__, or while unpickling)
                raise
            return getattr(self.base_layer, name)

    def merged_base_layer(self) -> nn.Module:
        """Fold the active adapters into ``base_layer`` in place and return it."""
        raise NotImplementedError(f"{self.method} adapters cannot be merged into the base weights")

    def merged_module(self) -> nn.Module:
        """The module that stands in the model in this layer's place while it is merged."""
        return self.base_layer

    def unmerge(self) -> None:
        """Take the active adapters' deltas back out of ``base_layer`` (the inverse of a merge)."""
        raise NotImplementedError(f"{self.method} adapters cannot be unmerged")

    def unmerge_refusal(self) -> str | None:
        """Why the merged adapters cannot be taken back out of ``base_layer`` exactly enough, or None."""
        return None


def innermost_base(module: nn.Module) -> nn.Module:
    """The base-model layer under any number of nested PEFT layers."""
    while isinstance(module, PEFTLayer):
        module = module.base_layer
    return module


def linear_features(layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of nn.Linear (quantized too) or transformers' Conv1D (weight ``(in, out)``).

    Linear's come from its attributes: a bitsandbytes 4-bit weight is packed into ``(out * in / 2, 1)``.
    """
    layer = innermost_base(layer)
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return tuple(layer.weight.shape)


def adapter_dtype(base_weight: Tensor) -> torch.dtype:
    """The dtype of new adapter parameters beside ``base_weight``: float32, or float64 for a float64 base.

    Half-precision and quantized bases get float32 adapters (mixed precision casts as it computes).
    """
    return base_weight.dtype if base_weight.dtype in (torch.float32, torch.float64) else torch.float32


def to_adapter_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast an adapter's input to its parameters' dtype, unless autocast picks the compute dtype."""
    if x.dtype == dtype or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(dtype)
