"""bitsandbytes linear layers for a frozen base: build one from an nn.Linear, read its weight back, requantize.

bitsandbytes is imported only when a layer is quantized, so the rest of lightning_peft works
without it; :func:`is_quantized` never imports it.
"""

from __future__ import annotations

import copy
import sys
import warnings
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lightning_peft.core.injection import replace_module

if TYPE_CHECKING:
    from bitsandbytes.functional import QuantState

MODES = ("int8", "nf4", "fp4")
INSTALL = 'pip install "lightning-peft[bitsandbytes]"'


def import_bitsandbytes(needed_by: str) -> ModuleType:
    """The bitsandbytes module, or an ImportError that names what needs it and the extra to install."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(f"{needed_by} needs bitsandbytes, which is not installed. Run: {INSTALL}") from err
    return bitsandbytes


def is_quantized(layer: nn.Module) -> bool:
    """Whether ``layer`` is a bitsandbytes 8-bit or 4-bit linear layer (no import: none exists before one)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(layer, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))


def quantize_linear(layer: nn.Linear, mode: str, double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> nn.Module:
    """A bitsandbytes copy of ``layer`` with its weight in ``mode``, quantized on ``device``; the bias is shared.

    Only one layer's weight is ever copied, so quantizing a model layer by layer needs
    little more memory than the model itself.
    """
    bnb = import_bitsandbytes("QuantizeBase")
    shape = (layer.in_features, layer.out_features, layer.bias is not None)
    if mode == "int8":
        quantized = bnb.nn.Linear8bitLt(*shape, has_fp16_weights=False, device="meta")
    else:
        quantized = bnb.nn.Linear4bit(*shape, compute_dtype=compute_dtype, compress_statistics=double_quant,
                                      quant_type=mode, device="meta")
        quantized.register_load_state_dict_pre_hook(_load_4bit_statistics)
    replace_weight(quantized, layer.weight.detach().to(device or layer.weight.device), warn=False)
    quantized.bias = layer.bias  # same Parameter: full precision, and a method that trains biases keeps it
    return quantized


def replace_weight(layer: nn.Module, weight: Tensor, warn: bool = True) -> None:
    """Quantize the ``(out, in)`` ``weight`` into the bitsandbytes ``layer``, in its own format, on ``weight``'s device.

    With ``warn``, says that the new weight is rounded (merging into a quantized base is lossy).
    """
    bnb = import_bitsandbytes("QuantizeBase")
    if isinstance(layer, bnb.nn.Linear8bitLt):
        rows, scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
        layer.weight = bnb.nn.Int8Params(rows, requires_grad=False, has_fp16_weights=False, CB=rows, SCB=scales)
    else:
        old = layer.weight
        packed, state = bnb.functional.quantize_4bit(weight, blocksize=old.blocksize,
                                                     compress_statistics=old.compress_statistics,
                                                     quant_type=old.quant_type, quant_storage=old.quant_storage)
        layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=old.blocksize,
                                         compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                                         quant_storage=old.quant_storage, module=layer, bnb_quantized=True)
        layer.quant_state = state
    if warn:
        kind = quantized_format(layer)
        warnings.warn(f"a merged or unmerged weight written into an {kind} base layer is rounded to {kind}: outputs "
                      "move about as much as quantizing moved them. For an exact merge, call "
                      "lightning_peft.quantization.dequantize_base(model) first", stacklevel=2)


def dequantized_weight(layer: nn.Module) -> Tensor:
    """The ``(out, in)`` float32 weight that the bitsandbytes ``layer`` computes with."""
    bnb = import_bitsandbytes("QuantizeBase")
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return bnb.functional.int8_vectorwise_dequant(layer.weight.data, _int8_scales(layer))
    packed, state = _standard_4bit_layout(layer.weight)
    return bnb.functional.dequantize_4bit(packed, state).float()


def quantized_format(layer: nn.Module) -> str:
    """``"int8"``, ``"nf4"`` or ``"fp4"``: how the bitsandbytes ``layer`` stores its weight."""
    return layer.weight.quant_type if hasattr(layer.weight, "quant_type") else "int8"


def statistics_bytes(layer: nn.Module) -> int:
    """Bytes of a bitsandbytes layer's quantization statistics (scales, codes), beside its weight."""
    if quantized_format(layer) == "int8":
        return _int8_scales(layer).nbytes
    _, state = _standard_4bit_layout(layer.weight)
    return sum(t.nbytes for t in state.as_dict(packed=True).values())


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


def _int8_scales(layer: nn.Module) -> Tensor:
    """The per-row scales of an 8-bit layer: on its weight until the first forward moves them to its state."""
    return layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB


def _standard_4bit_layout(weight: nn.Parameter) -> tuple[Tensor, QuantState]:
    """A 4-bit weight and its state in bitsandbytes' standard layout.

    On AVX512-BF16 CPUs an eval forward repacks the weight for a faster kernel; that is undone
    here on copies (as bitsandbytes' own state_dict does), leaving the layer as it is.
    """
    state = weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return weight.data, state
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    return _convert_weight_packed_for_cpu_inverse(weight.data, copy.deepcopy(state))
