"""An int8 frozen base that trains on CPU without keeping its input: the weight gets no gradient.

bitsandbytes' CPU training path (``MatMul8bitFp``) keeps every layer's input for a weight
gradient that a frozen base never needs, so an int8 model peaked above the same model in fp32.
This layer computes the same numbers (the weight dequantized exactly as bitsandbytes does it)
and keeps only the int8 weight and its scales for backward.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from torch import Tensor


def dequantize_rows(rows: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """LLM.int8()'s row-wise dequantization, in bitsandbytes' own order of operations (so bit-equal)."""
    return rows.to(dtype).mul_(scales.unsqueeze(1).mul(1.0 / 127.0))


class FrozenInt8MatMul(torch.autograd.Function):
    """``F.linear(x, dequantized W, bias)`` that saves the int8 weight, not ``x``."""

    @staticmethod
    def forward(ctx, x: Tensor, rows: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(rows, scales)
        ctx.dtype = x.dtype
        return F.linear(x, dequantize_rows(rows, scales, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        rows, scales = ctx.saved_tensors
        grad_x = grad_out.to(ctx.dtype) @ dequantize_rows(rows, scales, ctx.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_bias


class FrozenLinear8bit(bnb.nn.Linear8bitLt):
    """``bnb.nn.Linear8bitLt`` whose CPU training forward keeps nothing of its input (its weight is frozen)."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and x.device.type == "cpu") or self.weight.requires_grad:
            return super().forward(x)
        self.state.is_training = True
        if self.weight.CB is not None:
            self.init_8bit_state()
        if self.bias is not None and self.bias.dtype != x.dtype:
            self.bias.data = self.bias.data.to(x.dtype)  # as bitsandbytes does
        return FrozenInt8MatMul.apply(x, self.state.CB, self.state.SCB, self.bias)
