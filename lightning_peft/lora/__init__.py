"""The reparameterization family: LoRA and its variants (rsLoRA, DoRA, PiSSA)."""

from lightning_peft.lora.callback import LoRA
from lightning_peft.lora.layers import LoRAAdapter, LoRAConv, LoRAEmbedding, LoRALayer, LoRALinear

__all__ = ["LoRA", "LoRAAdapter", "LoRAConv", "LoRAEmbedding", "LoRALayer", "LoRALinear"]
