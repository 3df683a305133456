"""What the tasks share: a transformers model, its tokenizer, and an optimizer over trainable parameters."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import Metric, MetricCollection
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lightning_peft.core.adapter_files import class_path
from lightning_peft.core.checks import check_choice, check_positive_number
from lightning_peft.core.models import learned_positions, row_lengths
from lightning_peft.core.ownership import owners
from lightning_peft.core.weights import import_bitsandbytes
from lightning_peft.lightning.checkpointing import check_methods_present
from lightning_peft.tasks.models import resolve_model, weights_fingerprint

OPTIMIZERS = ("adamw", "adamw8bit")
BASE_KEY = "lightning_peft_base"  # a checkpoint's record of the base model's folder and weights
SCHEDULE_KEY = "lightning_peft_schedule_steps"  # a checkpoint's record of its run's optimizer steps
RESUMED_SETTINGS = ("learning_rate", "weight_decay", "warmup_steps", "optimizer")  # what a resume restores itself


def check_resumed_optimization(saved: dict[str, Any], here: dict[str, Any], path: Any) -> None:
    """Refuse to resume with other optimizer settings than the checkpoint's: the restored optimizer and schedule
    would keep the checkpoint's, while the logs record these."""
    changed = {key: (saved[key], here[key]) for key in RESUMED_SETTINGS
               if key in saved and key in here and saved[key] != here[key]}
    if changed:
        settings = ", ".join(f"{key}={theirs!r} (here {ours!r})" for key, (theirs, ours) in changed.items())
        raise ValueError(f"checkpoint {path} was trained with {settings}: a resume restores its optimizer and "
                         "learning-rate schedule, which keep its settings; resume with them, or start a new fit")


def adamw_class(optimizer: str) -> type[torch.optim.Optimizer]:
    """torch's AdamW, or for ``"adamw8bit"`` bitsandbytes' AdamW8bit, whose moment estimates take 8 bits."""
    if optimizer == "adamw8bit":
        return import_bitsandbytes("optimizer='adamw8bit'").optim.AdamW8bit
    return torch.optim.AdamW


