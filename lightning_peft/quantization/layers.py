"""bitsandbytes linear layers for a frozen base: build one from an nn.Linear, or put a plain one back.

Reading and writing their weights is :mod:`lightning_peft.core.weights`' job, shared with every method.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from lightning_peft.core.injection import ModulePlaces
from lightning_peft.core.merging import check_unmerged
from lightning_peft.core.models import transformers_models
from lightning_peft.core.ownership import owners
from lightning_peft.core.rollback import all_or_nothing
from lightning_peft.core.weights import (
    dequantized_weight,
    import_bitsandbytes,
    is_quantized,
    replace_quantized_weight,
)

MODES = ("int8", "nf4", "fp4")


def quantize_linear(layer: nn.Linear, mode: str, double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> nn.Module:
    """A bitsandbytes copy of ``layer`` with its weight in ``mode``, quantized on ``device``; the bias is shared.

    Only one layer's weight is ever copied, so quantizing a model layer by layer needs
    little more memory than the model itself.
    """
    import_bitsandbytes("QuantizeBase")  # one clear line when it is missing
    shape = (layer.in_features, layer.out_features, layer.bias is not None)
    from lightning_peft.quantization.frozen_layers import FrozenLinear4bit, FrozenLinear8bit  # bitsandbytes: optional

    if mode == "int8":
        quantized = FrozenLinear8bit(*shape, has_fp16_weights=False, threshold=6.0, device="meta")  # LLM.int8()
    else:
        quantized = FrozenLinear4bit(*shape, compute_dtype=compute_dtype, compress_statistics=double_quant,
                                     quant_type=mode, device="meta")
    for hook in (_quantize_a_full_precision_weight, _load_4bit_statistics):  # in this order; the second: 4-bit only
        quantized.register_load_state_dict_pre_hook(hook)
    replace_quantized_weight(quantized, layer.weight.detach().to(device or layer.weight.device), warn=False)
    bias = layer.bias  # the same Parameter: full precision, and a method that trains biases keeps it
    quantized.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(  # a pruned one: as
        bias.detach().clone(), requires_grad=False)  # computed now, as the quantized weight is
    return quantized.train(layer.training)  # bitsandbytes computes differently in eval mode


def describe_in_config(module: nn.Module, mode: str, double_quant: bool) -> None:
    """Write into each transformers model's config how its base is quantized, as transformers' own loading would.

    ``save_pretrained`` then writes a folder that ``from_pretrained`` loads quantized (bitsandbytes),
    with the same codes, rather than reading the codes as weights. Its layers left in full
    precision are listed as not to convert. A bitsandbytes entry already there (transformers
    quantized some layers on loading) is written afresh for the layers quantized now.
    """
    from transformers import BitsAndBytesConfig

    for _, model in transformers_models(module):
        layers = [(name, layer) for name, layer in model.named_modules() if isinstance(layer, nn.Linear)]
        if not _bitsandbytes_or_none(model) or not any(is_quantized(layer) for _, layer in layers):
            continue
        kept = [name.replace(".base_layer", "") for name, layer in layers if not is_quantized(layer)]
        model.config.quantization_config = BitsAndBytesConfig(
            load_in_8bit=mode == "int8", load_in_4bit=mode != "int8", bnb_4bit_quant_type=mode if mode != "int8"
            else "nf4", bnb_4bit_use_double_quant=double_quant, llm_int8_threshold=6.0, llm_int8_skip_modules=kept)


def forget_quantization(module: nn.Module) -> None:
    """Take the bitsandbytes entry out of the config of each transformers model in ``module`` that holds no
    quantized layer any more (dequantized, or a failed setup rolled back)."""
    for _, model in transformers_models(module):
        quantized = any(is_quantized(layer) for layer in model.modules())
        if getattr(model.config, "quantization_config", None) is not None and _bitsandbytes_or_none(model) \
                and not quantized:
            del model.config.quantization_config  # plain weights, which save_pretrained writes as such


def _bitsandbytes_or_none(model: nn.Module) -> bool:
    """Whether the model's config says nothing of quantization, or says bitsandbytes (not GGUF, say)."""
    found = getattr(model.config, "quantization_config", None)
    method = found.get("quant_method") if isinstance(found, dict) else getattr(found, "quant_method", None)
    return found is None or str(getattr(method, "value", method)) == "bitsandbytes"


