"""The rows of a batch that one adapter computes: taken and written back by index, or by mask under torch.compile."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor


@dataclass(frozen=True)
class RowSet:
    """The rows of one adapter: their indices, and as a slice when they are consecutive (taken without a copy)."""

    index: Tensor  # int64, on the CPU
    span: slice | None
    only_these: ClassVar[bool] = True  # `take` gives these rows alone

    @classmethod
    def of(cls, rows: list[int]) -> RowSet:
        consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
        return cls(torch.tensor(rows), slice(rows[0], rows[0] + len(rows)) if consecutive else None)

    def __len__(self) -> int:
        return len(self.index)

    def take(self, batch: Tensor) -> Tensor:
        """These rows of ``batch``."""
        return batch[self.span] if self.span is not None else batch.index_select(0, self.index.to(batch.device))

    def put(self, target: Tensor, values: Tensor) -> None:
        """Write ``values`` into these rows of ``target``, in place (``target`` must be a fresh tensor)."""
        if self.span is not None:
            target[self.span] = values
        else:
            target.index_copy_(0, self.index.to(target.device), values)


@dataclass(frozen=True)
class RowMask:
    """The rows of one adapter as a mask over the batch: every row is computed, only these are written.

    Under torch.compile the routing then reaches the graph as a tensor, so a new assignment of
    adapters to rows runs the same compiled graph instead of compiling another.
    """

    mask: Tensor  # bool, one entry per row of the batch
    only_these: ClassVar[bool] = False  # `take` gives every row

    def __len__(self) -> int:
        return self.mask.shape[0]

    def take(self, batch: Tensor) -> Tensor:
        """Every row of ``batch``."""
        return batch

    def put(self, target: Tensor, values: Tensor) -> None:
        """Write these rows of ``values`` (one per row of ``target``) into ``target``, in place."""
        keep = self.mask.to(target.device).view(-1, *[1] * (target.dim() - 1))
        target.copy_(torch.where(keep, values, target))
