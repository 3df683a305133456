"""What prompt and prefix tuning share: the transformers model they hook, and its reshaped inputs.

Both methods change what a transformers model sees through a forward pre-hook, so that user code
that calls ``model(input_ids=...)`` or ``model.generate(...)`` works unchanged. The helpers here
name every argument of a forward call, read the cache it carries, and widen the 2D masks and
position/token-type ids by ``n`` virtual positions placed before the real ones.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from lightning_peft.core.models import POSITION_TABLES, learned_positions, row_lengths

CACHE_ARGUMENTS = ("cache", "past_key_values")  # transformers 5 name, then the deprecated one


@dataclass(frozen=True)
class KVShape:
    """The key/value geometry of a decoder: layers, key/value heads (fewer with GQA) and head size."""

    layers: int
    heads: int
    head_dim: int

    @property
    def width(self) -> int:
        """Prefix values per virtual token: a key and a value per layer, ``layers * 2 * kv_dim``."""
        return self.layers * 2 * self.heads * self.head_dim

    @classmethod
    def of(cls, config: Any) -> KVShape:
        text = config.get_text_config()
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(text.num_hidden_layers, _key_value_heads(text), head_dim)


def _key_value_heads(text: Any) -> int:
    """Key/value heads as the cache holds them: ``num_key_value_heads`` (GQA), else every head, but one for Falcon's
    older multi-query layout (its newer one broadcasts its key/value heads to every head before caching)."""
    if getattr(text, "num_key_value_heads", None):
        return text.num_key_value_heads
    older_falcon = getattr(text, "new_decoder_architecture", None) is False
    return 1 if older_falcon and text.multi_query else text.num_attention_heads


def named_forward_arguments(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a forward call, all by name, so that a hook can read and replace any of them."""
    if not args:
        return dict(kwargs)
    positional = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(positional):
        raise TypeError(f"{type(model).__name__}.forward takes {len(positional)} positional arguments, got {len(args)}")
    return {**dict(zip(positional, args, strict=False)), **kwargs}


def cache_argument(model: nn.Module) -> str | None:
    """The name under which ``model.forward`` takes a key/value cache, or None if it takes none."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in CACHE_ARGUMENTS if name in parameters), None)


def given_cache(kwargs: dict[str, Any]) -> Any:
    """The cache passed to the call, under either name, or None."""
    return next((kwargs[name] for name in CACHE_ARGUMENTS if kwargs.get(name) is not None), None)


def check_cache_grows(cache: Any) -> None:
    """Refuse a fixed-length (static) cache: generate sized it to the input and the new tokens, with no room left
    for virtual ones."""
    if any(hasattr(layer, "max_cache_len") for layer in getattr(cache, "layers", None) or ()):  # StaticLayer's
        raise ValueError("soft prompts need a cache that grows, and generate was given a static one (sized to the "
                         "input and the new tokens, with no room for the virtual tokens): leave cache_implementation "
                         "unset")


_PREFIX_LENGTH = "_lightning_peft_prefix_length"  # on a cache PrefixTuning filled: the prefix's length


def mark_prefix_cache(cache: Any, length: int) -> None:
    """Note on ``cache`` that it holds PrefixTuning's prefix of ``length`` positions and nothing else yet."""
    setattr(cache, _PREFIX_LENGTH, length)


def holds_only_a_prefix(cache: Any) -> bool:
    """Whether ``cache`` is one PrefixTuning filled in this call, before any token: not a later decoding step."""
    return cache is not None and cached_length(cache) == getattr(cache, _PREFIX_LENGTH, None)


def cached_length(cache: Any) -> int:
    """How many positions ``cache`` already holds (0 for no cache or an empty one)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        try:
            return cache.get_seq_length()
        except ValueError:  # a state-space model's cache (Mamba's) holds states, not positions: 1 once it holds any
            return int(cache.has_previous_state())
    return cache[0][0].shape[-2]  # legacy tuple of (key, value) per layer


def input_shape(kwargs: dict[str, Any]) -> tuple[int, int] | None:
    """(batch, sequence length) of the call's tokens, from ``input_ids`` or ``inputs_embeds``."""
    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    return None if tokens is None else (tokens.shape[0], tokens.shape[1])


