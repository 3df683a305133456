"""The callbacks that change a LightningModule's model at setup: PEFT methods, and base storage (QuantizeBase).

At ``setup`` (every stage, idempotent) the change is applied to the LightningModule, before the
strategy wraps it and before ``configure_optimizers`` runs; a model that the module builds in
``configure_model`` is changed right after it is built. Under FSDP (``ModelParallelStrategy``,
``FSDPStrategy``) the last of these callbacks then prepares the sharding (see
:mod:`lightning_peft.lightning.sharding`). A PEFT method then trains exactly what PEFT methods
claim and freezes the rest; checkpoints hold the adapter only (``checkpoint="full"`` keeps all).
After the first backward, a trainable parameter without a gradient is named: an error under
DDP, which could not train it, else a warning.
"""

from __future__ import annotations

import inspect
import json
import warnings
import weakref
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import lightning as L
from lightning.pytorch.callbacks import StochasticWeightAveraging, WeightAveraging
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning_utilities.core.overrides import is_overridden
from torch import Tensor, nn

from lightning_peft.core.adapter_files import AdapterFormat, class_path, outside_the_file
from lightning_peft.core.injection import give_new_modules_their_parents_mode, keep_pytorch_fast_paths_off, modules_of
from lightning_peft.core.layer import check_not_switched_off
from lightning_peft.core.merging import check_unmerged, merged_layers
from lightning_peft.core.models import model_root
from lightning_peft.core.ownership import AdapterRef, adapter_refs, claim, freeze_unclaimed, owners
from lightning_peft.core.rollback import TreeRecord, all_or_nothing
from lightning_peft.core.saved_modules import save_modules
from lightning_peft.core.summary import trainable_summary
from lightning_peft.core.targeting import select_modules
from lightning_peft.core.weights import is_quantized
from lightning_peft.lightning.checkpointing import (
    CHECKPOINT_KEY,
    TASKS,
    every_process_random_states,
    install_adapter_checkpointing,
    saved_setup_states,
    set_this_process_random_states,
)
from lightning_peft.lightning.gradient_checkpointing import enable_input_grads_for_checkpointing
from lightning_peft.lightning.sharding import (
    check_gradients_reached,
    check_loss_reaches_parameters,
    check_tasks_can_rest,
    idle_everywhere,
    prepare_sharding,
    rest_idle_adapters,
    shards_after_injection,
)

CheckpointPolicy = Literal["adapter", "full"]
SELECTION = ("target_modules", "target_parameters", "exclude_modules", "layers", "feedforward_modules")  # what picks
_CHAINED = "_lightning_peft_trainer"
_WEAK_SET = "<a weak set of modules, left behind when pickled>"


