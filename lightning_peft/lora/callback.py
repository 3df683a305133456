"""LoRA as a Lightning callback: low-rank updates of frozen weights (rsLoRA, DoRA, PiSSA)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from lightning_peft.core.checks import (
    check_choice,
    check_positive_int,
    check_positive_number,
    check_probability,
    layer_list,
)
from lightning_peft.core.injection import wrap_modules, wrap_parameters
from lightning_peft.core.layer import innermost_base, linear_features
from lightning_peft.core.targeting import (
    ALL_LINEAR,
    ParameterTarget,
    Targets,
    attention_parameters,
    linear_types,
    select_modules,
    select_parameters,
    warn_left_out_weights,
)
from lightning_peft.lightning.callback import CheckpointPolicy, PEFTCallback
from lightning_peft.lora.layers import INITS, LoRALayer, lora_layer_for
from lightning_peft.lora.parameters import LoRAParameter
from lightning_peft.lora.peft_format import LORA_FORMAT
from lightning_peft.lora.pissa import pissa_as_lora


class LoRA(PEFTCallback):
    """Train a low-rank update ``scale * B @ A`` beside each targeted frozen weight (LoRA, rsLoRA, DoRA, PiSSA).

    At setup the targeted layers are wrapped and every parameter that no PEFT method trains is
    frozen. ``scale`` is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). Linear layers (GPT-2's
    Conv1D too), ``nn.Embedding``, ``nn.Conv1d`` and ``nn.Conv2d`` (with ``groups=1`` and zero
    padding) and ``nn.MultiheadAttention`` can be targeted, and so can weights that their module
    reads itself (fused mixture-of-experts weights: one update per expert). The adapter merges
    into the base weights (`merge`) and is saved in Hugging Face peft's LoRA layout.

    Args:
        r: rank of the update, a positive integer.
        alpha: scaling numerator, a finite number above zero.
        dropout: dropout rate on the adapter's input, in ``[0, 1)``; embeddings get none. Above 0
            it cannot apply to weight targets (``target_parameters``, ``nn.MultiheadAttention``):
            ``"all-linear"`` then leaves them out with a warning, and naming one raises a ValueError
            at injection.
        target_modules: module-name suffixes (a list: ``["q_proj", "v_proj"]`` matches every
            ``...q_proj`` and ``...v_proj``), a regex that must match the whole module name (a
            string), or ``"all-linear"``: every linear-like layer and ``nn.MultiheadAttention``
            except the output head or classifier. ``None`` adapts ``target_parameters`` only.
        target_parameters: names of weights that their module reads itself, as peft's
            ``target_parameters``: suffixes of full parameter names, or a full-match regex, e.g.
            ``["experts.gate_up_proj"]``. ``None`` takes the fused expert weights under
            ``"all-linear"`` and none otherwise; ``[]`` takes none.
        exclude_modules: the same forms as ``target_modules``; matching modules, and the weights
            they hold, are taken out of the targets.
        layers: block indices to adapt, read as the first integer in a module's name
            (``model.layers.3.self_attn.q_proj`` is in block 3); ``None`` adapts every block.
        use_dora: DoRA: also learn a magnitude per output feature (linear layers only).
        use_rslora: rsLoRA: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        init: how A and B start. ``"default"``: B zero and A as ``nn.Linear`` initializes its
            weight (on embeddings A zero and B standard normal), so the model starts as its base;
            ``"gaussian"``: the same with the random factor normal of std ``1 / r``; ``"pissa"``
            (linear layers only): A and B from the weight's top ``r`` singular components, and the
            base weight is replaced by the rest.
        modules_to_save: whole modules trained fully and saved with the adapter, a list of
            module-name suffixes, e.g. ``["classifier"]`` for a new classification head.
        adapter_name: name of this adapter; several adapters with different names can live on one
            model (see `set_adapter`).
        checkpoint: ``"adapter"`` keeps checkpoints to the tensors that PEFT methods train,
            ``"full"`` keeps the whole model (one ``"full"`` method in a Trainer is enough for that).

    Raises:
        ValueError: when ``r``, ``alpha``, ``dropout``, ``init`` or ``checkpoint`` is not an allowed
            value, or ``target_modules`` is ``None`` without ``target_parameters``. At setup (or
            `inject`): when the targets match nothing, or dropout, DoRA or PiSSA meet a weight target
            that was named (``"all-linear"`` leaves those out with a warning).
        TypeError: at setup (or `inject`), when a named module is of a type LoRA does not adapt, or
            DoRA or PiSSA meet a layer that is not linear.

    Examples:
        ```python
        import lightning as L
        from lightning_peft import LoRA

        trainer = L.Trainer(callbacks=[LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"])])
        trainer.fit(module)  # your LightningModule, unchanged
        ```
    """

    method_name = "LoRA"
    peft_format = LORA_FORMAT

    @staticmethod
    def swap_refusal(slot: dict[str, Any], incoming: dict[str, Any]) -> str | None:
        """DoRA's magnitudes have no place in a plain slot, nor a plain adapter in a DoRA one; PiSSA leaves the residual
        of the top-r part of W in the base: only a PiSSA adapter of that rank fits it."""
        def base(settings: dict[str, Any]) -> str:
            return f"a rank-{settings['r']} PiSSA residual" if settings.get("init") == "pissa" else "W itself"

        kinds = ["DoRA" if settings.get("use_dora") else "plain LoRA" for settings in (slot, incoming)]
        if kinds[0] != kinds[1]:
            return f"the slot is {kinds[0]} and the file's adapter {kinds[1]}; load it with load_adapter instead"
        if base(slot) == base(incoming):
            return None
        return (f"the slot's base weights hold {base(slot)}, and the file's adapter was trained against "
                f"{base(incoming)}; load it with load_adapter instead")

    @staticmethod
    def for_original_base(settings: dict[str, Any], tensors: dict[str, Tensor],
                          root: nn.Module) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """A PiSSA adapter as the rank-2r plain LoRA of the original W (`pissa_as_lora`); any other as it is."""
        return pissa_as_lora(settings, tensors, root) if settings.get("init") == "pissa" else (settings, tensors)

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        target_modules: Targets = "all-linear",
        target_parameters: Targets = None,
        exclude_modules: Targets = None,
        layers: int | Sequence[int] | None = None,
        use_dora: bool = False,
        use_rslora: bool = False,
        init: str = "default",
        modules_to_save: Sequence[str] | None = None,
        adapter_name: str = "default",
        checkpoint: CheckpointPolicy = "adapter",
    ) -> None:
        super().__init__(adapter_name=adapter_name, checkpoint=checkpoint, modules_to_save=modules_to_save)
        check_positive_int("LoRA", "r", r)
        check_positive_number("LoRA", "alpha", alpha)
        check_probability("LoRA", "dropout", dropout)
        check_choice("LoRA", "init", init, INITS)
        if target_modules is None and not target_parameters:
            raise ValueError("LoRA needs target_modules, target_parameters or both")
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.target_modules, self.target_parameters = target_modules, target_parameters
        self.exclude_modules, self.layers = exclude_modules, layer_list(layers)
        self.use_dora, self.use_rslora, self.init = use_dora, use_rslora, init

    def inject_into(self, module: nn.Module) -> list[nn.Parameter]:
        modules = self._chosen_modules(module)
        attention = [(n, m) for n, m in modules if isinstance(innermost_base(m), nn.MultiheadAttention)]
        layers = [(n, m) for n, m in modules if (n, m) not in attention]
        parameters = [(n, path) for n, m in attention for path in attention_parameters(innermost_base(m))]
        parameters += self._chosen_parameters(module)
        told = []  # weights left out with a warning of their own
        setting = self._layer_only_setting()
        if parameters and layers and setting and self._all_linear_chose_parameters():
            warnings.warn(f"LoRA {setting}: all-linear leaves out {_listed(parameters)}, whose modules read their "
                          "weights themselves, where a layer-only setting cannot act; to adapt them, add a second "
                          f"LoRA without {setting} whose targets name them", stacklevel=2)
            told = [module.get_submodule(name).get_parameter(path) for name, path in parameters]
            parameters = []
        self._check_before_injecting(layers, parameters)
        wrapped = [layer for _, layer in wrap_modules(module, layers, lora_layer_for, LoRALayer, innermost=True)]
        on_parameters = wrap_parameters(module, parameters, LoRAParameter, LoRAParameter)
        warn_left_out_weights(module, "LoRA", [layer.stored_weight() for layer in on_parameters] + told)
        trained = [p for layer in wrapped + on_parameters
                   for p in layer.add_adapter(self.adapter_name, self.r, self.alpha, self.dropout, self.use_rslora,
                                              self.use_dora, self.init).parameters()]
        self._warn_of_pissa_neighbours(wrapped)
        return trained

    def _warn_of_pissa_neighbours(self, layers: list[LoRALayer]) -> None:
        """Say when a PiSSA adapter shares layers with others: their base weight is its residual, not W."""
        shared = [layer for layer in layers if len(layer.adapters) > 1]
        pissa = sorted({name for layer in shared for name, a in layer.adapters.items() if hasattr(a, "initial_A")})
        if pissa:
            others = sorted({name for layer in shared for name in layer.adapters} - set(pissa))
            warnings.warn(f"LoRA[{self.adapter_name}]: {len(shared)} layer(s) hold the PiSSA adapter(s) "
                          f"{', '.join(pissa)} beside {', '.join(others) or 'each other'}: their base weight is now "
                          "W minus each PiSSA adapter's top-r part, which the others (and the layer with no adapter "
                          "active, or a row routed to None) compute with, and which files saved of the others do "
                          "not record; delete_adapter of a PiSSA adapter gives its part back", stacklevel=3)

    def chosen_names(self, root: nn.Module) -> dict[str, set[str]]:
        modules, parameters = self._chosen_modules(root), self._chosen_parameters(root)
        attention = [name for name, m in modules if isinstance(innermost_base(m), nn.MultiheadAttention)]
        if len(attention) < len(modules) and self._layer_only_setting() and self._all_linear_chose_parameters():
            parameters = []  # all-linear leaves weight targets out beside a layer-only setting, as inject_into does
            modules = [(name, m) for name, m in modules if name not in attention]
        return {"target_modules": {name for name, _ in modules},
                "target_parameters": {f"{name}.{path}" for name, path in parameters}}

    def _chosen_modules(self, root: nn.Module) -> list[tuple[str, nn.Module]]:
        if self.target_modules is None:
            return []
        return select_modules(root, self.target_modules, self.exclude_modules, self.layers, method="LoRA",
                              supported=(*linear_types(), nn.Embedding, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention))

    def _chosen_parameters(self, root: nn.Module) -> list[ParameterTarget]:
        """The parameters named, or under "all-linear" (unless told otherwise) the fused expert weights."""
        targets = self.target_parameters
        if targets is None:
            targets = ALL_LINEAR if self.target_modules == ALL_LINEAR else []
        if not targets:
            return []
        return select_parameters(root, targets, self.exclude_modules, self.layers, method="LoRA")

    def _layer_only_setting(self) -> str | None:
        """The setting that needs a layer's own forward (its input), which a weight read by its module has not."""
        return ("use_dora=True" if self.use_dora else f"dropout={self.dropout}" if self.dropout
                else "init='pissa'" if self.init == "pissa" else None)

    def _all_linear_chose_parameters(self) -> bool:
        """Whether the weight-level targets came from "all-linear" alone, not from the user naming them."""
        return self.target_modules == ALL_LINEAR and self.target_parameters is None

    def _check_before_injecting(self, layers: list[tuple[str, nn.Module]], parameters: list[ParameterTarget]) -> None:
        """Refuse what would fail half-way, so a refused injection leaves the model untouched."""
        for name, module in layers:
            base = innermost_base(module)
            if (self.use_dora or self.init == "pissa") and not isinstance(base, linear_types()):
                what = "DoRA" if self.use_dora else "init='pissa'"
                raise TypeError(f"LoRA {what} needs linear layers; '{name}' is {type(base).__name__}")
            if isinstance(base, (nn.Conv1d, nn.Conv2d)) and (base.groups != 1 or base.padding_mode != "zeros"):
                raise TypeError(f"LoRA adapts convolutions with groups=1 and padding_mode='zeros'; '{name}' is not")
            smallest = min(linear_features(base)) if isinstance(base, linear_types()) else None
            if self.init == "pissa" and smallest is not None and self.r > smallest:
                raise ValueError(f"LoRA init='pissa' takes the top r={self.r} singular vectors of each weight, but "
                                 f"'{name}' has only {smallest} (its smallest dimension): use r <= {smallest}")
        setting = self._layer_only_setting()
        if parameters and setting:
            name, path = parameters[0]
            raise ValueError(f"LoRA {setting} cannot apply to '{name}.{path}': its module reads that weight itself, "
                             "so the update is added to the weight, not computed by a layer. Leave such weights out "
                             "(target_parameters=[], or target_modules without the attention module) or drop "
                             f"{setting.split('=')[0]}")


def _listed(parameters: list[ParameterTarget], limit: int = 4) -> str:
    names = [f"{name}.{path}" for name, path in parameters]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
