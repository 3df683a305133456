"""Prompt tuning: trainable embeddings of virtual tokens, put before the input embeddings.

A forward pre-hook on the transformers model turns ``input_ids`` into ``inputs_embeds`` with the
prompt in front (attention mask, position and token-type ids widened, labels padded with -100),
and a forward hook cuts the virtual positions back off the outputs that have a sequence
dimension, so logits keep the input's shape and existing training code runs unchanged.
Generation works too: a call whose cache already holds positions is a later decoding step, whose
cache already contains the prompt, so only its mask and positions are widened.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from lightning_peft.additive.prompt_formats import PROMPT_TUNING_FORMAT
from lightning_peft.additive.soft_prompts import (
    GENERATED,
    cached_length,
    check_cache_grows,
    check_data_fits_positions,
    check_positions_fit,
    decoder_argument,
    encoder_decoder,
    first_position,
    gather_if_sharded,
    given_cache,
    holds_only_a_prefix,
    input_shape,
    keep_last_positions,
    named_forward_arguments,
    prepend_to_token_inputs,
    shift_position_ids,
    widen_attention_mask,
)
from lightning_peft.core.checks import check_choice, check_positive_int
from lightning_peft.core.layer import PEFTModule, adapter_dtype
from lightning_peft.core.models import (
    input_embedding_weight,
    learned_positions,
    require_token_model,
    warn_of_other_models,
)
from lightning_peft.lightning.callback import CheckpointPolicy, PEFTCallback

PromptInit = Literal["random", "vocab", "text"]
INITS = ("random", "vocab", "text")


class Prompt(nn.Module):
    """One adapter's soft prompt: ``(num_virtual_tokens, hidden)`` trainable embeddings."""

    def __init__(self, prompt: Tensor) -> None:
        super().__init__()
        self.prompt = nn.Parameter(prompt)


@dataclass(frozen=True)
class RowPrompts:
    """The soft prompt before each row: ``embeds`` ``(batch, n, hidden)``, each row's prompt first, zeros after.

    ``lengths`` (per row) is None when every row's prompt fills all ``n`` positions. Otherwise each
    row is packed as its prompt, its tokens, then padding that attention masks out: every real
    token sits where it would sit with its row's prompt alone (first-token pooling reads the same).
    """

    embeds: Tensor
    lengths: Tensor | None = None

    @property
    def width(self) -> int:
        return self.embeds.shape[1]

    def real_positions(self, length: int) -> Tensor:
        """``(batch, length)``: where each row's real tokens sit once packed."""
        return self.lengths[:, None] + torch.arange(length, device=self.lengths.device)

    def pack(self, kwargs: dict[str, Any], shape: tuple[int, int], positions: Tensor | None,
             is_encoder_decoder: bool, first: int = 0) -> None:
        """Turn inputs laid out as ``[prompt block, tokens]`` into ``[prompt, tokens, padding]`` per row.

        An encoder-decoder's decoder inputs stay as they are, whatever their length.
        """
        batch, length = shape
        n, lengths = self.width, self.lengths[:, None]
        virtual = torch.arange(n, device=lengths.device) < lengths
        mask = kwargs.get("attention_mask")
        real_mask = mask[:, n:] if mask is not None else virtual.new_ones(batch, length)
        kwargs["attention_mask"] = torch.cat([virtual.to(real_mask.dtype), real_mask], dim=1)
        if positions is not None:
            virtual_positions = torch.arange(first, first + n, device=positions.device).expand(batch, n)
            kwargs["position_ids"] = torch.cat([virtual_positions, positions + lengths.to(positions.dtype)], dim=1)
        t = torch.arange(n + length, device=lengths.device)
        source = torch.where(t < lengths, t, torch.where(t < lengths + length, t - lengths + n, t - length))
        for key, value in kwargs.items():
            if is_encoder_decoder and decoder_argument(key):
                continue
            if isinstance(value, Tensor) and value.dim() >= 2 and tuple(value.shape[:2]) == (batch, n + length):
                index = source.view(batch, n + length, *[1] * (value.dim() - 2)).expand_as(value)
                kwargs[key] = value.gather(1, index)


