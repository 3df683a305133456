"""Dropout masks that are cheap to draw and to keep: one byte per element, drawn fast on CPU.

``nn.Dropout`` on CPU draws one Bernoulli sample per element through torch's Mersenne
Twister (about 8 ns each, over a second per step for LoRA on every attention projection of a
135M model) and keeps a full float copy of the dropped input for backward. Here the mask is a
bool tensor that an adapter keeps instead of that copy. On CPU its bits come from numpy's SFC64
generator, seeded by one draw from torch's generator, so ``torch.manual_seed``, checkpoint
recomputation (which restores torch's RNG state) and per-layer independence behave as with
``nn.Dropout``. A 16-bit uniform integer decides each element: the keep probability is ``1 - p``
rounded to a multiple of 1/65536 (at most 7.7e-6 away), and kept values are scaled by
``1 / (1 - p)`` exactly as ``nn.Dropout`` scales them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

_LEVELS = 1 << 16  # a 16-bit uniform integer per element


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> Tensor:
    """A bool mask of ``shape`` whose elements are True (kept) with probability ``1 - p``, independently."""
    if device.type != "cpu":  # GPU generators are fast: take torch's own Bernoulli draw
        return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1 - p)
    count = int(np.prod(shape))
    seed = int(torch.randint(0, 2**62, (1,)).item())  # advances torch's CPU generator, as nn.Dropout would
    words = np.random.SFC64(seed).random_raw((count + 3) // 4)  # four 16-bit draws per 64-bit word
    threshold = round((1 - p) * _LEVELS) - _LEVELS // 2  # int16 draws are uniform on [-32768, 32767]
    return torch.from_numpy(words.view(np.int16)[:count] < threshold).reshape(shape)  # numpy compares 5x faster


def as_factor(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """The mask as 0/1 of ``dtype``: multiplying by it is ten times faster on CPU than by the bool mask."""
    return keep.view(torch.uint8).to(dtype)  # bool -> float is slow on CPU; uint8 -> float is not


class MaskedScale(torch.autograd.Function):
    """``x * keep * scale`` that keeps the one-byte mask for backward, not a float copy of it."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * as_factor(keep, x.dtype) * scale

    @staticmethod
    def backward(ctx, grad: Tensor):
        (keep,) = ctx.saved_tensors
        return grad * as_factor(keep, grad.dtype) * ctx.scale, None, None


class Dropout(nn.Module):
    """``nn.Dropout(p)`` on the fast mask; ``keep_mask`` gives the mask alone to code that applies it itself."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    @property
    def active(self) -> bool:
        """Whether this dropout drops anything now (training, with ``p > 0``)."""
        return self.training and self.p > 0

    @property
    def keep_scale(self) -> float:
        """The factor on kept elements, ``1 / (1 - p)``."""
        return 1.0 / (1.0 - self.p)

    def keep_mask(self, x: Tensor) -> Tensor | None:
        """A fresh mask for ``x``, or None when nothing is dropped."""
        return keep_mask(x.shape, self.p, x.device) if self.active else None

    def forward(self, x: Tensor) -> Tensor:
        keep = self.keep_mask(x)
        return x if keep is None else MaskedScale.apply(x, keep, self.keep_scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"
