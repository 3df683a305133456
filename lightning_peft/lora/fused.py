"""LoRA on a frozen nn.Linear as one autograd function: the base and the update share their passes.

    out = x @ W.T + b + scale * ((x * keep) @ A.T) @ B.T        (keep: the dropout mask, or all True)

Autograd on the plain formula keeps a float copy of the dropped input per layer, writes the
update and the sum as two new tensors, computes ``grad_B`` in a slow transposed layout and adds
the input gradients of the base and the update as two tensors. Here the update is added into the
base output in place (``addmm_``), backward adds the update's input gradient into the base's
(again ``addmm_``), and only ``x`` (which the next layers keep anyway), the ``(tokens, r)``
hidden ``x A^T`` and a one-byte mask are kept. ``W`` and ``b`` are frozen: no gradient is made for them.
With dropout on CPU, the mask as floats and the dropped input are written into two buffers that
every layer reuses (`scratch`).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor


class FusedLoRALinear(torch.autograd.Function):
    """``F.linear(x, W, b) + scale * F.linear(F.linear(x * keep, A), B)`` with frozen ``W`` and ``b``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scale: float, keep: Tensor | None) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])  # (tokens, in)
        hidden = rank_product(dropped(rows, keep), lora_A)  # (tokens, r)
        out = x.new_empty(*x.shape[:-1], weight.shape[0])  # not a view: the model may change it in place
        linear_into(out.view(-1, weight.shape[0]), rows, weight, bias).addmm_(hidden, lora_B.T, alpha=scale)
        ctx.save_for_backward(x, weight, lora_A, lora_B, hidden, keep)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, lora_A, lora_B, hidden, keep = ctx.saved_tensors
        rows = x.reshape(-1, x.shape[-1])
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])  # (tokens, out)
        grad_hidden = rank_product(grad_rows, lora_B.T).mul_(ctx.scale)  # (tokens, r)
        grad_B = (hidden.T @ grad_rows).T.mul_(ctx.scale) if ctx.needs_input_grad[4] else None  # fast layout
        factor = None if keep is None else mask_factor(keep, rows)  # made once, used twice
        dropped_rows = rows if factor is None else torch.mul(rows, factor, out=scratch(1, rows))
        grad_A = grad_hidden.T @ dropped_rows if ctx.needs_input_grad[3] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_rows @ weight  # (tokens, in)
            if factor is None:
                grad_x.addmm_(grad_hidden, lora_A)
            else:
                grad_x.addcmul_(torch.mm(grad_hidden, lora_A, out=dropped_rows), factor)  # reuses its buffer
            grad_x = grad_x.view(x.shape)
        return grad_x, None, None, grad_A, grad_B, None, None


def linear_into(out: Tensor, rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(rows, weight, bias)`` written into ``out`` (a 2-D view of the result, which is then no view).

    A custom autograd function's output must not be a view, or a model that changes it in place
    (Longformer's ``query /= sqrt(d)``, Wav2Vec2's masking) fails in backward; F.linear of a 3-D input
    returns one.
    """
    return torch.mm(rows, weight.T, out=out) if bias is None else torch.addmm(bias, rows, weight.T, out=out)


def rank_product(rows: Tensor, factor: Tensor) -> Tensor:
    """``rows @ factor.T``, a ``(tokens, r)`` result, computed as ``(factor @ rows.T).T``.

    MKL's CPU kernel for a product with few output columns is two to three times slower than for
    the same product with few output rows (0.26 or 0.47 ms against 0.16 ms at 1,024 x 576, rank 8);
    the transposed view it returns works as well in every later product.
    """
    return (factor @ rows.T).T


def dropped(rows: Tensor, keep: Tensor | None) -> Tensor:
    """``rows`` with the dropped elements zeroed (the 1/(1-p) scale is folded into ``scale``)."""
    return rows if keep is None else torch.mul(rows, mask_factor(keep, rows), out=scratch(1, rows))


def mask_factor(keep: Tensor, rows: Tensor) -> Tensor:
    """The bool mask as 0/1 in ``rows``' dtype and shape: multiplying by it is ten times faster than by the bool."""
    return scratch(0, rows).copy_(keep.view(torch.uint8).view(rows.shape))


_SCRATCH: dict[tuple[int, torch.dtype, int], Tensor] = {}


def scratch(slot: int, like: Tensor) -> Tensor:
    """A buffer shaped as ``like`` for one of the dropout path's two temporaries, reused by every layer on CPU.

    On CPU each new tensor of a layer's input size is fresh memory whose pages fault in on first
    touch, which cost more than the arithmetic on them (1 ms a layer at 1,024 x 576). The mask as
    floats and the dropped input live only inside one forward or backward, so each thread keeps
    one buffer per slot, grown to the largest input seen. On a GPU (caching allocator) and while
    torch.compile traces, a new tensor.
    """
    if like.device.type != "cpu" or torch.compiler.is_compiling():
        return torch.empty_like(like)
    key = (slot, like.dtype, threading.get_ident())
    flat = _SCRATCH.get(key)
    if flat is None or flat.numel() < like.numel():
        flat = _SCRATCH[key] = torch.empty(like.numel(), dtype=like.dtype)
    return flat[:like.numel()].view(like.shape)


class FusedDoRALinear(torch.autograd.Function):
    """DoRA without dropout: ``m / ||W + s B A||_row * (x (W + s B A)^T) + b``, the norm given (detached).

    The base projection and the update are one ``(tokens, out)`` tensor ``y`` that the output
    rescales in place; ``y`` is kept for the magnitude's gradient, as the plain formula keeps its
    base output, but none of the plain formula's four other full-size temporaries is made.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                magnitude: Tensor, scale: float, norm: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        hidden = rank_product(rows, lora_A)
        y = F.linear(rows, weight).addmm_(hidden, lora_B.T, alpha=scale)  # x (W + s B A)^T
        norm_scale = magnitude / norm
        y_out = y.view(*x.shape[:-1], y.shape[-1])
        out = torch.addcmul(bias, y_out, norm_scale) if bias is not None else y_out * norm_scale  # new: not a view
        ctx.save_for_backward(x, weight, lora_A, lora_B, hidden, y, norm_scale, norm)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, lora_A, lora_B, hidden, y, norm_scale, norm = ctx.saved_tensors
        rows = x.reshape(-1, x.shape[-1])
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_magnitude = (grad_rows * y).sum(0).div_(norm) if ctx.needs_input_grad[5] else None
        grad_y = grad_rows * norm_scale  # (tokens, out)
        grad_hidden = rank_product(grad_y, lora_B.T).mul_(ctx.scale)
        grad_B = (hidden.T @ grad_y).T.mul_(ctx.scale) if ctx.needs_input_grad[4] else None
        grad_A = grad_hidden.T @ rows if ctx.needs_input_grad[3] else None
        grad_x = (grad_y @ weight).addmm_(grad_hidden, lora_A).view(x.shape) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, grad_A, grad_B, grad_magnitude, None, None
