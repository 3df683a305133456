"""Lightning's progress bar as a command-line user wants it: on stderr, counting steps when training is set in steps.

stdout is for results (predictions, the fit summary), so ``> file`` captures them alone. A
recipe that sets ``max_steps`` trains in steps, not epochs (Lightning's epoch count is then
-1): the bar counts optimizer steps against ``max_steps``, with tqdm's rate and ETA.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


def _on_stderr(init: Callable[[TQDMProgressBar], Any]) -> Callable[[TQDMProgressBar], Any]:
    """One of TQDMProgressBar's ``init_*_tqdm`` methods, making its bar write to stderr (Lightning's go to stdout)."""
    def init_on_stderr(self: TQDMProgressBar) -> Any:
        with contextlib.redirect_stdout(sys.stderr):
            return init(self)

    return init_on_stderr


class StepProgressBar(TQDMProgressBar):
    """TQDMProgressBar on stderr whose training bar counts optimizer steps against ``max_steps`` when it is set."""

    init_sanity_tqdm = _on_stderr(TQDMProgressBar.init_sanity_tqdm)
    init_train_tqdm = _on_stderr(TQDMProgressBar.init_train_tqdm)
    init_validation_tqdm = _on_stderr(TQDMProgressBar.init_validation_tqdm)
    init_test_tqdm = _on_stderr(TQDMProgressBar.init_test_tqdm)
    init_predict_tqdm = _on_stderr(TQDMProgressBar.init_predict_tqdm)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The logged metrics, without the logger's version number."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:  # once per fit: the bar runs across epochs
            bar.reset(total=trainer.max_steps)
            bar.initial = bar.n = trainer.global_step  # a resumed run's rate counts its own steps
            bar.set_description("Steps")
        return None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar = self.train_progress_bar
        if not bar.disable and self._should_update(trainer.global_step, bar.total):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar
        return None
