"""Modules that adapters train whole (``modules_to_save``): each adapter trains a copy of its own.

The original module stays beneath, frozen, as the base; the active adapter's copy computes (under
`per_row_adapters`, each row's adapter's copy). So adapters of many tasks on one base each keep
their own head, as in Hugging Face peft.
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Any

from torch import Tensor, nn

from lightning_peft.core.injection import wrap_modules
from lightning_peft.core.layer import PEFTLayer, PEFTModule
from lightning_peft.core.ownership import forget_claims, owners
from lightning_peft.core.per_row import replace_rows
from lightning_peft.core.rows import RowMask, RowSet

_COPY_TENSOR = re.compile(r"^(?P<module>.+)\.adapters\.[^.]+\.(?P<tensor>.+)$")


class SavedModule(PEFTLayer):
    """A module trained whole by adapters: the frozen original as ``base_layer``, one trainable copy per adapter."""

    method = "modules_to_save"
    mergeable = True
    per_row = True
    trained_whole = True

    def add_copy(self, name: str) -> nn.Module:
        """A trainable copy of the original for the adapter ``name``."""
        duplicate = copy.deepcopy(self.base_layer)
        forget_claims(duplicate)
        self.register_adapter(name, duplicate)
        return duplicate

    def current(self) -> nn.Module:
        """The copy of the last active adapter that has one here, else the original."""
        return next((self.adapters[n] for n in reversed(self.active_adapters) if n in self.adapters), self.base_layer)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.row_adapters is None:
            self._warn_of_unused_copies()
            return self.current()(*args, **kwargs)
        batch = next(value for value in (*args, *kwargs.values()) if isinstance(value, Tensor))
        groups = self.row_groups(batch)
        one_copy = len(groups) == 1 and groups[0][1].only_these and len(groups[0][1]) == batch.shape[0]
        if one_copy and not self.row_adapters.sharded:  # called as it is (FSDP2: every process runs the original)
            return self.with_resting(groups[0][0](*args, **kwargs))
        if groups:
            self._check_rows_can_split(args, kwargs)

        def rows_of(copy_: nn.Module, rows: RowSet | RowMask) -> Tensor:
            def take(value: Any) -> Any:
                if type(value) in (tuple, list):  # rotary (cos, sin) of each row, say
                    return type(value)(map(take, value))
                same_rows = isinstance(value, Tensor) and value.dim() and value.shape[0] == batch.shape[0]
                return rows.take(value) if same_rows else value
            return copy_(*map(take, args), **{k: take(v) for k, v in kwargs.items()})

        return self.with_resting(replace_rows(self.base_layer(*args, **kwargs), groups, rows_of))

    def _warn_of_unused_copies(self) -> None:
        """Say once that several active adapters have a copy here, of which only the last computes (and trains)."""
        if self.__dict__.get("_warned_of_copies"):
            return
        copies = [name for name in self.active_adapters if name in self.adapters]
        if len(copies) > 1:
            self.__dict__["_warned_of_copies"] = True
            warnings.warn(f"the active adapters {', '.join(copies)} each have a copy of this "
                          f"{type(self.base_layer).__name__} (modules_to_save), of which only the last, "
                          f"'{copies[-1]}', computes: the others' copies get no gradient. Name the module in one "
                          "adapter's modules_to_save, or route rows with per_row_adapters", stacklevel=3)

    def _check_rows_can_split(self, args: tuple, kwargs: dict[str, Any]) -> None:
        """Refuse what calling the original and each copy on their rows would get wrong: a cache or adapted layers."""
        kind = type(self.base_layer).__name__
        if any(hasattr(value, "get_seq_length") for value in (*args, *kwargs.values())):
            raise ValueError(f"per_row_adapters: the modules_to_save copies of a {kind} would each add their rows to "
                             "one cache; run the forward with use_cache=False, or rows of one adapter at a time")
        nested = sorted({m.method for m in self.base_layer.modules() if isinstance(m, PEFTModule)})
        if nested:
            raise ValueError(f"per_row_adapters: the modules_to_save copies of a {kind} hold {', '.join(nested)} "
                             "layers, which would see only some rows of the batch; route rows of one adapter at a "
                             "time (set_adapter)")

    def merged_base_layer(self) -> nn.Module:
        return self.current()

    def merged_module(self) -> nn.Module:
        return self.current()

    def unmerge(self) -> None:
        """Nothing to take out: merging put the active copy in place of this module, and unmerging puts this back."""


def save_modules(root: nn.Module, chosen: list[tuple[str, nn.Module]], adapter_name: str,
                 owner: str) -> list[nn.Parameter]:
    """Give ``adapter_name`` its own trainable copy of each chosen module; return the copies' parameters.

    A chosen module inside another chosen one is left to that one's copy, which holds it.
    """
    chosen = [(name, module) for name, module in chosen if not any(name.startswith(f"{outer}.") for outer, _ in chosen)]
    layers = wrap_modules(root, chosen, SavedModule, SavedModule)
    taken = next(((name, layer.adapters[adapter_name]) for name, layer in layers if adapter_name in layer.adapters),
                 None)
    if taken is not None:
        name, copy_ = taken
        holder = owners(root).get(id(next(copy_.parameters(), None)), "another adapter")
        raise ValueError(f"{owner}: '{name}' is in modules_to_save of {holder} already; adapters of two methods "
                         f"with one name cannot each have a copy: name it in one method only, or give this adapter "
                         "another adapter_name")
    return [p for _, layer in layers for p in layer.add_copy(adapter_name).parameters()]


def saved_module_name(name: str, root: nn.Module) -> str:
    """A copy's tensor under the original's name (``head.adapters.a.weight`` -> ``head.weight``); others unchanged.

    Files name a saved module's tensors as the module's own, whichever adapter they belong to.
    """
    match = _COPY_TENSOR.match(name)
    if match and isinstance(root.get_submodule(match["module"]), SavedModule):
        return f"{match['module']}.{match['tensor']}"
    return name
