"""PEFT models under DDP, FSDP2 (``ModelParallelStrategy``) and FSDP1 (``FSDPStrategy``).

Sharded units never mix frozen and trainable parameters: each PEFT layer's base layer is a unit,
the PEFT layer around it is another (then holding its adapters only), fully trainable modules
(``modules_to_save``) and the blocks (members of every ``nn.ModuleList``) follow, the root last.
The PEFT callback applies this itself after injecting: under ``ModelParallelStrategy`` it calls
:func:`fully_shard_peft` on the data-parallel mesh (the module's ``configure_model`` only builds
the model), under ``FSDPStrategy`` it supplies :func:`fsdp_auto_wrap_policy`. Checkpoints of
both stay adapter-only files of full tensors, written by rank 0, that load back into the shards.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy
from torch.nn.parallel import DistributedDataParallel

from lightning_peft.core.files import PathLike
from lightning_peft.core.layer import PEFTLayer, PEFTModule
from lightning_peft.core.ownership import holders, owners
from lightning_peft.core.weights import is_quantized, whole
from lightning_peft.lightning.checkpointing import (
    CHECKPOINT_KEY,
    OPTIMIZER_NUMBERING,
    AdapterCheckpointIO,
    adapter_state_keys,
    check_adapter_state,
    check_same_optimizer_order,
    read_checkpoint,
    running_statistic_keys,
    state_key,
)

_SHARDED = "_lightning_peft_fully_sharded"
_PATCHED = "_lightning_peft_adapter_loading"


# --- sharded units ----------------------------------------------------------------------------
def sharding_units(model: nn.Module) -> list[nn.Module]:
    """The submodules to shard before ``model`` itself, every module after the ones inside it."""
    chosen: set[nn.Module] = set()
    for module in model.modules():
        if isinstance(module, PEFTLayer):
            chosen.update((module, module.base_layer))
        elif isinstance(module, nn.ModuleList):
            chosen.update(module)
    chosen.update(_trainable_modules(model))
    return [m for m in reversed(list(model.modules())) if m in chosen and m is not model]


def _trainable_modules(module: nn.Module) -> Iterator[nn.Module]:
    """The largest submodules (outside PEFT layers) whose parameters all train, e.g. ``modules_to_save``."""
    for child in module.children():
        params = list(child.parameters())
        if isinstance(child, PEFTLayer) or not params:
            continue
        if all(p.requires_grad for p in params):
            yield child
        else:
            yield from _trainable_modules(child)


def check_units_do_not_mix(model: nn.Module, units: list[nn.Module]) -> None:
    """Raise if a unit (``units`` in sharding order, then ``model``) would hold frozen and trainable parameters, or
    a parameter tied to a module outside it (FSDP shards each parameter in one unit)."""
    names = {module: name for name, module in model.named_modules()}
    shared_with = holders(model)
    taken: set[int] = set()
    for unit in [*units, model]:
        own = [(name, p) for name, p in unit.named_parameters() if id(p) not in taken]
        inside = set(unit.modules())
        tied = next(((name, other) for name, p in own for other, _ in shared_with[id(p)] if other not in inside), None)
        if tied:
            raise ValueError(
                f"cannot shard '{names[unit]}' apart: its parameter '{tied[0]}' is tied to '{names[tied[1]]}' (tied "
                "input and output embeddings, say), which is sharded in another unit. Leave the tied module out of "
                "target_modules and modules_to_save, or untie the weights before fitting")
        frozen = [name for name, p in own if not p.requires_grad]
        trainable = [name for name, p in own if p.requires_grad]
        if frozen and trainable:
            raise ValueError(
                f"cannot shard '{names[unit] or 'the root module'}' apart: it holds frozen ({frozen[0]}, ...) and "
                f"trainable ({trainable[0]}, ...) parameters directly. Sharded units are whole modules: train "
                "whole modules (modules_to_save) or use a method that adds its own, such as LoRA"
            )
        taken.update(id(p) for _, p in own)


# --- FSDP2 ------------------------------------------------------------------------------------
def fully_shard_peft(model: nn.Module, mesh: DeviceMesh | None = None, **fully_shard_kwargs: Any) -> nn.Module:
    """Shard ``model``, adapters already injected, with FSDP2 so that no unit mixes frozen and trainable tensors.

    For Fabric or plain torch; under Lightning's ``ModelParallelStrategy`` the PEFT callback calls
    it itself. The units, each sharded after the units inside it: each PEFT layer's base layer and
    the PEFT layer around it (then holding its adapters only), each fully trainable module
    (``modules_to_save``), each block (every member of an ``nn.ModuleList``), and last ``model``
    itself. bitsandbytes weights stay whole on every rank, and the base layers of DoRA adapters
    stay unsharded from their forward until the backward.

    Args:
        model: the model, with its adapters injected and not yet sharded; changed in place.
        mesh: the device mesh to shard over, passed to every ``fully_shard`` call; ``None`` lets
            ``fully_shard`` take its default (all ranks).
        **fully_shard_kwargs: passed to every ``torch.distributed.fsdp.fully_shard`` call (e.g.
            ``mp_policy``); ``reshard_after_forward`` is overridden for DoRA's base layers, and
            ``ignored_params`` by the bitsandbytes weights where there are any.

    Returns:
        ``model`` itself, sharded.

    Raises:
        ValueError: when ``model`` is already sharded, or a unit would hold frozen and trainable
            parameters directly (a partly trained module: train whole modules instead).

    Examples:
        ```python
        from torch.distributed.device_mesh import init_device_mesh
        from lightning_peft import LoRA, fully_shard_peft

        LoRA(r=8).inject(model)
        fully_shard_peft(model, init_device_mesh("cuda", (world_size,)))
        ```
    """
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError("the model is already sharded: inject the adapters first, then call fully_shard_peft "
                         "(instead of fully_shard) once; under ModelParallelStrategy the PEFT callback does both")
    units = sharding_units(model)
    check_units_do_not_mix(model, units)
    read_by_layer = _bases_read_outside_their_forward(model)
    quantized = quantized_parameters(model)
    for unit in [*units, model]:
        keep_unsharded = {"reshard_after_forward": False} if unit in read_by_layer else {}
        ignored = {"ignored_params": quantized} if quantized else {}
        fully_shard(unit, mesh=mesh, **{**fully_shard_kwargs, **keep_unsharded, **ignored})
    model.__dict__[_SHARDED] = True
    return model


def quantized_parameters(model: nn.Module) -> set[nn.Parameter]:
    """The parameters of bitsandbytes layers: FSDP2 would turn them into DTensors without their quantization state.

    They stay whole on every rank (as under DDP); the adapters and every full-precision tensor are sharded.
    """
    return {param for module in model.modules() if is_quantized(module) for param in module.parameters()}


def _bases_read_outside_their_forward(model: nn.Module) -> set[nn.Module]:
    """Base layers whose weight a DoRA adapter (one with a ``magnitude``) reads in the PEFT layer's forward.

    These stay unsharded from their forward until the backward, when FSDP2 would otherwise have resharded them.
    """
    return {layer.base_layer for layer in model.modules() if isinstance(layer, PEFTLayer)
            and any(getattr(adapter, "magnitude", None) is not None for adapter in layer.adapters.values())}


def full_adapter_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """Gather the adapter tensors of a sharded (or plain) ``module`` as full CPU tensors, to save them.

    Takes the tensors that PEFT methods own or that are trainable, and the buffers of modules that
    train whole (a ``modules_to_save`` BatchNorm's running statistics), as adapter-only
    checkpoints do. Sharded tensors (FSDP2's DTensors) are gathered from all ranks, so every rank
    must call it.

    Args:
        module: the model, sharded with FSDP2 or not.

    Returns:
        The tensors by state-dict key (names without FSDP1's or activation checkpointing's wrapper
        modules), each a full, detached tensor on the CPU.

    Examples:
        ```python
        import torch
        from lightning_peft import full_adapter_state_dict

        state = full_adapter_state_dict(model)  # on every rank
        if torch.distributed.get_rank() == 0:
            torch.save(state, "adapter.pt")
        ```
    """
    keys = adapter_state_keys(module)
    named = ((state_key(name), tensor) for name, tensor in chain(module.named_parameters(), module.named_buffers()))
    return {key: whole(tensor).cpu() for key, tensor in named if key in keys}


# --- FSDP1 ------------------------------------------------------------------------------------
def fsdp_auto_wrap_policy(model: nn.Module) -> Callable[..., bool]:
    """Make an FSDP1 ``auto_wrap_policy`` under which no flat parameter mixes frozen and trainable tensors.

    It wraps the units that `fully_shard_peft` shards (each PEFT layer's base layer, the PEFT
    layer, fully trainable modules, the blocks), computed from ``model`` now. Under Lightning's
    ``FSDPStrategy`` the PEFT callback supplies it itself unless a policy is given.

    Args:
        model: the model, with its adapters injected, that FSDP1 will wrap.

    Returns:
        A policy for ``FullyShardedDataParallel(auto_wrap_policy=...)`` or
        ``FSDPStrategy(auto_wrap_policy=...)``.

    Raises:
        ValueError: when a unit would hold frozen and trainable parameters directly (a partly
            trained module: train whole modules instead).

    Examples:
        ```python
        from torch.distributed.fsdp import FullyShardedDataParallel
        from lightning_peft import LoRA, fsdp_auto_wrap_policy

        LoRA(r=8).inject(model)
        model = FullyShardedDataParallel(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=True)
        ```
    """
    units = sharding_units(model)
    check_units_do_not_mix(model, units)
    return functools.partial(lambda_auto_wrap_policy, lambda_fn=set(units).__contains__)


# --- Lightning strategies ---------------------------------------------------------------------
def shards_after_injection(strategy: Strategy) -> bool:
    """Whether the PEFT callback prepares this strategy's sharding (once the model is built and injected)."""
    return isinstance(strategy, (ModelParallelStrategy, FSDPStrategy))


def prepare_sharding(trainer: L.Trainer, module: L.LightningModule, adapter_checkpoints: bool) -> None:
    """Called once PEFT is injected: shard for ModelParallelStrategy, or give FSDPStrategy its units."""
    strategy = trainer.strategy
    if isinstance(strategy, ModelParallelStrategy):
        _shard_with_fsdp2(strategy, module, adapter_checkpoints)
    elif isinstance(strategy, FSDPStrategy) and not _wrapped_by_fsdp1(module):
        _give_fsdp1_its_units(strategy, module, adapter_checkpoints)


def _shard_with_fsdp2(strategy: ModelParallelStrategy, module: L.LightningModule, adapter_checkpoints: bool) -> None:
    """Give every trainer's strategy adapter-only checkpoints; shard the module once (a later Trainer finds it so)."""
    if strategy.device_mesh["tensor_parallel"].size() > 1:
        raise ValueError("lightning_peft shards PEFT models with FSDP2 over data parallelism only: "
                         "use ModelParallelStrategy(data_parallel_size=..., tensor_parallel_size=1)")
    if adapter_checkpoints:  # one file of full adapter tensors, written by rank 0 through CheckpointIO
        strategy._save_distributed_checkpoint = False
        strategy.lightning_module_state_dict = functools.partial(full_adapter_state_dict, module)
    load_adapter_checkpoints_into_shards(strategy, module)  # the settings checked, an adapter-only file loaded
    if not module.__dict__.get(_SHARDED):
        fully_shard_peft(module, strategy.device_mesh["data_parallel"])


def _give_fsdp1_its_units(strategy: FSDPStrategy, module: L.LightningModule, adapter_checkpoints: bool) -> None:
    if not strategy.kwargs.get("use_orig_params"):
        raise ValueError("PEFT models need FSDPStrategy(use_orig_params=True) (Lightning's default): with flat "
                         "parameters, adapters can be neither found nor saved by name")
    strategy.kwargs.setdefault("auto_wrap_policy", fsdp_auto_wrap_policy(module))
    quantized = quantized_parameters(module)
    if quantized:  # whole on every rank, as under FSDP2 (flat parameters would lose the quantization state)
        given = [state for state in strategy.kwargs.get("ignored_states") or [] if state not in quantized]
        strategy.kwargs["ignored_states"] = [*given, *quantized]
    load_adapter_checkpoints_into_shards(strategy, module)


def _wrapped_by_fsdp1(module: nn.Module) -> bool:
    return any(isinstance(m, FullyShardedDataParallel) for m in module.modules())


def load_adapter_checkpoints_into_shards(strategy: Strategy, module: L.LightningModule) -> None:
    """Let the strategy check a checkpoint's settings (a file, or a folder's ``meta.pt``) and load adapter-only files:
    checked against the model, then loaded with non-strict keys.

    Sharded strategies load checkpoints themselves, without CheckpointIO, so the frozen tensors
    cannot be filled in from the model as for other strategies.
    """
    load = strategy.load_checkpoint
    if getattr(load, _PATCHED, False):
        return
    shapes = {key: tuple(tensor.shape) for key, tensor in module.state_dict().items()}
    expected, optional = adapter_state_keys(module), running_statistic_keys(module)

    def load_checkpoint(checkpoint_path: PathLike, weights_only: bool | None = None) -> dict[str, Any]:
        is_file = Path(checkpoint_path).is_file()
        checkpoint = read_checkpoint(checkpoint_path, mmap=True) if is_file else _folder_state(checkpoint_path)
        if checkpoint is not None and isinstance(strategy.checkpoint_io, AdapterCheckpointIO):
            strategy.checkpoint_io.check_loaded(checkpoint, checkpoint_path)  # the methods' settings, as elsewhere
        if checkpoint is not None and isinstance(strategy, ModelParallelStrategy):
            check_same_optimizer_order(checkpoint, strategy, checkpoint_path)
        if is_file and _numbered_by_the_optimizer(strategy, checkpoint):
            return _load_renumbered(checkpoint, strategy, module, load_checkpoint, weights_only)
        if not is_file or not checkpoint.get(CHECKPOINT_KEY, {}).get("adapter_only"):
            return load(checkpoint_path, weights_only=weights_only)
        check_adapter_state(checkpoint["state_dict"], shapes, expected, checkpoint_path, optional)
        strict, module.strict_loading = module.strict_loading, False
        try:
            return load(checkpoint_path, weights_only=weights_only)
        finally:
            module.strict_loading = strict

    setattr(load_checkpoint, _PATCHED, True)
    strategy.load_checkpoint = load_checkpoint


def _numbered_by_the_optimizer(strategy: Strategy, checkpoint: dict[str, Any]) -> bool:
    """Whether FSDP2 is to load optimizer states saved without it: numbered by the optimizer's own parameters, where
    Lightning's FSDP2 loading counts all the module's."""
    numbering = checkpoint.get(CHECKPOINT_KEY, {}).get(OPTIMIZER_NUMBERING)
    return isinstance(strategy, ModelParallelStrategy) and numbering == "optimizer" and bool(
        checkpoint.get("optimizer_states"))


def _load_renumbered(checkpoint: dict[str, Any], strategy: Strategy, module: nn.Module, load: Callable,
                     weights_only: bool | None) -> dict[str, Any]:
    """Load ``checkpoint`` (from one device or DDP) under FSDP2, its optimizer states renumbered by the module's
    parameters: the optimizer's ``k``-th parameter is the one its ``k``-th saved state belongs to, as torch has it."""
    position = {id(param): i for i, param in enumerate(module.parameters())}
    states = []
    for saved, optimizer in zip(checkpoint["optimizer_states"], strategy.optimizers, strict=True):
        ours = [position[id(param)] for group in optimizer.param_groups for param in group["params"]]
        states.append({"state": {ours[k]: value for k, value in saved["state"].items()},
                       "param_groups": [{**group, "params": [ours[k] for k in group["params"]]}
                                        for group in saved["param_groups"]]})
    meta = {**checkpoint[CHECKPOINT_KEY], OPTIMIZER_NUMBERING: "model"}
    with tempfile.TemporaryDirectory(prefix="lightning-peft-renumbered-") as folder:
        path = Path(folder) / "checkpoint.ckpt"
        torch.save({**checkpoint, "optimizer_states": states, CHECKPOINT_KEY: meta}, path)
        return load(path, weights_only=weights_only)


def _folder_state(path: PathLike) -> dict[str, Any] | None:
    """The loop and callback states of a distributed checkpoint folder (FSDP2's ``meta.pt``), where there is one."""
    meta = Path(path) / "meta.pt"
    return read_checkpoint(meta) if meta.is_file() else None


# --- several tasks and unused gradients: DDP, FSDP ---------------------------------------------
def check_tasks_can_rest(trainer: L.Trainer) -> None:
    """Before any step: refuse several tasks (`MultiTaskData`) where a resting adapter would break or drift.

    A step may hold no row of a task, whose adapter then has no gradient: DDP's reducer (without
    ``find_unused_parameters``) fails on it; FSDP2 leaves it out of the reduction only on the
    processes without its rows (mixed batches), so the processes' collectives disagree (a crash on
    gloo), unless each of its adapters without rows joins with a zero (`RowAdapters.with_resting`),
    which prompts cannot: they are refused there; FSDP1 reduces one flat gradient per unit, zeros
    standing in for a resting adapter's, which AdamW turns into updates (``use_orig_params=False``)
    or which processes without its rows treat as none, so they stop agreeing (``True``): not run
    on a GPU here, so refused.
    """
    datamodule = trainer.datamodule
    if len(getattr(datamodule, "task_names", None) or []) < 2:
        return
    strategy = trainer.strategy
    if _reducer_needs_every_gradient(strategy):
        raise ValueError("several tasks under DDP: a step can hold no row of a task (with alternating batches, "
                         "every step), whose adapter then gets no gradient, which DDP cannot train: use "
                         "DDPStrategy(find_unused_parameters=True)")
    if isinstance(strategy, FSDPStrategy):
        raise ValueError("several tasks under FSDP1 (FSDPStrategy): its flat gradients hold zeros for a resting "
                         "task's adapter, which the optimizer can turn into updates; use ModelParallelStrategy "
                         "(FSDP2) with mixing='alternating', or DDPStrategy(find_unused_parameters=True)")
    mixed_on_several = datamodule.mixing == "mixed" and trainer.world_size > 1
    prompts = sorted({part.method for part in trainer.lightning_module.modules()
                      if isinstance(part, PEFTModule) and part.per_row and not isinstance(part, PEFTLayer)})
    if isinstance(strategy, ModelParallelStrategy) and mixed_on_several and prompts:
        raise ValueError(f"mixed batches of several {'/'.join(prompts)} tasks under FSDP2 (ModelParallelStrategy): "
                         "a process whose batch holds no row of a task leaves its prompt out of a gradient reduction "
                         "that the other processes run; use mixing='alternating' (every process gets a batch of the "
                         "same task each step)")


def check_gradients_reached(trainer: L.Trainer, module: nn.Module, idle: set[str] = frozenset()) -> None:
    """After the first backward: name every trainable parameter without a gradient.

    DDP (without ``find_unused_parameters``) would fail on them with "Expected to have finished
    reduction" at the next step, so there it is an error; elsewhere a warning. Adapters named in
    ``idle`` (tasks that the batch's rows did not name) are left out.
    """
    if idle and _reducer_needs_every_gradient(trainer.strategy):
        raise RuntimeError(f"the first batch names no row of task(s) {', '.join(sorted(idle))}, whose adapters then "
                           "get no gradient, which DDP cannot train: use DDPStrategy(find_unused_parameters=True)")
    owner = {param_id: ref.name for param_id, ref in owners(module).items()}
    missing = [state_key(name) for name, p in module.named_parameters()
               if p.requires_grad and p.grad is None and owner.get(id(p)) not in idle]
    if not missing:
        return
    message = (
        f"{len(missing)} trainable parameter(s) got no gradient in the first training step, so they never "
        f"reached the loss: {', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''}. Exclude their modules "
        "from target_modules / modules_to_save, or use them in the loss (inside torch.utils.checkpoint with "
        "use_reentrant=True, a block whose inputs need no gradient gives its parameters none: use_reentrant=False)."
    )
    if _reducer_needs_every_gradient(trainer.strategy):
        raise RuntimeError(f"{message} DDP cannot train parameters that get no gradient.")
    rank_zero_warn(message)


def check_loss_reaches_parameters(module: nn.Module, loss: Any) -> None:
    """Before the first backward: refuse a loss that no trainable parameter reached, naming the parameters.

    Without this, torch's backward fails with "element 0 of tensors does not require grad".
    """
    if not isinstance(loss, Tensor) or loss.requires_grad or not torch.is_grad_enabled():
        return
    trainable = [state_key(name) for name, p in module.named_parameters() if p.requires_grad]
    named = f": {', '.join(trainable[:8])}{', ...' if len(trainable) > 8 else ''}" if trainable else ""
    raise ValueError(f"the loss depends on no trainable parameter, so nothing would train{named}. Either the "
                     "forward never calls their modules (a module whose weight another one uses, such as T5's "
                     "`shared`, is not called itself: target the modules the forward calls), or the loss was "
                     "detached or computed under torch.no_grad")


def idle_everywhere(strategy: Strategy, names: list[str], present: set[str]) -> set[str]:
    """The adapters in ``names`` that no process's batches named in this step (``present``: this process's).

    One small all-reduce per step under several processes (every process calls it with the same ``names``).
    """
    named = torch.tensor([float(name in present) for name in names], device=strategy.root_device)
    named = strategy.reduce(named, reduce_op="sum")
    return {name for name, count in zip(names, named.tolist(), strict=True) if count == 0}


def rest_idle_adapters(module: nn.Module, idle: set[str]) -> None:
    """Before the optimizer steps: no gradient for the adapters in ``idle``, whose tasks had no row in the step.

    Their gradients are zeros where there are any: from a loop that zeroes gradients instead of
    dropping them, or from FSDP2's reduction (`RowAdapters.with_resting`). AdamW would still move
    them (momentum, weight decay) and count an update of their schedule; without a gradient it
    leaves them as they are.
    """
    if not idle:
        return
    owner = owners(module)
    for param in module.parameters():
        ref = owner.get(id(param))
        if ref is not None and ref.name in idle:
            param.grad = None


def _reducer_needs_every_gradient(strategy: Strategy) -> bool:
    """Whether the strategy's DDP reducer fails on a trainable parameter without a gradient."""
    model = strategy.model
    return isinstance(model, DistributedDataParallel) and not (model.find_unused_parameters or model.static_graph)
