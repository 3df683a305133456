"""A quantized frozen base: 8-bit and 4-bit weights through bitsandbytes, under any PEFT method (QLoRA)."""

from lightning_peft.quantization.callback import QuantizeBase, base_weight_bytes
from lightning_peft.quantization.layers import (
                                                dequantize_base,
                                                dequantized_weight,
                                                is_quantized,
                                                quantize_linear,
                                                replace_weight,
)

__all__ = ["QuantizeBase", "base_weight_bytes", "dequantize_base", "dequantized_weight", "is_quantized",
           "quantize_linear", "replace_weight"]
