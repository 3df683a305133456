"""Folding adapters into the base weights for zero added latency, and taking them back out.

A merged PEFT layer leaves the model (the plain base layer takes its place) and is kept on the
module that held it, under the name it had there, so :func:`unmerge` finds it from any module
above it, also after ``copy.deepcopy``.
"""

from __future__ import annotations

import warnings

from torch import nn
from torch.nn.utils import parametrize

from lightning_peft.core.injection import ModulePlaces, peft_layers
from lightning_peft.core.layer import PEFTLayer, PEFTModule, innermost_base, open_block
from lightning_peft.core.models import transformers_models
from lightning_peft.core.ownership import holders
from lightning_peft.core.weights import (
    ROUNDED,
    is_quantized,
    quantized_codes,
    restore_quantized_codes,
    warn_of_rounding,
    weight_hooks,
)

_MERGED = "_lightning_peft_merged"  # on a parent module: {child name: the PEFT layer merged there}
_CODES = "_lightning_peft_codes"  # on a merged layer over a quantized base: the base's codes before the merge
_TIED = "_lightning_peft_untied"  # on a merged layer: {local name: the shared weight}; on the model: copies made


def merge(module: nn.Module) -> nn.Module:
    """Fold every active adapter into its base weight and put the plain base layer back, for zero added latency.

    Works for the methods whose updates are weights (LoRA, IA3); a method that cannot merge
    (Adapter, PromptTuning, PrefixTuning) raises before anything changes. The PEFT layers are kept
    aside, inactive adapters included, so `unmerge` can restore them. On a quantized base
    (`QuantizeBase`) the merged weight is rounded to the base's format again, with a warning;
    ``lightning_peft.quantization.dequantize_base(module)`` first makes the merge exact. A weight
    shared with another module (tied input and output embeddings) is copied first, so only the
    adapted end changes, and the transformers config stops tying them, so a saved merged model
    loads (in vLLM too) as merged; `unmerge` ties them again. A forward that reads an adapted
    layer's weight itself (``x @ self.embed.weight.T``, ``F.linear(x, self.proj.weight)``) rather
    than calling the layer reads the base weight unmerged and the merged one after: such a model
    computes otherwise once merged.

    Args:
        module: a model with adapters, or a LightningModule holding one; changed in place.

    Returns:
        ``module`` itself, its adapted layers replaced by their merged base layers.

    Raises:
        ValueError: when ``module`` holds adapters of a method that cannot merge, inside a
            `per_row_adapters` or `disable_adapters` block, or when a weight cannot be written exactly
            (computed by spectral_norm, pruning or the old weight_norm hook; an embedding with
            ``max_norm``).

    Examples:
        ```python
        from lightning_peft import merge

        merge(model)  # the targeted layers are plain nn.Linear again
        model.save_pretrained("merged-model")
        ```
    """
    if block := open_block(module):
        wrong = "merge no adapter" if block == "disable_adapters" else "give every row the active adapters"
        raise ValueError(f"merge inside a {block} block would {wrong}; merge after the block")
    unmergeable = sorted({m.method for m in module.modules() if isinstance(m, PEFTModule) and not m.mergeable})
    if unmergeable:
        raise ValueError(f"{', '.join(unmergeable)} adapters cannot be merged into the base weights")
    _check_weights_writable(module)
    quantized = next((base for _, layer in peft_layers(module) if layer.active_adapters and not layer.trained_whole
                      and is_quantized(base := innermost_base(layer))), None)  # a layer whose merge writes there
    if quantized is not None:  # said once, before any weight changes (an error under -W error changes nothing)
        warn_of_rounding(quantized, stacklevel=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=ROUNDED)
        _merge_layers(module)
    return module


def _merge_layers(module: nn.Module) -> None:
    """Put each PEFT layer's merged base in its place, innermost first, keeping what `unmerge` needs."""
    where, places = holders(module), ModulePlaces(module)
    alive = list(module.parameters())  # noqa: F841  (``where`` is by id: a weight a merge replaces must keep its id)
    for name, layer in reversed(list(peft_layers(module))):  # innermost first when layers are nested
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        layer.merged_adapters = tuple(layer.active_adapters)  # what unmerge takes out, whatever is active then
        _untie(module, layer, where)
        codes = quantized_codes(layer.base_layer)
        if codes is not None:
            layer.__dict__[_CODES] = codes
        places.put_in_place_of(layer, layer.merged_base_layer())
        parent.__dict__.setdefault(_MERGED, {})[child] = layer


def unmerge(module: nn.Module) -> nn.Module:
    """Undo `merge`: take the adapters' updates back out of the base weights and put the adapters back.

    The outermost merged layers come back first, the reverse of the order they were merged in.
    It works from any module above the merged layers, also on a ``copy.deepcopy`` of a merged model.

    Args:
        module: a model (or LightningModule) that `merge` changed; changed in place.

    Returns:
        ``module`` itself, with its PEFT layers and their adapters back.

    Raises:
        ValueError: when ``module`` holds no merged adapters.
        RuntimeError: when a merged layer's place was given another module after the merge.

    Examples:
        ```python
        from lightning_peft import merge, unmerge

        merge(model)    # fast inference
        unmerge(model)  # back to the adapter form, to train on
        ```
    """
    restored = False
    while merged := merged_layers(module):
        _check_unmergeable(merged)
        places = ModulePlaces(module)
        for parent, child, layer in merged:
            if getattr(parent, child) is not layer.merged_module():
                raise RuntimeError(f"unmerge: '{child}' was replaced after the merge; cannot restore its adapter")
            active, layer.active_adapters = layer.active_adapters, list(layer.merged_adapters)
            _unmerge_layer(layer)  # the adapters merged, even if another set is active now (disable_adapters ended)
            layer.active_adapters = active
            _tie_again(layer)
            places.put_in_place_of(layer.merged_module(), layer)  # a layer shared by several places: at each
            del parent.__dict__[_MERGED][child]
        restored = True
    if not restored:
        raise ValueError("unmerge: this module has no merged adapters")
    _tie_models_again(module)
    return module


