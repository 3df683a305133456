"""A quantized frozen base: 8-bit and 4-bit weights through bitsandbytes, under any PEFT method (QLoRA)."""

from lightning_peft.core.summary import base_weight_bytes
from lightning_peft.core.weights import dequantized_weight, is_quantized, statistics_bytes
from lightning_peft.quantization.callback import QuantizeBase
from lightning_peft.quantization.layers import dequantize_base, quantize_linear

__all__ = ["QuantizeBase", "base_weight_bytes", "dequantize_base", "dequantized_weight", "is_quantized",
           "quantize_linear", "statistics_bytes"]
