"""Gradient checkpointing over a frozen base model: gradients must still reach the adapters.

Reentrant checkpointing backpropagates through a block only when one of the block's inputs
requires grad. With frozen input embeddings none does, so the adapters inside the checkpointed
blocks get no gradient (or the loss has none at all). transformers' ``enable_input_require_grads``
makes the embedding output require grad; non-reentrant checkpointing needs nothing.
"""

from __future__ import annotations

from torch import nn

from lightning_peft.core.models import transformers_models

_ENABLED = "_lightning_peft_input_grads"


def enable_input_grads_for_checkpointing(module: nn.Module) -> None:
    """Make the input embeddings' output require grad in every checkpointing transformers model of ``module``."""
    for _, model in transformers_models(module):
        if not model.__dict__.get(_ENABLED) and _checkpoints(model) and _embeddings_frozen(model):
            model.enable_input_require_grads()
            model.__dict__[_ENABLED] = True


def _checkpoints(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _embeddings_frozen(model: nn.Module) -> bool:
    try:
        embeddings = model.get_input_embeddings()
    except NotImplementedError:
        return False
    return embeddings is not None and not any(p.requires_grad for p in embeddings.parameters())
