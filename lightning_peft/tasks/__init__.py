"""Ready LightningModules around transformers models, for recipes and quick starts."""

from lightning_peft.tasks.causal_lm import CausalLM
from lightning_peft.tasks.sequence_classification import SequenceClassification

__all__ = ["CausalLM", "SequenceClassification"]
