"""The one place that reads and writes a base layer's weight, whatever its storage.

A weight is read in the layer's own layout (``(out, in)`` for nn.Linear, ``(in, out)`` for
GPT-2's Conv1D) as a float tensor, and written back the same way. A bitsandbytes 8-bit or 4-bit
layer is dequantized on reading and quantized again on writing, so merging, DoRA's norms and
PiSSA work on a quantized base as on a full-precision one; writing into it rounds (and warns).
bitsandbytes is never imported here unless a quantized layer exists.
"""

from __future__ import annotations

import copy
import math
import sys
import warnings
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from lightning_peft.core.checks import import_optional
from lightning_peft.core.layer import innermost_base

if TYPE_CHECKING:
    from bitsandbytes.functional import QuantState


def import_bitsandbytes(needed_by: str) -> ModuleType:
    """The bitsandbytes module, or an ImportError that names what needs it and the extra to install."""
    return import_optional("bitsandbytes", "bitsandbytes", needed_by)


def is_quantized(layer: nn.Module) -> bool:
    """Whether ``layer`` is a bitsandbytes 8-bit or 4-bit linear layer (no import: none exists before one)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(layer, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))


def read_weight(layer: nn.Module) -> Tensor:
    """The weight ``layer`` computes with, in its own layout: the parameter itself, or a dequantized float32 copy."""
    layer = innermost_base(layer)
    return dequantized_weight(layer) if is_quantized(layer) else layer.weight


@torch.no_grad()
def write_weight(layer: nn.Module, weight: Tensor, warn: bool = True) -> None:
    """Store ``weight`` (the layout :func:`read_weight` gives) as ``layer``'s weight, quantizing when it is quantized.

    With ``warn``, writing into a quantized layer says that the new weight is rounded.
    """
    layer = innermost_base(layer)
    if is_quantized(layer):
        replace_quantized_weight(layer, weight, warn)
    elif parametrize.is_parametrized(layer, "weight"):  # weight_norm: the originals that give this weight
        layer.weight = weight.to(layer.weight.dtype)
    else:
        layer.weight.copy_(weight.to(layer.weight.dtype))


COMPUTING_HOOKS = (WeightNorm, SpectralNorm, BasePruningMethod)  # pre-hooks that compute a module's own tensor


def computing_hooks(layer: nn.Module) -> list:
    """The forward pre-hooks that compute one of ``layer``'s own tensors before each call: the old weight_norm and
    spectral_norm, pruning (whatever is written into that tensor is lost at the next call)."""
    return [hook for hook in layer._forward_pre_hooks.values() if isinstance(hook, COMPUTING_HOOKS)]


def weight_hooks(layer: nn.Module) -> list:
    """The `computing_hooks` of ``layer`` that compute its weight (a pruned bias leaves the weight writable)."""
    return [hook for hook in computing_hooks(layer)
            if getattr(hook, "name", getattr(hook, "_tensor_name", None)) == "weight"]


@torch.no_grad()
def replace_weight(layer: nn.Module, weight: Tensor) -> None:
    """Give ``layer`` a new weight tensor (quantized when it is quantized), leaving the old tensor untouched.

    Unlike :func:`write_weight` nothing is written in place, so whoever holds the old weight
    (a rollback record) still has it.
    """
    layer = innermost_base(layer)
    if parametrize.is_parametrized(layer, "weight") or weight_hooks(layer):
        raise ValueError(f"the weight of this {type(layer).__name__} is computed by a parametrization or hook "
                         "(weight_norm, spectral_norm or pruning, say), which cannot take a new tensor; use another "
                         "init for it (init='pissa' replaces the base weight)")
    if is_quantized(layer):
        replace_quantized_weight(layer, weight, warn=False)
    else:
        old = layer.weight
        layer.weight = nn.Parameter(weight.to(old.dtype).to(old.device), requires_grad=old.requires_grad)


def dequantized_weight(layer: nn.Module) -> Tensor:
    """The ``(out, in)`` float32 weight that the bitsandbytes ``layer`` computes with."""
    bnb = import_bitsandbytes("QuantizeBase")
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return bnb.functional.int8_vectorwise_dequant(layer.weight.data, int8_scales(layer))
    packed, state = standard_4bit_layout(layer.weight)
    return bnb.functional.dequantize_4bit(packed, state).float()


def replace_quantized_weight(layer: nn.Module, weight: Tensor, warn: bool = True) -> None:
    """Quantize the ``(out, in)`` ``weight`` into the bitsandbytes ``layer`` (its own format, ``weight``'s device)."""
    bnb = import_bitsandbytes("QuantizeBase")
    if isinstance(layer, bnb.nn.Linear8bitLt):
        rows, scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
        layer.weight = bnb.nn.Int8Params(rows, requires_grad=False, has_fp16_weights=False, CB=rows, SCB=scales)
    else:
        old = layer.weight
        dtype = getattr(old.quant_state, "dtype", weight.dtype) if old.quant_state is not None else weight.dtype
        packed, state = bnb.functional.quantize_4bit(weight.to(dtype), blocksize=old.blocksize,
                                                     compress_statistics=old.compress_statistics,
                                                     quant_type=old.quant_type, quant_storage=old.quant_storage)
        layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=old.blocksize,
                                         compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                                         quant_storage=old.quant_storage, module=layer, bnb_quantized=True)
        layer.quant_state = state
    if warn:
        warn_of_rounding(layer, stacklevel=4)


