"""Bottleneck adapter layers: output = h + up(act(down(h))), with h the wrapped layer's output.

The adapter sits on a block's output projection, before the residual add and norm that the
block does itself (Houlsby et al., 2019). The up-projection starts at zero, so a freshly
added adapter leaves the model's output unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_peft.core.dropout import Dropout
from lightning_peft.core.layer import PEFTLayer, adapter_dtype, innermost_base, to_adapter_dtype
from lightning_peft.core.per_row import replace_rows
from lightning_peft.core.targeting import linear_types

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


class ZeroStart(nn.Linear):
    """An nn.Linear that starts (and restarts, in ``reset_parameters``) at zero: the adapter's up-projection.

    A model materialized from the meta device runs every module's ``reset_parameters`` (Lightning's
    FSDP strategies): a plain nn.Linear would start random there, and the model would not start as its base.
    """

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class BottleneckAdapter(nn.Module):
    """down (hidden -> bottleneck), activation, up (bottleneck -> hidden), dropout, residual."""

    def __init__(self, hidden: int, bottleneck_dim: int, activation: str, dropout: float,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck_dim, dtype=dtype, device=device)
        self.activation = ACTIVATIONS[activation]()
        self.up = ZeroStart(bottleneck_dim, hidden, dtype=dtype, device=device)
        self.dropout = Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:
        update = self.dropout(self.up(self.activation(self.down(to_adapter_dtype(h, self.down.weight.dtype)))))
        return h + update.to(h.dtype)


class AdapterLayer(PEFTLayer):
    """A linear-like base layer (nn.Linear, GPT-2's Conv1D) whose output passes through adapters in turn."""

    method = "Adapter"
    mergeable = False
    per_row = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.out_features = output_features(base_layer)

    def add_adapter(self, name: str, bottleneck_dim: int, activation: str = "gelu",
                    dropout: float = 0.0) -> BottleneckAdapter:
        weight = innermost_base(self.base_layer).weight
        adapter = BottleneckAdapter(self.out_features, bottleneck_dim, activation, dropout, adapter_dtype(weight),
                                    weight.device)
        self.register_adapter(name, adapter)
        return adapter

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.row_adapters is not None:
            return self.with_resting(replace_rows(out, self.row_groups(out),
                                                  lambda adapter, rows: adapter(rows.take(out))))
        for name in self.active_adapters:
            out = self.adapters[name](out)
        return out


def output_features(layer: nn.Module) -> int:
    """The hidden size an adapter on ``layer`` works in: nn.Linear's out_features, Conv1D's nf."""
    base = innermost_base(layer)
    if not isinstance(base, linear_types()):
        raise TypeError(f"Adapter needs a linear layer (nn.Linear or Conv1D), got {type(base).__name__}")
    return base.out_features if isinstance(base, nn.Linear) else base.nf
