"""Finding the transformers model inside whatever module a user passes, and reading facts off it."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.core.layer import innermost_base


def transformers_models(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The outermost transformers models (``PreTrainedModel``) in ``module``, ``module`` itself included, by name."""
    from transformers import PreTrainedModel

    found: list[str] = []
    for name, sub in module.named_modules():
        if isinstance(sub, PreTrainedModel) and not any(_within(name, outer) for outer in found):
            found.append(name)
            yield name, sub


def _within(name: str, outer: str) -> bool:
    """Whether the module ``name`` lies inside the module ``outer`` (``""`` is the root)."""
    return not outer or name.startswith(outer + ".")


def model_root(module: nn.Module) -> tuple[str, nn.Module]:
    """The first transformers model inside ``module`` (its name and itself), or ``("", module)``.

    A plain model wrapped by ``torch.compile`` is the model it wraps (``_orig_mod``), so files name
    its layers as the uncompiled model does.
    """
    found = next(transformers_models(module), None)
    if found is not None:
        return found
    if isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
        return "_orig_mod", module._orig_mod
    return "", module


def warn_of_other_models(module: nn.Module, needed_by: str) -> None:
    """Say which model an adapter goes into when ``module`` holds several (a policy and its reference, a teacher)."""
    found = [name for name, _ in transformers_models(module)]
    if len(found) > 1:
        warnings.warn(f"{needed_by}: {type(module).__name__} holds {len(found)} transformers models ("
                      f"{', '.join(found)}); the adapter goes into the first, '{found[0]}'. To choose another, "
                      f"pass it itself (module.{found[1]})", stacklevel=3)


def require_transformers_model(module: nn.Module, needed_by: str) -> nn.Module:
    """The transformers model inside ``module``, or a TypeError saying that ``needed_by`` needs one."""
    found = next(transformers_models(module), None)
    if found is None:
        raise TypeError(f"{needed_by} needs a transformers PreTrainedModel inside the module; "
                        f"{type(module).__name__} holds none")
    return found[1]


def require_token_model(module: nn.Module, needed_by: str) -> nn.Module:
    """The transformers model inside ``module`` if it reads token ids through an nn.Embedding, else one TypeError."""
    model = require_transformers_model(module, needed_by)
    first = next(iter(inspect.signature(model.forward).parameters), None)
    try:
        embedding = model.get_input_embeddings()
    except NotImplementedError:
        embedding = None
    if first != "input_ids" or not isinstance(innermost_base(embedding), nn.Embedding):
        what = f"takes {first} first" if first != "input_ids" else "has no single token embedding"
        raise TypeError(f"{needed_by} puts virtual tokens in front of token ids; {type(model).__name__} {what}, "
                        "so it fits text models only")
    if not _takes_inputs_embeds(type(model)):  # SigLIP's two towers, say
        raise TypeError(f"{needed_by} gives the model its tokens as embeddings, with the virtual ones in front; "
                        f"{type(model).__name__}.forward takes no inputs_embeds")
    return model


def _takes_inputs_embeds(cls: type) -> bool:
    """Whether ``cls``'s forward names ``inputs_embeds``, or takes ``**kwargs`` over a class whose forward does (a
    subclass that passes its arguments on)."""
    for klass in (k for k in cls.__mro__ if "forward" in vars(k)):
        parameters = inspect.signature(klass.forward).parameters
        if "inputs_embeds" in parameters:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return False
    return False


def model_type(module: nn.Module) -> str | None:
    """The ``config.model_type`` of the transformers model inside ``module``, if there is one."""
    _, model = model_root(module)
    return getattr(getattr(model, "config", None), "model_type", None)


def name_or_path(module: nn.Module) -> str | None:
    """Where the transformers model inside ``module`` was loaded from (its ``config._name_or_path``), if known."""
    _, model = model_root(module)
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def input_embedding_weight(model: nn.Module) -> Tensor:
    """The token embedding matrix of a transformers ``model`` (a wrapping PEFT layer shows its base's)."""
    return model.get_input_embeddings().weight


POSITION_TABLES = ("position_embeddings", "wpe", "embed_positions")  # BERT-likes; GPT-2 and GPT-Neo; OPT and BART


def learned_positions(model: nn.Module) -> int | None:
    """How many positions ``model``'s learned position table numbers; None for rotary, relative or ALiBi models.

    RoBERTa's table starts after its padding index, and OPT's and BART's after an offset of 2; a
    ``position_ids`` buffer shorter than the table (a table grown, Nystromformer's) is the limit.
    """
    tables = [table for name, table in model.named_modules()
              if isinstance(table, nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLES]
    first = [getattr(table, "offset", 0) + (0 if table.padding_idx is None else table.padding_idx + 1)
             for table in tables]
    sizes = [table.num_embeddings - start for table, start in zip(tables, first, strict=True)]
    ids = [buffer.shape[-1] for name, buffer in model.named_buffers() if name.rsplit(".", 1)[-1] == "position_ids"]
    return min(sizes + ids) if sizes else None


def row_lengths(data: Any, predicting: bool = False) -> list[tuple[str, int]]:
    """The lengths a data module cuts its rows to, by setting (``max_length``, ``block_size``), with each task's of a
    MultiTaskData; prompts to continue (``predicting``) are not cut to ``block_size``."""
    keys = ("max_length",) if predicting else ("max_length", "block_size")
    found = []
    for part in [data, *(getattr(data, "parts", None) or {}).values()] if data is not None else []:
        name = next((key for key in keys if isinstance(getattr(part, key, None), int)), None)
        if name is not None:
            found.append((name, getattr(part, name)))
    return found
