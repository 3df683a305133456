"""Choosing which modules a PEFT method adapts: one rule set shared by every method.

A target is given as a list of module-name suffixes (``["q_proj", "v_proj"]``), a regular
expression that must match the whole module name, or ``"all-linear"``: every linear-like
layer except the output head or classifier (nn.MultiheadAttention counts as linear-like where
the method adapts it). Weights that no layer computes with on its own, fused
mixture-of-experts weights above all, are chosen as parameters (:func:`select_parameters`),
and a selection that leaves out such weights holding most of a block is warned about.
"""

from __future__ import annotations

import copy
import difflib
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from lightning_peft.core.layer import PEFTLayer, PEFTModule, innermost_base

Targets = str | Sequence[str] | None
ParameterTarget = tuple[str, str]  # (holding module's name, parameter path below it)

ALL_LINEAR = "all-linear"
# Names of task heads (transformers' and timm's ``head``, BART's ``classification_head``): "all-linear" leaves them
# alone.
HEAD_NAMES = frozenset({"lm_head", "classifier", "score", "qa_outputs", "cls", "head", "classification_head"})
_BLOCK_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def linear_types() -> tuple[type[nn.Module], ...]:
    """Layer types that compute ``x @ W`` on the last dimension: nn.Linear and GPT-2's Conv1D."""
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def block_index(name: str) -> int | None:
    """The block (layer) number of a module: the first integer component of its dotted name."""
    match = _BLOCK_INDEX.search(name)
    return int(match.group(1)) if match else None


def name_matches(name: str, targets: Targets) -> bool:
    """Whether a module name ends with one of ``targets``' names (a list) or matches it whole (a regex string)."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def head_names(root: nn.Module) -> set[str]:
    """Names of output heads: transformers' output embeddings plus layers named like a head."""
    heads = {name for name, _ in root.named_modules() if set(name.split(".")) & HEAD_NAMES}
    output_layers = set()
    for module in root.modules():
        get_output = getattr(module, "get_output_embeddings", None)
        if callable(get_output):
            try:
                layer = get_output()
            except (NotImplementedError, AttributeError):
                layer = None
            if layer is not None:
                output_layers.add(id(layer))
    heads.update(name for name, m in root.named_modules() if id(m) in output_layers)
    return heads


def _attribute_read_layers(root: nn.Module) -> dict[str, str]:
    """Layers whose parent reads their weight directly, so a wrapper there never acts, with why.

    nn.MultiheadAttention's ``out_proj``; a Mamba-style mixer's (Mamba, Mamba2, Bamba, ...) ``dt_proj``
    (``dt_proj.weight @ ...``) and ``conv1d`` always, and its ``x_proj`` and ``out_proj`` in training
    wherever the mamba-ssm kernel is installed (it takes their weights), so an adapter there would
    act on one machine and not on another (peft refuses them too).
    """
    found = {}
    for name, module in root.named_modules():
        base = innermost_base(module)
        where = f"{name}." if name else ""
        if isinstance(base, nn.MultiheadAttention):
            found[f"{where}out_proj"] = (f"nn.MultiheadAttention '{name}' reads its weight directly, so an adapter "
                                         "there would never act; only LoRA adapts nn.MultiheadAttention, targeted "
                                         "as the attention module itself (its input and output projections)")
        elif _state_space_mixer(base):
            kind = type(base).__name__
            reasons = {"dt_proj": "reads its weight directly (dt_proj.weight @ ...), so an adapter there would never "
                                  "act",
                       "conv1d": "passes its weight to its convolution kernel, so an adapter there would never act",
                       "x_proj": "passes its weight to the mamba-ssm kernel in training where that is installed, so "
                                 "an adapter there would not act; adapt in_proj"}
            reasons["out_proj"] = reasons["x_proj"]
            found.update({f"{where}{layer}": f"{kind} '{name}' {why}" for layer, why in reasons.items()
                          if hasattr(base, layer)})
    return found


def _state_space_mixer(module: nn.Module) -> bool:
    """Whether ``module`` is a Mamba-style mixer of transformers (Mamba, Mamba2, Bamba, Zamba2, ...), whose forward
    passes some of its layers' weights to kernels."""
    return type(module).__name__.endswith("Mixer") and hasattr(module, "in_proj") and hasattr(module, "conv1d")


