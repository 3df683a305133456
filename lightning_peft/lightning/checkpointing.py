"""Adapter-only Lightning checkpoints: their size follows the adapter, not the base model.

A checkpoint keeps the trainable tensors; the frozen base is rebuilt by the module from its
original source, so on load the missing entries are taken from the model as it stands.
Saving goes through a temporary file and a rename, so a crash never leaves a corrupt file; a
checksum of the adapter tensors travels in the checkpoint and is checked on load, and a file
that cannot be read is one error naming it.
"""

from __future__ import annotations

import pickle
import random
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_peft.core.files import PathLike, atomic_write
from lightning_peft.core.integrity import check_digest, tensor_digest
from lightning_peft.core.merging import check_unmerged
from lightning_peft.core.ownership import adapter_refs, buffers_of_trained_modules, owners

CHECKPOINT_KEY = "lightning_peft"
# how integer keys of the optimizer states count parameters: "optimizer" (its own, as torch does) or "model" (all
# the module's, as Lightning's FSDP2 strategy saves and loads them)
OPTIMIZER_NUMBERING = "optimizer_numbering"
OPTIMIZER_PARAMETERS = "optimizer_parameters"  # each optimizer's parameters by name: its states are by position
TASKS = "tasks"  # the tasks of a multi-task run, each with its adapter: evaluating it needs their routing
WRAPPER_NAMES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")  # FSDP1 and activation checkpointing


def adapter_state_keys(module: nn.Module) -> set[str]:
    """State-dict keys of the tensors that PEFT methods own or that are trainable, of the buffers beside them, and
    of norm layers' running statistics (a frozen BatchNorm in train mode moves them)."""
    owned = owners(module)

    def kept(param: nn.Parameter) -> bool:
        return param.requires_grad or id(param) in owned

    params = {state_key(name) for name, param in module.named_parameters(remove_duplicate=False) if kept(param)}
    return (params | {state_key(name) for name in buffers_of_trained_modules(module, kept)}
            | running_statistic_keys(module))


def running_statistic_keys(module: nn.Module) -> set[str]:
    """The state-dict keys of `running_statistics`."""
    return {state_key(name) for name in running_statistics(module)}


def running_statistics(module: nn.Module) -> list[str]:
    """The buffers of norm layers that track running statistics: they move in training, frozen or not."""
    return [f"{name}.{local}" if name else local for name, m in module.named_modules()
            if getattr(m, "track_running_stats", False) and hasattr(m, "running_mean")
            for local, buffer in m._buffers.items()
            if buffer is not None and local not in m._non_persistent_buffers_set]


def state_key(parameter_name: str) -> str:
    """The state-dict key of a parameter: its name without the wrapper modules that state dicts leave out."""
    for wrapper in WRAPPER_NAMES:
        parameter_name = parameter_name.replace(wrapper, "")
    return parameter_name


