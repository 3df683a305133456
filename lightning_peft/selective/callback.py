"""Selective fine-tuning: train a named subset of the parameters the model already has.

Nothing is added to the model, so its forward stays the base's and there is nothing to merge;
the method only claims parameters, which the base callback then leaves trainable. Names are
matched as the base model spells them: the ``.base_layer`` of a wrapping PEFT layer is invisible.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence

from torch import nn

from lightning_peft.core.checks import layer_list
from lightning_peft.core.ownership import holders
from lightning_peft.core.saved_modules import SavedModule
from lightning_peft.core.targeting import (
    BaseParameter,
    Targets,
    base_parameters,
    block_index,
    head_names,
    select_modules,
)
from lightning_peft.lightning.callback import CheckpointPolicy, PEFTCallback

PARAM_TYPES = ("bias", "norm", "embedding")


class Selective(PEFTCallback):
    """Train a chosen subset of the model's own parameters: those that pass every given filter.

    Nothing is added to the model, so its forward stays the base's and there is nothing to merge;
    the chosen parameters are trained and saved with the adapter (in lightning-peft's own layout),
    the rest are frozen. Filters left at ``None`` do not filter, but at least one must be given.
    Parameter names are the base model's: the ``.base_layer`` of a wrapping PEFT layer is left out.

    Args:
        modules: module-name suffixes (a list) or a regex that must match the whole module name (a
            string), as ``target_modules``; every parameter inside a matching module passes.
        layers: block indices whose parameters pass, read as the first integer in a parameter's name.
        param_types: kinds of parameter that pass, any of ``"bias"`` (every parameter named
            ``bias``, or ending in ``_bias`` as fused experts' ``gate_up_proj_bias``), ``"norm"``
            (parameters of ``nn.LayerNorm`` and of modules whose class name contains ``Norm``, as
            RMSNorm) and ``"embedding"`` (``nn.Embedding`` weights); one string is taken as a list
            of one.
        modules_to_save: whole modules trained as well, whatever the filters, e.g. ``["classifier"]``.
        adapter_name: name under which the parameters are claimed.
        checkpoint: ``"adapter"`` keeps checkpoints to the tensors that PEFT methods train,
            ``"full"`` keeps the whole model (one ``"full"`` method in a Trainer is enough for that).

    Raises:
        ValueError: when ``param_types`` holds an unknown kind, no filter is given, or ``checkpoint``
            is not an allowed value. At setup (or `inject`): when no parameter passes every filter
            (the message counts what each filter selects), or ``modules`` matches no module.

    Examples:
        ```python
        import lightning as L
        from lightning_peft import Selective

        norms = Selective(layers=[10, 11], param_types=["norm"], modules_to_save=["classifier"])
        trainer = L.Trainer(callbacks=[norms])  # the norms of blocks 10 and 11, and the head
        ```
    """

    method_name = "Selective"

    def __init__(
        self,
        modules: Targets = None,
        layers: int | Sequence[int] | None = None,
        param_types: Sequence[str] | None = None,
        modules_to_save: Sequence[str] | None = None,
        adapter_name: str = "default",
        checkpoint: CheckpointPolicy = "adapter",
    ) -> None:
        super().__init__(adapter_name=adapter_name, checkpoint=checkpoint, modules_to_save=modules_to_save)
        param_types = [param_types] if isinstance(param_types, str) else list(param_types or [])
        unknown = sorted(set(param_types) - set(PARAM_TYPES))
        if unknown:
            raise ValueError(f"{self.method_name} param_types must be among {PARAM_TYPES}, got {unknown}")
        if modules is None and layers is None and not param_types:
            raise ValueError(f"{self.method_name} needs modules, layers or param_types; "
                             "training every parameter is full fine-tuning")
        self.modules = modules
        self.layers = layer_list(layers)
        self.param_types = param_types

    def inject_into(self, module: nn.Module) -> list[nn.Parameter]:
        """The base parameters that pass every filter, or a ValueError saying what exists."""
        shadowed = _shadowed(module)
        base = [b for b in base_parameters(module) if id(b.param) not in shadowed]
        passing = self._passing_per_filter(module, base)
        chosen = [b for b in base if all(id(b.param) in ids for ids in passing.values())]
        if not chosen:
            raise ValueError(self._nothing_matched(base, passing))
        if self.modules is None:
            self._warn_if_only_the_head(module, chosen)
        return [b.param for b in chosen]

    def _warn_if_only_the_head(self, root: nn.Module, chosen: list[BaseParameter]) -> None:
        """Warn when every chosen parameter lies in the output head: the blocks would not change at all."""
        heads = head_names(root)
        if all(b.module_name in heads for b in chosen):
            names = ", ".join(b.name for b in chosen[:4]) + (", ..." if len(chosen) > 4 else "")
            warnings.warn(f"{self.owner} selects only {names}, in the output head: {type(root).__name__}'s blocks "
                          "hold no parameter that passes the filters, so they do not change. Use LoRA or IA3 there",
                          stacklevel=2)

    def _passing_per_filter(self, root: nn.Module, base: list[BaseParameter]) -> dict[str, set[int]]:
        """For each given filter, described as it was given, the ids of the base parameters that pass it."""
        passing = {}
        if self.modules is not None:
            chosen = select_modules(root, self.modules, supported=(nn.Module,), method=f"{self.owner} modules",
                                    wraps=False)
            inside = {id(p) for _, m in chosen for p in m.parameters()}
            passing[f"modules={self.modules!r}"] = {id(b.param) for b in base if id(b.param) in inside}
        if self.layers is not None:
            wanted = set(self.layers)
            passing[f"layers={self.layers!r}"] = {id(b.param) for b in base if block_index(b.name) in wanted}
        if self.param_types:
            wanted = set(self.param_types)
            passing[f"param_types={self.param_types!r}"] = {id(b.param) for b in base if kinds(b) & wanted}
        return passing

    def _nothing_matched(self, base: list[BaseParameter], passing: dict[str, set[int]]) -> str:
        each = "; ".join(f"{label} selects {len(ids)} tensor(s)" for label, ids in passing.items())
        counts = Counter(kind for b in base for kind in kinds(b))
        blocks = sorted({block_index(b.name) for b in base} - {None})
        return (
            f"{self.owner}: no parameter passes all filters ({each}). The model has "
            + ", ".join(f"{counts[kind]} {kind} tensor(s)" for kind in PARAM_TYPES)
            + f" and blocks {blocks or '(none)'}"
        )


def _shadowed(root: nn.Module) -> set[int]:
    """Parameters that only originals behind another adapter's ``modules_to_save`` copies hold: they never run.

    A weight tied to a module outside (an embedding tied to a copied head) still runs there.
    """
    hidden = {id(m) for saved in root.modules() if isinstance(saved, SavedModule) for m in saved.base_layer.modules()}
    return {param for param, where in holders(root).items() if all(id(m) in hidden for m, _ in where)}


class BitFit(Selective):
    """Train every bias of the model (BitFit, Ben Zaken et al. 2022), plus whole ``modules_to_save``.

    ``Selective(param_types=["bias"])`` under its own registered name, ``"BitFit"``. Nothing is
    added to the model and nothing merges; the biases are saved in lightning-peft's own layout.

    Args:
        modules_to_save: whole modules trained fully and saved with the biases, named as
            ``target_modules`` name them (suffixes or a full-match regex), e.g. ``["classifier"]``.
        adapter_name: name under which the parameters are claimed.
        checkpoint: ``"adapter"`` keeps checkpoints to the tensors that PEFT methods train,
            ``"full"`` keeps the whole model (one ``"full"`` method in a Trainer is enough for that).

    Raises:
        ValueError: when ``checkpoint`` is not an allowed value; at setup (or `inject`), when the
            model has no bias.

    Examples:
        ```python
        import lightning as L
        from lightning_peft import BitFit

        trainer = L.Trainer(callbacks=[BitFit(modules_to_save=["classifier"])])
        ```
    """

    method_name = "BitFit"

    def __init__(
        self,
        modules_to_save: Sequence[str] | None = None,
        adapter_name: str = "default",
        checkpoint: CheckpointPolicy = "adapter",
    ) -> None:
        super().__init__(param_types=["bias"], modules_to_save=modules_to_save, adapter_name=adapter_name,
                         checkpoint=checkpoint)


def kinds(base: BaseParameter) -> frozenset[str]:
    """Which of PARAM_TYPES a base parameter is."""
    found = set()
    if base.local == "bias" or base.local.endswith("_bias"):  # fused experts hold gate_up_proj_bias, down_proj_bias
        found.add("bias")
    if isinstance(base.module, nn.LayerNorm) or "Norm" in type(base.module).__name__:
        found.add("norm")
    if isinstance(base.module, nn.Embedding) and base.local == "weight":
        found.add("embedding")
    return frozenset(found)