def candidate_modules(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules of ``root`` that belong to the base model (adapter internals excluded)."""
    skipped: list[str] = []
    found = []
    for name, module in root.named_modules(remove_duplicate=False):  # a layer shared by two places: both names
        if not name or any(name.startswith(prefix) for prefix in skipped):
            continue
        if isinstance(module, PEFTLayer):
            # The wrapper stands for the base layer; its adapters are never targets.
            skipped.append(name + ".")
        elif isinstance(module, PEFTModule | parametrize.ParametrizationList):  # a method's own part (a prompt
            skipped.append(name + ".")  # encoder), or what computes a parametrized weight: not layers of the model
            continue
        found.append((name, module))
    return found


def select_modules(
    root: nn.Module,
    target_modules: Targets,
    exclude_modules: Targets = None,
    layers: Sequence[int] | None = None,
    *,
    supported: tuple[type[nn.Module], ...],
    method: str,
    option: str = "target_modules",
    wraps: bool = True,
    check_exclusions: bool = True,
    whole_modules: bool = False,
) -> list[tuple[str, nn.Module]]:
    """The modules of ``root`` that ``method`` adapts, or a ValueError that says what exists.

    ``supported`` are the layer types the method can carry; an explicitly named module of
    another type is an error, while ``"all-linear"`` silently takes linear-like layers only.
    ``option`` is the argument's name in messages; ``wraps``: the method wraps what it chooses, so a
    layer whose parent reads its weight directly is refused. A listed name that matches nothing while
    others match is warned about (a typo, or a recipe shared across architectures). Modules that adapters
    train whole (modules_to_save) and the layers inside them are no targets, as in peft, unless
    ``whole_modules`` (choosing modules_to_save).
    """
    candidates = candidate_modules(root)
    unwrappable = _attribute_read_layers(root)
    if target_modules == ALL_LINEAR:
        heads = head_names(root) | set(unwrappable)
        linear = (*linear_types(), nn.MultiheadAttention)
        chosen = [
            (n, m)
            for n, m in candidates
            if isinstance(innermost_base(m), linear) and n not in heads and isinstance(innermost_base(m), supported)
        ]
        chosen = _without_own_forwards(chosen, method)
    else:
        chosen = [(n, m) for n, m in candidates if name_matches(n, target_modules)]
        _warn_unmatched_entries(target_modules, candidates, f"{method}: {option}")
    if check_exclusions:
        _warn_of_exclusions_that_exclude_nothing(exclude_modules, candidates, chosen, method)
    chosen = [(n, m) for n, m in chosen if not name_matches(n, exclude_modules)]
    if layers is not None:
        wanted = set(layers)
        chosen = [(n, m) for n, m in chosen if block_index(n) in wanted]
    whole = [n for n, m in chosen if getattr(m, "trained_whole", False)] if not whole_modules else []
    chosen = [(n, m) for n, m in chosen if n not in whole]
    if not chosen:
        raise ValueError(
            f"{method}: {option}={target_modules!r}"
            + (f", exclude_modules={exclude_modules!r}" if exclude_modules else "")
            + (f", layers={list(layers)!r}" if layers is not None else "")
            + (f" matched only {', '.join(whole)}, which modules_to_save trains whole (no method adapts it)"
               if whole else " matched no module")
            + f". Module names that exist: {_name_overview(candidates)}"
            + _regex_hint(target_modules, candidates)
        )
    chosen = list({id(module): (name, module) for name, module in reversed(chosen)}.values())[::-1]  # one per layer
    for name, module in chosen:
        if wraps and name in unwrappable:  # a method that trains the weight in place (Selective) is not fooled
            raise TypeError(f"{method} cannot adapt '{name}' on its own: {unwrappable[name]}")
        if not isinstance(innermost_base(module), supported):
            kinds = ", ".join(t.__name__ for t in supported)
            inside = _name_overview([(n, m) for n, m in candidates if n.startswith(name + ".")], 5)
            raise TypeError(
                f"{method} cannot adapt '{name}' of type {type(innermost_base(module)).__name__}; "
                f"it adapts {kinds}." + (f" Name the layers inside it instead, e.g. {inside}" if inside != "(none)"
                                         else " It holds no layer with weights: leave it out of the targets")
            )
    return chosen


QUANTIZED_LINEAR_MODULES = ("bitsandbytes", "lightning_peft", "transformers.integrations")  # linear by design


def _without_own_forwards(chosen: list[tuple[str, nn.Module]], method: str) -> list[tuple[str, nn.Module]]:
    """``chosen`` without nn.Linear subclasses whose forward computes other than a linear layer, with a warning.

    Llama4's router is an nn.Linear whose forward returns a tuple: wrapped or quantized as a linear
    layer, the model fails at its first forward. A subclass with a forward of its own (Falcon's
    plain ``FalconLinear``) is tried once per class, on a copy, against ``F.linear``; one whose
    weights cannot be tried here (quantized, on meta) and bitsandbytes' and ours stay linear layers.
    """
    verdicts: dict[type, bool] = {}
    left_out = []
    for name, module in chosen:
        layer = innermost_base(module)
        if isinstance(layer, nn.Linear) and type(layer).forward is not nn.Linear.forward:
            if type(layer) not in verdicts:
                verdicts[type(layer)] = _computes_as_linear(layer)
            if not verdicts[type(layer)]:
                left_out.append((name, module))
    if left_out:
        classes = sorted({type(innermost_base(m)).__name__ for _, m in left_out})
        where = left_out[0][0] + (f" and {len(left_out) - 1} more" if len(left_out) > 1 else "")
        warnings.warn(f"{method} leaves out {where}, of class {', '.join(classes)}: an nn.Linear subclass whose "
                      "forward computes other than a linear layer (Llama4's router returns a tuple), so it would "
                      "not compute as it does once wrapped or quantized", stacklevel=3)
    dropped = {id(m) for _, m in left_out}
    return [(n, m) for n, m in chosen if id(m) not in dropped]


def _computes_as_linear(layer: nn.Linear) -> bool:
    """Whether a copy of ``layer``, called without its hooks on one random row, gives ``F.linear``'s output.

    The copy keeps the layer's buffers and the global random state as they were. Layers that
    cannot be tried (quantized weights, meta) and quantized linear layers (bitsandbytes', ours,
    transformers' quantization integrations: FP8, BitNet) count as linear; one whose forward fails
    on a row (a grouped projection) does not.
    """
    weight = layer.weight
    if (type(layer).__module__.startswith(QUANTIZED_LINEAR_MODULES) or weight.device.type == "meta"
            or weight.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16)):
        return True
    x = torch.randn(1, layer.in_features, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[weight.device] if weight.device.type == "cuda" else []):
            out = type(layer).forward(copy.deepcopy(layer), x)
    except Exception:  # noqa: BLE001 - a forward that cannot take one row computes otherwise
        return False
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, layer.out_features):
        return False
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, weight, layer.bias).float()
    return torch.allclose(out.float(), expected, rtol=1e-2, atol=1e-3 * float(expected.abs().max()) + 1e-6)


def _warn_of_exclusions_that_exclude_nothing(exclude: Targets, candidates: list[tuple[str, nn.Module]],
                                            chosen: list[tuple[str, nn.Module]], method: str) -> None:
    """Warn of an exclude_modules entry that names no module (a typo, as peft warns), or only a module holding
    chosen layers, which it does not leave out."""
    if not exclude:
        return
    for entry in [exclude] if isinstance(exclude, str) else list(exclude):
        pattern = entry if isinstance(exclude, str) else [entry]
        if any(name_matches(name, pattern) for name, _ in chosen):
            continue
        matched = [name for name, _ in candidates if name_matches(name, pattern)]
        holders = [name for name in matched if any(c.startswith(name + ".") for c, _ in chosen)]
        if not matched:
            warnings.warn(f"{method}: exclude_modules {entry!r} matches no module of this model", stacklevel=3)
        elif holders:
            warnings.warn(f"{method}: exclude_modules {entry!r} names '{holders[0]}', which holds chosen layers but "
                          "is not one: they stay chosen; to leave them out, give a regex over their names, e.g. "
                          rf"r'{re.escape(holders[0])}\..*'", stacklevel=3)


UNMATCHED = "matches no module of this model (the other names do)"


@contextmanager
def names_from_a_file() -> Iterator[None]:
    """Leave unwarned the listed names that match nothing, where the lists are an adapter file's, not the user's:
    peft lists its heads (``classifier``, ``score``) for every sequence classifier, whichever it has."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f".*{re.escape(UNMATCHED)}")
        yield


def _warn_unmatched_entries(targets: Targets, candidates: list[tuple[str, nn.Module]], where: str) -> None:
    """Warn about each name of a target list that matches no module while others do, with the closest name."""
    if targets is None or isinstance(targets, str):
        return
    unmatched = [t for t in targets if not any(name_matches(name, [t]) for name, _ in candidates)]
    if not unmatched or len(unmatched) == len(targets):  # all unmatched: the error below says what exists
        return
    leaves = sorted({name.rsplit(".", 1)[-1] for name, _ in candidates})
    for entry in unmatched:
        close = difflib.get_close_matches(entry.rsplit(".", 1)[-1], leaves, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        warnings.warn(f"{where}: {entry!r} {UNMATCHED}{hint}", stacklevel=3)


def _regex_hint(targets: Targets, candidates: list[tuple[str, nn.Module]]) -> str:
    """For a string that names modules by their last part: a string is a regex over the whole name; say so."""
    if not isinstance(targets, str) or targets == ALL_LINEAR:
        return ""
    if not any(name.endswith("." + targets) for name, _ in candidates):
        return ""
    return (f". A string is a regular expression that must match the whole module name; to match names ending "
            f"in {targets!r}, pass a list: [{targets!r}] (or the regex '.*\\.{targets}')")


def _name_overview(named: list[tuple[str, nn.Module]], limit: int = 40) -> str:
    """Distinct last name components with their layer type, e.g. ``q_proj (Linear)``, of modules holding weights.

    Modules without parameters (dropout, activations, a LightningModule's metrics) are left
    out: no method adapts them.
    """
    seen: dict[str, str] = {}
    for name, module in named:
        leaf = name.rsplit(".", 1)[-1]
        if leaf.isdigit():  # a container's entry: named in full, and only a layer holding weights of its own
            leaf = name if next(innermost_base(module).parameters(recurse=False), None) is not None else ""
        if leaf and next(module.parameters(), None) is not None:
            seen.setdefault(leaf, type(innermost_base(module)).__name__)
    items = [f"{leaf} ({kind})" for leaf, kind in seen.items()]
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more if items else "(none)"


def _expert_holder(module: nn.Module) -> bool:
    """Whether ``module`` holds mixture-of-experts weights: it counts experts, or says it is one."""
    return hasattr(module, "num_experts") or "expert" in type(module).__name__.lower()


class BaseParameter(NamedTuple):
    """A parameter of the base model, with the module holding it, named as the base model names it."""

    module_name: str  # the holder's name, any ``.base_layer`` of a wrapping PEFT layer left out
    module: nn.Module
    local: str
    param: nn.Parameter

    @property
    def name(self) -> str:
        return f"{self.module_name}.{self.local}" if self.module_name else self.local


def base_parameters(root: nn.Module) -> list[BaseParameter]:
    """Every parameter of the base model in ``root`` (none that a PEFT method added), once each, in order."""
    added = {id(p) for m in root.modules() if isinstance(m, PEFTModule) for p in _added_by(m)}
    seen: set[int] = set()
    found = []
    for module_name, module in root.named_modules():
        for local, param in module.named_parameters(recurse=False):
            if id(param) not in added and id(param) not in seen:
                seen.add(id(param))
                found.append(BaseParameter(re.sub(r"\.base_layer(?=\.|$)", "", module_name), module, local, param))
    return found


def _added_by(module: PEFTModule) -> list[nn.Parameter]:
    """What a PEFT part added: a layer's adapters (its base layer is the model's), or all of it."""
    return list(module.adapters.parameters() if isinstance(module, PEFTLayer) else module.parameters())


def fused_expert_parameters(root: nn.Module) -> list[BaseParameter]:
    """The 3-D weights of mixture-of-experts modules: one matrix per expert, stored as one parameter."""
    return [p for p in base_parameters(root)
            if p.param.dim() == 3 and p.param.is_floating_point() and _expert_holder(p.module)]


def attention_parameters(attention: nn.MultiheadAttention) -> list[str]:
    """nn.MultiheadAttention's projection weights: ``out_proj.weight`` first, then the packed (or separate) input ones.

    That order nests the input projection outermost, where peft keeps its own update of it.
    """
    inputs = ["in_proj_weight"] if attention.in_proj_weight is not None else ["q_proj_weight", "k_proj_weight",
                                                                               "v_proj_weight"]
    return ["out_proj.weight", *inputs]


def select_parameters(
    root: nn.Module,
    target_parameters: Targets,
    exclude_modules: Targets = None,
    layers: Sequence[int] | None = None,
    *,
    method: str,
) -> list[ParameterTarget]:
    """The parameters named by ``target_parameters`` (suffixes of full names, or a full-match regex), as peft's.

    ``"all-linear"`` takes the fused expert weights, if the model has any. Several parameters of
    one module come in the module's registration order.
    """
    if target_parameters == ALL_LINEAR:
        found = fused_expert_parameters(root)
    else:
        found = [p for p in base_parameters(root) if name_matches(p.name, target_parameters)]
    whole = {id(param) for m in root.modules() if getattr(m, "trained_whole", False) for param in m.parameters()}
    kept = [p for p in found if id(p.param) not in whole]  # in modules_to_save: each adapter's copy trains them
    chosen = [(p.module_name, p.local) for p in kept
              if not name_matches(p.module_name, exclude_modules) and not name_matches(p.name, exclude_modules)
              and (layers is None or block_index(p.module_name) in set(layers))]
    if not chosen and target_parameters != ALL_LINEAR:
        what = (f"matched only {found[0].name}{' and more' if len(found) > 1 else ''}, inside a module that "
                "modules_to_save trains whole (no method adapts it)") if found and not kept else "matched no parameter"
        raise ValueError(f"{method}: target_parameters={target_parameters!r} {what}. Weights that no layer computes "
                         f"with on its own: {_parameter_overview(root)}")
    return chosen


def _parameter_overview(root: nn.Module, limit: int = 20) -> str:
    """Distinct matrix parameters held outside linear-like layers, e.g. ``experts.gate_up_proj (4, 96, 32)``."""
    seen: dict[str, tuple[int, ...]] = {}
    for p in _unreachable(root):
        seen.setdefault(f"{p.module_name.rsplit('.', 1)[-1]}.{p.local}", tuple(p.param.shape))
    items = [f"{name} {shape}" for name, shape in seen.items()][:limit]
    return ", ".join(items) if items else "(none)"


def _unreachable(root: nn.Module) -> list[BaseParameter]:
    """Matrix parameters that no layer type computes with: only parameter targets can adapt them."""
    layer_types = (*linear_types(), nn.Embedding, nn.modules.conv._ConvNd)
    return [p for p in base_parameters(root)
            if p.param.dim() >= 2 and not isinstance(_reader(root, p), layer_types)]


def _reader(root: nn.Module, p: BaseParameter) -> nn.Module:
    """The module whose forward reads ``p``: the parametrized layer for a ``parametrizations.weight.original``."""
    if not isinstance(p.module, parametrize.ParametrizationList):
        return p.module
    return innermost_base(root.get_submodule(re.sub(r"(^|\.)parametrizations\.[^.]+$", "", p.module_name)))


def warn_left_out_weights(root: nn.Module, method: str, adapted: Sequence[nn.Parameter] = ()) -> None:
    """Warn when weights that no layer target reaches, left out of ``adapted``, hold most of a block's parameters.

    The silent skip this catches: "all-linear" on a model whose experts are fused 3-D weights.
    """
    taken = {id(p) for p in adapted}
    sizes: dict[int | None, int] = {}
    for p in base_parameters(root):
        sizes[block_index(p.module_name)] = sizes.get(block_index(p.module_name), 0) + p.param.numel()
    left: dict[int | None, list[tuple[str, int]]] = {}
    for p in _unreachable(root):
        if id(p.param) not in taken:
            left.setdefault(block_index(p.module_name), []).append((p.name, p.param.numel()))
    heavy = [(full, n) for block, params in left.items() if 2 * sum(n for _, n in params) > sizes[block]
             for full, n in params if 10 * n > sizes[block]]  # a router beside the experts is not worth naming
    if not heavy:
        return
    share = sum(n for _, n in heavy) / sum(sizes.values())
    names = sorted({re.sub(r"\.\d+\.", ".*.", full) for full, _ in heavy})
    warnings.warn(f"{method} leaves out {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}: {share:.0%} of "
                  "the model's parameters and most of their blocks. Their module reads these weights itself, so no "
                  "layer target reaches them; LoRA adapts them with target_parameters (\"all-linear\" includes "
                  "fused expert weights)", stacklevel=3)
