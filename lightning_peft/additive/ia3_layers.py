"""IA3 layers: learned vectors that rescale a linear layer's output, or its input for feed-forward layers.

As in Hugging Face peft, a vector ``ia3_l`` starts at ones and is stored as ``(out, 1)`` when
it scales the output and as ``(1, in)`` when it scales the input, so either shape multiplies
the ``(out, in)`` weight directly; the output scaling also scales the bias.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_peft.core.layer import PEFTLayer, adapter_dtype, innermost_base, linear_features
from lightning_peft.core.weights import read_weight, write_weight


class IA3Adapter(nn.Module):
    """One learned scaling vector, on the layer's input (``feedforward``) or on its output."""

    def __init__(self, width: int, feedforward: bool, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.feedforward = feedforward
        shape = (1, width) if feedforward else (width, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, dtype=dtype, device=device))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Ones: the layer computes as its base (also what a model materialized from the meta device starts at)."""
        self.ia3_l.fill_(1.0)


class IA3Layer(PEFTLayer):
    """nn.Linear or transformers' Conv1D (GPT-2, weight stored transposed) with IA3 vectors."""

    method = "IA3"
    mergeable = True
    per_row = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.transposed = not isinstance(innermost_base(base_layer), nn.Linear)  # Conv1D: weight is (in, out)
        self.in_features, self.out_features = linear_features(base_layer)

    def add_adapter(self, name: str, feedforward: bool) -> IA3Adapter:
        weight = innermost_base(self.base_layer).weight
        width = self.in_features if feedforward else self.out_features
        adapter = IA3Adapter(width, feedforward, adapter_dtype(weight), weight.device)
        self.register_adapter(name, adapter)
        return adapter

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        routed = self.row_adapters is not None
        input_scale = self._row_scale(True, like=x) if routed else self._active_scale(feedforward=True)
        if input_scale is not None:
            x = (x.to(input_scale.dtype) * input_scale).to(x.dtype)
        out = self.base_layer(x, *args, **kwargs)
        output_scale = self._row_scale(False, like=out) if routed else self._active_scale(feedforward=False)
        if output_scale is not None:
            out = (out * output_scale).to(out.dtype)
        return self.with_resting(out) if routed else out

    def _active_scale(self, feedforward: bool) -> Tensor | None:
        """The product of the active vectors on the input (``feedforward``) or output, if any."""
        scale = None
        for name in self.active_adapters:
            adapter = self.adapters[name]
            if adapter.feedforward == feedforward:
                vector = adapter.ia3_l.flatten()
                scale = vector if scale is None else scale * vector
        return scale

    def _row_scale(self, feedforward: bool, like: Tensor) -> Tensor | None:
        """Under `per_row_adapters`: each row's vector, shaped to multiply ``like`` (ones for rows without one)."""
        groups = [(a, rows) for a, rows in self.row_groups(like) if a.feedforward == feedforward]
        if not groups:
            return None
        vector = groups[0][0].ia3_l
        scale = vector.new_ones(like.shape[0], vector.numel())
        for adapter, rows in groups:
            rows.put(scale, adapter.ia3_l.flatten().expand(len(rows), -1))
        return scale.view(like.shape[0], *[1] * (like.dim() - 2), -1)

    @torch.no_grad()
    def merged_base_layer(self) -> nn.Module:
        for name in self.active_adapters:
            self._scale_base(self.adapters[name], self.adapters[name].ia3_l)
        return self.base_layer

    @torch.no_grad()
    def unmerge(self) -> None:
        for name in reversed(self.active_adapters):
            self._scale_base(self.adapters[name], self.adapters[name].ia3_l, divide=True)

    def unmerge_refusal(self) -> str | None:
        """A vector with a zero (or non-finite) entry wiped what it scaled: dividing it out would write inf/NaN."""
        for name in self.merged_adapters:
            vector = self.adapters[name].ia3_l
            bad = int((~torch.isfinite(1 / vector.float())).sum())
            if bad:
                return (f"IA3[{name}]'s vector has {bad} zero or non-finite entr{'y' if bad == 1 else 'ies'}, which "
                        "the merge multiplied into the weights for good; load the base model again instead")
        return None

    def _scale_base(self, adapter: IA3Adapter, vector: Tensor, divide: bool = False) -> None:
        """Multiply (or divide) the weight's columns (input scaling) or rows and bias (output scaling) by ``vector``.

        In float32 (float64 for a float64 weight), rounded once to the weight's dtype, so a merge and an unmerge
        give the weights back.
        """
        scale = torch.div if divide else torch.mul
        weight = read_weight(self.base_layer)
        exact = torch.promote_types(weight.dtype, torch.float32)
        scaled = scale(self._as_out_in(weight).to(exact), vector.to(exact))
        write_weight(self.base_layer, self._as_out_in(scaled.to(weight.dtype)))
        bias = getattr(self.base_layer, "bias", None)
        if not adapter.feedforward and bias is not None:
            bias.copy_(scale(bias.to(exact), vector.flatten().to(exact)))

    def _as_out_in(self, weight: Tensor) -> Tensor:
        """``weight`` as an ``(out, in)`` view, or back: Conv1D stores it as ``(in, out)``."""
        return weight.T if self.transposed else weight

