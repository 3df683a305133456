"""Choosing which modules a PEFT method adapts: one rule set shared by every method.

A target is given as a list of module-name suffixes (``["q_proj", "v_proj"]``), a regular
expression that must match the whole module name, or ``"all-linear"``: every linear-like
layer except the output head or classifier.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from lightning_peft.core.layer import PEFTLayer, PEFTModule, innermost_base

Targets = str | Sequence[str] | None

ALL_LINEAR = "all-linear"
# Last-layer names of the task heads in transformers models: "all-linear" leaves them alone.
HEAD_NAMES = frozenset({"lm_head", "classifier", "score", "qa_outputs", "cls"})
_BLOCK_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def linear_types() -> tuple[type[nn.Module], ...]:
    """Layer types that compute ``x @ W`` on the last dimension: nn.Linear and GPT-2's Conv1D."""
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def block_index(name: str) -> int | None:
    """The block (layer) number of a module: the first integer component of its dotted name."""
    match = _BLOCK_INDEX.search(name)
    return int(match.group(1)) if match else None


def _matches(name: str, targets: Targets) -> bool:
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _head_names(root: nn.Module) -> set[str]:
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


def _attribute_read_layers(root: nn.Module) -> set[str]:
    """Layers whose parent reads their weight directly (nn.MultiheadAttention's out_proj): unwrappable."""
    return {f"{name}.out_proj" if name else "out_proj"
            for name, m in root.named_modules() if isinstance(m, nn.MultiheadAttention)}


def candidate_modules(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules of ``root`` that belong to the base model (adapter internals excluded)."""
    skipped: list[str] = []
    found = []
    for name, module in root.named_modules():
        if not name or any(name.startswith(prefix) for prefix in skipped):
            continue
        if isinstance(module, PEFTLayer):
            # The wrapper stands for the base layer; its adapters are never targets.
            skipped.append(name + ".")
        elif isinstance(module, PEFTModule):  # a method's own part (a prompt encoder): not base model
            skipped.append(name + ".")
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
) -> list[tuple[str, nn.Module]]:
    """The modules of ``root`` that ``method`` adapts, or a ValueError that says what exists.

    ``supported`` are the layer types the method can carry; an explicitly named module of
    another type is an error, while ``"all-linear"`` silently takes linear-like layers only.
    """
    candidates = candidate_modules(root)
    unwrappable = _attribute_read_layers(root)
    if target_modules == ALL_LINEAR:
        heads = _head_names(root) | unwrappable
        linear = linear_types()
        chosen = [
            (n, m)
            for n, m in candidates
            if isinstance(innermost_base(m), linear) and n not in heads and isinstance(innermost_base(m), supported)
        ]
    else:
        chosen = [(n, m) for n, m in candidates if _matches(n, target_modules)]
    chosen = [(n, m) for n, m in chosen if not _matches(n, exclude_modules)]
    if layers is not None:
        wanted = set(layers)
        chosen = [(n, m) for n, m in chosen if block_index(n) in wanted]
    if not chosen:
        raise ValueError(
            f"{method}: target_modules={target_modules!r}"
            + (f", exclude_modules={exclude_modules!r}" if exclude_modules else "")
            + (f", layers={list(layers)!r}" if layers is not None else "")
            + f" matched no module. Module names that exist: {_name_overview(candidates)}"
        )
    for name, module in chosen:
        if name in unwrappable:
            raise TypeError(f"{method} cannot adapt '{name}': nn.MultiheadAttention reads its weight directly")
        if not isinstance(innermost_base(module), supported):
            kinds = ", ".join(t.__name__ for t in supported)
            raise TypeError(
                f"{method} cannot adapt '{name}' of type {type(innermost_base(module)).__name__}; "
                f"it adapts {kinds}. Name the layers inside it instead, e.g. "
                f"{_name_overview([(n, m) for n, m in candidates if n.startswith(name + '.')], 5)}"
            )
    return chosen


def _name_overview(named: list[tuple[str, nn.Module]], limit: int = 40) -> str:
    """Distinct last name components with their layer type, e.g. ``q_proj (Linear)``."""
    seen: dict[str, str] = {}
    for name, module in named:
        leaf = name.rsplit(".", 1)[-1]
        if not leaf.isdigit():
            seen.setdefault(leaf, type(innermost_base(module)).__name__)
    items = [f"{leaf} ({kind})" for leaf, kind in seen.items()]
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more if items else "(none)"
