"""Putting PEFT layers into a model: replacing a submodule, wrapping the chosen ones, finding them again."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from torch import nn

from lightning_peft.core.layer import PEFTLayer, PEFTModule
from lightning_peft.core.ownership import carry_claims
from lightning_peft.core.weights import computing_hooks, is_quantized


class ModulePlaces:
    """Where each module object of a tree sits (parent, attribute name), found in one walk, kept as modules change.

    A layer that two places of the model share (one ``nn.Linear`` in two blocks) is replaced at
    both, so it stays one layer, its adapter acts wherever it does, and a merge into its shared
    weight keeps the outputs. One walk serves a whole injection (a walk per layer would make
    adapting thousands of expert layers quadratic).
    """

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.at: dict[int, list[tuple[nn.Module, str]]] = {}
        for parent in root.modules():
            self._note_children(parent)

    def _note_children(self, parent: nn.Module) -> None:
        for key, child in parent._modules.items():
            if child is not None:
                self.at.setdefault(id(child), []).append((parent, key))

    def put_in_place_of(self, old: nn.Module, new: nn.Module) -> None:
        """Put ``new`` at every place where the module object ``old`` sits."""
        if old is self.root:
            raise ValueError(f"a PEFT layer cannot replace the model root itself ({type(self.root).__name__}); adapt "
                             "a submodule, or wrap the model in another module first")
        places = self.at.pop(id(old), [])
        carry_claims(old, new)
        carry_hooks(old, new)
        for parent, key in places:
            setattr(parent, key, new)
        self.at[id(new)] = places
        self._note_children(new)  # a wrapper holds ``old`` (and its adapters) now


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")


def carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """Hand the hooks on ``old`` to ``new``, which computes in its place (a PEFT layer, a merged or quantized layer).

    So a user's hook sees, and may change, what the model computes there, adapted or merged alike;
    the hook dicts themselves move, so the handles that registered the hooks still remove them.
    A ``new`` with hooks of its own (a sharded unit's) keeps them, and ``old`` its own; so does an ``old`` whose
    hooks compute its own weight or bias (the old weight_norm and spectral_norm, pruning), which must stay with it.
    """
    if not any(old.__dict__.get(name) for name in _HOOK_DICTS) or any(new.__dict__.get(name) for name in _HOOK_DICTS):
        return
    if computing_hooks(old):
        return
    for name in _HOOK_DICTS:
        if name in old.__dict__ and name in new.__dict__:
            old.__dict__[name], new.__dict__[name] = new.__dict__[name], old.__dict__[name]
    old._is_full_backward_hook, new._is_full_backward_hook = new._is_full_backward_hook, old._is_full_backward_hook


def wrap_modules(
    root: nn.Module,
    chosen: list[tuple[str, nn.Module]],
    layer_for: Callable[[nn.Module], PEFTLayer],
    layer_type: type[PEFTLayer],
    innermost: bool = False,
) -> list[tuple[str, PEFTLayer]]:
    """Wrap each chosen module in a ``layer_type`` layer, reusing one that is already there.

    A module already wrapped by another method is wrapped again on the outside, or, with
    ``innermost`` (methods that change the weight itself, like LoRA), right around its base layer.
    """
    layers, places = [], ModulePlaces(root)
    for name, module in chosen:
        while innermost and isinstance(module, PEFTLayer) and not isinstance(module, layer_type):
            name, module = f"{name}.base_layer", module.base_layer
        layer = module if isinstance(module, layer_type) else layer_for(module)
        if layer is not module:
            places.put_in_place_of(module, layer)
        layers.append((name, layer))
    return layers


def wrap_parameters(
    root: nn.Module,
    chosen: list[tuple[str, str]],
    layer_for: Callable[[nn.Module, str], PEFTLayer],
    layer_type: type[PEFTLayer],
) -> list[PEFTLayer]:
    """Wrap each chosen ``(module name, parameter path)`` in a ``layer_type`` layer for that parameter.

    A layer already there for the parameter is reused. Several parameters of one module nest: the
    first chosen innermost, as peft nests its parameter wrappers.
    """
    layers, places = [], ModulePlaces(root)
    for name, path in chosen:
        module = root.get_submodule(name)
        layer = _layer_for_parameter(module, path, layer_type)
        if layer is None:
            layer = layer_for(module, path)
            places.put_in_place_of(module, layer)
        layers.append(layer)
    return layers


def _layer_for_parameter(module: nn.Module, path: str, layer_type: type[PEFTLayer]) -> PEFTLayer | None:
    """The ``layer_type`` layer around ``module``'s base that adapts the parameter ``path``, if there is one."""
    while isinstance(module, PEFTLayer):
        if isinstance(module, layer_type) and getattr(module, "parameter_name", None) == path:
            return module
        module = module.base_layer
    return None


def modules_of(root: nn.Module) -> set[int]:
    """The ids of every module in ``root``, to tell afterwards which modules an injection added."""
    return {id(module) for module in root.modules()}


def give_new_modules_their_parents_mode(root: nn.Module, before: set[int]) -> None:
    """Put each module added since ``before`` in its parent's train or eval mode (new modules start in train).

    So an adapter loaded into a model in eval mode runs without dropout, as the model around it does.
    """
    for parent in root.modules():
        for child in parent.children():
            if id(child) not in before:
                child.training = parent.training  # the parent is set first: modules() goes top-down


def keep_pytorch_fast_paths_off(root: nn.Module) -> None:
    """Make each ``nn.TransformerEncoderLayer`` (and its ``nn.TransformerEncoder``) holding PEFT parts or quantized
    layers run plainly.

    In eval mode PyTorch's fused fast path reads the layer's weights straight off its submodules,
    the frozen base weights, so it would skip every adapter there (and multiply by a quantized
    layer's int8 codes, which fails). A forward pre-hook on the layer
    is one of the things that turns it off, per layer and only where adapters sit; the stack's
    nested-tensor inputs, which only that fast path reads, are turned off with it.
    """
    for module in root.modules():
        if not isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerEncoder)):
            continue
        if not any(isinstance(part, PEFTModule) or is_quantized(part) for part in module.modules()):
            continue
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False
        elif _slow_path not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(_slow_path)


def _slow_path(module: nn.Module, args: tuple) -> None:
    """Does nothing: its presence keeps PyTorch's fused fast path off (see `keep_pytorch_fast_paths_off`)."""


def peft_layers(root: nn.Module) -> Iterator[tuple[str, PEFTLayer]]:
    """Every PEFT layer in ``root`` with its name."""
    for name, module in root.named_modules():
        if isinstance(module, PEFTLayer):
            yield name, module
