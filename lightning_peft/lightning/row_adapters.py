"""Predicting with several adapters at once: each input line names its adapter, ``NAME<TAB>text``.

``lightning-peft predict --adapters NAME=DIR ...`` loads every folder under its name and routes
each row of each batch to its adapter with `per_row_adapters`, so one model serves every task.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from lightning_peft.core.per_row import check_routable, per_row_adapters

BASE_MODEL = "-"  # the name that gives a row the base model, without an adapter


def parse_adapters(pairs: list[str]) -> dict[str, str]:
    """``NAME=DIR`` pairs as ``{name: folder}``, or a one-line error that says what is wrong."""
    folders: dict[str, str] = {}
    for pair in pairs:
        name, equals, folder = pair.partition("=")
        if not equals or not name or not folder:
            raise ValueError(f"--adapters {pair!r}: give each adapter as NAME=DIR, e.g. --adapters "
                             "tweets=adapters/tweets movies=adapters/movies")
        if name == BASE_MODEL or "\t" in name:
            raise ValueError(f"--adapters {pair!r}: {name!r} cannot name an adapter ('{BASE_MODEL}' is the base model)")
        if name in folders:
            raise ValueError(f"--adapters names '{name}' twice")
        folders[name] = folder
    return folders


def split_rows(lines: list[tuple[int, str]], names: list[str], source: str,
               keep_spaces: bool = False) -> tuple[list[str | None], list[str]]:
    """Each numbered ``NAME<TAB>text`` line (`numbered_lines`) as its adapter name (None for the base model) and its
    text (with the spaces around it where ``keep_spaces``: a causal LM's prompt, as it was trained)."""
    routed, texts = [], []
    for number, line in lines:
        name, tab, text = line.partition("\t")
        name = name.strip()
        if not tab or (name not in names and name != BASE_MODEL):
            what = f"names adapter {name!r}, which --adapters does not give" if tab else \
                "does not start with an adapter name and a tab"
            raise ValueError(f"{source}, line {number}: {line[:60]!r} {what}; with --adapters each line is "
                             f"NAME<TAB>text, NAME one of {', '.join(names)} or '{BASE_MODEL}' for the base model")
        if not text.strip():  # the texts go on alone, where an empty one would shift every later row's adapter
            raise ValueError(f"{source}, line {number}: {line[:60]!r} has no text after its adapter name; give "
                             "each line as NAME<TAB>text, or leave the line out")
        routed.append(None if name == BASE_MODEL else name)
        texts.append(text if keep_spaces else text.strip())
    return routed, texts


def prompt_lengths(configs: dict[str, dict], names: list[str | None]) -> set[int]:
    """The soft-prompt lengths that the rows' adapters (by their folders' ``configs``) put before the text (or 0)."""
    length = {name: config.get("num_virtual_tokens", 0) if config.get("peft_type") == "PROMPT_TUNING" else 0
              for name, config in configs.items()}
    return {0 if name is None else length[name] for name in names}


class RowAdapterRouting(Callback):
    """Route each row that ``predict`` sees, in input order, to the adapter its line names."""

    def __init__(self, names: list[str | None]) -> None:
        self.names = names
        self._next = 0
        self._routing = ExitStack()

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_routable(pl_module, self.names)  # every row's name, before the first batch
        self._next = 0

    def on_predict_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        rows = len(next(iter(batch.values())))
        names = self.names[self._next:self._next + rows]
        self._next += rows
        self._routing.enter_context(per_row_adapters(pl_module, names))

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._routing.close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._routing.close()