def keep_adapter_only(checkpoint: dict[str, Any], module: nn.Module) -> dict[str, Any]:
    """A shallow copy of ``checkpoint`` whose state_dict holds the adapter tensors only."""
    keys = adapter_state_keys(module)
    trimmed = dict(checkpoint)
    trimmed["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
    trimmed[CHECKPOINT_KEY] = {"adapter_only": True}
    return trimmed


def with_adapter_digest(checkpoint: dict[str, Any], module: nn.Module) -> dict[str, Any]:
    """A shallow copy of ``checkpoint`` that records the checksum of its adapter tensors (plain tensors only)."""
    keys = adapter_state_keys(module)
    adapter = {k: v for k, v in checkpoint.get("state_dict", {}).items() if k in keys}
    if not adapter or not all(type(t) in (torch.Tensor, nn.Parameter) for t in adapter.values()):
        return checkpoint  # sharded tensors: each shard is its own file
    marked = dict(checkpoint)
    marked[CHECKPOINT_KEY] = {**checkpoint.get(CHECKPOINT_KEY, {}), "sha256": tensor_digest(adapter),
                              "sha256_keys": sorted(adapter)}
    return marked


def check_adapter_digest(checkpoint: dict[str, Any], path: PathLike) -> None:
    """Raise if the adapter tensors of a loaded checkpoint do not match the checksum saved with them."""
    recorded = checkpoint.get(CHECKPOINT_KEY, {})
    state = checkpoint.get("state_dict", {})
    if "sha256" in recorded:
        tensors = {k: state[k] for k in recorded["sha256_keys"] if k in state}
        check_digest(tensors, recorded["sha256"], f"checkpoint {path}")


@contextmanager
def checkpoint_read_errors(path: PathLike) -> Iterator[None]:
    """Turn the many ways a checkpoint file fails to load into one error that names the file and the problem."""
    try:
        yield
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    except PermissionError:
        raise ValueError(f"checkpoint {path} cannot be read: permission denied") from None
    except IsADirectoryError:
        if (Path(path) / ".metadata").is_file():
            raise ValueError(f"checkpoint {path} is a sharded checkpoint (a folder: FSDP with checkpoint='full'), "
                             "which test, predict and export cannot read on one process; resume the fit from it "
                             "with the same strategy, or train with checkpoint='adapter' (the default) for a "
                             "one-file checkpoint") from None
        raise ValueError(f"checkpoint {path} is a folder; give the .ckpt file inside it") from None
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"a {found.group(1)} object" if found else "objects other than tensors and plain values"
        raise ValueError(f"checkpoint {path} holds {what}, which loading with weights_only=True refuses (a "
                         "hyperparameter of that type, say); only if you trust the file, load it with "
                         "weights_only=False: trainer.fit(..., weights_only=False), or lightning-peft fit (validate, "
                         "test, predict) --weights_only false") from None
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 (inside a read, any failure means: not a readable checkpoint)
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise ValueError(f"checkpoint {path} cannot be read: it is empty, truncated or not a checkpoint "
                         f"({type(err).__name__}: {reason})") from None


def read_checkpoint(path: PathLike, **load_options: Any) -> dict[str, Any]:
    """A checkpoint file loaded with ``weights_only=True`` on the CPU, its adapter checksum checked."""
    with checkpoint_read_errors(path):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, **load_options)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a Lightning checkpoint")
    check_adapter_digest(checkpoint, path)
    return checkpoint


def check_methods_present(checkpoint: dict[str, Any], module: nn.Module) -> None:
    """Refuse an adapter-only checkpoint for a model without adapters: its tensors have nowhere to go."""
    if not checkpoint.get(CHECKPOINT_KEY, {}).get("adapter_only") or owners(module):
        return
    methods = [_described(state) for state in saved_methods(checkpoint).values()]
    raise ValueError(f"this checkpoint holds only the adapter of {' and '.join(methods) or 'a PEFT method'}, not the "
                     "whole model: add the callback it was trained with to the trainer (in a recipe: "
                     "trainer.callbacks, class_path lightning_peft.<Method> with those settings)")


def _described(state: dict[str, Any]) -> str:
    settings = ", ".join(f"{k}={v!r}" for k, v in state.get("config", {}).items()
                         if v not in (None, [], "default") and k != "checkpoint")
    return f"{state['method']}({settings})"


_EXTRA_STATE = "_extra_state"  # a module's get_extra_state, under this key in its state_dict


def complete_from_model(checkpoint: dict[str, Any], module: nn.Module, path: PathLike) -> None:
    """Check an adapter-only state_dict against ``module`` and fill in the frozen tensors from it.

    Only its parameters and buffers (and extra states) are filled in: what a layer writes of its own state beside
    them (bitsandbytes' int8 ``SCB`` and ``weight_format``) it keeps, and may refuse to load once it has run.
    """
    saved = checkpoint["state_dict"]
    current = module.state_dict()
    shapes = {key: tuple(tensor.shape) for key, tensor in current.items()}
    check_adapter_state(saved, shapes, adapter_state_keys(module), path, running_statistic_keys(module))
    registered = {state_key(name) for name, _ in module.named_parameters(remove_duplicate=False)}
    registered.update(state_key(name) for name, _ in module.named_buffers(remove_duplicate=False))
    for key, tensor in current.items():
        if key in registered or key.rsplit(".", 1)[-1] == _EXTRA_STATE:
            saved.setdefault(key, tensor)


