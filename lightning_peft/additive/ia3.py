"""IA3 as a Lightning callback: learned vectors that rescale chosen activations (Liu et al., 2022).

A target that is not a feed-forward module has its output scaled by a vector of out_features;
a feed-forward one has its input scaled by a vector of in_features. The vectors start at ones,
so a freshly injected model computes what its base computes, and they merge into the weights.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lightning_peft.additive.ia3_format import IA3_FORMAT
from lightning_peft.additive.ia3_layers import IA3Layer
from lightning_peft.core.checks import layer_list
from lightning_peft.core.injection import wrap_modules
from lightning_peft.core.models import model_type
from lightning_peft.core.targeting import Targets, linear_types, select_modules, warn_left_out_weights
from lightning_peft.lightning.callback import CheckpointPolicy, PEFTCallback

# model_type -> (target_modules, feedforward_modules): Hugging Face peft 0.21's IA3 defaults.
DEFAULT_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "t5": (["k", "v", "wo"], ["wo"]),
    "mt5": (["k", "v", "wi_1"], []),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "gptj": (["q_proj", "v_proj", "fc_out"], ["fc_out"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "gpt_neo": (["q_proj", "v_proj", "c_proj"], ["c_proj"]),
    "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gpt_bigcode": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "llama4": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mixtral": (["k_proj", "v_proj"], []),  # peft's w2 is gone: transformers 5 fuses the experts' weights
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "deberta-v2": (["key_proj", "value_proj", "output.dense"], ["output.dense"]),
    "deberta": (["in_proj", "output.dense"], ["output.dense"]),
    "falcon": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma3_text": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    # Beyond peft's table: the same choice on architectures it lacks.
    "phi3": (["qkv_proj", "down_proj"], ["down_proj"]),
    "distilbert": (["k_lin", "v_lin", "lin2"], ["lin2"]),
    "vit": (["k_proj", "v_proj", "fc2"], ["fc2"]),
    "clip": (["k_proj", "v_proj", "fc2"], ["fc2"]),
    "whisper": (["k_proj", "v_proj", "fc2"], ["fc2"]),
    "qwen3_moe": (["k_proj", "v_proj"], []),
    "olmoe": (["k_proj", "v_proj"], []),
    "gpt_oss": (["k_proj", "v_proj"], []),
}


class IA3(PEFTCallback):
    """Train one scaling vector per targeted linear layer (IA3): on its output, or on its input for feed-forward ones.

    Each target gets one vector of its width (``out_features``, or ``in_features`` for a
    feed-forward target). The vectors start at ones, so the injected model computes what its base
    computes, and they merge into the base weights (`merge`). Targets are ``nn.Linear`` or GPT-2's
    Conv1D layers. The adapter is saved in Hugging Face peft's IA3 layout.

    Args:
        target_modules: module-name suffixes (a list) or a regex that must match the whole module
            name (a string). ``None`` takes the defaults of the transformers model's architecture
            (``DEFAULT_TARGETS`` in this module, peft's choices, e.g. ``k_proj``, ``v_proj`` and
            ``down_proj`` for Llama); a model without defaults then raises a ValueError at injection.
        feedforward_modules: the targets whose input, not output, is scaled, in the same forms;
            each must be a target. ``None`` takes the architecture's feed-forward defaults that
            are targets, or none when ``target_modules`` is given for an architecture without
            defaults.
        exclude_modules: the same forms as ``target_modules``, taken out of the targets.
        layers: block indices to adapt, read as the first integer in a module's name; ``None``
            adapts every block.
        modules_to_save: whole modules trained fully and saved with the adapter, named in the forms
            of ``target_modules``, e.g. ``["classifier"]`` for a new classification head.
        adapter_name: name of this adapter; several adapters with different names can live on one
            model (see `set_adapter`).
        checkpoint: ``"adapter"`` keeps checkpoints to the tensors that PEFT methods train,
            ``"full"`` keeps the whole model (one ``"full"`` method in a Trainer is enough for that).

    Raises:
        ValueError: when ``checkpoint`` is not ``"adapter"`` or ``"full"``. At setup (or `inject`):
            when the targets match nothing, the model has no default targets and none were given,
            or a ``feedforward_modules`` entry is not a target.
        TypeError: at setup (or `inject`), when a named target is not a linear layer.

    Examples:
        ```python
        import lightning as L
        from lightning_peft import IA3

        ia3 = IA3(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
        trainer = L.Trainer(callbacks=[ia3])  # or IA3() for the architecture's defaults
        ```
    """

    method_name = "IA3"
    peft_format = IA3_FORMAT

    def __init__(
        self,
        target_modules: Targets = None,
        feedforward_modules: Targets = None,
        exclude_modules: Targets = None,
        layers: int | Sequence[int] | None = None,
        modules_to_save: Sequence[str] | None = None,
        adapter_name: str = "default",
        checkpoint: CheckpointPolicy = "adapter",
    ) -> None:
        super().__init__(adapter_name=adapter_name, checkpoint=checkpoint, modules_to_save=modules_to_save)
        self.target_modules, self.feedforward_modules = target_modules, feedforward_modules
        self.exclude_modules, self.layers = exclude_modules, layer_list(layers)

    def inject_into(self, module: nn.Module) -> list[nn.Parameter]:
        chosen = self._chosen_modules(module)
        feedforward = self._feedforward_names(module, {name for name, _ in chosen})
        warn_left_out_weights(module, "IA3")
        layers = wrap_modules(module, chosen, IA3Layer, IA3Layer)
        return [p for name, layer in layers
                for p in layer.add_adapter(self.adapter_name, name in feedforward).parameters()]

    def chosen_names(self, root: nn.Module) -> dict[str, set[str]]:
        targets = {name for name, _ in self._chosen_modules(root)}
        return {"target_modules": targets, "feedforward_modules": self._feedforward_names(root, targets)}

    def _chosen_modules(self, root: nn.Module) -> list[tuple[str, nn.Module]]:
        return select_modules(root, self._target_modules(root), self.exclude_modules, self.layers,
                              supported=linear_types(), method="IA3")

    def _target_modules(self, root: nn.Module) -> Targets:
        return self.target_modules if self.target_modules is not None else self._defaults(root)[0]

    def _feedforward_names(self, root: nn.Module, targets: set[str]) -> set[str]:
        """Names of the targets whose input is scaled; explicit feed-forward modules must be targets.

        With targets or feed-forward modules given as a regex, as peft, a feed-forward name marks the
        targets it matches and nothing else (peft checks the subset only between two lists).
        """
        given = self.feedforward_modules
        patterns = given if given is not None else self._default_feedforward(root)
        if not patterns:
            return set()
        filters = (self.exclude_modules, self.layers) if given is not None else (None, None)
        named = select_modules(root, patterns, *filters, supported=(nn.Module,), method="IA3 feedforward_modules",
                               check_exclusions=False)
        target_ids = {id(root.get_submodule(name)) for name in targets}  # a layer at two places: one module, by id
        stray = sorted(name for name, module in named if id(module) not in target_ids)
        if given is not None and stray and not isinstance(self.target_modules, str) and not isinstance(given, str):
            raise ValueError(f"IA3 feedforward_modules must be among the targets; these are not: {stray[:8]}")
        feedforward_ids = {id(module) for _, module in named}
        return {name for name in targets if id(root.get_submodule(name)) in feedforward_ids}

    def _default_feedforward(self, root: nn.Module) -> list[str]:
        """The architecture's feed-forward defaults, or none when targets were given for an unknown one."""
        if self.target_modules is not None and model_type(root) not in DEFAULT_TARGETS:
            return []
        return self._defaults(root)[1]

    def _defaults(self, root: nn.Module) -> tuple[list[str], list[str]]:
        kind = model_type(root)
        if kind not in DEFAULT_TARGETS:
            found = f"model type {kind!r}" if kind else "no transformers model"
            raise ValueError(f"IA3 has no default targets for {found}; pass target_modules (and "
                             f"feedforward_modules). Defaults exist for: {', '.join(sorted(DEFAULT_TARGETS))}")
        return DEFAULT_TARGETS[kind]
