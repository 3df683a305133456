"""Which adapter trains which parameter, stored in the module tree itself.

A claim sits on the module that holds the parameter, under the parameter's own (local) name:
``module.__dict__["_lightning_peft_claims"] = {"lora_A": AdapterRef(LoRA, "default", {...})}``.
So ownership travels with the modules: it survives ``copy.deepcopy``, ``load_state_dict``
(also with ``assign=True``), FSDP's replacement of parameters by sharded ones, and any
submodule that holds the adapted layers answers for the part of the model it holds.
Freezing follows ownership: a parameter that no adapter claims is frozen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

_CLAIMS = "_lightning_peft_claims"


@dataclass(frozen=True)
class AdapterRef:
    """One adapter: the method's callback class, the adapter's name and the settings that made it.

    Two refs are the same adapter when their registered method names and adapter names agree,
    so a subclass of LoRA named ``default`` and LoRA's ``default`` are one adapter.
    """

    method: type = field(compare=False)
    name: str
    config: dict[str, Any] = field(compare=False, hash=False, repr=False)
    method_name: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "method_name", self.method.method_name)

    def __str__(self) -> str:
        return f"{self.method_name}[{self.name}]"


def _claims(module: nn.Module) -> dict[str, AdapterRef]:
    return module.__dict__.get(_CLAIMS, {})


def holders(root: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """For each parameter of ``root`` (by id), the modules holding it and its local name there."""
    found: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in root.modules():
        for local, param in module._parameters.items():
            if param is not None:
                found.setdefault(id(param), []).append((module, local))
    return found


def owners(root: nn.Module) -> dict[int, AdapterRef]:
    """``id(param) -> AdapterRef`` for every claimed parameter that ``root`` holds."""
    found = {}
    for module in root.modules():
        for local, ref in _claims(module).items():
            param = module._parameters.get(local)
            if param is not None:
                found[id(param)] = ref
    return found


def buffers_of_trained_modules(root: nn.Module, trained: Callable[[nn.Parameter], bool]) -> dict[str, Tensor]:
    """The persistent buffers of each module of ``root`` whose own parameters are all ``trained`` (by name).

    They change as those parameters train (a BatchNorm copy's running statistics), so they are
    saved, and resumed, with them; a norm layer's running statistics go with any of its
    parameters (BitFit trains a BatchNorm's bias, and the statistics move with it).
    """
    found = {}
    for prefix, module in root.named_modules():
        params = [p for p in module._parameters.values() if p is not None]
        tracks = getattr(module, "track_running_stats", False)
        if params and (all(trained(p) for p in params) or (tracks and any(trained(p) for p in params))):
            for local, buffer in module._buffers.items():
                if buffer is not None and local not in module._non_persistent_buffers_set:
                    found[f"{prefix}.{local}" if prefix else local] = buffer
    return found


def adapter_refs(root: nn.Module) -> list[AdapterRef]:
    """The adapters that train parameters of ``root``, in the order their parameters come."""
    return list(dict.fromkeys(owners(root).values()))


def claim(root: nn.Module, ref: AdapterRef, params: Iterable[nn.Parameter]) -> None:
    """Record in the tree that ``ref`` trains ``params``; one claimed by another adapter is an error."""
    params = list(params)
    where = holders(root)
    check_unclaimed(root, ref, params, where)
    for param in params:
        for module, local in where.get(id(param), []):
            module.__dict__.setdefault(_CLAIMS, {})[local] = ref


def check_unclaimed(root: nn.Module, ref: AdapterRef, params: Iterable[nn.Parameter],
                    where: dict[int, list[tuple[nn.Module, str]]] | None = None) -> None:
    """Raise before anything changes if another adapter than ``ref`` already trains one of ``params``."""
    where = holders(root) if where is None else where
    taken = owners(root)
    names = {id(p): n for n, p in root.named_parameters()}
    for param in params:
        previous = taken.get(id(param))
        if previous is not None and previous != ref:
            raise ValueError(f"parameter '{names.get(id(param), '<unnamed>')}' is claimed by both {previous} and "
                             f"{ref}; a parameter can be trained by one PEFT method only")
        if id(param) not in where:
            raise ValueError(f"{ref} claims a parameter that the model does not hold")
        if not (param.is_floating_point() or param.is_complex()):
            raise ValueError(f"{ref} would train '{names.get(id(param), '<unnamed>')}', stored in {param.dtype} (a "
                             "quantized base weight); keep its module in full precision with QuantizeBase("
                             "skip_modules=[...]), or put QuantizeBase after the method")


def carry_claims(old: nn.Module, new: nn.Module) -> None:
    """Give ``new``, which replaces ``old`` (a quantized or dequantized layer), the claims on the parameters it keeps
    (the same tensor under the same name: a bias that BitFit trains)."""
    for local, ref in _claims(old).items():
        param = old._parameters.get(local)
        if param is not None and new._parameters.get(local) is param:
            new.__dict__.setdefault(_CLAIMS, {})[local] = ref


def release(root: nn.Module, ref: AdapterRef) -> None:
    """Drop every claim of ``ref`` inside ``root`` (its adapter was deleted)."""
    for module in root.modules():
        claims = _claims(module)
        for local in [name for name, owner in claims.items() if owner == ref]:
            del claims[local]


def forget_claims(root: nn.Module) -> None:
    """Drop every claim recorded inside ``root`` (a fresh copy of claimed modules, whose parameters are new)."""
    for module in root.modules():
        module.__dict__.pop(_CLAIMS, None)


def freeze_unclaimed(root: nn.Module) -> None:
    """Train exactly the claimed parameters of ``root``: set ``requires_grad`` from ownership."""
    claimed = owners(root)
    for param in root.parameters():
        param.requires_grad_(id(param) in claimed)