def check_adapter_state(saved: dict[str, Any], shapes: dict[str, tuple[int, ...]], expected: set[str],
                        path: PathLike, optional: set[str] = frozenset()) -> None:
    """Raise unless ``saved`` fits a model of these tensor ``shapes`` and holds its ``expected`` adapter keys.

    ``optional`` keys may be missing (running statistics, which checkpoints of earlier versions left out).
    """
    for key, tensor in saved.items():
        if key not in shapes:
            raise ValueError(
                f"checkpoint {path} holds '{key}', which this model does not have; the model's adapter "
                f"tensors are: {_preview(sorted(expected))}. Was it trained with other target_modules?"
            )
        if tuple(tensor.shape) != shapes[key]:
            raise ValueError(
                f"checkpoint {path}: tensor '{key}' has shape {tuple(tensor.shape)}, but the model's has "
                f"{shapes[key]}. Was the adapter trained with another r or model?"
            )
    missing = sorted(expected - saved.keys() - optional)
    if missing:
        raise ValueError(
            f"checkpoint {path} lacks {len(missing)} adapter tensor(s) of this model, first '{missing[0]}'. "
            "Was it trained with other target_modules or methods?"
        )


class AdapterCheckpointIO(CheckpointIO):
    """Wraps the strategy's CheckpointIO: trims what is saved to the adapter and saves atomically."""

    def __init__(self, inner: CheckpointIO, trainer: Any, adapter_only: Callable[[], bool],
                 check_loaded: Callable[[dict[str, Any], PathLike], None],
                 methods: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        self.inner = inner
        self.trainer = trainer
        self.adapter_only = adapter_only  # asked at each save: the trainer's callbacks say
        self.check_loaded = check_loaded  # before anything is restored: the settings match the trainer's
        self.methods = methods  # the PEFT methods' states by callback key, kept even in weights-only checkpoints

    def save_checkpoint(self, checkpoint: dict[str, Any], path: PathLike, storage_options: Any | None = None) -> None:
        module = self.trainer.lightning_module
        check_unmerged(module, f"checkpoint {path}", "to save the adapters as tensors of their own, which a resume "
                       "and export read")
        if self.adapter_only():
            if not adapter_refs(module):  # OnExceptionCheckpoint after a failed setup, undone
                rank_zero_warn(f"checkpoint {path} was not written: the model holds no adapter (the run failed before "
                               "its PEFT methods changed the model, or that was undone), so there is nothing to "
                               "resume")
                return
            checkpoint = keep_adapter_only(checkpoint, module)
        checkpoint = with_adapter_digest(checkpoint, module)
        numbered = "model" if isinstance(self.trainer.strategy, ModelParallelStrategy) else "optimizer"
        tasks = list(getattr(self.trainer.datamodule, "task_names", None) or [])  # MultiTaskData's: routed adapters
        checkpoint = {**checkpoint, CHECKPOINT_KEY: {**checkpoint.get(CHECKPOINT_KEY, {}), "methods": self.methods(),
                                                     OPTIMIZER_NUMBERING: numbered, TASKS: tasks,
                                                     OPTIMIZER_PARAMETERS: optimizer_parameter_names(self.trainer)}}
        if type(self.inner) is TorchCheckpointIO and storage_options is None and _is_local(path):
            atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))
        else:
            self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(
        self, path: PathLike, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        kwargs = {"weights_only": True if weights_only is None else weights_only}
        if map_location is not None:
            kwargs["map_location"] = map_location
        with checkpoint_read_errors(path):
            checkpoint = self.inner.load_checkpoint(path, **kwargs)
        check_adapter_digest(checkpoint, path)
        self.check_loaded(checkpoint, path)
        if checkpoint.get(CHECKPOINT_KEY, {}).get("adapter_only") and "state_dict" in checkpoint:
            complete_from_model(checkpoint, self.trainer.lightning_module, path)
        return checkpoint

    def remove_checkpoint(self, path: PathLike) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


def optimizer_parameter_names(trainer: Any) -> list[list[list[str]]] | None:
    """Each optimizer's parameter groups, each as its parameters' names in the module, in the optimizer's order."""
    names = {id(param): name for name, param in trainer.lightning_module.named_parameters()}
    found = [[[names.get(id(param)) for param in group["params"]] for group in optimizer.param_groups]
             for optimizer in trainer.optimizers]
    return None if any(None in group for groups in found for group in groups) else found


def states_in_this_order(checkpoint: dict[str, Any], trainer: Any, path: PathLike) -> list[dict[str, Any]]:
    """The checkpoint's optimizer states renumbered for the trainer's optimizers, matched by parameter name.

    torch keeps an optimizer's state by position: a resume whose optimizer lists the same
    parameters in another order (the same PEFT callbacks in another order) would give each
    parameter another's moments, or fail on a shape. Other parameters are refused.
    """
    states, saved = checkpoint["optimizer_states"], checkpoint.get(CHECKPOINT_KEY, {}).get(OPTIMIZER_PARAMETERS)
    current = optimizer_parameter_names(trainer)
    numbered = all(isinstance(i, int) for state in states for group in state["param_groups"] for i in group["params"])
    if not saved or current is None or saved == current or len(saved) != len(states) or not numbered:
        return states  # FSDP1's states are by name already
    return [_renumbered(state, then, now, path) for state, then, now in zip(states, saved, current, strict=True)]


def check_same_optimizer_order(checkpoint: dict[str, Any], holder: Any, path: PathLike) -> None:
    """Refuse a resume whose optimizer lists the checkpoint's parameters in another order where states cannot be
    renumbered by name (FSDP2 numbers them by the module's parameters itself)."""
    saved, current = checkpoint.get(CHECKPOINT_KEY, {}).get(OPTIMIZER_PARAMETERS), optimizer_parameter_names(holder)
    if saved and current is not None and saved != current:
        raise ValueError(f"checkpoint {path} lists its optimizer's parameters in another order than this run "
                         "(the PEFT methods given in another order?); under FSDP2 resume with the methods in the "
                         "order it was trained with")


def _renumbered(state: dict[str, Any], then: list[list[str]], now: list[list[str]], path: PathLike) -> dict[str, Any]:
    """One optimizer's saved ``state``, its groups' parameters named ``then``, numbered for its groups ``now``."""
    if then == now:
        return state
    if [sorted(group) for group in then] != [sorted(group) for group in now]:
        other = sorted({n for g in then for n in g} ^ {n for g in now for n in g})
        what = f"other parameters than this run's optimizer takes, first '{other[0]}'" if other else \
            "the same parameters in other groups (per task, say: the PEFT methods given in another order?)"
        raise ValueError(f"checkpoint {path} holds the optimizer state of {what}; resume with the methods and "
                         "optimizer it was trained with, in its order")
    position = {name: i for group, names in zip(state["param_groups"], then, strict=True)
                for i, name in zip(group["params"], names, strict=True)}
    index = {name: k for k, name in enumerate(name for group in now for name in group)}
    return {"state": {index[name]: state["state"][i] for name, i in position.items() if i in state["state"]},
            "param_groups": [{**group, "params": [index[name] for name in names]}
                             for group, names in zip(state["param_groups"], now, strict=True)]}


class CheckpointTheLastStep(Callback):
    """After a fit's last step, have its checkpoint callback save that step where its newest file is older.

    Without a monitored metric the callback saves after validation: a fit that stops between two
    validations (``val_check_interval``) would end with no file of the weights it tests and exports.
    It saves as after any step (``every_n_train_steps``), so the file resumes inside its epoch, and
    a validation at that same step saves nothing more.
    """

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        checkpoint = trainer.checkpoint_callback
        if not _saves_by_step(checkpoint):
            return
        if _last_step(trainer, batch_idx) and checkpoint._last_global_step_saved < trainer.global_step and \
                not checkpoint._should_skip_saving_checkpoint(trainer):
            candidates = checkpoint._monitor_candidates(trainer)
            checkpoint._save_topk_checkpoint(trainer, candidates)
            checkpoint._save_last_checkpoint(trainer, candidates)  # last.ckpt too, as Lightning's step saves do


def _saves_by_step(checkpoint: Any) -> bool:
    """Whether ``checkpoint`` keeps files by step: unmonitored, saving at all, named by epoch and step only (a name
    with a metric would carry an earlier validation's value)."""
    if not isinstance(checkpoint, ModelCheckpoint) or checkpoint.monitor is not None or checkpoint.save_top_k == 0:
        return False
    if checkpoint._every_n_epochs == 0 and not checkpoint._every_n_train_steps and \
            checkpoint._train_time_interval is None:
        return False  # saving switched off
    return set(re.findall(r"\{(\w+)", checkpoint.filename or "")) <= {"epoch", "step"}


def _last_step(trainer: Any, batch_idx: int) -> bool:
    """Whether the step just done ends the fit: its steps, or the last batch of its last epoch."""
    steps_done = 0 < trainer.max_steps <= trainer.global_step
    last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
    return steps_done or (last_epoch and batch_idx + 1 >= trainer.num_training_batches)


def install_adapter_checkpointing(trainer: Any, adapter_only: Callable[[], bool],
                                  check_loaded: Callable[[dict[str, Any], PathLike], None],
                                  methods: Callable[[], dict[str, Any]]) -> None:
    """Route the trainer's checkpoint saving and loading through :class:`AdapterCheckpointIO` (once)."""
    strategy = trainer.strategy
    if not isinstance(strategy.checkpoint_io, AdapterCheckpointIO):
        strategy.checkpoint_io = AdapterCheckpointIO(strategy.checkpoint_io, trainer, adapter_only, check_loaded,
                                                     methods)
    if not getattr(strategy.load_optimizer_state_dict, _MATCHES_NAMES, False):
        _load_optimizer_states_by_name(strategy, trainer)


_MATCHES_NAMES = "_lightning_peft_matches_names"


def _load_optimizer_states_by_name(strategy: Any, trainer: Any) -> None:
    """Let the strategy give each parameter its own saved optimizer state in any order (`states_in_this_order`)."""
    load = strategy.load_optimizer_state_dict

    def load_optimizer_state_dict(checkpoint: dict[str, Any]) -> None:
        if checkpoint.get(CHECKPOINT_KEY, {}).get(OPTIMIZER_NUMBERING) == "optimizer":
            states = states_in_this_order(checkpoint, trainer, trainer.ckpt_path)
            checkpoint = {**checkpoint, "optimizer_states": states}
        load(checkpoint)

    setattr(load_optimizer_state_dict, _MATCHES_NAMES, True)
    strategy.load_optimizer_state_dict = load_optimizer_state_dict


def random_states() -> dict[str, Any]:
    """The random number generators' states (torch, this device's CUDA, numpy, Python), in types ``weights_only``
    loading reads."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    cuda = [torch.cuda.get_rng_state()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate(),
            "numpy": [kind, keys.tolist(), position, has_gauss, gauss]}


def every_process_random_states() -> list[dict[str, Any]]:
    """`random_states` of every process, by rank: under DDP each draws its own dropout masks (its batches' shapes).

    A checkpoint is made on every process, so each gives its states to all here.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [random_states()]
    states: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, random_states())
    return states


def set_this_process_random_states(saved: list[dict[str, Any]] | dict[str, Any]) -> None:
    """Put this process's generators back as `every_process_random_states` found them (rank 0's where the checkpoint
    holds no states of this rank: another world size, or a file from before each rank's were kept)."""
    every = [saved] if isinstance(saved, dict) else saved
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    set_random_states(every[rank] if rank < len(every) else every[0])


def set_random_states(states: dict[str, Any]) -> None:
    """Put the generators back as `random_states` found them, so dropout draws on as it would have."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():  # this process's device
        torch.cuda.set_rng_state(states["cuda"][0])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))


def saved_setup_states(checkpoint: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The model-changing callbacks' states a checkpoint holds by callback key (weights-only ones keep them beside
    the checksum)."""
    states = {**checkpoint.get(CHECKPOINT_KEY, {}).get("methods", {}), **checkpoint.get("callbacks", {})}
    return {key: state for key, state in states.items() if isinstance(state, dict)}


def saved_methods(checkpoint: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The PEFT methods' states a checkpoint holds by callback key."""
    return {key: state for key, state in saved_setup_states(checkpoint).items() if "method" in state}


def _is_local(path: PathLike) -> bool:
    return isinstance(get_filesystem(path), LocalFileSystem)


def _preview(names: list[str], limit: int = 8) -> str:
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "(none)"