def first_position(model: nn.Module) -> int:
    """The position id of a model's first token: RoBERTa-likes index their table past its padding row with the ids
    as given (``padding_idx + 1``); others count from 0 (OPT and BART add their offset to given ids themselves)."""
    return next((table.padding_idx + 1 for name, table in model.named_modules()
                 if isinstance(table, nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLES
                 and table.padding_idx is not None and not hasattr(table, "offset")), 0)


GENERATED = "the input and the tokens generated after it: generate fewer (max_new_tokens)"


def check_positions_fit(table: int | None, model: nn.Module, method: str, virtual: int, length: int,
                        source: str) -> None:
    """Refuse ``virtual`` tokens before ``length`` real ones that overrun ``model``'s learned position table.

    ``table``: its `learned_positions`, found once (a forward's hook must not walk the model).
    """
    if table is not None and virtual + length > table:
        raise ValueError(f"{method}: {virtual} virtual tokens + {length} tokens ({source}) need {virtual + length} "
                         f"positions, but {type(model).__name__} has {table} learned positions: keep inputs to at "
                         f"most {table - virtual} tokens (a smaller max_length or block_size), or use fewer virtual "
                         "tokens")


def check_data_fits_positions(trainer: Any, model: nn.Module, method: str, virtual: int) -> None:
    """Refuse, before training, a data module whose longest rows would overrun the position table mid-run."""
    data = getattr(trainer, "datamodule", None)
    for _, length in row_lengths(data):
        check_positions_fit(learned_positions(model), model, method, virtual, length,
                            f"the data's {type(data).__name__} max_length/block_size")


def widen_attention_mask(kwargs: dict[str, Any], n: int, attended_length: int) -> None:
    """Let the tokens attend to ``n`` virtual positions: prepend ones to a 2D mask shorter than ``attended_length``."""
    mask = kwargs.get("attention_mask")
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        got = f"one of shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else f"a {type(mask).__name__}"
        raise ValueError(f"soft prompts extend 2D attention masks (batch, tokens) only; got {got}. generate with a "
                         "static cache builds such masks itself: leave cache_implementation unset")
    if mask.shape[1] < attended_length:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def shift_position_ids(kwargs: dict[str, Any], n: int, with_virtual: bool, first: int = 0) -> None:
    """Move given position ids ``n`` places on; with ``with_virtual``, number the virtual positions first, from
    ``first`` (the model's `first_position`)."""
    positions = kwargs.get("position_ids")
    if positions is None:
        return
    shifted = positions + n
    if with_virtual:
        virtual = torch.arange(first, first + n, dtype=positions.dtype, device=positions.device).expand(
            *positions.shape[:-1], n)
        shifted = torch.cat([virtual, shifted], dim=-1)
    kwargs["position_ids"] = shifted


def encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model`` is an encoder-decoder, whose labels and ``decoder_*`` inputs and outputs are the decoder's."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def decoder_argument(key: str) -> bool:
    """Whether an encoder-decoder's argument ``key`` goes to its decoder, which gets no prompt."""
    return key == "labels" or key.startswith("decoder_")


def prepend_to_token_inputs(kwargs: dict[str, Any], n: int, shape: tuple[int, int],
                            is_encoder_decoder: bool) -> None:
    """Give ``n`` virtual positions token type 0 and label -100 (no loss), beside given token types and labels.

    An encoder-decoder's labels are its decoder's, which gets no prompt: they stay as they are.
    """
    batch, length = shape
    token_types = kwargs.get("token_type_ids")
    if token_types is not None:
        kwargs["token_type_ids"] = torch.cat([token_types.new_zeros(batch, n), token_types], dim=1)
    labels = kwargs.get("labels")
    if not is_encoder_decoder and _is_token_labels(labels, shape):  # sequence-level labels (classification) stay
        kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)


def keep_last_positions(output: Any, total: int, length: int, index: Tensor | None = None,
                        encoder_only: bool = False) -> Any:
    """Cut every tensor of ``output`` whose dim 1 has ``total`` positions to its last ``length`` ones.

    With ``index`` (``(batch, length)``), each row keeps the positions that its row of ``index`` names.
    With ``encoder_only`` (an encoder-decoder), only the encoder's outputs are cut, found by name.
    """
    if isinstance(output, Tensor):
        if output.dim() < 3 or output.shape[1] != total:
            return output
        if index is None:
            return output[:, -length:]
        return output.gather(1, index.view(*index.shape, *[1] * (output.dim() - 2)).expand(-1, -1, *output.shape[2:]))
    if isinstance(output, dict):  # transformers' ModelOutput; its attention maps keep all positions
        for key in [k for k in output if not k.endswith("attentions") and k not in ("cache", "past_key_values")]:
            if key.startswith("encoder_") or not encoder_only:
                output[key] = keep_last_positions(output[key], total, length, index)
        return output
    if isinstance(output, tuple) and not hasattr(output, "get_seq_length") and not encoder_only:
        return type(output)(keep_last_positions(item, total, length, index) for item in output)
    return output


def _is_token_labels(labels: Any, shape: tuple[int, int]) -> bool:
    return (isinstance(labels, Tensor) and not labels.is_floating_point() and labels.dim() == 2
            and tuple(labels.shape) == shape)


def gather_if_sharded(part: nn.Module) -> None:
    """Gather an FSDP2-sharded prompt or prefix before a hook reads it: FSDP2 gathers a unit in its own forward,
    which these never run. It stays whole until the backward has reduced its gradients (FSDP2's last callback)."""
    if isinstance(part, FSDPModule):
        part.unshard()
