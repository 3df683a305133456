"""Several text classification data sets in one run, each row carrying its task's name, which names its adapter."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Sampler
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from lightning_peft.core.checks import check_choice
from lightning_peft.data.base import (
    ResumableLoader,
    batches_done_in_epoch,
    batches_trained_in_epoch,
    epoch_length,
    evaluation_loader,
)
from lightning_peft.data.text_classification import TextClassificationData

Mixing = Literal["mixed", "alternating"]
MIXINGS = ("mixed", "alternating")
SHARED = ("max_length", "batch_size", "seed", "tokenizer", "num_workers")  # set once, for every task


class MultiTaskData(L.LightningDataModule):
    """Several labelled text data sets trained in one run on one base: one adapter (and head) per task.

    Every batch carries ``task``, the task name of each row; `SequenceClassification` computes each
    row with the adapter of that name (`per_row_adapters`), so each task's adapter and head learn
    from that task's rows only, and it reports validation and test metrics per task
    (``test_acc_tweets``, ...) beside the overall ones. Give the trainer one PEFT method per task
    with ``adapter_name`` set to the task's name, and ``modules_to_save`` for a head of each.

    Args:
        tasks: task name -> the arguments of that task's `TextClassificationData` (``source`` or
            ``train_file``/``val_file``/``test_file``, columns, ``val_fraction``). The tasks share
            their labels.
        mixing: ``"mixed"``: each training batch draws rows from every task; ``"alternating"``:
            each batch holds the rows of one task.
        weights: task name -> sampling weight (tasks left out weigh 0); ``None``: each task in
            proportion to its rows, every row once an epoch. With weights, rows (mixed) or
            batches (alternating) are drawn with replacement, as many as an epoch has.
        max_length: tokens per text, for every task.
        batch_size: rows per batch.
        seed: seeds every task's splits and the order of the training batches, per epoch.
        tokenizer: ``None`` takes the task model's tokenizer.
        num_workers: DataLoader worker processes.

    Raises:
        ValueError: when ``tasks`` is empty, a task name is not a plain name, a task's settings are
            wrong or set a shared argument, ``mixing`` is unknown, or ``weights`` name an unknown
            task or are not positive. At setup: when the tasks' labels differ.

    Examples:
        ```python
        from lightning_peft import LoRA
        from lightning_peft.data import MultiTaskData

        data = MultiTaskData({"tweets": {"source": "tweets"}, "movies": {"source": "movie-snippets"}})
        callbacks = [LoRA(r=8, target_modules=["query", "value"], modules_to_save=["classifier"], adapter_name=task)
                     for task in ("tweets", "movies")]
        ```
    """

    def __init__(self, tasks: dict[str, dict[str, Any]], mixing: Mixing = "mixed",
                 weights: dict[str, float] | None = None, max_length: int = 128, batch_size: int = 32, seed: int = 0,
                 tokenizer: PreTrainedTokenizerBase | None = None, num_workers: int = 0) -> None:
        super().__init__()
        check_choice("MultiTaskData", "mixing", mixing, MIXINGS)
        _check_tasks(tasks, weights)
        shared = dict(max_length=max_length, batch_size=batch_size, seed=seed, tokenizer=tokenizer,
                      num_workers=num_workers)
        self.parts: dict[str, TextClassificationData] = {}
        for name, settings in tasks.items():
            try:
                self.parts[name] = TextClassificationData(**settings, **shared)
            except (TypeError, ValueError) as err:
                raise ValueError(f"MultiTaskData task '{name}': {err}") from None
        self.mixing, self.weights, self.batch_size, self.seed = mixing, weights, batch_size, seed
        self.num_workers = num_workers

    @property
    def task_names(self) -> list[str]:
        return list(self.parts)

    @property
    def batch_shares(self) -> dict[str, float]:
        """Each task's expected share of the optimizer steps (`TaskBatchSampler.shares`), once set up."""
        sizes = {name: len(part.splits.get("train", ())) for name, part in self.parts.items()}
        accumulated = getattr(self.trainer, "accumulate_grad_batches", 1) if self.trainer is not None else 1
        return self._sampler_of_a_process(sizes).shares(accumulated)

    def _sampler_of_a_process(self, sizes: dict[str, int]) -> TaskBatchSampler:
        """The sampler of one of the trainer's processes (as Lightning re-creates it under DDP), to count with."""
        processes = getattr(self.trainer, "world_size", 1) if self.trainer is not None else 1
        stand_in = DistributedSampler([], num_replicas=processes, rank=0) if processes > 1 else None
        return TaskBatchSampler(sizes, self.batch_size, self.mixing, self.weights, self.seed, stand_in)

    @property
    def splits(self) -> dict[str, list]:
        """Every task's rows by split, once set up, one task after another."""
        found: dict[str, list] = {}
        for part in self.parts.values():
            for split, rows in part.splits.items():
                found.setdefault(split, []).extend(rows)
        return found

    @property
    def labels(self) -> list[str] | None:
        """The tasks' shared label names (as `TextClassificationData.labels`), once set up."""
        return next(iter(self.parts.values())).labels

    def prepare_data(self) -> None:
        for part in self.parts.values():
            part.prepare_data()

    def setup(self, stage: str) -> None:
        for part in self.parts.values():
            part.trainer = self.trainer
            part.setup(stage)
        labels = {name: part.labels for name, part in self.parts.items()}
        if len({tuple(found or ()) for found in labels.values()}) > 1:
            raise ValueError("MultiTaskData tasks must share their labels; got " +
                             "; ".join(f"{name}: {found}" for name, found in labels.items()))

    def _examples(self, split: str) -> dict[str, list[dict]]:
        """Each task's tokenized rows of ``split``, each row with its ``task``."""
        return {name: [{**row, "task": name} for row in part.encoded(part.splits[split])]
                for name, part in self.parts.items() if split in part.splits}

    def _loader(self, examples: dict[str, list[dict]], kind: Callable[..., DataLoader] = DataLoader,
                **batching: Any) -> DataLoader:
        rows = [row for task_rows in examples.values() for row in task_rows]
        tokenizer = next(iter(self.parts.values())).tokenizer
        return kind(rows, collate_fn=TaskCollator(tokenizer), num_workers=self.num_workers, **batching)

    def train_dataloader(self) -> DataLoader:
        examples = self._examples("train")
        if not examples:
            raise ValueError("MultiTaskData has no training rows: give each task a source or a train_file")
        sizes = {name: len(rows) for name, rows in examples.items()}
        batches = len(self._sampler_of_a_process(sizes))  # a process's batches an epoch
        sampler = TaskBatchSampler(sizes=sizes, batch_size=self.batch_size, mixing=self.mixing, weights=self.weights,
                                   seed=self.seed, skip=batches_done_in_epoch(self.trainer, batches))
        # keywords: Lightning re-creates it with its sampler; its own generator, so that starting an epoch (again, on
        # a resume) leaves the global one, and with it the dropout masks, as the uninterrupted run has it
        loader = self._loader(examples, ResumableLoader, batch_sampler=sampler,
                              generator=torch.Generator().manual_seed(self.seed))
        loader.trained_in_epoch = batches_trained_in_epoch(self.trainer)
        loader.epoch_batches = epoch_length(self.trainer, batches)
        return loader

    def val_dataloader(self) -> DataLoader | list:
        examples = self._examples("val")
        return self._loader(examples, partial(evaluation_loader, trainer=self.trainer),
                            batch_size=self.batch_size) if examples else []

    def test_dataloader(self) -> DataLoader:
        examples = self._examples("test")
        if not examples:
            raise ValueError("MultiTaskData has no test rows: give the tasks a source or a test_file")
        return self._loader(examples, partial(evaluation_loader, trainer=self.trainer), batch_size=self.batch_size)

    def predict_dataloader(self) -> DataLoader:
        raise ValueError("MultiTaskData does not predict: run lightning-peft predict --adapters NAME=DIR ... with "
                         "NAME<TAB>text lines, or one task's TextClassificationData")


