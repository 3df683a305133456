"""bitsandbytes linear layers for a frozen base: build one from an nn.Linear, or put a plain one back.

Reading and writing their weights is :mod:`lightning_peft.core.weights`' job, shared with every method.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_peft.core.injection import replace_module
from lightning_peft.core.weights import dequantized_weight, import_bitsandbytes, is_quantized, replace_quantized_weight

MODES = ("int8", "nf4", "fp4")


def quantize_linear(layer: nn.Linear, mode: str, double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> nn.Module:
    """A bitsandbytes copy of ``layer`` with its weight in ``mode``, quantized on ``device``; the bias is shared.

    Only one layer's weight is ever copied, so quantizing a model layer by layer needs
    little more memory than the model itself.
    """
    bnb = import_bitsandbytes("QuantizeBase")
    shape = (layer.in_features, layer.out_features, layer.bias is not None)
    if mode == "int8":
        from lightning_peft.quantization.int8 import FrozenLinear8bit  # needs bitsandbytes, which is optional

        quantized = FrozenLinear8bit(*shape, has_fp16_weights=False, device="meta")
    else:
        quantized = bnb.nn.Linear4bit(*shape, compute_dtype=compute_dtype, compress_statistics=double_quant,
                                      quant_type=mode, device="meta")
        # bitsandbytes would repack the weight at its first no-grad eval forward on AVX512-BF16 CPUs, keeping
        # the block scales in bf16 from then on: outputs would then depend on the call history (about 1e-2
        # relative), and differ from the weight that merging and DoRA read. One layout, always.
        quantized.support_avx512bf16_for_cpu = False
        quantized.register_load_state_dict_pre_hook(_load_4bit_statistics)
    replace_quantized_weight(quantized, layer.weight.detach().to(device or layer.weight.device), warn=False)
    quantized.bias = layer.bias  # same Parameter: full precision, and a method that trains biases keeps it
    return quantized.train(layer.training)  # bitsandbytes computes differently in eval mode


def dequantize_base(module: nn.Module) -> nn.Module:
    """Put a full-precision nn.Linear back for every bitsandbytes layer of ``module`` (in place).

    For example, to merge exactly."""
    for name, layer in list(module.named_modules()):
        if is_quantized(layer):
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            plain.weight = nn.Parameter(dequantized_weight(layer), requires_grad=False)
            plain.bias = layer.bias
            replace_module(module, name, plain)
    return module


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
