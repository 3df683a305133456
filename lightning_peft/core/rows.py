"""The rows of a batch that one adapter computes, taken and written back without a copy where they are consecutive."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RowSet:
    """The rows of one adapter: their indices, and as a slice when they are consecutive (taken without a copy)."""

    index: Tensor  # int64, on the CPU
    span: slice | None

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
