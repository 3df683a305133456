"""Causal-LM data: plain text packed into blocks, or prompt/response pairs, tokenized by the task's tokenizer."""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lightning_peft import assets
from lightning_peft.data.base import SourceData, evaluation_loader, shuffled_loader
from lightning_peft.data.files import (
    READERS,
    check_data_arguments,
    check_enough_to_hold_out,
    read_lines,
    read_rows,
    read_text,
)

SOURCES = {"austen": assets.austen_text}
SOURCE_TEST_FRACTION = 0.05  # a built-in corpus's last lines, kept for test
IGNORE_INDEX = -100  # label of a token that carries no loss
LINES_PER_PIECE = 200  # a long text is tokenized this many lines at a time

Pairs = list[tuple[str, str]]
Split = str | Pairs  # plain text to pack, or (prompt, response) pairs
Example = dict[str, list[int]]


class CausalLMData(SourceData):
    """A LightningDataModule of text for causal language modelling: packed plain text, or prompt/response pairs.

    Tokenized by the task model's tokenizer (or ``tokenizer``) at setup. Plain text is packed
    into blocks whose every token carries loss; in prompt/response pairs only the response does.
    Batches are dicts of ``input_ids``, ``attention_mask`` and ``labels`` (-100 where no loss),
    padded to the longest example; the training batches are shuffled with ``seed``.

    Args:
        source: a built-in corpus, or ``None`` to read files (with a source, the train, val and test
            files are not read). ``"austen"``: Jane Austen's six novels in publication order, cut by
            lines into contiguous chunks: test is the last 5% (the end of Persuasion), val the
            ``val_fraction`` of the remaining lines just before it, train everything from the start.
        train_file: training data. A ``.txt`` file is tokenized, closed by the end token and cut
            into blocks of ``block_size`` tokens (labels = input ids; the last partial block is
            dropped). A JSONL (``.jsonl``, ``.json``), CSV or TSV file holds ``prompt_column`` and
            ``response_column``: prompt and response are joined, followed by the end token, and
            only the response and end tokens carry loss (prompt labels are -100).
        val_file: validation data, in the forms of ``train_file``; without it ``val_fraction`` of
            the training data is held out.
        test_file: test data, in the forms of ``train_file``.
        predict_file: prompts to continue, one per line (``-`` reads standard input); they are
            left-padded, so generation continues right after each one.
        block_size: tokens per packed block, and the most tokens of one prompt/response pair
            (longer ones are cut; a prompt must leave room for its response); at least 2.
        batch_size: examples per batch.
        val_fraction: share of the training data held out for validation when there is no
            ``val_file``, in ``[0, 1)``: the last lines of a text, or pairs drawn at random with
            ``seed``; 0 holds out nothing (no validation).
        seed: seeds the draw of held-out pairs and the shuffling of the training batches.
        tokenizer: ``None`` takes the tokenizer of the task model this data trains with
            (``trainer.lightning_module.tokenizer``).
        prompt_column: the column (JSON key) that holds the prompt.
        response_column: the column (JSON key) that holds the response.
        chat_template: wrap each prompt as a user turn in the tokenizer's chat template (for chat
            models); the tokenizer must have one.
        num_workers: DataLoader worker processes (0 loads in the main process).

    Raises:
        ValueError: when ``source`` is not a built-in corpus, neither ``source`` nor a train, test
            or predict file is given, ``val_fraction`` is not in ``[0, 1)`` or ``block_size`` is
            below 2. Later, as the data is read and encoded (at setup, for the data loaders): when
            a file is malformed (the error names the file and line), a text has fewer tokens than
            ``block_size``, a prompt leaves no room for its response, or ``chat_template`` is on
            and the tokenizer has no chat template.
        FileNotFoundError: later, as the data is read, when a data file does not exist.

    Examples:
        ```python
        from lightning_peft.data import CausalLMData

        data = CausalLMData(train_file="pairs.jsonl", block_size=256, batch_size=4)
        trainer.fit(module, datamodule=data)
        ```
    """

    SOURCES = SOURCES

    def __init__(self, source: str | None = None, train_file: str | None = None, val_file: str | None = None,
                 test_file: str | None = None, predict_file: str | None = None, block_size: int = 128,
                 batch_size: int = 8, val_fraction: float = 0.05, seed: int = 0,
                 tokenizer: PreTrainedTokenizerBase | None = None, prompt_column: str = "prompt",
                 response_column: str = "response", chat_template: bool = False, num_workers: int = 0) -> None:
        super().__init__()
        check_data_arguments(source, SOURCES, {"train_file": train_file, "val_file": val_file, "test_file": test_file},
                             predict_file, val_fraction)
        if block_size < 2:
            raise ValueError(f"block_size must be at least 2 tokens, got {block_size}")
        self.source, self.files = source, {"train": train_file, "val": val_file, "test": test_file}
        self.predict_file = predict_file
        self.prompt_column, self.response_column = prompt_column, response_column
        self.block_size, self.batch_size, self.num_workers = block_size, batch_size, num_workers
        self.val_fraction, self.seed, self.chat_template = val_fraction, seed, chat_template
        self.tokenizer = tokenizer
        self.splits: dict[str, Split] = {}
        self.predict_texts: list[str] = []  # the prompts of the last predict_dataloader, in order
        self.encoded: dict[str, list[Example]] = {}

    def _tokenizer_changed(self) -> None:
        self.encoded.clear()

    def _check_tokenizer(self) -> None:
        if self.chat_template and not self.tokenizer.chat_template:
            raise ValueError("chat_template is on, but the tokenizer has no chat template")

    def _read_splits(self) -> dict[str, Split]:
        if self.source is not None:
            rest, test = _split_lines(SOURCES[self.source](), SOURCE_TEST_FRACTION)
            splits = {"train": rest, "test": test}
        else:
            splits = {name: self._read(path) for name, path in self.files.items() if path is not None}
        if "val" not in splits and "train" in splits and self.val_fraction > 0:
            splits["train"], splits["val"] = self._hold_out(splits["train"])
        return splits

    def _read(self, path: str) -> Split:
        suffix = Path(path).suffix.lower()
        if suffix == ".txt":
            return read_text(path)
        if suffix not in READERS:
            raise ValueError(f"data file {path}: unknown format {suffix!r}; use .txt for plain text or "
                             f"{', '.join(READERS)} for {self.prompt_column}/{self.response_column} pairs")
        columns = [self.prompt_column, self.response_column]
        return [(str(row[self.prompt_column]), str(row[self.response_column])) for row in read_rows(path, columns)]

    def _hold_out(self, train: Split) -> tuple[Split, Split]:
        """Split (train, val): a text's last lines, or pairs drawn at random with the seed."""
        rows = len(train.splitlines()) if isinstance(train, str) else len(train)
        check_enough_to_hold_out(rows, "line" if isinstance(train, str) else "pair", self.val_fraction)
        if isinstance(train, str):
            return _split_lines(train, self.val_fraction)
        pairs = train[:]
        random.Random(self.seed).shuffle(pairs)
        cut = max(1, int(len(pairs) * self.val_fraction))
        return pairs[cut:], pairs[:cut]

    def _examples(self, name: str) -> list[Example]:
        if name not in self.splits:
            raise ValueError(f"no {name} data: give {name}_file" + (" or a source" if name != "val" else ""))
        if name not in self.encoded:
            split = self.splits[name]
            self.encoded[name] = self._pack(name, split) if isinstance(split, str) else [
                self._pair(prompt, response) for prompt, response in split]
        return self.encoded[name]

    def _pack(self, name: str, text: str) -> list[Example]:
        """Cut the text's tokens, closed by the end token, into whole blocks of ``block_size``."""
        ids = self._text_ids(text) + self._end()
        if len(ids) < self.block_size:
            raise ValueError(f"{name} text has {len(ids)} tokens, fewer than block_size {self.block_size}")
        ones = [1] * self.block_size
        blocks = (ids[start:start + self.block_size] for start in range(0, len(ids) - self.block_size + 1,
                                                                          self.block_size))
        return [{"input_ids": block, "attention_mask": ones, "labels": block} for block in blocks]

    def _text_ids(self, text: str) -> list[int]:
        """Token ids of a long text, tokenized a few hundred whole lines at a time."""
        lines = text.splitlines(keepends=True)
        pieces = ["".join(lines[i:i + LINES_PER_PIECE]) for i in range(0, len(lines), LINES_PER_PIECE)]
        return [token for ids in self.tokenizer(pieces, add_special_tokens=False)["input_ids"] for token in ids]

    def _pair(self, prompt: str, response: str) -> Example:
        prompt_ids = self._prompt_ids(prompt)
        if len(prompt_ids) >= self.block_size:
            raise ValueError(f"a prompt has {len(prompt_ids)} tokens, leaving no room for its response in "
                             f"block_size {self.block_size}: {prompt[:60]!r}")
        response_ids = self.tokenizer(response, add_special_tokens=False)["input_ids"] + self._end()
        ids = (prompt_ids + response_ids)[:self.block_size]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:self.block_size]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    def _prompt_ids(self, prompt: str) -> list[int]:
        """A prompt's ids: with the tokenizer's own special tokens, or as a user turn of its chat template."""
        if not self.chat_template:
            return self.tokenizer(prompt)["input_ids"]
        turn = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)
        return self.tokenizer(turn, add_special_tokens=False)["input_ids"]

    def _end(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [] if eos is None else [eos]

    def _loader(self, examples: list[Example], shuffle: bool = False, left_pad: bool = False) -> DataLoader:
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0  # masked anyway
        settings = dict(batch_size=self.batch_size, num_workers=self.num_workers,
                        collate_fn=partial(pad_batch, pad_id=pad_id, left=left_pad))
        if shuffle:
            return shuffled_loader(examples, self.seed, self.trainer, **settings)
        return evaluation_loader(examples, self.trainer, **settings)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._examples("train"), shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self._examples("val")) if "val" in self.splits else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._examples("test"))

    def predict_dataloader(self) -> DataLoader:
        """Prompts left-padded, so that generation continues right after each one."""
        if self.predict_file is None:
            raise ValueError("no prompts: give data.predict_file (a text file, one prompt per line, or -)")
        self.predict_texts = read_lines(self.predict_file, self.prompt_column,  # a table: its prompt column
                                        keep_spaces=True)  # as the training pairs keep them
        examples = [{"input_ids": ids, "attention_mask": [1] * len(ids)}
                    for ids in map(self._prompt_ids, self.predict_texts)]
        return self._loader(examples, left_pad=True)


def _split_lines(text: str, fraction: float) -> tuple[str, str]:
    """Cut a text between lines into (head, tail), the tail holding ``fraction`` of the lines (at least one)."""
    lines = text.splitlines(keepends=True)
    cut = len(lines) - max(1, int(len(lines) * fraction))
    return "".join(lines[:cut]), "".join(lines[cut:])


def pad_batch(examples: list[Example], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad examples to the longest: input ids with ``pad_id``, attention with 0, labels with -100."""
    length = max(len(example["input_ids"]) for example in examples)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}

    def pad(values: list[int], value: int) -> list[int]:
        padding = [value] * (length - len(values))
        return padding + values if left else values + padding

    return {key: torch.tensor([pad(example[key], fill[key]) for example in examples]) for key in examples[0]}
