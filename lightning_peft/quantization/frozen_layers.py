"""bitsandbytes layers for a frozen base: an int8 one that trains on CPU without keeping its input, and biases
that keep their dtype.

bitsandbytes' CPU training path (``MatMul8bitFp``) keeps every layer's input for a weight
gradient that a frozen base never needs, so an int8 model peaked above the same model in fp32.
`FrozenLinear8bit` computes the same numbers (the weight dequantized exactly as bitsandbytes does
it) and keeps only the int8 weight and its scales for backward. Both layers add a cast copy of the
bias where bitsandbytes casts the bias itself, for good, to the input's dtype: a bias that BitFit
trains in float32 would otherwise become bf16 under mixed precision and stop moving.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
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
    """``bnb.nn.Linear8bitLt`` whose CPU forward keeps nothing of its input (its weight is frozen) and computes
    the same in training and eval, and whose bias keeps its dtype."""

    def forward(self, x: Tensor) -> Tensor:
        self.state.is_training = self.training
        if self.weight.CB is not None:
            self.init_8bit_state()
        bias = None if self.bias is None else self.bias.to(x.dtype)  # a cast copy; the gradient reaches the bias
        if x.device.type == "cpu":  # in eval mode too: bitsandbytes would quantize the input as well
            return FrozenInt8MatMul.apply(x, self.state.CB, self.state.SCB, bias)
        out = bnb.matmul(x, self.weight, bias=bias, state=self.state)
        if self.state.CB is not None:  # as bitsandbytes does: the weight points at its int8 rows again
            self.weight.data = self.state.CB
        return out


_4BIT_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what bitsandbytes' 4-bit matmul takes


class FrozenLinear4bit(bnb.nn.Linear4bit):
    """``bnb.nn.Linear4bit`` whose bias keeps its dtype, and whose ``compute_dtype=None`` follows each input
    (a float64 one computes in float32: bitsandbytes' CPU matmul gives wrong numbers, then NaN, in float64).

    bitsandbytes fixes a compute dtype of None at the first input's, so an fp32 forward after a
    bf16 one would compute in bf16; and it repacks the weight at an eval forward on AVX512-BF16
    CPUs, after which outputs depend on the call history (about 1e-2 relative) and differ from
    the weight that merging and DoRA read. Neither happens here.
    """

    def forward(self, x: Tensor) -> Tensor:
        fix_4bit_weight_quant_state_from_module(self)
        dtype = self.compute_dtype or (x.dtype if x.dtype in _4BIT_COMPUTE_DTYPES else torch.float32)
        bias = None if self.bias is None else self.bias.to(dtype)
        return bnb.matmul_4bit(x.to(dtype), self.weight, bias=bias, quant_state=self.weight.quant_state).to(x.dtype)