def dequantize_base(module: nn.Module) -> nn.Module:
    """Put a full-precision nn.Linear back for every bitsandbytes layer of ``module`` (in place), in the dtype its
    model computes in now (a precision plugin may have cast the model since it was quantized, which leaves the codes
    and the dtype a 4-bit layer recorded as they were).

    For example, to merge exactly."""
    check_unmerged(module, "dequantize_base", "dequantize, then merge again (an exact merge)")
    dtypes, rest, places = _model_dtypes(module), _most_values_dtype(module), ModulePlaces(module)
    with all_or_nothing(module):  # a failure half-way (out of memory, say) leaves the base quantized as it was
        for _, layer in list(module.named_modules()):
            if is_quantized(layer):
                plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
                plain.weight = nn.Parameter(dequantized_weight(layer).to(dtypes.get(id(layer), rest)),
                                            requires_grad=False)
                plain.bias = layer.bias
                places.put_in_place_of(layer, plain)
    forget_quantization(module)
    return module


def _model_dtypes(module: nn.Module) -> dict[int, torch.dtype]:
    """For each module inside a transformers model, the dtype that model computes in: its token embeddings' (which
    no model keeps in float32 beside a half-precision body, as T5 keeps ``wo`` and others their norms), else that of
    most of its parameters."""
    dtypes = {}
    for _, model in transformers_models(module):
        try:
            weight = getattr(model.get_input_embeddings(), "weight", None)
        except (NotImplementedError, AttributeError):  # a model that names no input embeddings
            weight = None
        usable = isinstance(weight, torch.Tensor) and weight.is_floating_point()
        dtype = weight.dtype if usable else _most_values_dtype(model)
        dtypes.update({id(inner): dtype for inner in model.modules()})
    return dtypes


def _most_values_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of most of the base's floating-point parameters in ``module`` (no adapter's; float32 if none)."""
    adapters = owners(module)
    counts = Counter(p.dtype for p in module.parameters() if p.is_floating_point() and id(p) not in adapters)
    return counts.most_common(1)[0][0] if counts else torch.float32


def _quantize_a_full_precision_weight(layer: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """Quantize a full-precision weight that a state_dict brings (a checkpoint of the model before QuantizeBase)
    into the entries this layer's own state_dict has: bitsandbytes would copy it into the codes (int8: every
    value truncated to 0) or fail on its shape (4-bit)."""
    key = prefix + "weight"
    weight = state_dict.get(key)
    full = (layer.out_features, layer.in_features)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or tuple(weight.shape) != full:
        return
    replace_quantized_weight(layer, weight.to(layer.weight.device), warn=False)
    own = layer.state_dict(prefix=prefix)
    state_dict.update({name: value for name, value in own.items() if name == key or name.startswith(key + ".")
                       or name == prefix + "SCB"})


def _load_4bit_statistics(layer: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """Take the statistics saved beside a 4-bit weight back into ``layer`` (bitsandbytes writes but never reads them).

    Without this, loading a state_dict that holds them (a resumed adapter-only checkpoint is
    completed from the model's own) fails with unexpected keys.
    """
    bnb = import_bitsandbytes("QuantizeBase")
    key = prefix + "weight"
    stats = {name[len(key) + 1:]: state_dict.pop(name) for name in list(state_dict) if name.startswith(key + ".")}
    if stats and key in state_dict:
        layer.weight = bnb.nn.Params4bit.from_prequantized(state_dict[key], stats, device=layer.weight.device,
                                                           module=layer)