ROUNDED = "a merged or unmerged weight written into"  # how the warning of `warn_of_rounding` begins


def warn_of_rounding(layer: nn.Module, stacklevel: int) -> None:
    """Say that a weight written into the bitsandbytes ``layer`` is rounded to its format."""
    kind = quantized_format(layer)
    warnings.warn(f"{ROUNDED} an {kind} base layer is rounded to {kind}: outputs move about as much as quantizing "
                  "moved them. For an exact merge, call lightning_peft.quantization.dequantize_base(model) first",
                  stacklevel=stacklevel)


def quantized_codes(layer: nn.Module) -> tuple | None:
    """What puts a quantized ``layer``'s weight back bit for bit (its codes and statistics), or None for a float one.

    A merge into a 4-bit weight and its unmerge each round the weight again; going back to the
    codes from before the merge keeps merge/unmerge cycles from adding up rounding.
    """
    layer = innermost_base(layer)
    if not is_quantized(layer):
        return None
    if quantized_format(layer) == "int8":
        return layer, layer.weight.data, int8_scales(layer)
    return layer, layer.weight


def restore_quantized_codes(codes: tuple) -> None:
    """Put back the weight that :func:`quantized_codes` kept."""
    layer, *kept = codes
    if len(kept) == 2:
        rows, scales = kept
        layer.weight = import_bitsandbytes("QuantizeBase").nn.Int8Params(rows, requires_grad=False,
                                                                        has_fp16_weights=False, CB=rows, SCB=scales)
    else:
        layer.weight = kept[0]
        layer.quant_state = kept[0].quant_state


def element_count(param: Tensor) -> int:
    """How many values ``param`` holds: a bitsandbytes 4-bit weight packs two in a byte, counted by its real shape."""
    state = getattr(param, "quant_state", None)
    return math.prod(state.shape) if state is not None else param.numel()


def quantized_format(layer: nn.Module) -> str:
    """``"int8"``, ``"nf4"`` or ``"fp4"``: how the bitsandbytes ``layer`` stores its weight."""
    return layer.weight.quant_type if hasattr(layer.weight, "quant_type") else "int8"


def statistics_bytes(layer: nn.Module) -> int:
    """Bytes of a bitsandbytes layer's quantization statistics (scales, codes), beside its weight."""
    if quantized_format(layer) == "int8":
        return int8_scales(layer).nbytes
    _, state = standard_4bit_layout(layer.weight)
    return sum(t.nbytes for t in state.as_dict(packed=True).values())


def int8_scales(layer: nn.Module) -> Tensor:
    """The per-row scales of an 8-bit layer: on its weight until the first forward moves them to its state."""
    return layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB


def standard_4bit_layout(weight: nn.Parameter) -> tuple[Tensor, QuantState]:
    """A 4-bit weight and its state in bitsandbytes' standard layout.

    On AVX512-BF16 CPUs an eval forward repacks the weight for a faster kernel; that is undone
    here on copies (as bitsandbytes' own state_dict does), leaving the layer as it is.
    """
    state = weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return weight.data, state
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    return _convert_weight_packed_for_cpu_inverse(weight.data, copy.deepcopy(state))


def whole(tensor: Tensor) -> Tensor:
    """``tensor`` detached and whole: an FSDP2 shard (a DTensor) is gathered from every rank, which must all call."""
    tensor = tensor.detach()
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