class ModelSetupCallback(L.Callback):
    """A callback that changes the module's model once it exists, before wrapping; subclasses define :meth:`apply`."""

    _undo_setup: TreeRecord | None = None  # the first callback's record of the module as it was, until the run starts
    replaces_base_layers: ClassVar[bool] = False  # base storage (QuantizeBase): its record is not kept past setup

    def apply(self, module: nn.Module) -> nn.Module:
        """Change ``module`` in place (once: a second call on the same module does nothing) and return it."""
        raise NotImplementedError

    def prepare(self, trainer: L.Trainer) -> None:
        """Take from ``trainer`` what :meth:`apply` will need (its device, say); called just before applying."""

    def config(self) -> dict[str, Any]:
        """The settings a checkpoint keeps, which a fit from it compares with its own (none here)."""
        return {}

    @property
    def owner(self) -> str:
        """What a message calls this callback's work, e.g. ``QuantizeBase`` (``LoRA[default]`` for a method)."""
        return type(self).__name__

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (Lightning's spawn launcher pickles the trainer): sets of modules seen here stay behind, empty."""
        return {key: _WEAK_SET if isinstance(value, weakref.WeakSet) else value for key, value in self.__dict__.items()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({key: weakref.WeakSet() if isinstance(value, str) and value == _WEAK_SET else value
                              for key, value in state.items()})

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_launcher(trainer, self.owner)
        if self is not setup_callbacks(trainer)[0]:
            return  # the first of these callbacks applies them all, together
        if stage == "fit":
            check_unmerged(pl_module, "fit", "to train its adapters on, or save the merged model and use it as a "
                                             "new base")
        check_weight_averaging(trainer, pl_module)
        for callback in setup_callbacks(trainer):
            callback.prepare(trainer)
        if is_overridden("configure_model", pl_module, L.LightningModule) or shards_after_injection(trainer.strategy):
            _apply_after_configure_model(trainer, pl_module)
        else:
            apply_all(trainer, pl_module)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Leave the user's module as it was: drop the ``configure_model`` wrapper."""
        self._undo_setup = None
        pl_module.__dict__.pop("configure_model", None)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A run that fails before it starts (a bad checkpoint, say) leaves the module as it was, with no wrapper.

        A failed run gets no teardown, and a retry with corrected callbacks must find the module as it was.
        """
        undo, self._undo_setup = self._undo_setup, None
        if undo is not None and undo.untouched():
            undo.restore()
        elif undo is not None:
            rank_zero_warn("the run failed after the model was prepared for training (moved, cast or wrapped): its "
                           "PEFT changes stay; build the model again before another run")
        pl_module.__dict__.pop("configure_model", None)  # after the restore, which would put it back

    def _run_started(self) -> None:
        """The run got past checkpoint loading: from here on its changes to the module stay."""
        self._undo_setup = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run_started()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run_started()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run_started()

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run_started()


class PEFTCallback(ModelSetupCallback):
    """Base of every PEFT method: a callback that injects the method at setup, freezes the rest and trims checkpoints.

    Subclass it to write a method of your own. Subclasses implement `inject_into`, which adds the
    method to a module and returns the parameters it trains, and store every constructor argument
    as an attribute of the same name (`config` saves those with the adapter). ``method_name`` is
    the name under which the method is registered and saved; a direct subclass is named after its
    class, and a subclass of a method inherits that method's name, so it saves and loads as its
    parent unless it sets its own (and registers it with `register_method`). ``peft_format`` maps
    the method to Hugging Face peft's files, or is None for the native layout. `inject` also works
    on a plain ``nn.Module`` outside a Trainer.

    Args:
        adapter_name: name of this adapter; several adapters with different names can live on one
            model. Injecting one whose method and name are already there keeps that adapter when
            its settings are the same, and raises a ValueError naming them when they differ.
        checkpoint: ``"adapter"`` keeps checkpoints to the tensors that PEFT methods train,
            ``"full"`` keeps the whole model (one ``"full"`` method in a Trainer is enough for that).
        modules_to_save: whole modules (a new classification head, say), a list of module-name
            suffixes as ``target_modules`` takes them, of which this adapter trains its own copy
            alongside the method, saved with its adapter; the original stays frozen as the base.

    Raises:
        ValueError: when ``checkpoint`` is neither ``"adapter"`` nor ``"full"``, or
            ``modules_to_save`` is a string rather than a list of names.

    Examples:
        ```python
        from torch import nn
        from lightning_peft import PEFTCallback

        class TrainNorms(PEFTCallback):  # method_name "TrainNorms"; register_method(TrainNorms) to load its files
            def inject_into(self, module: nn.Module) -> list[nn.Parameter]:
                return [p for m in module.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()]
        ```
    """

    method_name: ClassVar[str | None] = None
    peft_format: ClassVar[AdapterFormat | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.method_name is None:  # a new method: named after its class until it says otherwise
            cls.method_name = cls.__name__

    def __init__(self, adapter_name: str = "default", checkpoint: CheckpointPolicy = "adapter",
                 modules_to_save: Sequence[str] | None = None) -> None:
        if checkpoint not in ("adapter", "full"):
            raise ValueError(f"checkpoint must be 'adapter' or 'full', got {checkpoint!r}")
        if isinstance(modules_to_save, str):  # list("classifier") would be its letters
            raise ValueError(f"{self.method_name} modules_to_save takes a list of module names, e.g. ['classifier']; "
                             f"got the string {modules_to_save!r}")
        self.adapter_name = adapter_name
        self.checkpoint = checkpoint
        self.modules_to_save = list(modules_to_save or [])
        self._injected: weakref.WeakSet[nn.Module] = weakref.WeakSet()

    @property
    def ref(self) -> AdapterRef:
        """This adapter as the module tree records it: method, name and settings."""
        return AdapterRef(type(self), self.adapter_name, self.config())

    @property
    def owner(self) -> str:
        """The adapter's label, e.g. ``LoRA[default]``."""
        return str(self.ref)

    def inject_into(self, module: nn.Module) -> list[nn.Parameter]:
        """Add the method to ``module`` and return the parameters it trains."""
        raise NotImplementedError

    def chosen_names(self, root: nn.Module) -> dict[str, set[str]]:
        """The names of the modules that each of this method's module-choosing settings picks in ``root`` (none for a
        method without such settings)."""
        return {}

    def _picks_the_listed_modules(self, module: nn.Module, theirs: dict[str, Any]) -> bool:
        """Whether this callback's settings pick exactly the modules that an adapter file's settings list by full name
        (`load_adapter`'s), so that the callback goes on with the loaded adapter."""
        listed = [theirs.get(key) for key in ("target_modules", "target_parameters")]
        if not any(isinstance(names, list) and names for names in listed) or any(
                theirs.get(key) not in (None, []) for key in ("exclude_modules", "layers")):
            return False  # not a file's full names: its settings themselves say what it adapted
        _, root = model_root(module)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a name that matches nothing says so at injection, not here
                ours = self.chosen_names(root)
        except (ValueError, TypeError):  # it picks nothing here
            return False
        return bool(ours) and all(set(theirs.get(key) or []) == names for key, names in ours.items())

    def inject(self, module: nn.Module) -> nn.Module:
        """Add the method to ``module`` (once), then train only what PEFT methods own; on an error, change nothing."""
        if module in self._injected and (self.ref in adapter_refs(module) or merged_layers(module)):
            return module  # applied (setup runs at every stage), maybe merged since; a rolled-back one is redone
        ref = self.ref
        there = next((r for r in adapter_refs(module) if r == ref), None)
        if there is not None:
            changed = changed_settings(there.config, ref.config)
            if set(changed) & set(SELECTION) and self._picks_the_listed_modules(module, there.config):
                changed = {k: v for k, v in changed.items() if k not in SELECTION}  # a file's full names: the same
            if not changed:
                return module  # put there by a callback of the same settings (an earlier Trainer's): that adapter
            made_with = ", ".join(f"{key}={theirs!r}" for key, (theirs, _) in changed.items())
            raise ValueError(f"{ref} is in this model already, made with {made_with}; give this one another "
                             "adapter_name, or use those settings to go on with that adapter")
        check_unmerged(module, f"{ref}: cannot inject", "or save the merged model and use it as a new base")
        check_not_switched_off(module, f"{ref}: inject")
        _check_materialized(module, ref)
        before = modules_of(module)
        with all_or_nothing(module):
            # Saved first: a target inside a module trained whole is left out (its copy trains it), as in peft.
            copies = save_modules(module, self._modules_to_save(module), self.adapter_name, self.owner)
            claim(module, ref, self.inject_into(module) + copies)
            freeze_unclaimed(module)
            give_new_modules_their_parents_mode(module, before)
            keep_pytorch_fast_paths_off(module)
        self._injected.add(module)
        self._warn_if_no_file_can_hold(module)
        return module

    def _warn_if_no_file_can_hold(self, module: nn.Module) -> None:
        """Say now, before training, what `save_adapter` would refuse at the end: tensors beside the model."""
        refusal = outside_the_file(module, self.ref)
        if refusal is not None:
            rank_zero_warn(f"{refusal}. It trains and checkpoints, but save_adapter will refuse it")

    apply = inject

    @staticmethod
    def swap_refusal(slot: dict[str, Any], incoming: dict[str, Any]) -> str | None:
        """Why an adapter made with the settings ``incoming`` cannot be hot-swapped into one made with ``slot``.

        None where the slot's tensors, given the file's values, compute what the file's adapter
        computes; a method whose settings change that beyond its tensors' shapes says so here.
        """
        return None

    @staticmethod
    def for_original_base(settings: dict[str, Any], tensors: dict[str, Tensor],
                          root: nn.Module) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The adapter's settings and tensors (named from ``root``) as an adapter of the base weights it started from.

        The same adapter, unless the method rewrote base weights when it was injected (LoRA's PiSSA).
        """
        return settings, tensors

    def _modules_to_save(self, module: nn.Module) -> list[tuple[str, nn.Module]]:
        if not self.modules_to_save:
            return []
        return select_modules(module, self.modules_to_save, supported=(nn.Module,), method=self.method_name,
                              option="modules_to_save", whole_modules=True)

    def config(self) -> dict[str, Any]:
        """The constructor arguments of this method and of the methods it extends, as stored attributes.

        A subclass's file thus holds every setting its registered parent needs to rebuild it.
        """
        names = [name for cls in type(self).__mro__ if issubclass(cls, PEFTCallback)
                 for name in inspect.signature(cls.__init__).parameters]
        return {name: getattr(self, name) for name in dict.fromkeys(names) if name != "self" and hasattr(self, name)}

    def prepare(self, trainer: L.Trainer) -> None:
        install_adapter_checkpointing(
            trainer, adapter_only=lambda: adapter_only_checkpoints(trainer),
            check_loaded=lambda checkpoint, path: check_saved_settings(trainer, checkpoint, path),
            methods=lambda: {cb.state_key: getattr(cb, "method_state", cb.state_dict)()
                             for cb in setup_callbacks(trainer)})  # on the saving process alone: no gathering

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._step_tasks: set[str] | None = None
        if self is peft_callbacks(trainer)[0]:
            check_tasks_can_rest(trainer)
            _warn_of_adapters_made_elsewhere(trainer, pl_module)
            enable_input_grads_for_checkpointing(pl_module)
            rank_zero_info(f"lightning_peft: trainable parameters\n{trainable_summary(pl_module)}")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if getattr(trainer.datamodule, "task_names", None):  # MultiTaskData: each row's task, over accumulation
            self._step_tasks = (self._step_tasks or set()) | set(batch["task"])

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        if trainer.global_step == 0 and self is peft_callbacks(trainer)[0]:
            check_loss_reaches_parameters(pl_module, loss)

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0 and self is peft_callbacks(trainer)[0]:  # only the first step is checked
            check_gradients_reached(trainer, pl_module, self._idle_tasks(pl_module))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: Any) -> None:
        if self is peft_callbacks(trainer)[0] and self._step_tasks is not None:
            tasks = task_adapters(trainer, pl_module)
            rest_idle_adapters(pl_module, idle_everywhere(trainer.strategy, tasks, self._step_tasks))
            self._step_tasks = None

    def _idle_tasks(self, pl_module: L.LightningModule) -> set[str]:
        """The task adapters that no row of this step's batches named (none outside `MultiTaskData`)."""
        routed = self._step_tasks
        return set() if routed is None else set(task_adapters(pl_module.trainer, pl_module)) - routed

    def method_state(self) -> dict[str, Any]:
        """The method and its settings, so ``lightning-peft export`` can rebuild the adapter."""
        return {"method": self.method_name, "class_path": class_path(type(self)), "config": self.config()}

    def state_dict(self) -> dict[str, Any]:
        """`method_state`, and every process's random states (gathered: called on every process).

        A resumed fit puts the random generators back as they were at the save, so dropout draws
        the masks the uninterrupted run draws.
        """
        return {**self.method_state(), "random_states": every_process_random_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "random_states" in state_dict:  # restored before the data loaders start, as they were at the save
            set_this_process_random_states(state_dict["random_states"])

    @property
    def state_key(self) -> str:
        return self._generate_state_key(adapter_name=self.adapter_name)


def task_adapters(trainer: L.Trainer, module: nn.Module) -> list[str]:
    """The adapters named after a task of the data (`MultiTaskData`), sorted; none for other data.

    Only these rest in a step without their task's rows; adapters of no task (a shared BitFit,
    say) serve every row and train at every step.
    """
    tasks = set(getattr(trainer.datamodule, "task_names", None) or ())
    return sorted(tasks & {ref.name for ref in adapter_refs(module)}) if tasks else []


def apply_all(trainer: L.Trainer, module: nn.Module) -> None:
    """Apply every model-changing callback of ``trainer`` to ``module``; if one fails, none has changed it.

    The first callback keeps the record of the module as it was until the run starts, so a
    failure in between (loading a checkpoint) undoes the changes too; unless base storage was
    replaced (QuantizeBase): holding the full-precision layers past setup would keep the model twice.
    """
    callbacks = setup_callbacks(trainer)
    with all_or_nothing(module) as record:
        for callback in callbacks:
            callback.apply(module)
    replaced = any(cb.replaces_base_layers for cb in callbacks)  # the record holds the layers they replaced
    callbacks[0]._undo_setup = None if replaced else record


def _apply_after_configure_model(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """Chain :func:`apply_all`, then sharding, behind the module's own ``configure_model`` (once)."""
    if getattr(pl_module.configure_model, _CHAINED, None) is trainer:
        return
    pl_module.__dict__.pop("configure_model", None)  # another trainer's, left by an interrupted run
    configure_model = pl_module.configure_model

    def configure_model_then_apply() -> None:
        configure_model()
        apply_all(trainer, pl_module)
        prepare_sharding(trainer, pl_module, adapter_checkpoints=adapter_only_checkpoints(trainer))

    setattr(configure_model_then_apply, _CHAINED, trainer)
    pl_module.configure_model = configure_model_then_apply


def check_launcher(trainer: L.Trainer, owner: str) -> None:
    """Refuse strategies that start their processes by multiprocessing: they train copies and hand no adapters back."""
    launcher = getattr(trainer.strategy, "launcher", None)
    if isinstance(launcher, _MultiProcessingLauncher):
        raise ValueError(f"{owner}: this strategy starts its processes by multiprocessing ('{launcher._start_method}': "
                         "ddp_spawn, ddp_fork, or ddp_notebook, Lightning's choice in a notebook), whose processes "
                         "train copies of the model and hand no adapters back to it; use strategy='ddp' from a "
                         "script started once per device (python or torchrun), or devices=1 in a notebook")


def _check_materialized(module: nn.Module, ref: AdapterRef) -> None:
    """Refuse a model whose lazy layers (nn.LazyLinear) have not met their first batch: their shapes are not known."""
    lazy = next((name for name, param in module.named_parameters() if isinstance(param, nn.UninitializedParameter)),
                None)
    if lazy is not None:
        raise ValueError(f"{ref}: '{lazy}' has no shape yet (a lazy layer, such as nn.LazyLinear, before its first "
                         "batch): run one batch through the model, then inject")


def check_weight_averaging(trainer: L.Trainer, module: nn.Module) -> None:
    """Refuse weight averaging (SWA, EMA) that copies the model before the PEFT callbacks change it, or that would
    average a quantized base's codes (changing them); else say that its averaged copy is of the whole model."""
    averaging = next((cb for cb in trainer.callbacks if isinstance(cb, WeightAveraging | StochasticWeightAveraging)),
                     None)
    if averaging is None or trainer.state.fn != TrainerFn.FITTING:
        return
    name, setups = type(averaging).__name__, setup_callbacks(trainer)
    if trainer.callbacks.index(averaging) < trainer.callbacks.index(setups[0]):
        raise ValueError(f"{name} comes before the PEFT callbacks in trainer.callbacks, so it would copy the model "
                         "before they change it (and fail on its first update): list it after them")
    if any(cb.replaces_base_layers for cb in setups) or any(map(is_quantized, module.modules())):
        raise ValueError(f"{name} averages every parameter of the model, a quantized base's codes too, which it "
                         "would change (their average is no code): leave it out, or train a base not quantized")
    rank_zero_warn(f"{name} keeps an average of every parameter, the frozen base's too: its checkpoints hold the "
                   "whole model beside the adapters, and the base, averaged with itself, may come back rounded")


def setup_callbacks(trainer: L.Trainer) -> list[ModelSetupCallback]:
    """The trainer's callbacks that change the model at setup, in order."""
    return [cb for cb in trainer.callbacks if isinstance(cb, ModelSetupCallback)]


def _warn_of_adapters_made_elsewhere(trainer: L.Trainer, module: nn.Module) -> None:
    """Say which trainable adapters no method of this trainer made (an earlier Trainer's): they train too, and the
    checkpoints, which record this trainer's methods, resume only with theirs given as well."""
    made_here = {callback.ref for callback in peft_callbacks(trainer)}
    trainable = {id(param) for param in module.parameters() if param.requires_grad}
    others = sorted({str(ref) for param_id, ref in owners(module).items() if param_id in trainable
                     and ref not in made_here and issubclass(ref.method, PEFTCallback)})
    if others:
        rank_zero_warn(f"the model holds {', '.join(others)}, which none of this trainer's methods made (an earlier "
                       "run's): it trains in this fit too, and resuming its checkpoints needs its method given as "
                       "well; give this trainer that method too, or delete_adapter it first")


def peft_callbacks(trainer: L.Trainer) -> list[PEFTCallback]:
    """The trainer's PEFT callbacks, in order."""
    return [cb for cb in trainer.callbacks if isinstance(cb, PEFTCallback)]


def check_saved_settings(trainer: L.Trainer, checkpoint: dict[str, Any], path: Any) -> None:
    """Refuse a checkpoint whose adapters were made with other settings than the trainer's; warn of a base stored
    otherwise (QuantizeBase's settings, or none)."""
    saved = saved_setup_states(checkpoint)
    _check_base_stored_alike(trainer, checkpoint, path, saved)
    for callback in setup_callbacks(trainer):
        state = saved.get(callback.state_key)
        if state is None or "config" not in state:
            continue
        changed = changed_settings(state["config"], callback.config())
        if not changed:
            continue
        settings = ", ".join(f"{key}={theirs!r} (here {ours!r})" for key, (theirs, ours) in changed.items())
        if not isinstance(callback, PEFTCallback):  # the base stored otherwise (QuantizeBase): the adapters still fit
            warnings.warn(f"checkpoint {path} was trained with {callback.owner} {settings}: its adapters go on on "
                          "this base", stacklevel=2)
            continue
        what = ("resume with the settings it was trained with, or start a new run"
                if trainer.state.fn == TrainerFn.FITTING else "load it with the settings it was trained with")
        raise ValueError(f"checkpoint {path} holds {callback.owner} trained with {settings}; {what}")
    _check_tasks_routed(trainer, checkpoint, path)
    here = {callback.state_key for callback in setup_callbacks(trainer)}
    for key, state in saved.items():
        if key not in here and "method" not in state and state.get("config"):
            settings = ", ".join(f"{name}={value!r}" for name, value in state["config"].items())
            warnings.warn(f"checkpoint {path} was trained with {key}({settings}), which this fit does not have: "
                          "its adapters go on without it", stacklevel=2)


def _check_base_stored_alike(trainer: L.Trainer, checkpoint: dict[str, Any], path: Any, saved: dict) -> None:
    """Refuse a full checkpoint whose base is quantized otherwise than the model here (other layers or formats, or
    none): its codes and statistics cannot load there."""
    theirs = _quantized_entries(checkpoint.get("state_dict") or {})
    module = trainer.lightning_module
    if not theirs or theirs == _quantized_entries(module.state_dict() if module is not None else {}):
        return
    made = next((f"{key}({', '.join(f'{k}={v!r}' for k, v in state['config'].items())})" for key, state in
                 saved.items() if "method" not in state and state.get("config")), "QuantizeBase")
    raise ValueError(f"checkpoint {path} holds a base that {made} quantized ({len(theirs)} layers), which the model "
                     "here is not quantized alike: give the QuantizeBase it was trained with (an adapter-only "
                     "checkpoint, checkpoint='adapter', goes on on any base)")


def _quantized_entries(state_dict: dict[str, Any]) -> set[str]:
    """The state_dict keys of bitsandbytes statistics, one per quantized layer: an int8 layer's scales, a 4-bit
    one's state (which names its format)."""
    return {key for key in state_dict if key.endswith(".SCB") or ".weight.quant_state." in key}


def _check_tasks_routed(trainer: L.Trainer, checkpoint: dict[str, Any], path: Any) -> None:
    """Refuse to evaluate a multi-task checkpoint without its tasks' routing: every task's adapter would act at once."""
    tasks = checkpoint.get(CHECKPOINT_KEY, {}).get(TASKS) or []
    evaluating = trainer.state.fn != TrainerFn.FITTING
    if len(tasks) > 1 and evaluating and not getattr(trainer.datamodule, "task_names", None):
        raise ValueError(f"checkpoint {path} holds one adapter per task ({', '.join(tasks)}), and this data routes "
                         "no rows to them, so all would act at once: evaluate with the multi-task recipe's data, "
                         "predict with --adapters NAME=DIR (export writes one folder per task), or export --merged "
                         "--adapter NAME")


RESUMABLE_SETTINGS = ("checkpoint",)  # settings that may change between a run and its resumption


def changed_settings(theirs: dict[str, Any], ours: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{setting: (theirs, ours)}`` for each setting of both that makes the adapter another one."""
    theirs, ours = _comparable(theirs), _comparable(ours)
    return {key: (theirs[key], ours[key]) for key in ours
            if key in theirs and key not in RESUMABLE_SETTINGS and theirs[key] != ours[key]}


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """Settings as a checkpoint holds them (tuples as lists, an empty list as None, which mean the same), so saved
    and current ones compare equal."""
    return {key: None if value == [] else value for key, value in json.loads(json.dumps(config, default=str)).items()}


def adapter_only_checkpoints(trainer: L.Trainer) -> bool:
    """Whether the trainer's checkpoints keep the adapters only: PEFT methods are there and none asked for all."""
    methods = peft_callbacks(trainer)
    return bool(methods) and all(cb.checkpoint == "adapter" for cb in methods)
