"""LoRA layers: output = base(x) + scale * B(A(dropout(x))), with the DoRA and rsLoRA variants.

Every kind of base layer (linear, GPT-2 Conv1D, embedding, convolution) keeps A as
``(r, fan_in...)`` and B as ``(out, r, ...)``, the shapes Hugging Face peft uses, so the
update ``B @ A`` reads the same everywhere; each kind only says how to apply A and B to an
input and how to lay the update out like its base weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.core.dropout import Dropout
from lightning_peft.core.layer import PEFTLayer, adapter_dtype, linear_features, to_adapter_dtype
from lightning_peft.core.per_row import add_to_rows
from lightning_peft.core.weights import read_weight, replace_weight, write_weight
from lightning_peft.lora.fused import FusedDoRALinear, FusedLoRALinear

INITS = ("default", "gaussian", "pissa")


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    """The factor on ``B @ A``: ``alpha / r``, or rsLoRA's ``alpha / sqrt(r)``."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRAAdapter(nn.Module):
    """One low-rank update ``scale * B @ A`` with its input dropout and DoRA's magnitude."""

    def __init__(self, r: int, a_shape: tuple[int, ...], b_shape: tuple[int, ...], alpha: float, dropout: float,
                 use_rslora: bool, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.r = r
        self.lora_A = nn.Parameter(torch.zeros(a_shape, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, dtype=dtype, device=device))
        self.dropout = Dropout(dropout)
        self.scale = lora_scale(alpha, r, use_rslora)
        self.magnitude: nn.Parameter | None = None  # DoRA: one learned norm per output feature
        self.init = "default"
        self.random_factor = "lora_A"  # the factor that starts random; the other starts at zero

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Start so that the layer computes as its base: ``random_factor`` drawn as ``init`` says, the other zero.

        Also what a model built on the meta device gets when it is materialized (``to_empty``, then each module's
        ``reset_parameters``, as Lightning's FSDP strategies do).
        """
        if self.init == "pissa":  # W's top singular triplets, taken out of the base weight once
            self.lora_A.copy_(self.initial_A)
            self.lora_B.copy_(self.initial_B)
            return
        random = getattr(self, self.random_factor)
        (self.lora_B if random is self.lora_A else self.lora_A).zero_()
        if self.init == "gaussian":
            nn.init.normal_(random, std=1 / self.r)
        elif random is self.lora_A:
            nn.init.kaiming_uniform_(random, a=math.sqrt(5))
        else:
            nn.init.normal_(random, std=1.0)

    def update(self) -> Tensor:
        """The dense update ``scale * B @ A`` as an ``(out, fan_in)`` matrix."""
        return (self.lora_B.flatten(1) @ self.lora_A.flatten(1)) * self.scale


class LoRALayer(PEFTLayer):
    """A base layer plus LoRA adapters; subclasses define how A and B meet the input."""

    method = "LoRA"
    mergeable = True
    per_row = True

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    use_dora: bool = False, init: str = "default") -> LoRAAdapter:
        weight = self.stored_weight()
        dtype = adapter_dtype(weight)
        adapter = LoRAAdapter(r, self.a_shape(r), self.b_shape(r), alpha, dropout, use_rslora, dtype, weight.device)
        if weight.is_meta and (use_dora or init == "pissa"):
            raise ValueError(f"LoRA {'use_dora' if use_dora else 'init=pissa'} starts from the base weights, which "
                             "are not there on the meta device: inject once they are loaded")
        self.initialize(adapter, init)
        if use_dora:
            norm = self.row_norm(adapter)
            zero = int((norm == 0).sum())
            if zero:  # its direction W / ||W|| is 0 / 0: NaN from the first forward (as in peft)
                raise ValueError(f"DoRA cannot adapt a layer whose weight has all-zero rows (here {zero} of "
                                 f"{len(norm)}: pruned or zero-initialised units), whose direction is undefined; "
                                 "use plain LoRA there, or leave the layer out (exclude_modules)")
            adapter.magnitude = nn.Parameter(norm.to(dtype))
        self.register_adapter(name, adapter)
        return adapter

    # --- what a kind of base layer defines -------------------------------------------------
    def stored_weight(self) -> Tensor:
        """The adapted weight as stored (possibly quantized): its device and dtype place the adapters."""
        return self.base_layer.weight

    def a_shape(self, r: int) -> tuple[int, ...]:
        raise NotImplementedError

    def b_shape(self, r: int) -> tuple[int, ...]:
        raise NotImplementedError

    def lora_output(self, x: Tensor, adapter: LoRAAdapter) -> Tensor:
        """``scale * B(A(x))`` for an input of this layer."""
        raise NotImplementedError

    def to_weight_layout(self, update: Tensor) -> Tensor:
        """Reshape an ``(out, fan_in)`` update like ``base_layer.weight``."""
        raise NotImplementedError

    def from_weight_layout(self, weight: Tensor) -> Tensor:
        """``base_layer.weight`` as an ``(out, fan_in)`` matrix."""
        raise NotImplementedError

    # --- shared --------------------------------------------------------------------------------
    def initialize(self, adapter: LoRAAdapter, init: str) -> None:
        """Default: A like nn.Linear's init and B = 0, so the layer starts as its base."""
        if init not in ("default", "gaussian"):
            raise ValueError(f"LoRA init={init!r} is not supported on {type(self.base_layer).__name__}")
        adapter.init = init
        adapter.reset_parameters()

    def base_weight(self) -> Tensor:
        """``base_layer.weight``, dequantized to float32 when bitsandbytes stores it in 8 or 4 bits."""
        return read_weight(self.base_layer)

    def row_norm(self, adapter: LoRAAdapter) -> Tensor:
        """DoRA's per-output norm of ``W + scale * B @ A``."""
        weight = self.from_weight_layout(self.base_weight()).to(adapter.lora_A.dtype)
        return torch.linalg.norm(weight + adapter.update(), dim=1)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.row_adapters is not None:
            return self.with_resting(add_to_rows(out, self.row_groups(x), lambda adapter, rows: self.delta(
                rows.take(x), rows.take(out), adapter)))
        for name in self.active_adapters:
            out = out + self.delta(x, out, self.adapters[name]).to(out.dtype)
        return out

    def delta(self, x: Tensor, out: Tensor, adapter: LoRAAdapter) -> Tensor:
        """What ``adapter`` adds to the base output ``out`` for the input ``x``."""
        return self.lora_output(to_adapter_dtype(adapter.dropout(x), adapter.lora_A.dtype), adapter)

    def swapped(self, tensor: str, value: Tensor, adapter: LoRAAdapter, settings: dict, where: str) -> Tensor:
        """A file's A or B for this slot: a lower rank padded with zeros, the file's scale folded into B."""
        if tensor not in ("lora_A", "lora_B"):
            return super().swapped(tensor, value, adapter, settings, where)
        rank_dim = 0 if tensor == "lora_A" else 1
        slot = getattr(adapter, tensor)
        rank = value.shape[rank_dim]
        if rank > adapter.r:
            raise ValueError(f"{where} has rank {rank}, above the slot's r={adapter.r}; use a slot of r >= {rank}")
        padding = list(value.shape)
        padding[rank_dim] = adapter.r - rank
        value = torch.cat([value.to(device=slot.device, dtype=slot.dtype), slot.new_zeros(padding)], dim=rank_dim)
        if tensor == "lora_B":
            value = value * (lora_scale(settings["alpha"], rank, settings["use_rslora"]) / adapter.scale)
        return self.same_shape(value, slot, where)

    def merge_update(self, adapter: LoRAAdapter) -> Tensor:
        """The ``(out, fan_in)`` change that merging ``adapter`` makes to the base weight."""
        return adapter.update()

    def unmerge_update(self, adapter: LoRAAdapter) -> Tensor:
        """The change that takes a merged ``adapter`` back out of the base weight."""
        return -adapter.update()

    @torch.no_grad()
    def merged_base_layer(self) -> nn.Module:
        for name in self.active_adapters:
            self._add_to_weight(self.merge_update(self.adapters[name]))
        return self.base_layer

    @torch.no_grad()
    def unmerge(self) -> None:
        for name in reversed(self.active_adapters):
            self._add_to_weight(self.unmerge_update(self.adapters[name]))

    def _add_to_weight(self, update: Tensor) -> None:
        write_weight(self.base_layer, self.base_weight() + self.to_weight_layout(update))


class LoRALinear(LoRALayer):
    """LoRA on nn.Linear, or on transformers' Conv1D (GPT-2), whose weight is stored transposed."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.transposed = not isinstance(base_layer, nn.Linear)  # Conv1D: weight is (in, out)
        self.in_features, self.out_features = linear_features(base_layer)

    def a_shape(self, r: int) -> tuple[int, ...]:
        return (r, self.in_features)

    def b_shape(self, r: int) -> tuple[int, ...]:
        return (self.out_features, r)

    def lora_output(self, x: Tensor, adapter: LoRAAdapter) -> Tensor:
        return F.linear(F.linear(x, adapter.lora_A) * adapter.scale, adapter.lora_B)

    def to_weight_layout(self, update: Tensor) -> Tensor:
        return update.T if self.transposed else update

    def from_weight_layout(self, weight: Tensor) -> Tensor:
        return weight.T if self.transposed else weight

    def initialize(self, adapter: LoRAAdapter, init: str) -> None:
        if init != "pissa":
            return super().initialize(adapter, init)
        self.initialize_pissa(adapter)

    @torch.no_grad()
    def initialize_pissa(self, adapter: LoRAAdapter) -> None:
        """PiSSA: A, B from the top-r singular triplets of W; the rest stays in the base weight."""
        weight = self.from_weight_layout(self.base_weight())
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        r = adapter.r
        root_s = torch.sqrt(s[:r] / adapter.scale)
        adapter.lora_A.copy_(root_s[:, None] * vh[:r])
        adapter.lora_B.copy_(u[:, :r] * root_s[None, :])
        adapter.register_buffer("initial_A", adapter.lora_A.detach().clone(), persistent=False)  # for pissa_as_lora
        adapter.register_buffer("initial_B", adapter.lora_B.detach().clone(), persistent=False)
        adapter.init = "pissa"
        residual = weight.float() - adapter.update()
        replace_weight(self.base_layer, self.to_weight_layout(residual))  # quantized again on a 4/8-bit base

    def delete_adapter(self, name: str) -> None:
        """Remove ``name``; a PiSSA adapter gives the base weight back the top-r part of W it took."""
        adapter = self.adapters[name]
        if hasattr(adapter, "initial_A"):
            with torch.no_grad():
                taken = (adapter.initial_B @ adapter.initial_A).float() * adapter.scale
                whole = self.from_weight_layout(self.base_weight()).float() + taken
                replace_weight(self.base_layer, self.to_weight_layout(whole))
        super().delete_adapter(name)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        adapter = self.fused_adapter(x, args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        if adapter.magnitude is not None:
            with torch.no_grad():  # DoRA's norm is detached: no graph for it
                norm = self.row_norm(adapter)
            return FusedDoRALinear.apply(x, base.weight, base.bias, adapter.lora_A, adapter.lora_B, adapter.magnitude,
                                         adapter.scale, norm)
        keep = adapter.dropout.keep_mask(x)
        scale = adapter.scale * (1.0 if keep is None else adapter.dropout.keep_scale)
        return FusedLoRALinear.apply(x, base.weight, base.bias, adapter.lora_A, adapter.lora_B, scale, keep)

    def fused_adapter(self, x: Tensor, args: tuple, kwargs: dict) -> LoRAAdapter | None:
        """The one active adapter when a fused path computes exactly the layer's formula, else None.

        That needs one adapter for the whole batch (no `per_row_adapters`), a frozen, unhooked
        ``nn.Linear`` base and one dtype for input, weight and adapter without autocast, and for
        DoRA no active dropout; anything else (a quantized or trainable base, several adapters, DoRA
        with dropout, mixed dtypes) takes the plain path, as ``torch.export`` does (whose graph would keep
        the fused path's ``out=`` products, which autograd refuses).
        """
        base = self.base_layer
        plain = self.row_adapters is not None or torch.compiler.is_exporting()
        if plain or args or kwargs or len(self.active_adapters) != 1 or type(base) is not nn.Linear:
            return None
        adapter = self.adapters[self.active_adapters[0]]
        frozen = not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
        unhooked = not (base._forward_hooks or base._forward_pre_hooks)
        same_dtype = x.dtype == base.weight.dtype == adapter.lora_A.dtype
        plain_or_undropped_dora = adapter.magnitude is None or not adapter.dropout.active
        if plain_or_undropped_dora and frozen and unhooked and same_dtype and not torch.is_autocast_enabled(
                x.device.type):
            return adapter
        return None

    def delta(self, x: Tensor, out: Tensor, adapter: LoRAAdapter) -> Tensor:
        if adapter.magnitude is None:
            return super().delta(x, out, adapter)
        return self.dora_delta(to_adapter_dtype(adapter.dropout(x), adapter.lora_A.dtype), out, adapter)

    def dora_delta(self, x: Tensor, out: Tensor, adapter: LoRAAdapter) -> Tensor:
        """DoRA: rescale ``W + scale * B @ A`` row-wise to the learned magnitude (norm detached).

        ``norm_scale - 1`` is taken in the adapter's dtype: rounded to a half-precision input's
        first (bf16 autocast), a magnitude's small change would be lost.
        """
        ratio = adapter.magnitude / self.row_norm(adapter).detach()
        if not adapter.dropout.active:
            bias = getattr(self.base_layer, "bias", None)
            base = out.to(x.dtype) if bias is None else out.to(x.dtype) - bias.to(x.dtype)
        else:  # the base output saw the undropped input: recompute it on the dropped one
            base = F.linear(x, self.from_weight_layout(self.base_weight()).to(x.dtype))
        return (ratio - 1).to(x.dtype) * base + ratio.to(x.dtype) * self.lora_output(x, adapter)

    @torch.no_grad()
    def merged_base_layer(self) -> nn.Module:
        # DoRA normalises against the unmerged weight, so take every norm before any merge.
        for name in self.active_adapters:
            adapter = self.adapters[name]
            if adapter.magnitude is not None:
                adapter.merged_norm_scale = (adapter.magnitude / self.row_norm(adapter))[:, None]
        return super().merged_base_layer()

    def merge_update(self, adapter: LoRAAdapter) -> Tensor:
        if adapter.magnitude is None:
            return adapter.update()
        weight = self.from_weight_layout(self.base_weight()).to(adapter.lora_A.dtype)
        return adapter.merged_norm_scale * (weight + adapter.update()) - weight

    def unmerge_update(self, adapter: LoRAAdapter) -> Tensor:
        if adapter.magnitude is None:
            return -adapter.update()
        merged = self.from_weight_layout(self.base_weight()).to(adapter.lora_A.dtype)
        return merged / adapter.merged_norm_scale - adapter.update() - merged


class LoRAEmbedding(LoRALayer):
    """LoRA on nn.Embedding: A is looked up like an embedding table, then B projects it."""

    def a_shape(self, r: int) -> tuple[int, ...]:
        return (r, self.base_layer.num_embeddings)

    def b_shape(self, r: int) -> tuple[int, ...]:
        return (self.base_layer.embedding_dim, r)

    def initialize(self, adapter: LoRAAdapter, init: str) -> None:
        """A = 0 and B random (peft's choice for embeddings), so the layer starts as its base."""
        if init == "pissa":
            raise ValueError("LoRA init='pissa' needs a linear layer, not nn.Embedding")
        adapter.random_factor = "lora_B"
        super().initialize(adapter, init)

    def delta(self, x: Tensor, out: Tensor, adapter: LoRAAdapter) -> Tensor:
        return self.lora_output(x, adapter)  # token ids: no dropout, no cast

    def lora_output(self, x: Tensor, adapter: LoRAAdapter) -> Tensor:
        base = self.base_layer
        # No max_norm here: F.embedding would renormalise A's columns in place on every call.
        # Nor sparse gradients: A is small, and its transposed view has none.
        rows = F.embedding(x, adapter.lora_A.T, base.padding_idx, None, 2.0, base.scale_grad_by_freq, False)
        # a scaled embedding (Gemma's, BART's) multiplies its lookup by embed_scale: the update's row too, as merged
        return F.linear(rows, adapter.lora_B) * (adapter.scale * getattr(base, "embed_scale", 1.0))

    def to_weight_layout(self, update: Tensor) -> Tensor:
        return update.T

    def from_weight_layout(self, weight: Tensor) -> Tensor:
        return weight.T


class LoRAConv(LoRALayer):
    """LoRA on nn.Conv1d/Conv2d: A is a convolution like the base's with r filters, B a 1x1 one."""

    def a_shape(self, r: int) -> tuple[int, ...]:
        return (r, *self.base_layer.weight.shape[1:])

    def b_shape(self, r: int) -> tuple[int, ...]:
        return (self.base_layer.out_channels, r) + (1,) * (self.base_layer.weight.dim() - 2)

    def initialize(self, adapter: LoRAAdapter, init: str) -> None:
        if init == "pissa":
            raise ValueError("LoRA init='pissa' needs a linear layer, not a convolution")
        super().initialize(adapter, init)

    def lora_output(self, x: Tensor, adapter: LoRAAdapter) -> Tensor:
        base = self.base_layer
        conv = F.conv1d if base.weight.dim() == 3 else F.conv2d
        hidden = conv(x, adapter.lora_A, None, base.stride, base.padding, base.dilation)
        return conv(hidden, adapter.lora_B) * adapter.scale

    def to_weight_layout(self, update: Tensor) -> Tensor:
        return update.view(self.base_layer.weight.shape)

    def from_weight_layout(self, weight: Tensor) -> Tensor:
        return weight.flatten(1)


def lora_layer_for(module: nn.Module) -> LoRALayer:
    """The LoRA layer that wraps ``module``."""
    if isinstance(module, nn.Embedding):
        return LoRAEmbedding(module)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return LoRAConv(module)
    return LoRALinear(module)