class TaskCollator:
    """Pads a batch as `TextClassificationData` does and keeps each row's ``task`` name beside it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        batch = dict(self.pad([{k: v for k, v in row.items() if k != "task"} for row in rows]))
        batch["task"] = [row["task"] for row in rows]
        return batch


class TaskBatchSampler(BatchSampler):
    """Batches of row indices over tasks laid one after another, in an order seeded by ``seed`` and the epoch.

    Under DDP or FSDP, Lightning passes its ``DistributedSampler`` as ``sampler``, which gives this
    process's rank, the number of processes and the epoch. Each step then hands every process a
    batch of its own, the same number of steps to each, and with alternating batches every
    process a batch of the same task.
    """

    def __init__(self, sizes: dict[str, int], batch_size: int, mixing: str, weights: dict[str, float] | None,
                 seed: int, sampler: Sampler | None = None, skip: int = 0) -> None:
        # BatchSampler's own __init__ is not called: the batches are drawn here, not from ``sampler``
        self.sizes, self.batch_size, self.mixing, self.weights, self.seed = sizes, batch_size, mixing, weights, seed
        starts = [0, *torch.tensor(list(sizes.values())).cumsum(0).tolist()]
        self.starts = dict(zip(sizes, starts, strict=False))
        self.epoch = 0
        self.skip = skip  # batches the next pass leaves out: those a fit resumed inside an epoch had done
        self.sampler = self if sampler is None else sampler  # Lightning calls set_epoch on a batch sampler's sampler
        self.replicas, self.rank = getattr(sampler, "num_replicas", 1), getattr(sampler, "rank", 0)

    def set_epoch(self, epoch: int) -> None:
        """Every epoch has its own order, the same again on a resume."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.mixing == "alternating" and self.weights is None:
            return sum(self._task_steps().values())
        return self._steps(self._batches())

    def shares(self, accumulated: int = 1) -> dict[str, float]:
        """Each task's expected share of the optimizer steps that hold rows of it (on any process): its adapter's
        updates, with ``accumulated`` batches a step (gradient accumulation)."""
        if self.weights is not None:
            chances = {name: self.weights.get(name, 0.0) for name in self.sizes}
        elif self.mixing == "alternating":
            chances = self._task_steps()
        else:
            chances = dict(self.sizes)  # its rows
        total = sum(chances.values()) or 1
        if self.mixing == "alternating":  # >= 1 of the step's batches
            return {name: 1 - (1 - chance / total) ** accumulated for name, chance in chances.items()}
        rows_a_step = self.batch_size * self.replicas * accumulated
        return {name: 1 - (1 - chance / total) ** rows_a_step for name, chance in chances.items()}  # >= 1 row

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.sampler.epoch)
        steps = self._mixed_steps(generator) if self.mixing == "mixed" else self._alternating_steps(generator)
        skip, self.skip = self.skip, 0
        for batches in itertools.islice(steps, skip, None):  # one batch per process
            yield batches[self.rank]

    def _batches(self) -> int:
        """Batches an epoch holds, over every process."""
        if self.mixing == "mixed":
            return math.ceil(sum(self.sizes.values()) / self.batch_size)
        return sum(math.ceil(n / self.batch_size) for n in self.sizes.values())

    def _steps(self, batches: int) -> int:
        return math.ceil(batches / self.replicas)

    def _task_steps(self) -> dict[str, int]:
        """Each task's steps an epoch in unweighted alternating batches: its batches, one per process a step."""
        return {name: self._steps(math.ceil(n / self.batch_size)) for name, n in self.sizes.items()}

    def _per_step(self, batches: list[list[int]]) -> list[list[list[int]]]:
        """``batches`` in steps of one per process; the last step is filled from the first batches."""
        return [[batches[(i + j) % len(batches)] for j in range(self.replicas)]
                for i in range(0, len(batches), self.replicas)]

    def _task_batches(self, name: str, generator: torch.Generator) -> list[list[int]]:
        rows = (torch.randperm(self.sizes[name], generator=generator) + self.starts[name]).tolist()
        return [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]

    def _mixed_steps(self, generator: torch.Generator) -> list[list[list[int]]]:
        total = sum(self.sizes.values())
        if self.weights is None:
            rows = torch.randperm(total, generator=generator).tolist()
        else:
            # a task by its weight, then a row of it at random: a draw over rows would fail past 2**24 of them
            names = list(self.sizes)
            weights = torch.tensor([self.weights.get(name, 0.0) for name in names], dtype=torch.float64)
            tasks = torch.multinomial(weights, total, replacement=True, generator=generator)
            sizes = torch.tensor([self.sizes[name] for name in names])
            starts = torch.tensor([self.starts[name] for name in names])
            within = (torch.rand(total, generator=generator, dtype=torch.float64) * sizes[tasks]).long()
            rows = (starts[tasks] + within).tolist()
        return self._per_step([rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)])

    def _alternating_steps(self, generator: torch.Generator) -> Iterator[list[list[int]]]:
        batches = {name: self._task_batches(name, generator) for name in self.sizes}
        if self.weights is None:
            every = [step for task_batches in batches.values() for step in self._per_step(task_batches)]
            yield from (every[i] for i in torch.randperm(len(every), generator=generator).tolist())
            return
        names = list(self.sizes)
        chances = torch.tensor([self.weights.get(name, 0.0) for name in names], dtype=torch.float)  # ints too
        drawn = torch.multinomial(chances, len(self), replacement=True, generator=generator).tolist()
        taken = dict.fromkeys(names, 0)
        for index in drawn:
            name = names[index]
            step = []
            for _ in range(self.replicas):
                if taken[name] == len(batches[name]):  # a task used up before the epoch ends: a new order of its rows
                    batches[name], taken[name] = self._task_batches(name, generator), 0
                step.append(batches[name][taken[name]])
                taken[name] += 1
            yield step


def _check_tasks(tasks: dict[str, dict[str, Any]], weights: dict[str, float] | None) -> None:
    if not tasks:
        raise ValueError("MultiTaskData needs at least one task")
    for name, settings in tasks.items():
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"MultiTaskData task name {name!r}: use letters, digits, '-' and '_' (it names the "
                             "task's adapter)")
        shared = sorted(set(settings) & set(SHARED))
        if shared:
            raise ValueError(f"MultiTaskData task '{name}' sets {', '.join(shared)}; set it once on MultiTaskData, "
                             "for every task")
    if weights is not None:
        unknown = sorted(set(weights) - set(tasks))
        if unknown:
            raise ValueError(f"MultiTaskData weights name unknown task '{unknown[0]}'; tasks: {', '.join(tasks)}")
        if any(not w >= 0 for w in weights.values()) or not sum(weights.values()) > 0:
            raise ValueError(f"MultiTaskData weights must be >= 0 with a positive sum; got {weights}")