class TransformersTask(L.LightningModule):
    """A LightningModule around a transformers model, built in ``configure_model``.

    Building there (not in ``__init__``) lets the model take facts from the data, such as the
    label names, and lets large models be created inside the strategy's init context.
    Subclasses implement :meth:`build_model` and the steps, and set ``val_metrics`` and ``test_metrics``.
    """

    def __init__(self, model: str, learning_rate: float, weight_decay: float, warmup_steps: int,
                 trust_remote_code: bool, optimizer: str = "adamw") -> None:
        super().__init__()
        check_choice(type(self).__name__, "optimizer", optimizer, OPTIMIZERS)
        check_positive_number(type(self).__name__, "learning_rate", learning_rate)
        check_positive_number(type(self).__name__, "weight_decay", weight_decay, zero_allowed=True)
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"{type(self).__name__} warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        adamw_class(optimizer)  # bitsandbytes missing: say so now, not after the model is built
        self.optimizer_name = optimizer
        self.model_path = resolve_model(model)
        self.trust_remote_code = trust_remote_code
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            self.model_path, trust_remote_code=trust_remote_code)
        self.model: nn.Module | None = None
        self.val_metrics: Metric | MetricCollection | None = None  # set by the subclass, as test_metrics
        self.test_metrics: Metric | MetricCollection | None = None

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self.build_model()
            predicting = self._trainer is not None and self.trainer.state.fn == TrainerFn.PREDICTING
            check_rows_fit_positions(self.model, getattr(self._trainer, "datamodule", None), predicting)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_methods_present(checkpoint, self)
        path = self.trainer.ckpt_path if self._trainer is not None else None
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            check_resumed_optimization(checkpoint.get("hyper_parameters") or {}, self.hparams, path)
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            self._resumed_schedule = (checkpoint.get(SCHEDULE_KEY), path)  # compared at on_train_start
        saved = checkpoint.get(BASE_KEY)
        here = weights_fingerprint(self.model_path) if saved and saved["fingerprint"] else None
        if here is not None and saved["fingerprint"] != here:
            rank_zero_warn(f"{f'checkpoint {path}' if path else 'the checkpoint'} was trained on the base model in "
                           f"{saved['folder']}, and this "
                           f"task's base ({self.model_path}) has other weights: its adapters were trained for that "
                           "one, and compute otherwise on this")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Name this task's class in the checkpoint, as LightningCLI does, so a fit from Python exports too, and its
        base model's weights by a fingerprint, so a resume or evaluation on another base says so."""
        checkpoint.setdefault("hyper_parameters", {}).setdefault("_class_path", class_path(type(self)))
        checkpoint[BASE_KEY] = {"folder": str(self.model_path), "fingerprint": weights_fingerprint(self.model_path)}
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            checkpoint[SCHEDULE_KEY] = self._schedule_steps()

    def _schedule_steps(self) -> int | None:
        """The optimizer steps of this run, over which the learning rate decays to 0 (None: a run without an end)."""
        steps = self.trainer.estimated_stepping_batches
        return max(int(steps), 1) if math.isfinite(steps) else None

    def on_train_start(self) -> None:
        """A fit resumed with more (or fewer) steps than its checkpoint's run: go on along this run's schedule, from
        the rate it has at the checkpoint's step, with a warning (the restored rate is the old schedule's)."""
        saved, path = getattr(self, "_resumed_schedule", (None, None))
        self._resumed_schedule = (None, None)
        if saved is None or self.trainer.ckpt_path is None or saved == self._schedule_steps():
            return  # (a fresh fit after one resumed from a finished checkpoint, which never started training)
        for config in self.trainer.lr_scheduler_configs:
            schedule = config.scheduler
            if not isinstance(schedule, torch.optim.lr_scheduler.LambdaLR):
                continue  # a subclass's own schedule
            before = [group["lr"] for group in schedule.optimizer.param_groups]
            for group, factor, base in zip(schedule.optimizer.param_groups, schedule.lr_lambdas, schedule.base_lrs,
                                           strict=True):
                group["lr"] = base * factor(schedule.last_epoch)
            schedule._last_lr = [group["lr"] for group in schedule.optimizer.param_groups]
            rank_zero_warn(f"{f'checkpoint {path}' if path else 'the checkpoint'} was trained on a learning-rate "
                           f"schedule of {saved} optimizer steps, and this fit has {self._schedule_steps()}: from step "
                           f"{schedule.last_epoch} on, the rate follows this fit's schedule ({before[0]:.3g} at the "
                           f"checkpoint, {schedule._last_lr[0]:.3g} now), not the checkpoint's; give max_steps or "
                           "max_epochs as its run had them to resume it exactly")

    def on_validation_epoch_start(self) -> None:
        # Fresh metric states in this loop's grad mode: a `validate` (inference mode) before `fit`
        # (no_grad) leaves inference tensors that fit's validation cannot update in place.
        self.val_metrics.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (or 8-bit AdamW) over the trainable parameters only, linear warmup then linear decay to zero.

        The decay ends with the run, so the run needs an end (``max_steps`` or ``max_epochs``).

        With several tasks (`MultiTaskData`), each task's adapter is a parameter group of its own
        whose warmup counts that adapter's own updates and whose decay ends with the run
        (`per_own_updates`), so it learns as it would trained alone, however its batches fall.
        """
        hp = self.hparams
        if self.trainer.max_steps == -1 and (self.trainer.max_epochs or 0) < 0:
            raise ValueError("the learning rate decays to 0 at the run's last step, so the run needs an end: give "
                             "max_steps or max_epochs (max_time alone leaves it open; it may stop a run early)")
        datamodule = getattr(self.trainer, "datamodule", None)
        shares = getattr(datamodule, "batch_shares", None) or {}
        groups = parameters_by_task(self, set(shares))
        optimizer = adamw_class(self.optimizer_name)([{"params": params} for params in groups.values()],
                                                     lr=hp.learning_rate, weight_decay=hp.weight_decay)

        def schedule_of(index: int, task: str | None) -> Callable[[], Callable[[int], float]]:
            def build() -> Callable[[int], float]:
                total = max(int(self.trainer.estimated_stepping_batches), 1)
                if task is None:
                    return linear_warmup_then_decay(min(hp.warmup_steps, total), total)
                return per_own_updates(hp.warmup_steps, shares[task], total, optimizer, index)
            return build

        at_start = 0.0 if hp.warmup_steps > 0 else 1.0  # either schedule's factor before any update
        factors = [built_at_first_step(schedule_of(index, task), at_start) for index, task in enumerate(groups)]
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def built_at_first_step(build: Callable[[], Callable[[int], float]], at_start: float) -> Callable[[int], float]:
    """The factor ``build()`` makes, made when a step past 0 first asks (``at_start`` before that).

    Its length is the run's optimizer steps, which Lightning counts by building the training data
    loader; counted while the optimizers are made, that is before a checkpoint is restored, so a
    resumed fit's loader would start its batches afresh (`lightning_peft.data.base.ResumableLoader`).
    """
    made: list[Callable[[int], float]] = []

    def factor(step: int) -> float:
        if not made and step == 0:
            return at_start
        if not made:
            made.append(build())
        return made[0](step)

    return factor


def parameters_by_task(module: nn.Module, tasks: set[str]) -> dict[str | None, list[nn.Parameter]]:
    """The trainable parameters grouped by the task whose adapter trains them; ``None``: all the others."""
    owner = owners(module)
    groups: dict[str | None, list[nn.Parameter]] = {}
    for param in module.parameters():
        if param.requires_grad:
            ref = owner.get(id(param))
            groups.setdefault(ref.name if ref is not None and ref.name in tasks else None, []).append(param)
    return groups


def per_own_updates(warmup_steps: int, share: float, total: int, optimizer: torch.optim.Optimizer,
                    index: int) -> Callable[[int], float]:
    """A task's learning-rate factor: warmup over its own first updates, then a decay to zero at the run's end.

    The decay runs over the updates the task had plus those it can expect (``share`` of the steps
    left), so a task whose updates keep pace with its share follows the schedule of a single run
    of its batches, and one that draws more (sampling weights, an epoch cut by ``max_steps``) still
    learns until the last step instead of resting at zero.
    """
    warmup = min(warmup_steps, max(round(total * share), 1))

    def factor(step: int) -> float:
        done = own_updates(optimizer, index)
        if done < warmup:
            return done / warmup
        ahead = share * max(total - step, 0)
        return ahead / (ahead + done - warmup) if ahead > 0 else 0.0

    return factor


def own_updates(optimizer: torch.optim.Optimizer, index: int) -> int:
    """The updates parameter group ``index`` got so far: AdamW's own count, in the checkpoint too.

    AdamW skips a parameter without a gradient, its count included, so the count is the steps
    whose batches held rows of the group's task.
    """
    state = optimizer.state  # read at each call: loading a checkpoint replaces it
    counts = (int(state[p]["step"]) for p in optimizer.param_groups[index]["params"] if "step" in state.get(p, {}))
    return max(counts, default=0)


def linear_warmup_then_decay(warmup: int, total: int) -> Callable[[int], float]:
    """The learning-rate factor at each step: 0 to 1 over ``warmup`` steps, then down to 0 at ``total``.

    As transformers' ``get_linear_schedule_with_warmup``, without importing transformers' trainer
    code (which imports bitsandbytes, so a broken bitsandbytes would break every recipe).
    """
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def check_rows_fit_positions(model: nn.Module, data: Any, predicting: bool = False) -> None:
    """Refuse, before training, rows that may be longer than the model's learned positions: they would fail
    mid-run, at the first text that long (a rotary or relative model has no such limit). Prompts to continue are
    not cut to ``block_size``: `CausalLM` checks each batch of them instead."""
    table = learned_positions(model)
    for name, length in row_lengths(data, predicting) if table is not None else []:
        if length > table:
            raise ValueError(f"the data's {name} is {length} tokens, but {type(model).__name__} has {table} learned "
                             f"positions: give {name} at most {table}")
