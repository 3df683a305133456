"""Hot-swapping: another saved adapter's weights copied into an existing adapter's slot, in place.

No layer is re-wrapped and no parameter replaced, so a compiled model keeps its graph: only the
values of the slot's tensors change. Each method's layer says how a file's tensor fits its slot
(`PEFTModule.swapped`): LoRA pads a lower rank with zeros and folds the file's scale into B.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_peft.core.adapter_files import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    check_file_keys,
    check_peft_layout_holds,
    copy_saved_base_weights,
    file_entries,
    find_adapter,
    read_adapter_files,
    saved_base_weights,
    split_layer_tensor,
)
from lightning_peft.core.files import PathLike
from lightning_peft.core.layer import PEFTModule
from lightning_peft.core.merging import check_unmerged
from lightning_peft.core.models import model_root
from lightning_peft.registry import callback_for


def hotswap_adapter(module: nn.Module, path: PathLike, adapter_name: str = "default") -> nn.Module:
    """Load the adapter saved in ``path`` into the existing adapter ``adapter_name``, in place: nothing is rebuilt.

    The slot keeps its parameters, their shapes and its settings; only their values change, so a
    model under ``torch.compile`` runs the new adapter without recompiling. The file must hold the
    same method on the same layers. A LoRA file may have a lower rank than the slot (padded with
    zeros) and another ``alpha`` or rsLoRA choice (its scale is folded into B), so the layer
    computes exactly what the file's adapter computes; the slot's dropout stays. Everything is
    checked before any value changes.

    Args:
        module: a model with adapters, or a LightningModule holding one; changed in place.
        path: the adapter folder, as `save_adapter` or peft wrote it.
        adapter_name: the slot: the adapter of ``module`` whose values are replaced.

    Returns:
        ``module`` itself.

    Raises:
        FileNotFoundError: when a file of the folder is missing.
        ValueError: when the file cannot be read, ``module`` has merged adapters or no adapter
            ``adapter_name`` of the file's method, the file's settings make another kind of adapter
            than the slot's (PiSSA against plain LoRA, another Adapter activation), or its tensors
            do not fit the slot (other layers, a higher rank, another shape).

    Examples:
        ```python
        from lightning_peft import hotswap_adapter

        compiled = torch.compile(model)
        hotswap_adapter(model, "adapters/customer-42")  # the next call runs customer 42's adapter
        ```
    """
    check_unmerged(module, "hotswap_adapter")
    config, tensors = read_adapter_files(path)
    weights_path = Path(path) / WEIGHTS_FILE
    incoming = callback_for(config, adapter_name, Path(path) / CONFIG_FILE)
    ref = find_adapter(module, adapter_name, incoming.method_name)
    refusal = ref.method.swap_refusal(ref.config, incoming.config())
    if refusal:
        raise ValueError(f"{Path(path) / CONFIG_FILE}: cannot hot-swap into {ref}: {refusal}")
    entries = file_entries(module, ref)
    _, root = model_root(module)
    check_peft_layout_holds(config, ref, root, f"{Path(path) / CONFIG_FILE} (hot-swapped into {ref})")
    base_weights = saved_base_weights(root, tensors, entries, weights_path, incoming.config().get("modules_to_save"))
    check_file_keys(entries, set(tensors) - set(base_weights), weights_path,
                    "a swapped adapter must adapt the same layers as the slot")
    values = {key: _fitted(root, name, tensors[key], param, incoming.config(), f"{weights_path}: tensor '{key}'")
              for key, (name, param) in entries.items()}
    copy_saved_base_weights(base_weights, weights_path)  # first: its warning (an error under -W error) before any copy
    with torch.no_grad():
        for key, (_, param) in entries.items():
            param.copy_(values[key])
    return module


def _fitted(root: nn.Module, name: str, value: Tensor, slot: Tensor, settings: dict, where: str) -> Tensor:
    """The file's ``value`` for the slot tensor ``name``, as the layer that holds it fits it."""
    parts = split_layer_tensor(name)
    holder = root.get_submodule(parts[0]) if parts else None
    if isinstance(holder, PEFTModule):
        return holder.swapped(parts[2], value, holder.adapters[parts[1]], settings, where)
    return PEFTModule.same_shape(value, slot, where)
