"""Bottleneck adapters as a Lightning callback: small trainable MLPs after each block's output projections."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from lightning_peft.additive.adapter_layers import ACTIVATIONS, AdapterLayer
from lightning_peft.core.checks import check_choice, check_positive_int, check_probability
from lightning_peft.core.injection import wrap_modules
from lightning_peft.core.targeting import Targets, candidate_modules, linear_types, select_modules
from lightning_peft.lightning.callback import CheckpointPolicy, PEFTCallback

PLACEMENTS = ("houlsby", "pfeiffer")

# Block output projections (attention output, feed-forward output) by naming scheme, as full-match
# regexes; a model takes the first scheme whose projections it has. BERT's block output
# ``layer.N.output.dense`` must not also take ``layer.N.attention.output.dense``.
OUTPUT_PROJECTIONS: dict[str, tuple[str, str]] = {
    "llama": (r"(?:.*\.)?self_attn\.o_proj", r"(?:.*\.)?mlp\.down_proj"),  # Mistral, Qwen, Gemma, Phi-3 too
    # RoBERTa, DeBERTa, ViT too
    "bert": (r"(?:.*\.)?layer\.\d+\.attention\.output\.dense", r"(?:.*\.)?layer\.\d+\.output\.dense"),
    "gpt2": (r"(?:.*\.)?h\.\d+\.attn\.c_proj", r"(?:.*\.)?h\.\d+\.mlp\.c_proj"),
    "bart": (r"(?:.*\.)?self_attn\.out_proj", r"(?:.*\.)?fc2"),  # OPT, Whisper, CLIP too
    "vit": (r"(?:.*\.)?attention\.o_proj", r"(?:.*\.)?mlp\.fc2"),
    "t5": (r"(?:.*\.)?SelfAttention\.o", r"(?:.*\.)?DenseReluDense\.wo"),
    "gpt_neox": (r"(?:.*\.)?attention\.dense", r"(?:.*\.)?mlp\.dense_4h_to_h"),
    "bloom": (r"(?:.*\.)?self_attention\.dense", r"(?:.*\.)?mlp\.dense_4h_to_h"),
    "distilbert": (r"(?:.*\.)?attention\.out_lin", r"(?:.*\.)?ffn\.lin2"),
}


class Adapter(PEFTCallback):
    """Insert bottleneck adapters ``h + up(act(down(h)))`` after each block's output projections (Houlsby, Pfeiffer).

    ``h`` is the output of the wrapped projection. The up-projection starts at zero, so the
    injected model computes what its base computes. Adapters add layers to the forward and cannot
    be merged into the base weights (`merge` raises a ValueError); they are saved in lightning-peft's
    own layout, which Hugging Face peft does not read.

    Args:
        bottleneck_dim: width of the bottleneck, a positive integer.
        placement: ``"houlsby"`` (after the attention output and the feed-forward output of each
            block) or ``"pfeiffer"`` (after the feed-forward output only). The projections are
            found by the naming schemes of ``OUTPUT_PROJECTIONS`` in this module (Llama-, BERT-,
            GPT-2-, BART-, ViT-, T5-, GPT-NeoX-, BLOOM- and DistilBERT-like models).
        activation: ``"gelu"``, ``"relu"``, ``"silu"`` or ``"tanh"``, between the two projections.
        dropout: dropout rate on the adapter's update, before the residual add, in ``[0, 1)``.
        target_modules: module-name suffixes (a list) or a regex that must match the whole module
            name (a string), naming the linear layers whose output the adapters take; needed for
            models of other naming schemes, and used instead of ``placement`` when given.
        modules_to_save: whole modules trained fully and saved with the adapter, named in the forms
            of ``target_modules``, e.g. ``["classifier"]`` for a new classification head.
        adapter_name: name of this adapter; several adapters with different names can live on one
            layer and apply in turn.
        checkpoint: ``"adapter"`` keeps checkpoints to the tensors that PEFT methods train,
            ``"full"`` keeps the whole model (one ``"full"`` method in a Trainer is enough for that).

    Raises:
        ValueError: when ``bottleneck_dim``, ``placement``, ``activation``, ``dropout`` or
            ``checkpoint`` is not an allowed value. At setup (or `inject`): when no
            ``target_modules`` are given and the model follows no known naming scheme, or the
            targets match nothing.
        TypeError: at setup (or `inject`), when a target is not a linear layer.

    Examples:
        ```python
        import lightning as L
        from lightning_peft import Adapter

        trainer = L.Trainer(callbacks=[Adapter(bottleneck_dim=64, placement="pfeiffer")])
        ```
    """

    method_name = "Adapter"

    @staticmethod
    def swap_refusal(slot: dict[str, Any], incoming: dict[str, Any]) -> str | None:
        """The activation between the projections is no tensor: a swap must keep it."""
        if slot["activation"] == incoming["activation"]:
            return None
        return f"the file's adapter uses activation '{incoming['activation']}', the slot '{slot['activation']}'"

    def __init__(
        self,
        bottleneck_dim: int = 64,
        placement: str = "houlsby",
        activation: str = "gelu",
        dropout: float = 0.0,
        target_modules: Targets = None,
        modules_to_save: Sequence[str] | None = None,
        adapter_name: str = "default",
        checkpoint: CheckpointPolicy = "adapter",
    ) -> None:
        super().__init__(adapter_name=adapter_name, checkpoint=checkpoint, modules_to_save=modules_to_save)
        check_positive_int("Adapter", "bottleneck_dim", bottleneck_dim)
        check_choice("Adapter", "placement", placement, PLACEMENTS)
        check_choice("Adapter", "activation", activation, ACTIVATIONS)
        check_probability("Adapter", "dropout", dropout)
        self.bottleneck_dim, self.placement, self.activation = bottleneck_dim, placement, activation
        self.dropout, self.target_modules = dropout, target_modules

    def inject_into(self, module: nn.Module) -> list[nn.Parameter]:
        chosen = select_modules(module, self.targets_in(module), supported=linear_types(), method="Adapter")
        layers = wrap_modules(module, chosen, AdapterLayer, AdapterLayer)
        params = []
        for _, layer in layers:
            adapter = layer.add_adapter(self.adapter_name, self.bottleneck_dim, self.activation, self.dropout)
            params.extend(adapter.parameters())
        return params

    def targets_in(self, module: nn.Module) -> Targets:
        """``target_modules`` when given, else the placement's output projections of the model's naming scheme."""
        if self.target_modules is not None:
            return self.target_modules
        names = [name for name, _ in candidate_modules(module)]
        for scheme, (attention, feedforward) in OUTPUT_PROJECTIONS.items():
            needed = [attention, feedforward] if self.placement == "houlsby" else [feedforward]
            if all(any(re.fullmatch(pattern, name) for name in names) for pattern in needed):
                _check_every_block_has(names, attention, feedforward)
                return placement_pattern(scheme, self.placement)
        known = ", ".join(f"{scheme} ({_readable(a)} / {_readable(f)})"
                          for scheme, (a, f) in OUTPUT_PROJECTIONS.items())
        raise ValueError(f"Adapter placement={self.placement!r} found no block output projections of a known naming "
                         f"scheme in this model; known: {known}. Pass target_modules with the output projections of "
                         "each block, e.g. Adapter(target_modules=['attn.out_proj', 'mlp.fc2'])")


def _check_every_block_has(names: list[str], attention: str, feedforward: str) -> None:
    """Refuse a model whose blocks do not all have the scheme's feed-forward output (a mixture-of-experts block)."""
    with_attention = {_block_of(n): n for n in names if re.fullmatch(attention, n)}
    with_feedforward = {_block_of(n) for n in names if re.fullmatch(feedforward, n)}
    missing = [block for block in with_attention if block not in with_feedforward]
    if missing:
        shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
        raise ValueError(f"Adapter: {len(missing)} of the model's {len(with_attention)} blocks ({shown}) have no "
                         f"{_readable(feedforward)} (mixture-of-experts "
                         "blocks, say), so the default placement would leave them without an adapter; pass "
                         "target_modules with each block's feed-forward output (its shared expert's, say)")


def _block_of(name: str) -> str:
    """The block a module belongs to: its name up to the first number (``model.layers.3``), or '' outside blocks."""
    match = re.match(r"^(.*?\.\d+)(?:\.|$)", name)
    return match.group(1) if match else ""


def placement_pattern(scheme: str, placement: str) -> str:
    """The regex of the module names that ``placement`` puts adapters after under a naming ``scheme``."""
    attention, feedforward = OUTPUT_PROJECTIONS[scheme]
    return f"(?:{attention})|(?:{feedforward})" if placement == "houlsby" else feedforward


def _readable(pattern: str) -> str:
    """A module-name regex of ``OUTPUT_PROJECTIONS`` as a user would write the name: ``layer.N.output.dense``."""
    return pattern.removeprefix(r"(?:.*\.)?").replace(r"\d+", "N").replace("\\", "")
