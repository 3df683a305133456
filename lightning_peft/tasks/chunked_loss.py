"""Next-token cross-entropy fused with the output projection, a few rows of logits at a time.

A causal LM's loss over a batch of 8 x 128 tokens and a 49,152-token vocabulary materialises
201 MB of fp32 logits, then their softmax and its gradient. Here the output projection and the
loss run together on chunks of rows: each chunk's logits give its share of the loss and, in the
same pass, the gradient with respect to its hidden states (and to the head's weight when that
is trained), so backward has nothing to recompute and no chunk's logits outlive its loop step.

The hidden states are taken from the model's own forward: the head's ``forward`` is swapped, for
that call, for one that keeps its input and returns a placeholder that takes no memory. If the
model returns anything but that placeholder (or a slice of it), it transforms its logits (a
soft cap, a scale) and the caller falls back to the model's own loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MB of fp32 (smaller chunks run slower)


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T + bias`` against ``labels`` (-100 ignored), chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, chunk: int) -> Tensor:
        counted = (labels != IGNORE_INDEX).sum().clamp(min=1)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if ctx.needs_input_grad[2] else None
        for start in range(0, hidden.shape[0], chunk):
            rows, targets = hidden[start:start + chunk], labels[start:start + chunk]
            logits = torch.nn.functional.linear(rows, weight, bias).float()
            loss, grad_logits = loss_and_logit_gradient(logits, targets, 1 / counted)
            total += loss
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = grad_logits.to(weight.dtype) @ weight
            if grad_weight is not None:
                grad_weight += grad_logits.T @ rows.float()
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(*(t for t in (grad_hidden, grad_weight, grad_bias) if t is not None))
        ctx.present = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total / counted

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        saved = iter(ctx.saved_tensors)
        grads = [(next(saved) * grad_loss).to(dtype) if present else None
                 for present, dtype in zip(ctx.present, ctx.dtypes, strict=True)]
        return *grads, None, None


def loss_and_logit_gradient(logits: Tensor, targets: Tensor, grad_scale: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy of fp32 ``logits`` and its gradient ``(softmax - one_hot) * grad_scale`` (0 if ignored).

    The gradient is made in the logits' own memory: no second chunk-sized tensor is allocated.
    """
    counted = targets != IGNORE_INDEX
    rows, safe = torch.arange(len(targets), device=logits.device), targets.clamp(min=0)
    target_logits = logits[rows, safe]
    peak = logits.amax(dim=-1, keepdim=True)
    exp = logits.sub_(peak).exp_()
    total = exp.sum(dim=-1, keepdim=True)
    loss = ((total.log().add_(peak).squeeze(1) - target_logits) * counted).sum()
    row_scale = counted[:, None] * grad_scale
    grad = exp.mul_(row_scale / total)  # softmax, scaled, in one pass
    grad[rows, safe] -= row_scale.squeeze(1)
    return loss, grad


def next_token_loss(hidden: Tensor, head: nn.Linear, labels: Tensor) -> Tensor:
    """The causal-LM loss of transformers (position t predicts label t + 1, -100 ignored, mean) without full logits."""
    valid = (labels == IGNORE_INDEX) | ((labels >= 0) & (labels < head.out_features))
    torch._assert_async(valid.all(), f"labels must be token ids below {head.out_features} or {IGNORE_INDEX} (ignored)")
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    flat = hidden.reshape(-1, hidden.shape[-1])
    chunk = max(1, CHUNK_ELEMENTS // head.out_features)
    return LinearCrossEntropy.apply(flat, head.weight, head.bias, shifted.reshape(-1), chunk)


def fp16_autocast(device: torch.device) -> bool:
    """Whether autocast computes in float16 on ``device``: its loss scaling would come after the gradient is made."""
    return torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.float16


def rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The random state of the CPU and of ``device``'s accelerator, to draw the same numbers again."""
    accelerator = torch.get_device_module(device.type).get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), accelerator


def restore_rng(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    """Put back the random state :func:`rng_state` took."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.get_device_module(device.type).set_rng_state(state[1], device)


def plain_linear_head(head: nn.Module | None) -> bool:
    """Whether ``head`` is a bare ``nn.Linear`` with ordinary tensors: one the fused loss computes exactly."""
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return False
    tensors = [head.weight] + ([] if head.bias is None else [head.bias])
    return all(type(t) is nn.Parameter for t in tensors)  # not a DTensor or FSDP's flat view


@contextmanager
def capturing_head_input(head: nn.Linear) -> Iterator[dict[str, Tensor]]:
    """Make ``head`` keep its input and return a zero-memory placeholder of its output's shape, for one block."""
    captured: dict[str, Tensor] = {}

    def capture(hidden: Tensor) -> Tensor:
        captured["hidden"] = hidden
        captured["placeholder"] = hidden.new_zeros(*hidden.shape[:-1], 1).expand(*hidden.shape[:-1],
                                                                                   head.out_features)
        return captured["placeholder"]

    head.forward = capture
    try:
        yield captured
    finally:
        del head.forward  # the class's forward again


def positions_behind(logits: Tensor, placeholder: Tensor) -> slice | None:
    """Which positions of the head's input the model's ``logits`` are, or None if the model transformed them."""
    if logits is placeholder:
        return slice(None)
    same_memory = logits.untyped_storage().data_ptr() == placeholder.untyped_storage().data_ptr()
    if not same_memory or logits.stride() != placeholder.stride() or logits.dim() != 3 or \
            logits.shape[0] != placeholder.shape[0] or logits.shape[2] != placeholder.shape[2]:
        return None
    start = logits.storage_offset() - placeholder.storage_offset()  # a slice of positions: stride 1 along dim 1
    return slice(start, start + logits.shape[1])