class PromptInjector(PEFTModule):
    """The prompts of one transformers model, and the hooks that put the active ones before its inputs.

    Active prompts go in front in the order they are active; with none active (``disable_adapters``)
    the model computes what its base computes. Under `per_row_adapters` each row gets its own
    adapter's prompt (or none).
    """

    method = "PromptTuning"
    per_row = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        # per call in flight: (prompted length, real length, per-row real positions when packed, tuple output)
        self._lengths: list[tuple[int, int, Tensor | None, bool] | None] = []
        self.positions = learned_positions(model)  # the learned position table's size, if the model has one
        hooked = prompted_module(model)
        self.takes_positions = "position_ids" in inspect.signature(hooked.forward).parameters
        self.first_position = first_position(model)
        hooked.register_forward_pre_hook(self.before_forward, with_kwargs=True)
        hooked.register_forward_hook(self.after_forward, with_kwargs=True, always_call=True)

    def packs_rows(self) -> bool:
        if self.row_adapters is None:
            return False
        held = {name: adapter.prompt.shape[0] for name, adapter in self.adapters.items()}
        return len({held.get(name, 0) for name in self.row_adapters.names}) > 1

    def active_prompt(self) -> Tensor | None:
        """The active prompts one after the other, ``(virtual tokens, hidden)``, or None when none is active."""
        prompts = [self.adapters[name].prompt for name in self.active_adapters]
        return torch.cat(prompts) if prompts else None

    def prompts_for(self, batch: int) -> RowPrompts | None:
        """The prompt before each of ``batch`` rows, or None when no row gets one."""
        if self.row_adapters is None:
            prompt = self.active_prompt()
            return None if prompt is None else RowPrompts(prompt.unsqueeze(0).expand(batch, -1, -1))
        if not self.adapters:
            return None
        first = next(iter(self.adapters.values())).prompt
        groups = self.row_adapters.row_sets(self, first.new_empty(batch, 0))  # the rows' prompts, not all held
        if not groups:
            return None
        width = max(adapter.prompt.shape[0] for adapter, _ in groups)
        embeds = first.new_zeros(batch, width, first.shape[1])
        lengths = torch.zeros(batch, dtype=torch.long, device=first.device)
        for adapter, rows in groups:
            n = adapter.prompt.shape[0]
            padded = torch.cat([adapter.prompt, first.new_zeros(width - n, first.shape[1])])
            rows.put(embeds, padded.expand(len(rows), -1, -1))
            rows.put(lengths, lengths.new_full((len(rows),), n))
        return RowPrompts(embeds, None if bool((lengths == width).all()) else lengths)

    def _check_encoder_ran_here(self, model: nn.Module, kwargs: dict[str, Any], shape: tuple | None) -> None:
        """Refuse encoder outputs made elsewhere (``generate`` runs the encoder by itself): they lack the prompt."""
        given = kwargs.get("encoder_outputs")
        if not encoder_decoder(model) or given is None or shape is not None:
            return
        if self.prompts_for(given[0].shape[0]) is not None:
            raise ValueError("PromptTuning on an encoder-decoder puts the prompt before the encoder's input, but these "
                             "encoder_outputs were computed without it (generate runs the encoder by itself); call "
                             "the model with input_ids or inputs_embeds, or decode step by step")

    def before_forward(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        gather_if_sharded(self)
        kwargs = named_forward_arguments(model, args, kwargs)
        shape = input_shape(kwargs)
        prompts = None if shape is None else self.prompts_for(shape[0])
        self._check_encoder_ran_here(model, kwargs, shape)
        cache, is_encoder_decoder = given_cache(kwargs), encoder_decoder(model)
        if prompts is not None and not is_encoder_decoder:  # an encoder-decoder's cache is its decoder's, unprompted
            check_cache_grows(cache)
        # an encoder-decoder's cache is its decoder's: the encoder, and so its prompt, runs at every call
        cached = 0 if is_encoder_decoder else cached_length(cache)
        if prompts is not None and holds_only_a_prefix(cache):
            raise ValueError("PromptTuning and PrefixTuning adapters are active together, and the prefix went in "
                             "first, so the prompt would be skipped: activate one at a time, or inject PromptTuning "
                             "first (into a decoder-only language model)")
        if prompts is not None and prompts.lengths is not None and cache is not None:
            raise ValueError("per_row_adapters cannot generate with prompts of different lengths in one batch "
                             "(or rows without a prompt): generate each group of equal prompt length separately")
        kept_logits = next((kwargs[k] for k in ("logits_to_keep", "num_logits_to_keep") if k in kwargs), 0)
        if prompts is not None and prompts.lengths is not None and not _keeps_every_logit(kept_logits):
            raise ValueError("per_row_adapters with prompts of different lengths in one batch (or rows without a "
                             "prompt) ends rows in padding, so logits_to_keep would keep padding; leave it out, or "
                             "run each group of equal prompt length separately")
        prompted = prompts is not None and not cached
        kept = None if not prompted or prompts.lengths is None else prompts.real_positions(shape[1])
        as_tuple = prompted and is_encoder_decoder and not kwargs.get("return_dict",
                                                                           getattr(model.config, "return_dict", True))
        if as_tuple:  # the encoder's outputs are cut by name, then the output goes back as the tuple asked for
            kwargs["return_dict"] = True
        self._lengths.append((prompts.width + shape[1], shape[1], kept, as_tuple) if prompted else None)
        if prompts is None:  # nothing to put in front, or nothing to put it before
            return (), kwargs
        if self.takes_positions and not is_encoder_decoder:
            number_past_left_padding(kwargs, (cached - prompts.width if cached else 0) + shape[1], shape[1],
                                     self.first_position)
        if cached:  # a later decoding step: the cache holds the prompt already
            check_positions_fit(self.positions, model, "PromptTuning", prompts.width,
                                cached - prompts.width + shape[1], GENERATED)
            widen_attention_mask(kwargs, prompts.width, cached + shape[1])
            shift_position_ids(kwargs, prompts.width, with_virtual=False)
        else:
            check_positions_fit(self.positions, model, "PromptTuning", prompts.width, shape[1], "the input")
            prepend(model, kwargs, prompts, shape, self.first_position)
        return (), kwargs

    def after_forward(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        lengths = self._lengths.pop() if self._lengths else None
        if lengths is None or output is None:
            return output
        total, length, kept, as_tuple = lengths
        output = keep_last_positions(output, total, length, kept, encoder_only=encoder_decoder(model))
        return output.to_tuple() if as_tuple else output


def number_past_left_padding(kwargs: dict[str, Any], length: int, new: int, first: int = 0) -> None:
    """Give left-padded rows position ids that count their attended tokens only, where none are given.

    The prompt goes before the padding, so without them the padding would stand between a row's
    prompt and its tokens and change what the row computes (``generate`` passes such ids itself).
    ``length``: the real tokens' count so far, which a mask of the caller's own covers; ``new``: this call's;
    ``first``: the model's first position id (`first_position`).
    """
    mask = kwargs.get("attention_mask")
    if (kwargs.get("position_ids") is not None or not isinstance(mask, Tensor) or mask.dim() != 2
            or mask.shape[1] != length or bool(mask[:, 0].all())):
        return
    positions = mask.long().cumsum(-1) - 1 + first
    kwargs["position_ids"] = positions.masked_fill(mask == 0, first + 1)[:, -new:]


def prepend(model: nn.Module, kwargs: dict[str, Any], prompts: RowPrompts, shape: tuple[int, int],
            first: int = 0) -> None:
    """Put each row's prompt before its input embeddings and widen everything aligned with them (given position
    ids: the prompt's numbered from ``first``, the model's first position)."""
    n = prompts.width
    embeds = kwargs.pop("inputs_embeds", None)
    ids = kwargs.pop("input_ids", None)
    if embeds is None:
        embeds = model.get_input_embeddings()(ids)
    kwargs["inputs_embeds"] = torch.cat([prompts.embeds.to(embeds.dtype), embeds], 1)
    positions = kwargs.get("position_ids")
    widen_attention_mask(kwargs, n, n + shape[1])
    shift_position_ids(kwargs, n, with_virtual=True, first=first)
    is_encoder_decoder = encoder_decoder(model)
    prepend_to_token_inputs(kwargs, n, shape, is_encoder_decoder)
    if prompts.lengths is not None:
        prompts.pack(kwargs, shape, positions, is_encoder_decoder, first)


class PromptTuning(PEFTCallback):
    """Train a soft prompt: ``num_virtual_tokens`` embeddings put before every input (tokens x hidden parameters).

    For transformers text models that read token ids through an embedding. A hook on the model
    puts the prompt before the input embeddings (attention mask, position and token-type ids
    widened, token labels padded with -100) and cuts the virtual positions off the outputs, so
    logits keep the input's shape and training code runs unchanged; ``generate`` works too.
    Nothing merges into the base weights (`merge` raises a ValueError). The prompt is saved in
    Hugging Face peft's prompt-tuning layout (in lightning-peft's own for encoder-decoder models).

    Args:
        num_virtual_tokens: length of the soft prompt, a positive integer.
        init_text: text whose token embeddings start the prompt, repeated or cut to
            ``num_virtual_tokens`` tokens.
        init: how the prompt starts: ``"random"`` (normal, with the embedding matrix's std),
            ``"vocab"`` (the embeddings of random vocabulary entries) or ``"text"`` (from
            ``init_text``). ``None`` means ``"text"`` when ``init_text`` is given, else ``"random"``.
        tokenizer: tokenizes ``init_text`` (called as ``tokenizer(text)["input_ids"]``); ``None``
            takes the LightningModule's ``tokenizer`` attribute. It is not saved with the adapter.
        modules_to_save: whole modules (a new classification head, say) trained fully and saved
            with the prompt, named as ``target_modules`` name them (suffixes or a full-match regex).
        adapter_name: name of this prompt; several prompts with different names can live on one
            model, and the active ones go in front in the order they are active.
        checkpoint: ``"adapter"`` keeps checkpoints to the tensors that PEFT methods train,
            ``"full"`` keeps the whole model (one ``"full"`` method in a Trainer is enough for that).

    Raises:
        ValueError: when ``num_virtual_tokens``, ``init`` or ``checkpoint`` is not an allowed value,
            ``init="text"`` comes without ``init_text``, or another ``init`` with it. At setup (or `inject`), for
            ``init="text"``: when there is no tokenizer, or ``init_text`` gives no tokens.
        TypeError: at setup (or `inject`), when the module holds no transformers model, or its model
            does not read token ids through a single ``nn.Embedding``.

    Examples:
        ```python
        import lightning as L
        from lightning_peft import PromptTuning

        prompt = PromptTuning(num_virtual_tokens=20, init_text="Classify the sentiment of this review:")
        trainer = L.Trainer(callbacks=[prompt])  # the text is tokenized by the module's `tokenizer`
        ```
    """

    method_name = "PromptTuning"
    peft_format = PROMPT_TUNING_FORMAT

    def __init__(
        self,
        num_virtual_tokens: int = 20,
        init_text: str | None = None,
        init: PromptInit | None = None,
        tokenizer: Any = None,
        modules_to_save: Sequence[str] | None = None,
        adapter_name: str = "default",
        checkpoint: CheckpointPolicy = "adapter",
    ) -> None:
        super().__init__(adapter_name=adapter_name, checkpoint=checkpoint, modules_to_save=modules_to_save)
        check_positive_int("PromptTuning", "num_virtual_tokens", num_virtual_tokens)
        init = init or ("text" if init_text is not None else "random")
        check_choice("PromptTuning", "init", init, INITS)
        if init == "text" and not init_text:
            raise ValueError("PromptTuning init='text' needs init_text")
        if init != "text" and init_text is not None:
            raise ValueError(f"PromptTuning init_text is read only with init='text', not {init!r}")
        self.num_virtual_tokens, self.init_text, self.init = num_virtual_tokens, init_text, init
        self._tokenizer = tokenizer  # a tool, not a setting: kept out of the saved config

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_data_fits_positions(trainer, require_token_model(pl_module, "PromptTuning"), self.owner,
                                  self.num_virtual_tokens)
        super().on_fit_start(trainer, pl_module)

    def inject_into(self, module: nn.Module) -> list[nn.Parameter]:
        model = require_token_model(module, "PromptTuning")
        check_prompts_fit(model)
        warn_of_other_models(module, self.owner)
        prompt = Prompt(self.initial_prompt(model, module))
        prompt_injector(model).register_adapter(self.adapter_name, prompt)
        return [prompt.prompt]

    @torch.no_grad()
    def initial_prompt(self, model: nn.Module, module: nn.Module) -> Tensor:
        """The starting prompt, ``(num_virtual_tokens, hidden)``, in float32 unless the embedding is wider."""
        weight = input_embedding_weight(model)
        dtype = adapter_dtype(weight)
        n = self.num_virtual_tokens
        if self.init == "random":
            return torch.randn(n, weight.shape[1], device=weight.device, dtype=dtype) * weight.float().std()
        if self.init == "vocab":
            ids = torch.randint(0, weight.shape[0], (n,), device=weight.device)
        else:
            ids = torch.tensor(self.text_token_ids(module), device=weight.device)
        return model.get_input_embeddings()(ids).to(dtype).clone()

    def text_token_ids(self, module: nn.Module) -> list[int]:
        """``init_text`` tokenized, repeated or cut to ``num_virtual_tokens`` ids (as peft does)."""
        tokenizer = self._tokenizer or getattr(module, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("PromptTuning init='text' needs a tokenizer: pass PromptTuning(tokenizer=...) or give "
                             "the LightningModule a `tokenizer` attribute")
        ids = list(tokenizer(self.init_text)["input_ids"])
        if not ids:
            raise ValueError(f"PromptTuning init_text {self.init_text!r} tokenizes to no tokens")
        return (ids * math.ceil(self.num_virtual_tokens / len(ids)))[: self.num_virtual_tokens]


def check_prompts_fit(model: nn.Module) -> None:
    """Refuse, at injection, models whose tokens after a soft prompt would compute wrongly or fail at the first step."""
    name = type(model).__name__
    if name.endswith(("ForQuestionAnswering", "ForMultipleChoice")):
        raise TypeError(f"PromptTuning cannot adapt {name}: its answer positions (or choices, a third dimension of "
                        "the ids) index the tokens that a prompt in front would shift; use LoRA, IA3 or Adapter")
    if getattr(model.config, "is_encoder_decoder", False) and name.endswith("ForSequenceClassification"):
        raise TypeError(f"PromptTuning cannot adapt {name}: it finds each row's end in its input ids and takes no "
                        "input embeddings; use LoRA, IA3 or Adapter")
    scale = _token_embedding_scale(model)
    if scale is not None:
        raise TypeError(f"PromptTuning cannot adapt {name}: it scales token embeddings by {scale:.4g} only when it "
                        "computes them from input ids (config.scale_embedding or embedding_multiplier), so every "
                        "token after a prompt would enter unscaled (peft's prompt tuning has this flaw); use LoRA, "
                        "IA3, Adapter or PrefixTuning")


def _token_embedding_scale(model: nn.Module) -> float | None:
    """The factor a module of ``model`` multiplies its token embeddings by when it looks them up itself (Marian's
    ``embed_scale``, Falcon-H1's ``embedding_multiplier``), where it is not 1."""
    embedding = model.get_input_embeddings()
    for module in model.modules():
        if getattr(module, "embed_tokens", None) is embedding:
            for attribute in ("embed_scale", "embedding_multiplier"):
                value = module.__dict__.get(attribute)
                if isinstance(value, (int, float)) and value != 1:
                    return float(value)
    return None


def prompted_module(model: nn.Module) -> nn.Module:
    """The module whose input the prompt goes before: the model, or a decoder classifier's body.

    A decoder's sequence classifier (``score`` head) pools each row's last token that is not
    padding, found in ``input_ids`` after its body ran; given embeddings it takes the last
    position, padding or not. Prompting its body keeps the ids where the head reads them.
    """
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    pools_last_token = type(model).__name__.endswith("ForSequenceClassification") and hasattr(model, "score")
    return body if pools_last_token and isinstance(body, nn.Module) and body is not model else model


def prompt_injector(model: nn.Module) -> PromptInjector:
    """The ``prompt_tuning`` part of ``model``, created (and its hooks installed) on first use."""
    if not isinstance(getattr(model, "prompt_tuning", None), PromptInjector):
        model.prompt_tuning = PromptInjector(model)
    return model.prompt_tuning


def _keeps_every_logit(kept: Any) -> bool:
    """Whether a model's ``logits_to_keep`` argument keeps every position (0, transformers' default)."""
    return isinstance(kept, int) and kept == 0
