"""PEFTCallback: the Lightning side that every PEFT method shares.

At ``setup`` (every stage, idempotent) the method is injected into the LightningModule, before
the strategy wraps it and before ``configure_optimizers`` runs; a model that the module builds
in ``configure_model`` is injected right after it is built. Everything that no PEFT method
owns is frozen. Checkpoints then hold the adapter only (``checkpoint="full"`` keeps all).
Under FSDP (``ModelParallelStrategy``, ``FSDPStrategy``) the last PEFT callback then prepares
the sharding (see :mod:`lightning_peft.distributed`). After the first backward, a trainable
parameter without a gradient is named: an error under DDP, which could not train it, else a warning.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from lightning_utilities.core.overrides import is_overridden
from torch import nn

from lightning_peft.core.checkpointing import install_adapter_checkpointing
from lightning_peft.core.gradient_checkpointing import enable_input_grads_for_checkpointing
from lightning_peft.core.injection import adapter_records, check_unclaimed, claim, freeze_unclaimed, record_adapter
from lightning_peft.core.summary import trainable_summary
from lightning_peft.core.targeting import select_modules
from lightning_peft.distributed import check_gradients_reached, prepare_sharding, shards_after_injection

CheckpointPolicy = Literal["adapter", "full"]


class PEFTCallback(L.Callback):
    """Base of every PEFT method: injects at setup, freezes the rest, trims checkpoints.

    Subclasses implement :meth:`inject_into`, which adds the method to a module and returns
    the parameters it trains. :meth:`inject` also works on a plain ``nn.Module`` outside a
    Trainer. ``modules_to_save`` names whole modules (a new classification head, say) that
    train fully alongside the method and are saved with its adapter.
    """

    def __init__(self, adapter_name: str = "default", checkpoint: CheckpointPolicy = "adapter",
                 modules_to_save: Sequence[str] | None = None) -> None:
        if checkpoint not in ("adapter", "full"):
            raise ValueError(f"checkpoint must be 'adapter' or 'full', got {checkpoint!r}")
        self.adapter_name = adapter_name
        self.checkpoint = checkpoint
        self.modules_to_save = list(modules_to_save or [])
        self._injected: weakref.WeakSet[nn.Module] = weakref.WeakSet()

    @property
    def owner(self) -> str:
        """The label under which this method's parameters are claimed, e.g. ``LoRA[default]``."""
        return f"{type(self).__name__}[{self.adapter_name}]"

    def inject_into(self, module: nn.Module) -> list[nn.Parameter]:
        """Add the method to ``module`` and return the parameters it trains."""
        raise NotImplementedError

    def inject(self, module: nn.Module) -> nn.Module:
        """Add the method to ``module`` (once), then train only what PEFT methods own."""
        if module in self._injected:
            return module
        if self.owner in adapter_records(module):
            raise ValueError(f"{self.owner} is already injected into this model; pass another adapter_name")
        saved = [p for _, m in self._modules_to_save(module) for p in m.parameters()]
        check_unclaimed(module, self.owner, saved)
        claim(module, self.owner, self.inject_into(module) + saved)
        record_adapter(module, self.owner, type(self).__name__, self.adapter_name, self.config())
        freeze_unclaimed(module)
        self._injected.add(module)
        return module

    def _modules_to_save(self, module: nn.Module) -> list[tuple[str, nn.Module]]:
        if not self.modules_to_save:
            return []
        return select_modules(module, self.modules_to_save, supported=(nn.Module,),
                              method=f"{type(self).__name__} modules_to_save")

    def config(self) -> dict[str, Any]:
        """The constructor arguments of this method, as stored attributes (saved with adapters)."""
        names = inspect.signature(type(self).__init__).parameters
        return {name: getattr(self, name) for name in names if name != "self" and hasattr(self, name)}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        install_adapter_checkpointing(trainer)
        if is_overridden("configure_model", pl_module, L.LightningModule) or shards_after_injection(trainer.strategy):
            self._inject_after_configure_model(trainer, pl_module)
        else:
            self.inject(pl_module)

    def _inject_after_configure_model(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Chain injection (and by the last PEFT callback, sharding) behind the module's own ``configure_model``."""
        configure_model = pl_module.configure_model
        if getattr(configure_model, "_lightning_peft_callback", None) is self:
            return

        def configure_model_then_inject() -> None:
            configure_model()
            self.inject(pl_module)
            callbacks = peft_callbacks(trainer)
            if self is callbacks[-1]:
                adapter_only = all(cb.checkpoint == "adapter" for cb in callbacks)
                prepare_sharding(trainer, pl_module, adapter_checkpoints=adapter_only)

        configure_model_then_inject._lightning_peft_callback = self  # type: ignore[attr-defined]
        pl_module.configure_model = configure_model_then_inject

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self is peft_callbacks(trainer)[0]:
            enable_input_grads_for_checkpointing(pl_module)
            rank_zero_info(f"lightning_peft: trainable parameters\n{trainable_summary(pl_module)}")

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0 and self is peft_callbacks(trainer)[0]:
            check_gradients_reached(trainer, pl_module)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Leave the user's module as it was: drop the ``configure_model`` wrapper."""
        pl_module.__dict__.pop("configure_model", None)

    def state_dict(self) -> dict[str, Any]:
        """The method and its settings, so ``lightning-peft export`` can rebuild the adapter."""
        return {"method": type(self).__name__, "config": self.config()}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(adapter_name=self.adapter_name)


def peft_callbacks(trainer: L.Trainer) -> list[PEFTCallback]:
    """The trainer's PEFT callbacks, in order."""
    return [cb for cb in trainer.callbacks if isinstance(cb, PEFTCallback)]
