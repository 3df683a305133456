"""The registry of PEFT methods: a saved method name back to its callback class.

Adding a method is one folder and one line in ``METHODS``. Files and checkpoints store a
method's registered name (its class's ``method_name``), so a subclass that does not register
a name of its own saves and loads as its parent.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from lightning_peft.additive import IA3, Adapter, PrefixTuning, PromptTuning
from lightning_peft.core.adapter_files import (
    CLASS_KEY,
    CONFIG_FILE,
    NATIVE_KEY,
    WEIGHTS_FILE,
    check_peft_layout_holds,
    copy_file_tensors,
    read_adapter_files,
    take_class_names,
)
from lightning_peft.core.files import PathLike
from lightning_peft.core.layer import check_not_switched_off
from lightning_peft.core.models import model_root, warn_of_other_models
from lightning_peft.core.ownership import AdapterRef, adapter_refs, freeze_unclaimed
from lightning_peft.core.rollback import all_or_nothing
from lightning_peft.core.targeting import names_from_a_file
from lightning_peft.lightning.callback import ModelSetupCallback, PEFTCallback
from lightning_peft.lora import LoRA
from lightning_peft.selective import BitFit, Selective

METHODS: dict[str, type[PEFTCallback]] = {method.method_name: method for method in (
    LoRA,
    IA3,
    Adapter,
    PromptTuning,
    PrefixTuning,
    Selective,
    BitFit,
)}


def register_method(method: type[PEFTCallback]) -> type[PEFTCallback]:
    """Register a PEFT method of your own under its ``method_name``, so its saved adapters and checkpoints load back.

    Files and checkpoints name a method by its ``method_name``; `load_adapter` and
    ``lightning-peft export`` find the class through this registry. Registering the same class
    again does nothing. A subclass of a registered method inherits that method's name and loads
    back as it unless it sets a ``method_name`` of its own before registering.

    Args:
        method: the callback class, a subclass of `PEFTCallback`.

    Returns:
        ``method`` itself, so that this function works as a class decorator.

    Raises:
        ValueError: when another class is already registered under ``method.method_name``.

    Examples:
        ```python
        from torch import nn
        from lightning_peft import PEFTCallback, register_method

        @register_method
        class TrainNorms(PEFTCallback):  # registered as "TrainNorms"
            def inject_into(self, module: nn.Module) -> list[nn.Parameter]:
                return [p for m in module.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()]
        ```
    """
    known = METHODS.get(method.method_name)
    if known is not None and known is not method:
        raise ValueError(f"method name {method.method_name!r} is taken by {known.__qualname__}; "
                         f"give {method.__qualname__} a method_name of its own")
    METHODS[method.method_name] = method
    return method


def method_named(name: str, source: Any) -> type[PEFTCallback]:
    """The registered method called ``name``, or an error naming ``source`` and the methods that exist."""
    if name not in METHODS:
        raise ValueError(f"{source}: unknown method {name!r}; registered methods: {', '.join(METHODS)}")
    return METHODS[name]


def rebuild(name: str, path: str | None, config: dict[str, Any], source: Any, **overrides: Any) -> PEFTCallback:
    """The callback that a saved name, class path and settings describe.

    The class at ``path`` is used when it imports and is the registered method or a subclass of
    it; otherwise the registered method itself, with the settings it takes (the others are named
    in a warning).
    """
    method = method_named(name, source)
    cls = _importable_subclass(path, method) or method
    accepted = inspect.signature(cls.__init__).parameters
    dropped = sorted(set(config) - set(accepted))
    if dropped and cls is method and path and not path.endswith(f".{method.__qualname__}"):
        warnings.warn(f"{source}: saved by {path}, which does not import here; rebuilt as {method.__qualname__}, "
                      f"without its settings {', '.join(dropped)}", stacklevel=2)
    return cls(**{**{k: v for k, v in config.items() if k in accepted}, **overrides})


def _importable_subclass(path: str | None, method: type[PEFTCallback]) -> type[PEFTCallback] | None:
    if not path:
        return None
    module_name, _, qualname = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), qualname, None)
    except ImportError:
        return None
    return cls if isinstance(cls, type) and issubclass(cls, method) else None


def callback_for(config: dict, adapter_name: str, config_path: Path) -> PEFTCallback:
    """The PEFT callback that an adapter_config.json describes (native layout or peft's)."""
    if NATIVE_KEY in config and "peft_type" not in config:
        settings = {k: v for k, v in config.items() if k not in (NATIVE_KEY, CLASS_KEY)}
        return rebuild(config[NATIVE_KEY], config.get(CLASS_KEY), settings, f"adapter file {config_path}",
                       adapter_name=adapter_name)
    for method in METHODS.values():
        if method.peft_format is not None and method.peft_format.peft_type == config.get("peft_type"):
            try:
                settings = method.peft_format.to_settings(config)
                if NATIVE_KEY in config:  # a subclass of the method, with its name and class beside peft's config
                    return rebuild(config[NATIVE_KEY], config.get(CLASS_KEY), settings, f"adapter file {config_path}",
                                   adapter_name=adapter_name)
                return method(**settings, adapter_name=adapter_name)
            except KeyError as err:
                raise ValueError(f"adapter file {config_path}: no {err.args[0]!r} entry, which a "
                                 f"{config['peft_type']} adapter_config.json needs") from None
            except (ValueError, TypeError) as err:
                raise ValueError(f"adapter file {config_path}: {err}") from None
    known = ", ".join(m.peft_format.peft_type for m in METHODS.values() if m.peft_format is not None)
    raise ValueError(f"adapter file {config_path}: peft_type {config.get('peft_type')!r} is not supported "
                     f"(supported: {known})")


def load_adapter(module: nn.Module, path: PathLike, adapter_name: str = "default") -> nn.Module:
    """Inject the adapter saved in the folder ``path`` into ``module`` and load its tensors, to run or train on.

    Reads what `save_adapter` wrote, in Hugging Face peft's layout or lightning-peft's own, and
    what peft itself wrote for LoRA, IA3, prompt tuning and prefix tuning. The method and its
    settings come from ``adapter_config.json``. Afterwards the
    adapter is active and trainable, and every parameter that no adapter trains is frozen. A
    missing, corrupt or mismatched file raises an error that names the file (and the tensor), and
    leaves ``module`` as it was.

    Args:
        module: the base model the adapter was trained on (or a LightningModule holding it);
            changed in place.
        path: the adapter folder, holding ``adapter_config.json`` and ``adapter_model.safetensors``.
        adapter_name: the name the adapter gets in ``module``, whatever name it was saved under.

    Returns:
        ``module`` itself, with the adapter injected and loaded.

    Raises:
        FileNotFoundError: when ``adapter_config.json`` or ``adapter_model.safetensors`` is missing.
        ValueError: when a file is not valid JSON or safetensors, fails its checksum, names a method
            or peft type that is not registered, or holds settings or tensors that do not fit
            ``module`` (targets it lacks, a missing tensor, another shape); or when ``module``
            already has this method's adapter under ``adapter_name``.
        TypeError: when the method cannot adapt ``module`` (a layer type it does not adapt, no
            transformers model for prompt or prefix tuning).

    Examples:
        ```python
        from transformers import AutoModelForCausalLM
        from lightning_peft import load_adapter

        model = load_adapter(AutoModelForCausalLM.from_pretrained("path/to/base"), "out/my-adapter")
        ```
    """
    check_not_switched_off(module, "load_adapter")
    config, tensors = read_adapter_files(path)
    callback = callback_for(config, adapter_name, Path(path) / CONFIG_FILE)
    _refuse_a_taken_name(module, callback.ref, path)
    _, root = model_root(module)
    warn_of_other_models(module, f"load_adapter({str(path)!r})")
    with all_or_nothing(module):
        with names_from_a_file():
            try:
                callback.inject(root)  # the file names layers from the transformers model: another beside it stays out
            except (TypeError, ValueError) as err:
                kind = TypeError if isinstance(err, TypeError) else ValueError
                raise kind(f"adapter file {Path(path) / CONFIG_FILE}: {err}") from err
        freeze_unclaimed(module)
        check_peft_layout_holds(config, callback.ref, root, f"adapter file {Path(path) / CONFIG_FILE}")
        copy_file_tensors(module, callback.ref, tensors, Path(path) / WEIGHTS_FILE)
    take_class_names(root, Path(path) / WEIGHTS_FILE)
    return module


def _refuse_a_taken_name(module: nn.Module, ref: AdapterRef, path: PathLike) -> None:
    """Refuse to load over an adapter the model has: the file would overwrite its trained tensors."""
    names = [r.name for r in adapter_refs(module) if r.method_name == ref.method_name]
    if ref.name in names:
        raise ValueError(f"load_adapter({str(path)!r}): this model has a {ref.method_name} adapter named "
                         f"{ref.name!r} already ({ref.method_name} adapters: {', '.join(map(repr, names))}); load "
                         f"it under another adapter_name, or delete_adapter(model, {ref.name!r}) first")


class LoadAdapter(ModelSetupCallback):
    """Put a saved adapter folder into the module at setup, as :func:`load_adapter` does (to evaluate or predict)."""

    def __init__(self, path: PathLike, adapter_name: str = "default") -> None:
        self.path, self.adapter_name = path, adapter_name

    def apply(self, module: nn.Module) -> nn.Module:
        """Load the folder, unless its adapter (this method, this name) is there already (a second run)."""
        config, _ = read_adapter_files(self.path)
        method = callback_for(config, self.adapter_name, Path(self.path) / CONFIG_FILE).method_name
        if (method, self.adapter_name) not in {(ref.method_name, ref.name) for ref in adapter_refs(module)}:
            load_adapter(module, self.path, self.adapter_name)
        return module
