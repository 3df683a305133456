"""Predictions as users read them: one line per input on stdout, and a CSV or JSONL table on request.

A classification prediction is a dict (``label``, ``probability``, ``probabilities`` per class);
a causal LM's is the generated text. Only predictions go to stdout, so
``lightning-peft predict ... > predictions.txt`` captures them alone.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from lightning_peft.core.files import atomic_write
from lightning_peft.lightning.row_adapters import BASE_MODEL

TABLE_FORMATS = (".csv", ".jsonl")


def _check_writable(path: Path) -> None:
    """Refuse, before any prediction, a table that could not be written at the end (a file in the way, no rights)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"):
            pass
    except OSError as err:
        raise ValueError(f"--output {path}: cannot write there ({err.strerror or err})") from None
    if path.is_dir():
        raise ValueError(f"--output {path} is a folder; give a file name ending in {' or '.join(TABLE_FORMATS)}")


class PredictionWriter(BasePredictionWriter):
    """Print each prediction on its own line; with ``output``, also write every input and prediction to that table."""

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="batch")
        if output is not None and Path(output).suffix.lower() not in TABLE_FORMATS:
            raise ValueError(f"--output {output}: write predictions to a {' or '.join(TABLE_FORMATS)} file")
        if output is not None:
            _check_writable(Path(output))
        self.output = output
        self.row_adapters: list[str | None] | None = None  # each input's adapter, with `predict --adapters`
        self.rows: list[dict[str, Any]] = []

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1:  # each process would print its share, out of order, with the sampler's repeats
            raise ValueError("predict prints its predictions in input order from one process: run it with "
                             "--trainer.devices=1 (and one node)")
        self.rows = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        inputs = getattr(trainer.datamodule, "predict_texts", None) or []
        for index, item in zip(batch_indices or [None] * len(prediction), prediction, strict=True):
            print_line(prediction_line(item))
            if self.output is not None:
                known = index is not None and index < len(inputs)
                text = inputs[index] if known else None
                self.rows.append(prediction_row(text, item))
                if self.row_adapters is not None and known:
                    self.rows[-1] = {"adapter": self.row_adapters[index] or BASE_MODEL, **self.rows[-1]}

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.output is not None and trainer.is_global_zero:
            write_table(Path(self.output), self.rows)


def print_line(line: str) -> None:
    """Print ``line`` to stdout; once its reader has gone (``| head``), print nothing more, quietly, and go on (a
    ``--output`` table is still written)."""
    try:
        print(line, flush=True)
    except BrokenPipeError:  # as Python's docs advise: stdout to devnull, so nothing fails at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # where str.splitlines breaks a line


def prediction_line(item: Any) -> str:
    """``positive<TAB>0.9312`` for a classification, the generated text on one line for generation: a backslash as
    ``\\\\`` and every character that a reader may break a line at (``\\n``, ``\\r``, U+2028...) as its Python
    escape, so each line reads back as it was."""
    if isinstance(item, dict):
        return f"{item['label']}\t{item['probability']:.4f}"
    text = str(item).replace("\\", "\\\\")
    return "".join(char.encode("unicode_escape").decode() if char in LINE_BREAKS else char for char in text)


def prediction_row(text: str | None, item: Any) -> dict[str, Any]:
    """One row of the table: the input, then the label, its probability and each class's, or the generated text."""
    if isinstance(item, dict):
        return {"input": text, "label": item["label"], "probability": item["probability"],
                **{f"p_{name}": p for name, p in item["probabilities"].items()}}
    return {"input": text, "generated": item}


def write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` as CSV or JSONL (by ``path``'s extension), atomically."""
    if path.suffix.lower() == ".jsonl":
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return

    def write_csv(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["input"])
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write_csv)