def _check_weights_writable(module: nn.Module) -> None:
    """Refuse, before any change, a merge into a weight that something else computes or rewrites in a forward.

    weight_norm's parametrization has its originals solved exactly from the weight written; spectral_norm's (or
    another's) have not, the old weight_norm and spectral_norm hooks and pruning recompute the weight in every
    forward, and an embedding with ``max_norm`` renormalizes its rows in place (the merged update with them, for
    good).
    """
    for name, layer in peft_layers(module):
        base = innermost_base(layer)
        if parametrize.is_parametrized(base, "weight"):
            kinds = [type(p).__name__ for p in base.parametrizations.weight]
            if kinds != ["_WeightNorm"]:
                raise ValueError(f"merge: the weight of '{name}' is computed by a parametrization ({', '.join(kinds)}) "
                                 "that a merged weight cannot be written through exactly; nothing was merged. "
                                 "Only weight_norm's can")
        if hooks := weight_hooks(base):
            raise ValueError(f"merge: the weight of '{name}' is recomputed before every forward by a "
                             f"{', '.join(type(hook).__name__ for hook in hooks)} hook (the old weight_norm or "
                             "spectral_norm, or pruning), which would overwrite a merged weight; nothing was merged. "
                             "torch.nn.utils.parametrizations.weight_norm's weight can be merged into")
        if isinstance(base, nn.Embedding) and base.max_norm is not None:
            raise ValueError(f"merge: '{name}' renormalizes its rows in place (nn.Embedding max_norm), a merged "
                             "update with them, which unmerge could not take back out; nothing was merged")


def _unmerge_layer(layer: PEFTLayer) -> None:
    """Take ``layer``'s merged adapters back out: a quantized base gets its codes from before the merge back."""
    codes = layer.__dict__.pop(_CODES, None)
    if codes is not None and codes[0] is innermost_base(layer.base_layer):
        restore_quantized_codes(codes)
    else:
        layer.unmerge()


def _check_unmergeable(merged: list[tuple[nn.Module, str, PEFTLayer]]) -> None:
    """Refuse, before any change, an unmerge that some merged layer cannot take back out."""
    for _, child, layer in merged:
        refusal = layer.unmerge_refusal()
        if refusal is not None:
            raise ValueError(f"unmerge: '{child}': {refusal}; nothing was changed")


def merged_layers(module: nn.Module) -> list[tuple[nn.Module, str, PEFTLayer]]:
    """The merged layers kept by modules of ``module`` now, as ``(parent, child name, layer)``."""
    return [(parent, child, layer) for parent in module.modules()
            for child, layer in parent.__dict__.get(_MERGED, {}).items()]


def _untie(root: nn.Module, layer: PEFTLayer, where: dict[int, list[tuple[nn.Module, str]]]) -> None:
    """Give ``layer``'s base its own copy of each weight it shares with a module outside it (tied embeddings).

    So merging changes this layer alone, not the output head tied to an adapted input embedding;
    the transformers config stops tying them, so a saved merged model loads as merged. The shared
    tensor is kept on the layer for unmerge. With the config untied, transformers ties none of the
    model's weights when it loads, so the other places that share the weight (BART's encoder and
    decoder embeddings and head) get copies too, or a saved model would hold it once and load the
    rest at random; `unmerge` shares it again.
    """
    inside = {id(m) for m in layer.modules()}
    base = layer.base_layer
    for local, param in list(base._parameters.items()):
        outside = [(m, name) for m, name in where.get(id(param), []) if id(m) not in inside]
        if param is not None and outside:
            layer.__dict__.setdefault(_TIED, {})[local] = param
            setattr(base, local, _own_copy(param))
            model = _model_holding(root, base)
            if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
                model.config.tie_word_embeddings = False
                model.__dict__[_TIED] = [(m, name, param) for m, name in outside[1:]]
                for m, name in outside[1:]:
                    setattr(m, name, _own_copy(param))


def _own_copy(param: nn.Parameter) -> nn.Parameter:
    """A parameter with ``param``'s values in memory of its own."""
    return nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)


def _tie_again(layer: PEFTLayer) -> None:
    """Give ``layer``'s base back the weights it shared before `merge` (see `_untie`)."""
    for local, param in layer.__dict__.pop(_TIED, {}).items():
        setattr(layer.base_layer, local, param)


def _tie_models_again(root: nn.Module) -> None:
    """Once every merged layer is back: the places `_untie` gave copies share the weight again, and the config ties."""
    for model in root.modules():
        separated = model.__dict__.pop(_TIED, None)
        if separated is not None:
            for module, name, param in separated:
                setattr(module, name, param)
            model.config.tie_word_embeddings = True


def _model_holding(root: nn.Module, module: nn.Module) -> nn.Module:
    """The transformers model of ``root`` that holds ``module`` (a module may hold several), or ``root``."""
    return next((model for _, model in transformers_models(root) if any(m is module for m in model.modules())), root)


def check_unmerged(module: nn.Module, what: str, instead: str = "") -> None:
    """Refuse ``what`` on a model whose merged adapters are in its weights, where no switch or new layer acts."""
    if merged_layers(module):
        raise ValueError(f"{what}: this model has merged adapters, which are in its weights now; unmerge it first"
                         + (f", {instead}" if instead else ""))
