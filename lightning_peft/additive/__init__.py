"""The additive family: new trainable parts — adapter layers, IA3 vectors, soft prompts."""

from lightning_peft.additive.adapter import Adapter
from lightning_peft.additive.ia3 import IA3
from lightning_peft.additive.ia3_layers import IA3Adapter, IA3Layer
from lightning_peft.additive.prefix_tuning import PrefixEncoder, PrefixInjector, PrefixTuning
from lightning_peft.additive.prompt_tuning import Prompt, PromptInjector, PromptTuning

__all__ = ["IA3", "Adapter", "IA3Adapter", "IA3Layer", "PrefixEncoder", "PrefixInjector", "PrefixTuning", "Prompt",
           "PromptInjector", "PromptTuning"]
