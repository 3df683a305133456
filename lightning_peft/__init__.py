"""Parameter-efficient fine-tuning as Lightning callbacks."""

from lightning_peft.core.callback import PEFTCallback
from lightning_peft.core.merging import merge, unmerge
from lightning_peft.core.summary import trainable_summary
from lightning_peft.lora import LoRA

__version__ = "0.1.0"

__all__ = ["LoRA", "PEFTCallback", "merge", "trainable_summary", "unmerge"]
