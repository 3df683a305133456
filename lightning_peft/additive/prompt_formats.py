"""Prompt and prefix tuning adapters in Hugging Face peft's layout.

peft stores a prompt-learning adapter as one tensor, ``prompt_embeddings``: the prompt, or the
computed prefix (never its MLP), plus the ``modules_to_save`` tensors under ``base_model.``.
So a prefix trained with ``projection=True`` is saved as the values its MLP computes (the model
keeps its MLP), and a peft prefix adapter loads as ``projection=False``.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.additive.soft_prompts import KVShape
from lightning_peft.core.adapter_files import AdapterFormat
from lightning_peft.core.models import input_embedding_weight, name_or_path

TENSOR = "prompt_embeddings"
PREFIX_MLP_TENSOR = re.compile(r"^(?P<encoder>prefix_tuning\.adapters\.[^.]+)\.(embedding|transform\..+)$")
SAVED_MODULE_PREFIX = "base_model."  # peft's prompt-learning models hold the transformers model as base_model
HEAD_TASKS = {"ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS",
              "ForQuestionAnswering": "QUESTION_ANS"}


def file_key(name: str, root: nn.Module) -> str:
    """peft's key for one of our tensor names: the prompt or prefix is ``prompt_embeddings``."""
    if name.startswith(("prompt_tuning.", "prefix_tuning.")):
        return TENSOR
    return SAVED_MODULE_PREFIX + name


PEFT_HEADS = ("classifier", "score")  # what peft's sequence classifiers train whole, matched by name ending


def no_layout(root: nn.Module, config: dict) -> str | None:
    """Why peft cannot load our soft prompt on ``root``: its encoder-decoders take one per stack, and its sequence
    classifiers want every module named like a head in the file."""
    if getattr(root.config, "is_encoder_decoder", False):
        return (f"{type(root).__name__} is an encoder-decoder; peft's prompt learning puts virtual tokens in its "
                "encoder and decoder, ours in front of the inputs only")
    if getattr(root.config.get_text_config(), "num_attention_heads", None) is None:
        return (f"{type(root).__name__} has no attention heads (a state-space model), and peft's prompt-learning "
                "config needs num_attention_heads")
    if task_type(root) == "SEQ_CLS":
        saved = {name for name, module in root.named_modules() if getattr(module, "trained_whole", False)}
        heads = [name for name, _ in root.named_modules() if name.endswith(PEFT_HEADS) and name not in saved
                 and not any(name.startswith(f"{s}.") for s in saved)]
        if heads:
            return (f"peft loads a sequence classifier's prompt with its heads ({', '.join(heads)}: every module "
                    "whose name ends in classifier or score), which this adapter does not train: give "
                    f"modules_to_save={heads} for a file peft loads")
    return None


def no_prefix_layout(root: nn.Module, config: dict) -> str | None:
    """`no_layout`, and peft's refusal of a prefix on a classifier whose forward takes no past_key_values."""
    reason = no_layout(root, config)
    if reason is None and task_type(root) == "SEQ_CLS" and \
            "past_key_values" not in inspect.signature(root.forward).parameters:
        return (f"peft's prefix tuning of a sequence classifier passes past_key_values, which "
                f"{type(root).__name__}.forward does not take (transformers 5 names it cache)")
    return reason


def task_type(root: nn.Module) -> str:
    """peft's task type for a transformers model, which picks the PeftModel class that loads it."""
    name = type(root).__name__
    task = next((task for suffix, task in HEAD_TASKS.items() if name.endswith(suffix)), None)
    return task or ("CAUSAL_LM" if root.can_generate() else "FEATURE_EXTRACTION")


def common_config(config: dict, root: nn.Module) -> dict:
    """The fields every peft prompt-learning config has."""
    return {"task_type": task_type(root), "base_model_name_or_path": name_or_path(root), "inference_mode": True,
            "num_virtual_tokens": config["num_virtual_tokens"], "num_transformer_submodules": 1,
            "modules_to_save": config["modules_to_save"] or None}


def prompt_config(config: dict, root: nn.Module, names: list[str]) -> dict:
    """peft's PromptTuningConfig; the initialization is moot once the trained prompt is loaded."""
    text = root.config.get_text_config()
    return {"peft_type": "PROMPT_TUNING", **common_config(config, root),
            "token_dim": input_embedding_weight(root).shape[1],
            "num_attention_heads": text.num_attention_heads,
            "num_layers": text.num_hidden_layers, "prompt_tuning_init": "RANDOM"}


def prefix_config(config: dict, root: nn.Module, names: list[str]) -> dict:
    """peft's PrefixTuningConfig, with the key/value geometry peft derives for grouped-query attention."""
    shape = KVShape.of(root.config)
    return {"peft_type": "PREFIX_TUNING", **common_config(config, root),
            "token_dim": shape.heads * shape.head_dim, "num_attention_heads": shape.heads,
            "num_layers": shape.layers, "encoder_hidden_size": input_embedding_weight(root).shape[1],
            "prefix_projection": False}


@torch.no_grad()
def computed_prefixes(tensors: dict[str, Tensor], root: nn.Module) -> dict[str, Tensor]:
    """Each prefix MLP's tensors replaced by the prefix it computes (``...adapters.NAME.prefix``), from ``tensors``
    (whole ones, where the model's own are FSDP2 shards)."""
    out = {}
    for name, tensor in tensors.items():
        match = PREFIX_MLP_TENSOR.match(name)
        if not match:
            out[name] = tensor
            continue
        encoder = match["encoder"]
        mlp = {key.removeprefix(f"{encoder}.transform."): value for key, value in tensors.items()
               if key.startswith(f"{encoder}.transform.")}
        transform = root.get_submodule(encoder).transform
        out[encoder + ".prefix"] = torch.func.functional_call(transform, mlp, (tensors[f"{encoder}.embedding"],))
    return {name: tensor.detach() for name, tensor in out.items()}


def checked_tokens(config: dict) -> int:
    """The number of virtual tokens of a peft config that puts them in front of the inputs only."""
    if (config.get("num_transformer_submodules") or 1) != 1:
        raise ValueError("peft adapter for an encoder-decoder (num_transformer_submodules=2) is not supported")
    return config["num_virtual_tokens"]


def saved_modules(config: dict) -> list[str] | None:
    """peft's modules_to_save, repeats removed (peft lists its default heads twice)."""
    return list(dict.fromkeys(config.get("modules_to_save") or [])) or None


def prompt_settings(config: dict) -> dict[str, Any]:
    """Our PromptTuning arguments for a peft PromptTuningConfig."""
    return dict(num_virtual_tokens=checked_tokens(config), init="random", modules_to_save=saved_modules(config))


def prefix_settings(config: dict) -> dict[str, Any]:
    """A plain prefix, whatever ``prefix_projection`` says: peft's file holds the computed values."""
    return dict(num_virtual_tokens=checked_tokens(config), projection=False, modules_to_save=saved_modules(config))


PROMPT_TUNING_FORMAT = AdapterFormat(peft_type="PROMPT_TUNING", to_config=prompt_config, to_settings=prompt_settings,
                                     file_key=file_key, no_layout=no_layout)
PREFIX_TUNING_FORMAT = AdapterFormat(peft_type="PREFIX_TUNING", to_config=prefix_config, to_settings=prefix_settings,
                                     file_key=file_key, to_file=computed_prefixes, no_layout=no_prefix_layout)
