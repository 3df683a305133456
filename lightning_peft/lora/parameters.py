"""LoRA on weights that a module reads itself: fused mixture-of-experts weights, attention's packed projections.

transformers 5 stores a mixture-of-experts block's experts as one 3-D parameter per projection,
``(experts, out, in)`` (``(experts, in, out)`` where the experts module says ``is_transposed``),
and nn.MultiheadAttention reads ``in_proj_weight`` and ``out_proj.weight`` itself, so no layer
can be wrapped. Instead each such weight gets one low-rank update per expert,
``W_e + scale * B_e @ A_e``, swapped in while the holding module runs, and merging adds it to
the weight. A and B keep peft's ``target_parameters`` layout: A is ``(experts * r, in)``
(expert-major), B is ``(out, r * experts)`` (rank-major); one wrapper per parameter, nested in
the holder's parameter order as peft nests its ParamWrapper, so the file keys are peft's.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lightning_peft.core.layer import innermost_base
from lightning_peft.lora.layers import LoRAAdapter, LoRALayer, lora_scale


class LoRAParameter(LoRALayer):
    """LoRA on the parameter ``parameter_name`` (a dotted path below the holding module) of ``base_layer``."""

    per_row = False  # its update is one weight for the whole batch

    def swapped(self, tensor: str, value: Tensor, adapter: LoRAAdapter, settings: dict, where: str) -> Tensor:
        """A file's tensor for this slot, of its own rank and scale: the experts' factors interleave the rank."""
        if lora_scale(settings["alpha"], settings["r"], settings["use_rslora"]) != adapter.scale:
            raise ValueError(f"{where}: a fused-parameter adapter swaps in only with the slot's rank and scale")
        return self.same_shape(value, getattr(adapter, tensor), where)

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        shape = self.stored_weight().shape
        if len(shape) not in (2, 3):
            raise TypeError(f"LoRA adapts 2-D or 3-D parameters; '{parameter_name}' has shape {tuple(shape)}")
        self.transposed = len(shape) == 3 and bool(getattr(innermost_base(base_layer), "is_transposed", False))
        self.num_experts = shape[0] if len(shape) == 3 else 1
        out, fan_in = shape[-2:]
        self.out_features, self.in_features = (fan_in, out) if self.transposed else (out, fan_in)

    def extra_repr(self) -> str:
        return f"parameter={self.parameter_name!r}, experts={self.num_experts}, {super().extra_repr()}"

    def stored_weight(self) -> Tensor:
        return functools.reduce(getattr, self.parameter_name.split("."), innermost_base(self))

    def a_shape(self, r: int) -> tuple[int, ...]:
        return (self.num_experts * r, self.in_features)

    def b_shape(self, r: int) -> tuple[int, ...]:
        return (self.out_features, r * self.num_experts)

    def initialize(self, adapter: LoRAAdapter, init: str) -> None:
        if init == "pissa":
            raise ValueError(f"LoRA init='pissa' needs a linear layer, not the parameter '{self.parameter_name}'")
        super().initialize(adapter, init)

    def factors(self, adapter: LoRAAdapter) -> tuple[Tensor, Tensor]:
        """``(left, right)``, one matrix per expert, whose product ``scale * left @ right`` lies like the weight."""
        experts, r = self.num_experts, adapter.r
        a = adapter.lora_A.view(experts, r, self.in_features)
        b = adapter.lora_B.view(self.out_features, r, experts).permute(2, 0, 1)  # (experts, out, r)
        return (a.transpose(1, 2), b.transpose(1, 2)) if self.transposed else (b, a)

    def adapted_weight(self, adapters: list[LoRAAdapter]) -> Tensor:
        """The weight plus the updates of ``adapters``, computed in the weight's dtype (one fused op per adapter)."""
        weight = self.stored_weight()
        stacked = weight if weight.dim() == 3 else weight.unsqueeze(0)
        for adapter in adapters:
            left, right = self.factors(adapter)
            stacked = torch.baddbmm(stacked, left.to(weight.dtype), right.to(weight.dtype), alpha=adapter.scale)
        return stacked if weight.dim() == 3 else stacked[0]

    def forward(self, *args, **kwargs):
        if not self.active_adapters:
            return self.base_layer(*args, **kwargs)
        adapted = self.adapted_weight([self.adapters[name] for name in self.active_adapters])
        with parameter_reads_as(innermost_base(self), self.parameter_name, adapted):
            return self.base_layer(*args, **kwargs)

    def merge_update(self, adapter: LoRAAdapter) -> Tensor:
        left, right = self.factors(adapter)
        update = torch.bmm(left, right) * adapter.scale
        return update if self.stored_weight().dim() == 3 else update[0]

    def unmerge_update(self, adapter: LoRAAdapter) -> Tensor:
        return -self.merge_update(adapter)

    def _add_to_weight(self, update: Tensor) -> None:
        weight = self.stored_weight()
        weight.add_(update.to(weight.dtype))


@contextmanager
def parameter_reads_as(holder: nn.Module, path: str, value: Tensor) -> Iterator[None]:
    """Inside the block, ``holder``'s parameter at ``path`` reads as ``value``; the parameter itself is untouched."""
    module_path, _, name = path.rpartition(".")
    module = holder.get_submodule(module_path)
    original = module._parameters[name]
    module._parameters[name] = value
    try:
        yield
    finally:
        module._parameters[name] = original
