"""What the data modules share: a built-in source fetched once, splits read once, the task's tokenizer, and
shuffled training batches that a resumed fit takes up where the checkpoint left them."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sized
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler


class SourceData(L.LightningDataModule):
    """A data module reading ``SOURCES[source]`` or files; subclasses read their splits and may check them."""

    SOURCES: ClassVar[dict[str, Callable[..., Any]]] = {}
    source: str | None
    splits: dict[str, Any]
    tokenizer: Any

    def prepare_data(self) -> None:
        if self.source is not None:
            self.SOURCES[self.source]()  # fetch into the cache once, on one process

    tokenizer_from_task = False  # whether ``tokenizer`` is the task's, taken at setup (none was given)

    def setup(self, stage: str) -> None:
        if not self.splits:
            self.splits = self._read_splits()
            self._splits_read()
        if self.tokenizer is None or self.tokenizer_from_task:  # the task of this run's (reused data: another's)
            task_tokenizer = self.trainer.lightning_module.tokenizer
            if task_tokenizer is not self.tokenizer:
                self.tokenizer, self.tokenizer_from_task = task_tokenizer, True
                self._tokenizer_changed()
        self._check_tokenizer()

    def _tokenizer_changed(self) -> None:
        """Called when setup takes another tokenizer: what was tokenized with the one before must go."""

    def _read_splits(self) -> dict[str, Any]:
        raise NotImplementedError

    def _splits_read(self) -> None:
        """Called once the splits are read (label names, say)."""

    def _check_tokenizer(self) -> None:
        """Called once the tokenizer is known."""


class ResumableShuffle(RandomSampler):
    """A seeded shuffle whose epoch a resumed run can take up: it notes its generator's state as each epoch starts.

    Each epoch it draws as ``DataLoader(shuffle=True, generator=...)`` does (the loader's draw of
    its workers' seed, then a permutation), so the first epoch's batches are that loader's; the
    permutation is drawn whole as the epoch starts, so the generator moves by one epoch however far
    the epoch is iterated (a loader made again each epoch can draw the epochs before it). The
    loader itself draws from a generator of its own, so however often Lightning makes iterators,
    the order depends on the epoch alone.
    """

    def __init__(self, data_source: Sized, generator: torch.Generator) -> None:
        super().__init__(data_source, generator=generator)
        self.epoch_start: Tensor | None = None  # the generator's state when this epoch's order was drawn
        self.resume_from: tuple[Tensor, int] | None = None  # (that state, rows already trained) from a checkpoint

    def __iter__(self) -> Iterator[int]:
        skip = 0
        if self.resume_from is not None:
            state, skip = self.resume_from
            self.resume_from = None
            self.generator.set_state(state)
        else:
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)  # the draw a shuffled loader makes
        self.epoch_start = self.generator.get_state()
        # drawn now, whole: the generator then moves by one order an epoch, however far the epoch is iterated
        order = torch.randperm(len(self.data_source), generator=self.generator).tolist()
        return iter(order[skip:])


class ResumableLoader(DataLoader):
    """A shuffled training DataLoader whose place goes into Lightning checkpoints (its ``state_dict``), or whose
    batch sampler leaves out the batches done itself (`MultiTaskData`'s: no state then).

    A fit resumed from a checkpoint inside an epoch draws that epoch's order again and goes on
    with the batch after the last one trained (``batches_done``, from the restored loop); from
    one at an epoch's end, the next epoch's order. Either way it sees the uninterrupted run's batches.
    """

    batches_done = 0  # set by `shuffled_loader` for a resumed fit
    trained_in_epoch = 0  # the batches its epoch had trained when the checkpoint was saved (0 for a fresh fit)
    epoch_batches: int | None = None  # the batches an epoch trains on this process (limit_train_batches counted)

    def __iter__(self) -> Iterator[Any]:
        """The batches; under DDP or FSDP (Lightning's ``DistributedSampler``, whose order is the epoch's), once after
        a resume inside an epoch, without the batches this process had trained."""
        skip = self.batches_done if isinstance(self.sampler, DistributedSampler) else 0
        if not skip:
            return super().__iter__()
        self.batches_done = 0  # the next epoch starts at its first batch
        return itertools.islice(super().__iter__(), skip, None)

    def state_dict(self) -> dict[str, Any]:
        sampler = self.sampler
        state = {"batch_size": self._rows_a_batch(), "batches": len(self), "epoch_batches": self.epoch_batches}
        if not isinstance(sampler, ResumableShuffle) or sampler.epoch_start is None:
            return state
        return {**state, "epoch_start": sampler.epoch_start, "now": sampler.generator.get_state()}

    def _saved_inside_an_epoch(self, state_dict: dict[str, Any]) -> bool:
        """Whether the checkpoint was saved part-way through an epoch (Lightning loads the state at an epoch's end
        too, where ``max_steps`` counts the run)."""
        if "batches" not in state_dict:  # an earlier version's state: the batches done, against this epoch's
            return bool(self.batches_done or getattr(self.batch_sampler, "skip", 0))
        return 0 < self.trained_in_epoch < (state_dict.get("epoch_batches") or state_dict["batches"])

    def _check_same_epoch(self, state_dict: dict[str, Any]) -> None:
        """Refuse to go on with an epoch of another batch size or length than the one the checkpoint was inside."""
        saved, now = state_dict.get("batch_size", self._rows_a_batch()), self._rows_a_batch()
        if saved != now:
            raise ValueError(f"the checkpoint was saved inside an epoch of batch_size {saved}, and this fit's "
                             f"batch_size is {now}: the rest of that epoch would repeat some rows and leave out "
                             f"others; resume with batch_size {saved}, or from a checkpoint at an epoch's end")
        saved, now = state_dict.get("batches", len(self)), len(self)
        if saved != now:
            raise ValueError(f"the checkpoint was saved inside an epoch of {saved} batches a process, and this fit's "
                             f"epoch has {now} (other data, or another number of processes): the rest of that epoch "
                             "would repeat some rows and leave out others; resume as it was trained, or from a "
                             "checkpoint at an epoch's end")

    def _rows_a_batch(self) -> int | None:
        """The batch size, the loader's own or its batch sampler's (MultiTaskData's)."""
        return self.batch_size if self.batch_size is not None else getattr(self.batch_sampler, "batch_size", None)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take up the checkpoint's place; inside an epoch, only with the batches that epoch was made of."""
        if self._saved_inside_an_epoch(state_dict):
            self._check_same_epoch(state_dict)
        sampler = self.sampler
        if "now" not in state_dict or not isinstance(sampler, ResumableShuffle):  # distributed: its own order
            return
        if self.batches_done:
            sampler.resume_from = (state_dict["epoch_start"], self.batches_done * self.batch_size)
        else:
            sampler.generator.set_state(state_dict["now"])


def shuffled_loader(rows: Any, seed: int, trainer: Any, **kwargs: Any) -> ResumableLoader:
    """A training DataLoader over ``rows`` shuffled with ``seed``, which a resumed fit takes up where it was.

    On several processes each takes its share through a ``DistributedSampler`` seeded with ``seed`` too
    (Lightning's own, which would replace a shuffle, seeds itself from ``seed_everything`` instead).
    """
    processes = getattr(trainer, "world_size", 1) or 1
    if processes > 1 and getattr(trainer._accelerator_connector, "use_distributed_sampler", True):
        sampler = DistributedSampler(rows, **trainer.strategy.distributed_sampler_kwargs, shuffle=True, seed=seed)
    else:
        sampler = _resumable_shuffle(rows, seed, trainer)
    loader = ResumableLoader(rows, sampler=sampler, generator=torch.Generator().manual_seed(seed),
                             **kwargs)  # the workers' seeds
    batches = _batches_per_process(loader, trainer)
    loader.batches_done = batches_done_in_epoch(trainer, batches)
    loader.trained_in_epoch, loader.epoch_batches = batches_trained_in_epoch(trainer), epoch_length(trainer, batches)
    return loader


def _resumable_shuffle(rows: Any, seed: int, trainer: Any) -> ResumableShuffle:
    """One process's shuffle, at the epoch a fit from a checkpoint (or a loader made again each epoch) is in."""
    generator = torch.Generator().manual_seed(seed)
    sampler = ResumableShuffle(rows, generator)
    after_epoch = _state_at_epoch_end(trainer)
    if after_epoch is not None:
        generator.set_state(after_epoch)
    else:  # a loader made again each epoch (reload_dataloaders_every_n_epochs): draw the epochs before, as one loader
        for _ in range(_epochs_done_before(trainer)):
            list(sampler)
    return sampler


def evaluation_loader(rows: Sized, trainer: Any, **settings: Any) -> DataLoader:
    """A validation or test DataLoader whose rows each count once in metrics synced over the processes.

    Lightning's ``DistributedSampler`` repeats rows so that every process gets as many, and synced
    metrics then count the repeats. Under DDP each process takes its own rows here, none repeated,
    where that still gives every process as many batches (whatever runs per batch stays in step: a
    fractional ``limit_val_batches``, a metric synced at each step). Elsewhere (sharded models, FSDP
    and DeepSpeed, gather weights in every forward) and where the batches would not come out even,
    Lightning's sampler stays, with a warning of the rows counted twice. Predicting, Lightning's own
    sampler repeats no row.
    """
    processes = getattr(trainer, "world_size", 1) or 1
    if (processes == 1 or trainer.state.fn == TrainerFn.PREDICTING  # Lightning's sampler repeats no row there
            or not getattr(trainer._accelerator_connector, "use_distributed_sampler", True)):
        return DataLoader(rows, **settings)
    strategy = trainer.strategy
    if (isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy)
            and _as_many_batches_unrepeated(len(rows), processes, settings.get("batch_size") or 1)):
        sampler = UnrepeatedDistributedSampler(rows, num_replicas=processes, rank=trainer.global_rank, shuffle=False)
        return DataLoader(rows, sampler=sampler, **settings)
    if len(rows) % processes:
        repeated = processes - len(rows) % processes
        rank_zero_warn(f"{type(strategy).__name__} on {processes} processes evaluates {repeated} of the {len(rows)} "
                       "rows twice (each process must run as many batches), and the metrics count them twice: "
                       "evaluate on one device for exact figures")
    return DataLoader(rows, **settings)


def _as_many_batches_unrepeated(rows: int, processes: int, batch_size: int) -> bool:
    """Whether ``rows`` dealt out to ``processes`` one by one give each process the same number of batches (>= 1)."""
    batches = {math.ceil(len(range(rank, rows, processes)) / batch_size) for rank in range(processes)}
    return len(batches) == 1 and 0 not in batches


def _batches_per_process(loader: DataLoader, trainer: Any) -> int:
    """The batches of an epoch on each process: Lightning's ``DistributedSampler`` gives each an equal share of rows."""
    processes = getattr(trainer, "world_size", 1) or 1
    rows = math.ceil(len(loader.dataset) / processes)
    return math.ceil(rows / loader.batch_size) if not loader.drop_last else rows // loader.batch_size


def _state_at_epoch_end(trainer: Any) -> Tensor | None:
    """The shuffle's state that a checkpoint from an epoch's end saved, for the next epoch's order.

    Lightning starts such a fit as a new epoch, not as a restart, and so loads no loader state itself.
    """
    loop = getattr(trainer, "fit_loop", None)
    saved = getattr(loop, "_combined_loader_states_to_load", None)
    if loop is None or loop.restarting or not saved or "now" not in (saved[0] or {}):
        return None
    return saved[0]["now"]


def _epochs_done_before(trainer: Any) -> int:
    """Epochs trained before this loader was made, for a fit that makes it again each epoch; 0 for a fit resumed
    inside an epoch (its checkpoint says where the order stands)."""
    loop = getattr(trainer, "fit_loop", None)
    if loop is None or loop.restarting:
        return 0
    return trainer.current_epoch


def batches_done_in_epoch(trainer: Any, batches: int) -> int:
    """Training batches of its epoch that a fit resumed from inside an epoch had done; 0 for a fresh fit, or one
    resumed from an epoch's end (of ``batches``, or fewer under ``limit_train_batches``)."""
    done = batches_trained_in_epoch(trainer)
    return done if done < epoch_length(trainer, batches) else 0


def epoch_length(trainer: Any, batches: int) -> int:
    """The batches of ``batches`` an epoch trains: all, or as many as ``limit_train_batches`` lets it."""
    limit = getattr(trainer, "limit_train_batches", None)
    if limit is None:
        return batches
    return min(limit, batches) if isinstance(limit, int) else int(batches * limit)


def batches_trained_in_epoch(trainer: Any) -> int:
    """The batches the epoch of the checkpoint a fit resumes from had trained (0 for a fresh fit)."""
    loop = getattr(trainer, "fit_loop", None)
    if loop is None or not loop.restarting:
        return 0
    return loop.epoch_loop.batch_progress.current.processed
