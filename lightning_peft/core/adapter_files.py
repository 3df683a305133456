"""Adapter folders: one adapter's settings (adapter_config.json) and tensors (adapter_model.safetensors).

Methods that Hugging Face peft has are written in peft's layout, so peft, transformers, vLLM
and TGI load them; such a method's callback class names its :class:`AdapterFormat` in
``peft_format``. Any other method is written in the native layout: its registered name, its
settings and its own tensor names. Files are safetensors only. Reading a folder back into a
method is the registry's job (:func:`lightning_peft.registry.load_adapter`).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from lightning_peft.core.files import PathLike, atomic_write_all
from lightning_peft.core.integrity import DIGEST_KEY, check_digest, tensor_digest
from lightning_peft.core.layer import PEFTModule, innermost_base
from lightning_peft.core.merging import check_unmerged
from lightning_peft.core.models import model_root, transformers_models
from lightning_peft.core.ownership import AdapterRef, adapter_refs, buffers_of_trained_modules, owners
from lightning_peft.core.saved_modules import saved_module_name
from lightning_peft.core.targeting import Targets, select_modules
from lightning_peft.core.weights import whole

PEFT_PREFIX = "base_model.model."  # peft holds the transformers model as base_model.model
BASE_WEIGHT = ".base_layer.weight"  # the key's end of a base weight that peft saves beside an adapter
_LAYER_TENSOR = re.compile(r"^(?P<layer>.+)\.adapters\.(?P<adapter>[^.]+)\.(?P<tensor>[^.]+)$")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
NATIVE_KEY = "lightning_peft_method"  # the registered method name, in native-layout configs
CLASS_KEY = "lightning_peft_class"  # the callback's class path, so a registered method's subclass rebuilds as itself


@dataclass(frozen=True)
class AdapterFormat:
    """How one method's adapter maps to Hugging Face peft's files.

    ``to_config(config, root, names)`` gives peft's adapter_config.json from our settings, the
    model root and our tensor names; ``to_settings(config)`` the inverse, our constructor
    arguments; and ``file_key(name, root)`` peft's tensor key for one of our tensor names
    (relative to ``root``). ``to_file(tensors, root)``, when given, turns our tensors into the
    ones peft's file holds. ``no_layout(root, config)``, when given, says why peft has no layout for
    the method on that model with those settings (or None): such an adapter is saved in the native
    layout instead.
    """

    peft_type: str
    to_config: Callable[[dict, nn.Module, list[str]], dict]
    to_settings: Callable[[dict], dict[str, Any]]
    file_key: Callable[[str, nn.Module], str]
    to_file: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]] | None = None
    no_layout: Callable[[nn.Module, dict], str | None] | None = None


def no_peft_layout(ref: AdapterRef, root: nn.Module) -> str | None:
    """Why peft has no layout for ``ref``'s adapter on the model ``root``: a layer of it at several places, or
    what its format says."""
    adapter_format = ref.method.peft_format
    if adapter_format is None:
        return None
    shared = _layers_at_several_places(root, ref)
    if shared:
        return (f"its layer at {' and '.join(shared)} is one module at several places of the model, which peft "
                "adapts at the one place its file names")
    key = _one_key_for_several(root, ref, adapter_format)
    if key:
        return f"peft's layout has one key, {key}, for several of its tensors"
    return None if adapter_format.no_layout is None else adapter_format.no_layout(root, ref.config)


def _one_key_for_several(root: nn.Module, ref: AdapterRef, adapter_format: AdapterFormat) -> str | None:
    """The first key of ``adapter_format``'s files that two of ``ref``'s layer tensors would share (an
    nn.MultiheadAttention's separate query, key and value weights: peft adapts its one in_proj_weight)."""
    if adapter_format.to_file is not None:  # the file holds tensors computed from ours, under keys of its own
        return None
    claimed, seen = owners(root), set()
    for name, param in root.named_parameters():
        if claimed.get(id(param)) == ref and split_layer_tensor(name):
            key = adapter_format.file_key(name, root)
            if key in seen:
                return key
            seen.add(key)
    return None


def _layers_at_several_places(root: nn.Module, ref: AdapterRef) -> list[str]:
    """The names of the first of ``ref``'s layers that is one module object at several (parent, attribute) places of
    ``root``; a layer inside a block that sits twice is at one place (peft adapts it there, for both)."""
    places: dict[int, set[tuple[int, str]]] = {}
    for parent in root.modules():
        for key, child in parent._modules.items():
            if isinstance(child, PEFTModule) and child.method == ref.method_name and ref.name in child.adapters:
                places.setdefault(id(child), set()).add((id(parent), key))
    shared = next((layer for layer, where in places.items() if len(where) > 1), None)
    if shared is None:
        return []
    return [name for name, module in root.named_modules(remove_duplicate=False) if id(module) == shared]


def file_format(ref: AdapterRef, root: nn.Module) -> AdapterFormat | None:
    """The peft layout that ``ref``'s files use on the model ``root``, or None for the native layout."""
    return None if no_peft_layout(ref, root) else ref.method.peft_format


def split_layer_tensor(name: str) -> tuple[str, str, str] | None:
    """``(layer, adapter, tensor)`` for a tensor of a PEFT layer (``x.q_proj.adapters.default.lora_A``)."""
    match = _LAYER_TENSOR.match(name)
    return (match["layer"], match["adapter"], match["tensor"]) if match else None


def peft_key(name: str, layer_key: Callable[[str, str], str]) -> str:
    """peft's key for one of our tensor names: ``layer_key(layer, tensor)`` for a layer's, a saved module's own name."""
    parts = split_layer_tensor(name)
    if parts is None:
        return saved_module_key(name)
    layer, _, tensor = parts
    return PEFT_PREFIX + layer_key(layer, tensor)


def saved_module_key(name: str) -> str:
    """peft's key for a ``modules_to_save`` tensor: its own name under the model root."""
    return PEFT_PREFIX + name.replace(".base_layer.", ".")


def native_key(name: str, root: nn.Module) -> str:
    """Our tensor name without the adapter's name, so a file loads under any adapter_name, and without other
    methods' wrappers (``.base_layer``), so it loads whichever methods wrap the layer and in whatever order; a
    layer that adapts one of several adapted parameters of a module names it (such layers nest, one a parameter)."""
    parts = split_layer_tensor(name)
    if parts is None:  # a saved module's, or an adapter's tensor inside a module of its own (``down.bias``)
        return re.sub(r"\.base_layer(?=\.)", "", re.sub(r"\.adapters\.[^.]+\.", ".adapter.", name))
    layer, _, tensor = parts
    parameter = getattr(root.get_submodule(layer), "parameter_name", None)
    module = re.sub(r"\.base_layer(?=\.|$)", "", layer)
    if parameter and _adapted_parameters(root.get_submodule(module)) < 2:
        parameter = None  # one adapted parameter: the key as files have always named it
    return f"{module}{'.' + parameter if parameter else ''}.adapter.{tensor}"


def _adapted_parameters(outermost: nn.Module) -> int:
    """How many layers adapting one parameter each (``parameter_name``) nest inside one place of the model."""
    count, layer = 0, outermost
    while isinstance(layer, PEFTModule) and hasattr(layer, "base_layer"):
        count += hasattr(layer, "parameter_name")
        layer = layer.base_layer
    return count


def peft_targets(value: str | list[str] | None) -> str | list[str] | None:
    """Our form of a peft target list or regex: peft matches a regex inside the model, ours may sit under a prefix."""
    return rf"(?:.*\.)?(?:{value})" if isinstance(value, str) else value


def find_adapter(module: nn.Module, adapter_name: str, method: str | None = None) -> AdapterRef:
    """The adapter of ``module`` called ``adapter_name`` (of ``method``, when given), or an error listing them."""
    refs = adapter_refs(module)
    found = [r for r in refs if r.name == adapter_name and method in (None, r.method_name)]
    if not found:
        raise ValueError(f"no adapter named '{adapter_name}'" + (f" of method {method}" if method else "")
                         + f"; this model has: {', '.join(map(str, refs)) or 'none'}")
    if len(found) > 1:
        raise ValueError(f"several methods use adapter_name '{adapter_name}' ({', '.join(map(str, found))}); "
                         "pass method= to choose one")
    return found[0]


def adapter_tensors(module: nn.Module, ref: AdapterRef) -> dict[str, torch.Tensor]:
    """The tensors of one adapter, named relative to the model root (a saved module's copy under its own name)."""
    prefix, root = model_root(module)
    tensors = _trained_tensors(module, ref)
    refusal = outside_the_file(module, ref, tensors)
    if refusal is not None:
        raise ValueError(refusal)
    return {saved_module_name(name[len(prefix) + 1:] if prefix else name, root): t for name, t in tensors.items()}


def _trained_tensors(module: nn.Module, ref: AdapterRef) -> dict[str, torch.Tensor]:
    """The tensors ``ref`` trains in ``module``, by name, with the buffers of modules it trains whole."""
    claimed = owners(module)
    tensors = {name: param for name, param in module.named_parameters() if claimed.get(id(param)) == ref}
    tensors.update(buffers_of_trained_modules(module, lambda param: claimed.get(id(param)) == ref))
    return tensors


def outside_the_file(module: nn.Module, ref: AdapterRef, tensors: dict[str, torch.Tensor] | None = None) -> str | None:
    """Why ``ref``'s adapter file cannot hold what it trains in ``module`` (tensors outside its transformers model)."""
    prefix, _ = model_root(module)
    tensors = _trained_tensors(module, ref) if tensors is None else tensors
    outside = [name for name in tensors if prefix and not name.startswith(prefix + ".")]
    if not outside:
        return None
    holder = outside[0].split(".")[0]
    in_another_model = any(name.split(".")[0] == holder for name, _ in transformers_models(module))
    advice = (f"save from the model that holds them (save_adapter(module.{holder}, ...)), or keep the method to "
              "one model (exclude_modules, a target regex)" if in_another_model else
              f"'{holder}' is a module of your own beside that model, which an adapter file (peft's layout "
              "names a transformers model's layers) cannot hold: keep it out of the method's targets and "
              "modules_to_save, and train and save it yourself (torch.save of its state_dict)")
    return (f"{ref} trains '{outside[0]}' ({len(outside)} tensor(s)), outside the transformers model "
            f"'{prefix}' that its file names layers from; {advice}")


def file_tensors(module: nn.Module, ref: AdapterRef,
                 tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One adapter's tensors under the keys its file uses: peft's where peft has the method, else ours.

    ``tensors``: the adapter's tensors named from the model root; by default, those the model holds.
    """
    _, root = model_root(module)
    tensors = adapter_tensors(module, ref) if tensors is None else tensors
    adapter_format = file_format(ref, root)
    if adapter_format is not None and adapter_format.to_file is not None:
        tensors = adapter_format.to_file(tensors, root)
    key = file_key_for(ref, root)
    keyed = {key(name): t for name, t in tensors.items()}
    if len(keyed) < len(tensors):  # a layout that would drop tensors: never write such a file
        raise RuntimeError(f"{ref}'s tensors {sorted(tensors)} share file keys: please report this")
    return keyed


def file_key_for(ref: AdapterRef, root: nn.Module) -> Callable[[str], str]:
    """The file key of each of ``ref``'s tensor names on the model ``root``: peft's where its layout applies."""
    adapter_format = file_format(ref, root)
    if adapter_format is None:
        return lambda name: native_key(name, root)
    return lambda name: adapter_format.file_key(name, root)


def file_entries(module: nn.Module, ref: AdapterRef) -> dict[str, tuple[str, torch.Tensor]]:
    """Each of one adapter's parameters under the key its file uses, with its name relative to the model root.

    Raises a ValueError for a method whose file holds tensors computed from its parameters (prefix tuning's).
    """
    _, root = model_root(module)
    adapter_format = file_format(ref, root)
    if adapter_format is not None and adapter_format.to_file is not None:
        raise ValueError(f"{ref}'s file holds tensors computed from the adapter, not the adapter's own; "
                         "its parameters cannot be set from it")
    key = file_key_for(ref, root)
    return {key(name): (name, t) for name, t in adapter_tensors(module, ref).items()}


def file_config(module: nn.Module, ref: AdapterRef) -> dict[str, Any]:
    """One adapter's adapter_config.json: peft's config where peft has the method, else ours."""
    _, root = model_root(module)
    adapter_format = file_format(ref, root)
    ours = {NATIVE_KEY: ref.method_name, CLASS_KEY: class_path(ref.method)}
    settings = {**ref.config, **modules_named_in_the_model(module, ref.config)}
    if adapter_format is None:
        return {**ours, **settings}
    config = adapter_format.to_config(settings, root, list(adapter_tensors(module, ref)))
    own_name = ref.method_name != format_owner(ref.method).method_name
    return {**config, **ours} if own_name else config  # a subclass with a name of its own loads back as itself


MODULE_SETTINGS = ("modules_to_save", "modules")  # settings that name modules (Selective's modules)


def modules_named_in_the_model(module: nn.Module, config: dict[str, Any]) -> dict[str, list[str]]:
    """The module-naming settings that name modules by ``module``'s names where it holds the model (a
    LightningModule's ``model.classifier``), as the modules they chose, named in the model that a file loads into."""
    prefix, _ = model_root(module)
    changed = {}
    for key in MODULE_SETTINGS if prefix else ():
        value = config.get(key)
        entries = [value] if isinstance(value, str) else value or []
        if any(isinstance(e, str) and (e.startswith(f"{prefix}.") or e.startswith(re.escape(f"{prefix}.")))
               for e in entries):
            chosen = select_modules(module, value, supported=(nn.Module,), method=key, wraps=False,
                                    check_exclusions=False, whole_modules=True)
            changed[key] = [name.removeprefix(f"{prefix}.") for name, _ in chosen]
    return changed


def format_owner(method: type) -> type:
    """The class that declares ``method``'s peft layout: the method peft's files name when nothing else is said."""
    return next(cls for cls in method.__mro__ if "peft_format" in vars(cls))


def save_adapter(module: nn.Module, path: PathLike, adapter_name: str = "default", method: str | None = None,
                 for_original_base: bool = False) -> Path:
    """Save one adapter to the folder ``path``, in Hugging Face peft's layout where peft has the method.

    The folder (created if needed) gets ``adapter_config.json`` and ``adapter_model.safetensors``,
    both written atomically. LoRA, IA3, PromptTuning and PrefixTuning use peft's layout, which
    peft, transformers, vLLM and TGI load; other methods (Adapter, Selective, BitFit, your own),
    and a method on a model where peft has no layout for it (with a warning), use lightning-peft's
    own, which `load_adapter` reads. The tensors' SHA-256 is stored in the file's metadata and
    checked on load.

    Args:
        module: a model with adapters, or a LightningModule holding one.
        path: the folder to write into; files already there are replaced.
        adapter_name: name of the adapter to save.
        method: registered name of the adapter's method (``"LoRA"``, ``"IA3"``, ...); needed only
            when adapters of several methods share ``adapter_name``.
        for_original_base: write an adapter that applies to the base weights as they were before
            injection. A PiSSA adapter (which moved W's top-r part into itself) becomes the plain
            LoRA of rank 2r equal to it, which vLLM, TGI and peft apply without redoing the SVD;
            other adapters are written as they are.

    Returns:
        The folder, as a ``Path``.

    Under FSDP2 the adapter's shards are gathered, so every rank must call it; each writes the
    same files, atomically.

    Raises:
        ValueError: when ``module`` has no adapter named ``adapter_name`` (of ``method``, when
            given), or several methods have one and ``method`` is not given.

    Examples:
        ```python
        from lightning_peft import LoRA, save_adapter

        LoRA(r=8, target_modules=["q_proj", "v_proj"]).inject(model)
        ...  # train
        save_adapter(model, "out/my-adapter")
        ```
    """
    check_unmerged(module, "save_adapter", "or save before merging (a merged model's weights hold the adapters)")
    ref = find_adapter(module, adapter_name, method)
    _, root = model_root(module)
    reason = no_peft_layout(ref, root)
    if reason:
        warnings.warn(f"{ref} is saved in lightning-peft's own layout, which peft does not read: {reason}",
                      stacklevel=2)
    own = {name: whole(tensor) for name, tensor in adapter_tensors(module, ref).items()}  # FSDP2: gathered
    if for_original_base:
        settings, own = ref.method.for_original_base(ref.config, own, root)
        ref = replace(ref, config=settings)  # the same adapter (refs compare by names) with the settings to write
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in file_tensors(module, ref, own).items()}
    config = json.dumps(_jsonable(file_config(module, ref)), indent=2)
    metadata = {"format": "pt", DIGEST_KEY: tensor_digest(tensors)}
    names = class_names(root)
    if names:  # a classifier's classes travel with its adapter (and head)
        metadata[LABELS_KEY] = json.dumps(names)
    folder = Path(path)
    atomic_write_all({folder / WEIGHTS_FILE: lambda tmp: write_safetensors(tensors, tmp, metadata),
                      folder / CONFIG_FILE: lambda tmp: tmp.write_text(config)})
    return folder


LABELS_KEY = "lightning_peft_labels"  # in a file's metadata: the model's class names, in id order


def class_names(model: nn.Module) -> list[str] | None:
    """The class names of a transformers classifier's config (``id2label``), unless they are the default LABEL_i."""
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    names = [str(name) for _, name in sorted(id2label.items())]
    return names if names and not all(re.fullmatch(r"LABEL_\d+", name) for name in names) else None


def take_class_names(root: nn.Module, weights_path: Path) -> None:
    """Give a model whose classes have no names (LABEL_i) those its adapter file records (`save_adapter` writes them);
    a model that names its classes keeps its own, with a warning where the file names them otherwise."""
    with safe_open(weights_path, "pt") as f:
        recorded = (f.metadata() or {}).get(LABELS_KEY)
    config = getattr(root, "config", None)
    if recorded is None or config is None or len(json.loads(recorded)) != getattr(config, "num_labels", None):
        return
    names, own = json.loads(recorded), class_names(root)
    if own is None:
        config.id2label = dict(enumerate(names))
        config.label2id = {name: i for i, name in enumerate(names)}
    elif own != names:
        warnings.warn(f"adapter file {weights_path} names its classes {', '.join(names)}, but the model names them "
                      f"{', '.join(own)}: the model's names are kept", stacklevel=3)


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A safetensors file whose header lists the metadata in sorted order, so equal adapters give equal bytes.

    safetensors writes its metadata map in a random order (a Rust HashMap), once it has two entries.
    """
    data = save(tensors, metadata=metadata)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    ordered = json.dumps(header, separators=(",", ":")).encode()
    if len(ordered) <= size:  # the same entries: the same length, padded as safetensors pads
        data = data[:8] + ordered.ljust(size, b" ") + data[8 + size:]
    path.write_bytes(data)


def read_adapter_files(path: PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """An adapter folder's settings and tensors, or one error that names the file and the problem."""
    folder = Path(path)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for file in (config_path, weights_path):
        if not file.is_file():
            inside = sorted(p.parent.name for p in folder.glob(f"*/{CONFIG_FILE}")) if folder.is_dir() else []
            hint = f"; {folder} holds adapters in {', '.join(inside)}: give one of those folders" if inside else ""
            raise FileNotFoundError(f"adapter file {file} does not exist{hint}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"adapter file {config_path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"adapter file {config_path} must hold a JSON object")
    try:
        tensors = load_file(weights_path)
        with safe_open(weights_path, "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"adapter file {weights_path} is not a valid safetensors file (truncated or corrupt?): "
                         f"{err}") from None
    check_digest(tensors, metadata.get(DIGEST_KEY), f"adapter file {weights_path}")
    return config, tensors


def copy_file_tensors(module: nn.Module, ref: AdapterRef, tensors: dict[str, torch.Tensor], weights_path: Path) -> None:
    """Check a file's tensors against the adapter ``ref`` just injected into ``module``, then copy them in."""
    expected = file_tensors(module, ref)
    base_weights = saved_base_weights(model_root(module)[1], tensors, expected, weights_path,
                                      ref.config.get("modules_to_save"))
    check_file_keys(expected, set(tensors) - set(base_weights), weights_path,
                    "it was saved for another model or settings")
    for file_key, param in expected.items():
        if tuple(tensors[file_key].shape) != tuple(param.shape):
            raise ValueError(f"adapter file {weights_path}: tensor '{file_key}' has shape "
                             f"{tuple(tensors[file_key].shape)}, but this model's has {tuple(param.shape)}")
    with torch.no_grad():
        for file_key, param in expected.items():
            param.copy_(tensors[file_key])
    copy_saved_base_weights(base_weights, weights_path)


def saved_base_weights(root: nn.Module, tensors: dict[str, torch.Tensor], expected: Iterable[str],
                       weights_path: Path, saved_modules: Targets = None) -> dict[str, tuple[str, nn.Parameter,
                                                                                           torch.Tensor]]:
    """The base weights a peft file holds beside its adapter, by file key: ``(name, parameter of root, value)``.

    peft saves an adapted embedding's own weight (``...embed_tokens.base_layer.weight``), and the
    model's input and output embeddings when their vocabulary was resized (``...lm_head.weight``,
    ``save_embedding_layers``), so that new rows, drawn at random, load as they trained; peft loads
    them into the model. A base weight this model has nowhere, or in another shape, is refused.
    ``saved_modules``: the file's ``modules_to_save``, whose weights are the adapter's own copies.
    """
    embeddings = _embedding_layers(root)
    expected = set(expected)
    found = {}
    for key, value in tensors.items():
        if key in expected or not key.startswith(PEFT_PREFIX):
            continue
        name = key[len(PEFT_PREFIX):]
        adapted = name.endswith(BASE_WEIGHT)
        name = name[:-len(BASE_WEIGHT)] if adapted else name.removesuffix(".weight")
        layer = _innermost_at(root, name)
        if not adapted and (not key.endswith(".weight") or _saved_by_the_file(name, saved_modules)
                            or id(layer) not in embeddings):
            continue  # not a base weight: check_file_keys names it
        if layer is None:
            raise ValueError(f"adapter file {weights_path} holds base weight '{key}', and this model has no weight "
                             f"{name}.weight")
        if tuple(value.shape) != tuple(layer.weight.shape):
            resize = (f": resize the model's token embeddings to {value.shape[0]} first"
                      if isinstance(layer, nn.Embedding) else "")
            raise ValueError(f"adapter file {weights_path} holds base weight '{key}' of shape {tuple(value.shape)}, "
                             f"and this model's is {tuple(layer.weight.shape)}{resize}")
        found[key] = (name, layer.weight, value)
    return found


def check_peft_layout_holds(config: dict, ref: AdapterRef, root: nn.Module, where: str) -> None:
    """Refuse a file in peft's layout (peft wrote it, or we on another model) where that layout cannot hold ``ref``
    on ``root``: its tensors would act otherwise here than in peft."""
    reason = no_peft_layout(ref, root) if NATIVE_KEY not in config else None
    if reason:
        raise ValueError(f"{where} is in peft's layout, which cannot hold {ref} on this model: {reason}")


def _saved_by_the_file(name: str, saved_modules: Targets) -> bool:
    """Whether a file's ``modules_to_save`` names the module ``name``, as peft matches them: a regex over the whole
    name, or a plain suffix (``"head"`` names ``lm_head``)."""
    if isinstance(saved_modules, str):
        return re.fullmatch(saved_modules, name) is not None
    return any(name.endswith(entry) for entry in saved_modules or [])


def _embedding_layers(root: nn.Module) -> set[int]:
    """The ids of the model's input and output embedding layers (their innermost base layers)."""
    found = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            layer = getattr(root, getter)()
        except (AttributeError, NotImplementedError):
            layer = None
        if layer is not None:
            found.add(id(innermost_base(layer)))
    return found


def _innermost_at(root: nn.Module, name: str) -> nn.Module | None:
    """The innermost base layer of the module ``name`` of ``root`` (under any PEFT wrapper), or None."""
    try:
        return innermost_base(root.get_submodule(name))
    except AttributeError:
        return None


def copy_saved_base_weights(found: dict[str, tuple[str, nn.Parameter, torch.Tensor]], weights_path: Path) -> None:
    """Copy the base weights of `saved_base_weights` in, as peft does, with a warning where they change the model."""
    changed = [name for name, param, value in found.values()
               if not torch.equal(param, value.to(param.device, param.dtype))]
    if changed:
        warnings.warn(f"adapter file {weights_path} holds the base weights of {', '.join(changed)} (peft saves the "
                      "weights of adapted and resized embeddings beside the adapter), which differ from this "
                      "model's: they are loaded, as peft loads them, and every adapter of the model computes with "
                      "them", stacklevel=3)
    with torch.no_grad():
        for _, param, value in found.values():
            param.copy_(value)


def check_file_keys(expected: Iterable[str], found: Iterable[str], weights_path: Path, why: str) -> None:
    """Refuse a file whose tensor names are not the adapter's, naming the first (``found``: without the base
    weights of `saved_base_weights`)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        raise ValueError(f"adapter file {weights_path} lacks tensor '{missing[0]}' ({len(missing)} missing): {why}")
    if unexpected:
        raise ValueError(f"adapter file {weights_path} holds tensor '{unexpected[0]}' ({len(unexpected)} this model "
                         f"has no place for): {why}")


def class_path(cls: type) -> str:
    """``module.QualifiedName`` of a class, as LightningCLI's ``class_path`` spells it."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    return value
