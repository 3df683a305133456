"""Prefix tuning: trainable keys and values of virtual tokens in front of every attention layer.

A forward pre-hook on the transformers model passes the prefix as a fresh key/value cache
(transformers' ``DynamicCache``, one per call, since the model appends to it) and widens the
attention mask by the prefix length; the sequence itself is untouched, so outputs keep their
shape. With ``projection=True`` the prefix is computed by an MLP from virtual-token embeddings
(peft's reparameterization, steadier to train); :meth:`PrefixTuning.fold` computes it once and
keeps the plain prefix, as ``projection=False`` would hold it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lightning_peft.additive.prompt_formats import PREFIX_TUNING_FORMAT
from lightning_peft.additive.soft_prompts import (
    CACHE_ARGUMENTS,
    GENERATED,
    KVShape,
    cache_argument,
    cached_length,
    check_cache_grows,
    check_data_fits_positions,
    check_positions_fit,
    gather_if_sharded,
    given_cache,
    input_shape,
    mark_prefix_cache,
    named_forward_arguments,
    shift_position_ids,
    widen_attention_mask,
)
from lightning_peft.core.checks import check_positive_int
from lightning_peft.core.layer import PEFTModule
from lightning_peft.core.models import (
    input_embedding_weight,
    learned_positions,
    require_transformers_model,
    warn_of_other_models,
)
from lightning_peft.core.ownership import claim
from lightning_peft.lightning.callback import CheckpointPolicy, PEFTCallback


class PrefixEncoder(nn.Module):
    """One adapter's prefix, ``(num_virtual_tokens, layers * 2 * kv_dim)``: plain, or computed by an MLP.

    The layout matches peft's: per virtual token, layer by layer, the key then the value, each
    ``kv_heads x head_dim``.
    """

    def __init__(self, num_virtual_tokens: int, width: int, hidden: int, projection_dim: int | None,
                 device: torch.device) -> None:
        super().__init__()
        self.prefix: nn.Parameter | None = None
        self.embedding: nn.Parameter | None = None
        self.transform: nn.Sequential | None = None
        if projection_dim is None:
            self.prefix = nn.Parameter(torch.randn(num_virtual_tokens, width, device=device))
        else:
            self.embedding = nn.Parameter(torch.randn(num_virtual_tokens, hidden, device=device))
            self.transform = nn.Sequential(nn.Linear(hidden, projection_dim, device=device), nn.Tanh(),
                                           nn.Linear(projection_dim, width, device=device))

    @property
    def num_virtual_tokens(self) -> int:
        return (self.embedding if self.prefix is None else self.prefix).shape[0]

    def values(self) -> Tensor:
        """The prefix, ``(num_virtual_tokens, layers * 2 * kv_dim)``."""
        return self.prefix if self.transform is None else self.transform(self.embedding)

    @torch.no_grad()
    def fold(self) -> nn.Parameter:
        """Compute the prefix once and keep it in place of the MLP; return the new parameter."""
        if self.transform is not None:
            trainable = self.embedding.requires_grad
            self.prefix = nn.Parameter(self.values().detach().clone(), requires_grad=trainable)
            self.embedding, self.transform = None, None
        return self.prefix


class PrefixInjector(PEFTModule):
    """The prefixes of one transformers model, and the hook that passes the active ones as its cache.

    Active prefixes are attended in the order they are active; with none active
    (``disable_adapters``) the model computes what its base computes.
    """

    method = "PrefixTuning"

    def __init__(self, model: nn.Module, shape: KVShape) -> None:
        super().__init__()
        self.shape = shape
        self._cache_argument = cache_argument(model)
        self.positions = learned_positions(model)  # the learned position table's size, if the model has one
        model.register_forward_pre_hook(self.before_forward, with_kwargs=True)
        model.register_forward_hook(self.after_forward, with_kwargs=True)

    def active_virtual_tokens(self) -> int:
        return sum(self.adapters[name].num_virtual_tokens for name in self.active_adapters)

    def active_values(self) -> Tensor:
        """The active prefixes one after the other, ``(virtual tokens, width)``."""
        return torch.cat([self.adapters[name].values() for name in self.active_adapters])

    def key_values(self, values: Tensor, batch: int) -> list[tuple[Tensor, Tensor]]:
        """Per layer, the prefix key and value, each ``(batch, kv_heads, virtual tokens, head_dim)``."""
        shape = self.shape
        per_layer = values.view(values.shape[0], shape.layers, 2, shape.heads, shape.head_dim).permute(1, 2, 3, 0, 4)
        return [(kv[0].expand(batch, -1, -1, -1), kv[1].expand(batch, -1, -1, -1)) for kv in per_layer]

    def before_forward(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        gather_if_sharded(self)
        kwargs = named_forward_arguments(model, args, kwargs)
        shape = input_shape(kwargs)
        if not self.active_adapters or shape is None:  # no prefix, or nothing to attend from
            return (), kwargs
        if model.training and _checkpointed(model):
            raise ValueError("PrefixTuning does not work with gradient checkpointing: transformers drops the cache "
                             "in checkpointed layers, so the prefix would be ignored")
        cache = given_cache(kwargs)
        check_cache_grows(cache)
        for name in CACHE_ARGUMENTS:
            kwargs.pop(name, None)
        if not cached_length(cache):  # a first step (or no generation at all): the prefix goes in first
            check_positions_fit(self.positions, model, "PrefixTuning", self.active_virtual_tokens(), shape[1],
                                "the input")
            cache = self.fill(cache, model, shape[0])
        else:
            check_positions_fit(self.positions, model, "PrefixTuning", self.active_virtual_tokens(),
                                cached_length(cache) - self.active_virtual_tokens() + shape[1], GENERATED)
        kwargs[self._cache_argument] = cache
        n = self.active_virtual_tokens()
        _check_no_router_loss_over_a_widened_mask(model, kwargs)
        widen_attention_mask(kwargs, n, cached_length(cache) + shape[1])
        shift_position_ids(kwargs, n, with_virtual=False)
        return (), kwargs

    def after_forward(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        """Keep the prefix cache private to a call made with ``use_cache=False``, as the base model keeps its own."""
        if self.active_adapters and kwargs.get("use_cache") is False and isinstance(output, dict):
            for name in CACHE_ARGUMENTS:
                if output.get(name) is not None:
                    output[name] = None
        return output

    def fill(self, cache: Any, model: nn.Module, batch: int) -> Any:
        """Write the active prefixes into an empty ``cache``, or into a new ``DynamicCache`` when none is given."""
        from transformers import DynamicCache

        if cache is None:
            cache = DynamicCache(config=model.config)
        values = self.active_values().to(input_embedding_weight(model).dtype)
        for layer, (key, value) in enumerate(self.key_values(values, batch)):
            cache.update(key, value, layer)
        mark_prefix_cache(cache, cached_length(cache))
        return cache


def _check_no_router_loss_over_a_widened_mask(model: nn.Module, kwargs: dict[str, Any]) -> None:
    """Refuse a mixture-of-experts forward whose router loss transformers computes with the attention mask the
    prefix widens: its router logits cover the real tokens only (a shape error deep in the model, as in peft)."""
    wanted = kwargs.get("output_router_logits")
    if wanted is None:
        wanted = getattr(model.config, "output_router_logits", False)
    if wanted and kwargs.get("attention_mask") is not None:
        raise ValueError(f"PrefixTuning cannot train {type(model).__name__} with output_router_logits=True and an "
                         "attention mask: transformers computes the router's load-balancing loss with the mask the "
                         "prefix widens. Set model.config.output_router_logits = False, or train PromptTuning or "
                         "LoRA")


class PrefixTuning(PEFTCallback):
    """Train keys and values of ``num_virtual_tokens`` virtual tokens in every attention layer (prefix tuning).

    For decoder-only transformers models (Llama, GPT-2, ...) whose forward takes a key/value
    cache: the prefix goes in as that cache, so the input and the outputs keep their shape. Trains
    ``tokens * layers * 2 * kv_dim`` values (``kv_dim`` = key/value heads x head size), or with
    ``projection=True`` an embedding ``tokens x hidden`` and the MLP
    ``Linear(hidden, p) -> tanh -> Linear(p, layers * 2 * kv_dim)`` (``p = projection_dim or hidden``)
    that computes them; call `fold` after training to keep only the computed prefix. Nothing
    merges into the base weights (`merge` raises a ValueError), and gradient checkpointing is
    refused while training. Saved in Hugging Face peft's prefix-tuning layout (the computed prefix).

    Args:
        num_virtual_tokens: length of the prefix, a positive integer.
        projection: train the prefix through the MLP (peft's ``prefix_projection``); ``False``
            trains the prefix values directly.
        projection_dim: the MLP's hidden width ``p``, a positive integer; ``None`` uses the
            model's hidden size. Needs ``projection=True``.
        modules_to_save: whole modules (a new head, say) trained fully and saved with the prefix,
            named as ``target_modules`` name them (suffixes or a full-match regex).
        adapter_name: name of this prefix; several prefixes with different names can live on one
            model, and the active ones are attended in the order they are active.
        checkpoint: ``"adapter"`` keeps checkpoints to the tensors that PEFT methods train,
            ``"full"`` keeps the whole model (one ``"full"`` method in a Trainer is enough for that).

    Raises:
        ValueError: when ``num_virtual_tokens``, ``projection_dim`` or ``checkpoint`` is not an
            allowed value, or ``projection_dim`` is given with ``projection=False``.
        TypeError: at setup (or `inject`), when the module holds no transformers model, or its
            model is an encoder-decoder or takes no key/value cache.

    Examples:
        ```python
        import lightning as L
        from lightning_peft import PrefixTuning

        prefix = PrefixTuning(num_virtual_tokens=20)
        L.Trainer(callbacks=[prefix]).fit(module)
        prefix.fold(module)  # keep the computed prefix, drop the MLP
        ```
    """

    method_name = "PrefixTuning"
    peft_format = PREFIX_TUNING_FORMAT

    def __init__(
        self,
        num_virtual_tokens: int = 20,
        projection: bool = True,
        projection_dim: int | None = None,
        modules_to_save: Sequence[str] | None = None,
        adapter_name: str = "default",
        checkpoint: CheckpointPolicy = "adapter",
    ) -> None:
        super().__init__(adapter_name=adapter_name, checkpoint=checkpoint, modules_to_save=modules_to_save)
        check_positive_int("PrefixTuning", "num_virtual_tokens", num_virtual_tokens)
        if projection_dim is not None:
            check_positive_int("PrefixTuning", "projection_dim", projection_dim)
        if projection_dim is not None and not projection:
            raise ValueError("PrefixTuning projection_dim needs projection=True")
        self.num_virtual_tokens, self.projection, self.projection_dim = num_virtual_tokens, projection, projection_dim

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_data_fits_positions(trainer, require_transformers_model(pl_module, "PrefixTuning"), self.owner,
                                  self.num_virtual_tokens)
        super().on_fit_start(trainer, pl_module)

    def inject_into(self, module: nn.Module) -> list[nn.Parameter]:
        model = require_transformers_model(module, "PrefixTuning")
        warn_of_other_models(module, self.owner)
        _check_decoder_with_cache(model)
        injector = prefix_injector(model)
        embedding = input_embedding_weight(model)
        width = (self.projection_dim or embedding.shape[1]) if self.projection else None
        encoder = PrefixEncoder(self.num_virtual_tokens, injector.shape.width, embedding.shape[1], width,
                                embedding.device)
        injector.register_adapter(self.adapter_name, encoder)
        return list(encoder.parameters())

    def fold(self, module: nn.Module) -> nn.Module:
        """Replace this adapter's MLP in ``module`` by the prefix it computes (outputs stay the same).

        Afterwards the adapter holds what ``projection=False`` holds, ``tokens * layers * 2 * kv_dim``
        values, and saves and loads like it. Fold after training: an optimizer built before keeps
        the MLP's parameters.
        """
        encoder = prefix_injector(require_transformers_model(module, "PrefixTuning")).adapters[self.adapter_name]
        claim(module, self.ref, [encoder.fold()])
        return module


def _check_decoder_with_cache(model: nn.Module) -> None:
    """Refuse models where a prefix cache cannot go: encoder-decoders and forwards that take no cache."""
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        raise TypeError(f"PrefixTuning supports decoder-only models; {name} is an encoder-decoder, whose encoder "
                        "and decoder would each need their own prefix")
    if cache_argument(model) is None:
        raise TypeError(f"PrefixTuning needs a model whose forward takes a key/value cache (decoder-only models such "
                        f"as Llama or GPT-2); {name}.forward takes none. Use PromptTuning instead")
    text = model.config.get_text_config()
    if getattr(text, "num_attention_heads", None) is None:
        raise TypeError(f"PrefixTuning puts keys and values before each attention layer's; {name} has no attention "
                        "heads (a state-space model such as Mamba, whose cache holds states). Use PromptTuning instead")
    other = _layers_without_a_plain_cache(text)
    if other:
        raise TypeError(f"PrefixTuning puts the same keys and values before every layer's; {name} has {other}, "
                        "whose cache holds something else. Use PromptTuning or LoRA instead")


def _layers_without_a_plain_cache(text: Any) -> str | None:
    """What makes a config's layers other than attention with one key/value shape: state-space or linear-attention
    layers (hybrids), compressed keys and values (MLA), shared key/value layers or per-layer head sizes."""
    kinds = [str(kind) for key in ("layer_types", "layers_block_type", "block_types")
             for kind in (getattr(text, key, None) or [])]
    others = sorted({kind for kind in kinds if "attention" not in kind or "linear" in kind})
    if others:
        return f"layers of kind {', '.join(others)}"
    if getattr(text, "kv_lora_rank", None):
        return "compressed keys and values (multi-head latent attention)"
    if getattr(text, "num_kv_shared_layers", 0):
        return "layers that share another layer's keys and values"
    shapes = {(getattr(layer, "head_dim", None), getattr(layer, "num_key_value_heads", None))
              for layer in getattr(text, "per_layer_config", None) or []}
    if len(shapes) > 1:
        return "layers of other key/value head sizes"
    return None


def prefix_injector(model: nn.Module) -> PrefixInjector:
    """The ``prefix_tuning`` part of ``model``, created (and its hooks installed) on first use."""
    if not isinstance(getattr(model, "prefix_tuning", None), PrefixInjector):
        model.prefix_tuning = PrefixInjector(model, KVShape.of(model.config))
    return model.prefix_tuning


def _checkpointed(model: nn.Module) -> bool:
    """Whether transformers recomputes the model's layers in backward (the name changed in transformers 5)."""
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return bool(getattr(model, name, False))
