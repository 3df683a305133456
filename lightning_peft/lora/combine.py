"""Adapter arithmetic: named LoRA adapters combined into a new one.

Adapter ``i`` with weight ``w_i`` and scale ``s_i`` (``alpha / r``, or ``alpha / sqrt(r)`` with
rsLoRA) changes a weight by ``w_i * s_i * B_i @ A_i``. The new adapter has ``alpha = r``, so its
scale is 1 and its factors carry every scale: nothing depends on how the inputs were scaled.

- ``cat``: A and B stacked along the rank: exactly ``sum_i w_i s_i B_i A_i`` (rank ``sum r_i``).
- ``linear``: ``B = sum_i c_i B_i``, ``A = sum_i sign(w_i) c_i A_i`` with ``c_i = sqrt(|w_i| s_i)``;
  cross terms included, as peft's ``linear`` (same rank for all).
- ``ties`` / ``dare_linear`` / ``dare_ties``: each factor merged with TIES (magnitude pruning to
  ``density``, sign election, disjoint mean) or DARE (random pruning to ``density``, rescaled),
  as peft does: pruning and the sign election read the inputs' own factors, and the factor
  weights above apply to what is kept. One input combines as ``linear``, as in peft.
- ``svd``: the exact sum refactored by a truncated SVD to ``rank`` (default: the largest input rank).

DoRA adapters (all inputs DoRA) also combine their magnitudes as task vectors on the base's row
norms: ``m = |W| + sum_i w_i (m_i - |W|)``; modules the inputs train whole (``modules_to_save``)
likewise: ``W + sum_i w_i (W_i - W)``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_peft.core.adapter_files import find_adapter
from lightning_peft.core.checks import check_choice
from lightning_peft.core.injection import peft_layers
from lightning_peft.core.layer import check_not_switched_off
from lightning_peft.core.merging import check_unmerged
from lightning_peft.core.ownership import adapter_refs
from lightning_peft.core.rollback import all_or_nothing
from lightning_peft.core.saved_modules import SavedModule
from lightning_peft.lora.callback import LoRA
from lightning_peft.lora.layers import LoRAAdapter, LoRALayer
from lightning_peft.lora.parameters import LoRAParameter

How = Literal["linear", "cat", "ties", "dare_linear", "dare_ties", "svd"]
MajoritySign = Literal["total", "frequency"]
HOWS = ("linear", "cat", "ties", "dare_linear", "dare_ties", "svd")
MAJORITY_SIGNS = ("total", "frequency")
FACTOR_WISE = ("linear", "ties", "dare_linear", "dare_ties")


def combine_adapters(module: nn.Module, weights: Mapping[str, float], new_name: str, how: How = "linear",
                     density: float = 0.5, rank: int | None = None, majority_sign: MajoritySign = "total",
                     seed: int = 0) -> nn.Module:
    """Combine named LoRA adapters of ``module`` into a new LoRA adapter ``new_name``, weighted.

    The new adapter adapts every layer that any input adapts, with ``alpha = r`` (scale 1) and the
    first input's dropout; each module an input trains whole (``modules_to_save``, a head) gets
    the original plus the inputs' weighted changes to it, ``W + sum_i w_i (W_i - W)``. It is added
    active beside the inputs, which stay as they are. It saves in peft's layout like any LoRA
    adapter, and works on a quantized base (`QuantizeBase`). Formulas: the module docs of
    ``lightning_peft.lora.combine``.

    Args:
        module: a model with LoRA adapters, or a LightningModule holding one; changed in place.
        weights: adapter name -> weight (negative weights subtract a task).
        new_name: the name of the new adapter, not yet used in ``module``.
        how: ``"cat"`` (exact, rank the sum of ranks), ``"linear"``, ``"ties"``, ``"dare_linear"``,
            ``"dare_ties"`` (factor-wise, the inputs of one rank) or ``"svd"`` (exact sum cut to ``rank``).
        density: the fraction of each factor's entries that TIES and DARE keep, in (0, 1].
        rank: the new adapter's rank for ``"svd"`` (default: the largest input rank).
        majority_sign: TIES's sign election: by the summed values (``"total"``) or by counts.
        seed: seeds DARE's random pruning, so a combination can be repeated.

    Returns:
        ``module`` itself, with the new adapter.

    Raises:
        ValueError: for no weights, an unknown name or ``how``, an existing ``new_name``, a model with
            merged adapters, PiSSA inputs, inputs that are not LoRA adapters of modules (fused
            parameters), a factor-wise ``how`` over inputs of different ranks, DoRA mixed with plain
            LoRA, ``density`` outside (0, 1], a weight that is not a finite number, an unknown
            ``majority_sign``, or a ``rank`` that is not a positive int or comes with another ``how``.

    Examples:
        ```python
        from lightning_peft import combine_adapters, save_adapter, set_adapter

        combine_adapters(model, {"sentiment": 0.7, "topic": 0.3}, new_name="both", how="cat")
        set_adapter(model, "both")
        save_adapter(model, "adapters/both", adapter_name="both")  # peft loads it too
        ```
    """
    check_choice("combine_adapters", "how", how, HOWS)
    check_choice("combine_adapters", "majority_sign", majority_sign, MAJORITY_SIGNS)
    check_unmerged(module, "combine_adapters")
    check_not_switched_off(module, "combine_adapters")
    if not weights:
        raise ValueError("combine_adapters needs at least one adapter to combine; weights is empty")
    if not 0 < density <= 1:
        raise ValueError(f"combine_adapters density must be in (0, 1], got {density}")
    _check_weights_and_rank(weights, how, rank)
    if len(weights) == 1 and how in FACTOR_WISE:
        how = "linear"  # nothing to elect or rescale against, as peft has it
    if new_name in {ref.name for ref in adapter_refs(module)}:
        raise ValueError(f"combine_adapters: this model already has an adapter named '{new_name}'")
    configs = {name: find_adapter(module, name, LoRA.method_name).config for name in weights}
    pissa = [name for name, config in configs.items() if config.get("init") == "pissa"]
    if pissa:
        raise ValueError(f"combine_adapters: '{pissa[0]}' is a PiSSA adapter, whose top-r part of W the base weights "
                         "no longer hold, so a combination would compute against a changed base; combine plain LoRA "
                         "adapters")
    layers = _layers_of(module, weights)
    use_dora = _same_kind(configs)
    new_rank = _new_rank(how, configs, rank)
    generator = torch.Generator().manual_seed(seed)
    values = {name: _combined(layer, weights, how, new_rank, density, majority_sign, generator, use_dora)
              for name, layer in layers}
    heads = list(dict.fromkeys(head for config in configs.values() for head in config["modules_to_save"] or []))
    with all_or_nothing(module), torch.no_grad():  # a failure half-way leaves no half-filled adapter
        LoRA(r=new_rank, alpha=new_rank, dropout=next(iter(configs.values()))["dropout"], use_dora=use_dora,
             target_modules=[_target_name(name) for name, _ in layers], modules_to_save=heads or None,
             adapter_name=new_name).inject(module)
        for name, layer in layers:
            adapter = layer.adapters[new_name]
            for tensor, value in values[name].items():
                getattr(adapter, tensor).copy_(value)
        _combine_heads(module, weights, new_name)
    return module


def _combine_heads(module: nn.Module, weights: Mapping[str, float], new_name: str) -> None:
    """Give each ``modules_to_save`` copy of ``new_name`` the original plus the inputs' weighted changes to it,
    ``W + sum_i w_i (W_i - W)``, as the LoRA updates combine (an input without a copy there adds nothing); its
    floating buffers (a norm's running statistics) the inputs' mean weighted by ``|w_i|``, which keeps a variance
    positive whatever the signs."""
    for saved in module.modules():
        if isinstance(saved, SavedModule) and new_name in saved.adapters:
            inputs = [(saved.adapters[name], weight) for name, weight in weights.items() if name in saved.adapters]
            for tensor, param in saved.adapters[new_name].named_parameters():
                original = saved.base_layer.get_parameter(tensor)
                param.copy_(original + sum(weight * (part.get_parameter(tensor) - original) for part, weight in inputs))
            total = sum(abs(weight) for _, weight in inputs)
            for tensor, buffer in saved.adapters[new_name].named_buffers():
                if buffer.is_floating_point() and total > 0:
                    buffer.copy_(sum(abs(weight) / total * part.get_buffer(tensor) for part, weight in inputs))


def _check_weights_and_rank(weights: Mapping[str, float], how: str, rank: int | None) -> None:
    """Refuse weights that are not finite numbers, and a ``rank`` that is not a positive int or not for "svd"."""
    bad = next(((n, w) for n, w in weights.items() if isinstance(w, bool) or not isinstance(w, numbers.Real)
                or not math.isfinite(w)), None)
    if bad is not None:
        raise ValueError(f"combine_adapters: the weight of '{bad[0]}' must be a finite number, got {bad[1]!r}")
    if rank is None:
        return
    if how != "svd":
        raise ValueError(f"combine_adapters: rank sets the rank of how='svd' alone; how={how!r} gives the rank "
                         + ("the sum of the inputs' ranks" if how == "cat" else "of its inputs"))
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"combine_adapters: rank must be a positive integer, got {rank!r}")


def _layers_of(module: nn.Module, weights: Mapping[str, float]) -> list[tuple[str, LoRALayer]]:
    layers = [(name, layer) for name, layer in peft_layers(module)
              if isinstance(layer, LoRALayer) and any(a in layer.adapters for a in weights)]
    fused = next((name for name, layer in layers if isinstance(layer, LoRAParameter)), None)
    if fused is not None:
        raise ValueError(f"combine_adapters combines LoRA adapters of modules; '{fused}' adapts a fused parameter")
    return layers


def _same_kind(configs: dict[str, dict]) -> bool:
    """Whether the inputs are DoRA adapters; an error when some are and some are not."""
    kinds = {name: bool(config["use_dora"]) for name, config in configs.items()}
    if len(set(kinds.values())) > 1:
        raise ValueError(f"combine_adapters cannot mix DoRA and plain LoRA adapters: DoRA is "
                         f"{', '.join(n for n, dora in kinds.items() if dora)}, plain LoRA is "
                         f"{', '.join(n for n, dora in kinds.items() if not dora)}")
    return next(iter(kinds.values()))


def _new_rank(how: str, configs: dict[str, dict], rank: int | None) -> int:
    ranks = {name: config["r"] for name, config in configs.items()}
    if how == "cat":
        return sum(ranks.values())
    if how == "svd":
        return max(ranks.values()) if rank is None else rank
    if len(set(ranks.values())) > 1:
        raise ValueError(f"combine_adapters how={how!r} adds factors, so the adapters need one rank; got "
                         f"{', '.join(f'{n}: r={r}' for n, r in ranks.items())} (how='cat' or 'svd' take any ranks)")
    return next(iter(ranks.values()))


def _target_name(layer_name: str) -> str:
    """The module name that LoRA targets for a LoRA layer found at ``layer_name`` (inside other methods' wrappers)."""
    while layer_name.endswith(".base_layer"):
        layer_name = layer_name[: -len(".base_layer")]
    return layer_name


@torch.no_grad()
def _combined(layer: LoRALayer, weights: Mapping[str, float], how: str, rank: int, density: float,
              majority_sign: str, generator: torch.Generator, use_dora: bool) -> dict[str, Tensor]:
    """The new adapter's tensors on one layer: ``lora_A``, ``lora_B`` and, for DoRA, ``magnitude``."""
    present = [(layer.adapters[name], weight) for name, weight in weights.items() if name in layer.adapters]
    if how == "svd":
        a, b = _svd_factors(layer, present, rank)
    elif how == "cat":
        a, b = _pad_rank(torch.cat([_weighted(x, w)[0] for x, w in present]),
                         torch.cat([_weighted(x, w)[1] for x, w in present], dim=1), rank)
    else:
        coefficients = [_coefficients(x, w) for x, w in present]
        a = _merge([x.lora_A.float() for x, _ in present], [c for c, _ in coefficients], how, density, majority_sign,
                   generator)
        b = _merge([x.lora_B.float() for x, _ in present], [c for _, c in coefficients], how, density, majority_sign,
                   generator)
    values = {"lora_A": a, "lora_B": b}
    if use_dora:
        base_norm = torch.linalg.norm(layer.from_weight_layout(layer.base_weight()).float(), dim=1)
        values["magnitude"] = base_norm + sum(w * (x.magnitude.float() - base_norm) for x, w in present)
    return values


def _coefficients(adapter: LoRAAdapter, weight: float) -> tuple[float, float]:
    """``(sign(w) c, c)`` with ``c = sqrt(|w| s)``: the factors of ``w s B A`` that A and B take."""
    c = math.sqrt(abs(weight) * adapter.scale)
    return math.copysign(c, weight), c


def _weighted(adapter: LoRAAdapter, weight: float) -> tuple[Tensor, Tensor]:
    """``(sign(w) c A, c B)``: their product is ``w s B A``."""
    for_a, for_b = _coefficients(adapter, weight)
    return for_a * adapter.lora_A.float(), for_b * adapter.lora_B.float()


def _pad_rank(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """A and B with zero rows (A) and columns (B) up to ``rank``, where some inputs do not adapt this layer."""
    missing = rank - a.shape[0]
    a = torch.cat([a, a.new_zeros(missing, *a.shape[1:])])
    return a, torch.cat([b, b.new_zeros(b.shape[0], missing, *b.shape[2:])], dim=1)


def _merge(parts: list[Tensor], coefficients: list[float], how: str, density: float, majority_sign: str,
           generator: torch.Generator) -> Tensor:
    """One factor of the new adapter from the inputs' factors and their ``coefficients``, as ``how`` merges them
    (entry by entry)."""
    stacked = torch.stack(parts)
    weights = torch.tensor(coefficients, device=stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    if how == "linear":
        return (weights * stacked).sum(0)
    if how == "dare_linear":
        return (weights * _random_pruned(stacked, density, generator)).sum(0)
    kept = _magnitude_pruned(stacked, density) if how == "ties" else _random_pruned(stacked, density, generator)
    total = kept.sum(0) if majority_sign == "total" else kept.sign().sum(0)
    agrees = kept.sign() == torch.where(total >= 0, 1.0, -1.0)
    return (weights * kept * agrees).sum(0) / agrees.sum(0).clamp(min=1)


def _magnitude_pruned(stacked: Tensor, density: float) -> Tensor:
    """Each input's factor with all but its ``density`` largest-magnitude entries set to zero (TIES)."""
    flat = stacked.flatten(1)
    largest = flat.abs().topk(max(1, int(density * flat.shape[1])), dim=1).indices
    return (flat * torch.zeros_like(flat).scatter_(1, largest, 1.0)).view_as(stacked)


def _random_pruned(stacked: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """Each entry kept with probability ``density`` and rescaled by ``1 / density`` (DARE)."""
    keep = torch.rand(stacked.shape, generator=generator) < density
    return stacked * keep.to(stacked.device) / density


def _svd_factors(layer: LoRALayer, present: list[tuple[LoRAAdapter, float]], rank: int) -> tuple[Tensor, Tensor]:
    """A and B of the best rank-``rank`` approximation of ``sum_i w_i s_i B_i A_i``, shaped like the layer's."""
    delta = sum(w * x.update().float() for x, w in present)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    kept = min(rank, s.shape[0])
    a = torch.zeros(rank, delta.shape[1], dtype=delta.dtype, device=delta.device)
    b = torch.zeros(delta.shape[0], rank, dtype=delta.dtype, device=delta.device)
    a[:kept], b[:, :kept] = vh[:kept], u[:, :kept] * s[:kept]
    return a.view(layer.a_shape(rank)), b.view(layer.b_shape(rank))
