"""What the data modules share: a built-in source fetched once, splits read once, the task's tokenizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import lightning as L


class SourceData(L.LightningDataModule):
    """A data module reading ``SOURCES[source]`` or files; subclasses read their splits and may check them."""

    SOURCES: ClassVar[dict[str, Callable[..., Any]]] = {}
    source: str | None
    splits: dict[str, Any]
    tokenizer: Any

    def prepare_data(self) -> None:
        if self.source is not None:
            self.SOURCES[self.source]()  # fetch into the cache once, on one process

    def setup(self, stage: str) -> None:
        if not self.splits:
            self.splits = self._read_splits()
            self._splits_read()
        if self.tokenizer is None:
            self.tokenizer = self.trainer.lightning_module.tokenizer
        self._check_tokenizer()

    def _read_splits(self) -> dict[str, Any]:
        raise NotImplementedError

    def _splits_read(self) -> None:
        """Called once the splits are read (label names, say)."""

    def _check_tokenizer(self) -> None:
        """Called once the tokenizer is known."""
