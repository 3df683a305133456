"""Data modules for recipes: built-in sources from the package registries, or your own files."""

from lightning_peft.data.causal_lm import CausalLMData
from lightning_peft.data.multi_task import MultiTaskData
from lightning_peft.data.text_classification import TextClassificationData

__all__ = ["CausalLMData", "MultiTaskData", "TextClassificationData"]
