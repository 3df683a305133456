"""Text classification data: a built-in source or CSV/TSV/JSONL files, tokenized by the task's tokenizer."""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import partial
from typing import Any

from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from lightning_peft import assets
from lightning_peft.data.base import SourceData, evaluation_loader, shuffled_loader
from lightning_peft.data.files import check_data_arguments, check_enough_to_hold_out, read_lines, read_rows

SOURCES = {domain: partial(assets.sentiment_split, domain) for domain in assets.SENTIMENT_DOMAINS}
SOURCE_LABELS = {domain: ("negative", "positive") for domain in SOURCES}  # a built-in source's label names, by id
Example = tuple[str, object]


class TextClassificationData(SourceData):
    """A LightningDataModule of labelled texts for classification, from a built-in data set or CSV/TSV/JSONL files.

    Tokenized by the task model's tokenizer (or ``tokenizer``) when the data loaders are built.
    Labels may be integers, used as class ids, or strings: then the sorted names of the training
    labels become ``labels`` (ids in that order), which `SequenceClassification` takes as its
    class names, and a val or test label that training never saw is an error. Batches are dicts of
    ``input_ids``, ``attention_mask`` and ``labels``, padded to the longest text; the training
    batches are shuffled with ``seed``.

    Args:
        source: a built-in data set, or ``None`` to read files (with a source, the train, val and
            test files are not read). Sentiment, labelled ``"negative"`` or ``"positive"``:
            ``"movie-snippets"`` (10,568 movie review snippets, 2,000 of them drawn with ``seed``
            for test), ``"tweets"`` (4,196), ``"amazon-snippets"`` (3,610 product review
            snippets) and ``"nyt-snippets"`` (4,946 New York Times editorial snippets), 1,000 of
            each drawn for test.
        train_file: training data: a CSV, TSV or JSONL (``.jsonl``, ``.json``) file with
            ``text_column`` and ``label_column``.
        val_file: validation data, in the forms of ``train_file``; without it ``val_fraction`` of
            the training rows is held out.
        test_file: test data, in the forms of ``train_file``.
        predict_file: raw texts to label, one per line (``-`` reads standard input).
        text_column: the column (JSON key) that holds the text.
        label_column: the column (JSON key) that holds the label.
        max_length: tokens per text (longer texts are cut).
        batch_size: examples per batch.
        val_fraction: share of the training rows held out, drawn at random with ``seed``, for
            validation when there is no val set, in ``[0, 1)``; 0 holds out nothing (no validation).
        seed: seeds the built-in source's test draw, the held-out rows and the shuffling of the
            training batches.
        tokenizer: ``None`` takes the tokenizer of the task model this data trains with
            (``trainer.lightning_module.tokenizer``).
        num_workers: DataLoader worker processes (0 loads in the main process).

    Raises:
        ValueError: when ``source`` is not a built-in data set, neither ``source`` nor a train, test
            or predict file is given, or ``val_fraction`` is not in ``[0, 1)``. Later, as the data
            is read (at setup, for the data loaders): when a file is malformed (the error names the
            file and line), or a label does not fit the training labels.
        FileNotFoundError: later, as the data is read, when a data file does not exist.

    Examples:
        ```python
        from lightning_peft.data import TextClassificationData

        data = TextClassificationData(train_file="train.csv", test_file="test.csv", text_column="review")
        trainer.fit(module, datamodule=data)
        ```
    """

    SOURCES = SOURCES

    def __init__(self, source: str | None = None, train_file: str | None = None, val_file: str | None = None,
                 test_file: str | None = None, predict_file: str | None = None, text_column: str = "text",
                 label_column: str = "label",
                 max_length: int = 128, batch_size: int = 32, val_fraction: float = 0.1, seed: int = 0,
                 tokenizer: PreTrainedTokenizerBase | None = None, num_workers: int = 0) -> None:
        super().__init__()
        check_data_arguments(source, SOURCES, {"train_file": train_file, "val_file": val_file, "test_file": test_file},
                             predict_file, val_fraction)
        self.source, self.files = source, {"train": train_file, "val": val_file, "test": test_file}
        self.predict_file = predict_file
        self.text_column, self.label_column = text_column, label_column
        self.max_length, self.batch_size, self.num_workers = max_length, batch_size, num_workers
        self.val_fraction, self.seed = val_fraction, seed
        self.tokenizer = tokenizer
        self.splits: dict[str, list[Example]] = {}
        self.labels: list[str] | None = None
        self.predict_texts: list[str] = []  # the texts of the last predict_dataloader, in order

    def _splits_read(self) -> None:
        """Label names from the training rows (those held out for validation too), else from the task."""
        train = self.splits.get("train", [])
        held_out = self.splits.get("val", []) if self.files["val"] is None else []
        self.labels = _label_names([*train, *held_out]) if train else self._task_labels()
        self._check_labels()

    def _task_labels(self) -> list[str] | None:
        """The task's own label names (``SequenceClassification(labels=...)``), for data without a training split."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        labels = getattr(module, "labels", None)
        return list(labels) if labels else None

    def _read_splits(self) -> dict[str, list[Example]]:
        if self.source is not None:
            names = SOURCE_LABELS[self.source]
            train, test = SOURCES[self.source](seed=self.seed)
            splits = {split: [(text, names[label]) for text, label in rows] for split, rows in
                      (("train", train), ("test", test))}
        else:
            columns = [self.text_column, self.label_column]
            splits = {
                name: [(str(row[self.text_column]), _label(row[self.label_column]))
                       for row in read_rows(path, columns)]
                for name, path in self.files.items() if path is not None
            }
        if "val" not in splits and "train" in splits and self.val_fraction > 0:
            rows = splits["train"][:]
            check_enough_to_hold_out(len(rows), "row", self.val_fraction)
            random.Random(self.seed).shuffle(rows)
            cut = max(1, int(len(rows) * self.val_fraction))
            splits["val"], splits["train"] = rows[:cut], rows[cut:]
        return splits

    def _check_labels(self) -> None:
        known = set(self.labels) if self.labels else None
        for name, rows in self.splits.items():
            for _, label in rows:
                if known is not None and str(label) not in known:
                    raise ValueError(f"{name} data has label {label!r} that training never saw; "
                                     f"known labels: {', '.join(self.labels)}")
                if known is None and not is_int_label(label):
                    raise ValueError(f"{name} data has label {label!r}, but training labels are integers"
                                     if "train" in self.splits else
                                     f"{name} data has label {label!r}, and no training data names the classes: "
                                     "give the task its labels (labels=[...], in class-id order)")

    def label_id(self, label: object) -> int:
        return self.labels.index(str(label)) if self.labels else int(label)

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        if split not in self.splits:
            raise ValueError(f"no {split} data: give {split}_file" + (" or a source" if split != "val" else ""))
        return self._encode(self.splits[split], shuffle)

    def encoded(self, rows: Sequence[Example]) -> list[dict]:
        """Each row tokenized: ``input_ids``, ``attention_mask`` and its label id as ``labels``."""
        encoded = self.tokenizer([text for text, _ in rows], truncation=True, max_length=self.max_length)
        return [{"input_ids": ids, "attention_mask": mask, "labels": self.label_id(label)}
                for ids, mask, (_, label) in zip(encoded["input_ids"], encoded["attention_mask"], rows, strict=True)]

    def _encode(self, rows: Sequence[Example], shuffle: bool = False) -> DataLoader:
        settings = dict(batch_size=self.batch_size, num_workers=self.num_workers,
                        collate_fn=DataCollatorWithPadding(self.tokenizer, return_tensors="pt"))
        if shuffle:
            return shuffled_loader(self.encoded(rows), self.seed, self.trainer, **settings)
        return evaluation_loader(self.encoded(rows), self.trainer, **settings)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val") if "val" in self.splits else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        if self.predict_file is None:
            raise ValueError("no texts to predict: give data.predict_file (a text file, one text per line, or -)")
        self.predict_texts = read_lines(self.predict_file, self.text_column)  # a table: its text column
        return self._encode([(text, self.labels[0] if self.labels else 0) for text in self.predict_texts])


def is_int_label(value: object) -> bool:
    """Whether a label is an integer class id (an int, or a string of digits), not a class name."""
    return isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit())


def _label_names(rows: Sequence[Example]) -> list[str] | None:
    """Sorted label names when the training labels are strings; None when they are integers."""
    if not rows or all(is_int_label(label) for _, label in rows):
        return None
    return sorted({str(label) for _, label in rows})


def _label(value: Any) -> Any:
    """A label as read: a name without the spaces around it (``"pos, neg"`` gives `` neg``), or a JSON number."""
    return value.strip() if isinstance(value, str) else value
