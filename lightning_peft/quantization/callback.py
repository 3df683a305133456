"""QuantizeBase: the frozen base model's linear layers stored in 8 or 4 bits through bitsandbytes (QLoRA)."""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_peft.core.injection import ModulePlaces, keep_pytorch_fast_paths_off
from lightning_peft.core.layer import PEFTLayer
from lightning_peft.core.merging import check_unmerged
from lightning_peft.core.models import transformers_models
from lightning_peft.core.ownership import holders, owners
from lightning_peft.core.summary import base_weight_bytes, size_text
from lightning_peft.core.targeting import ALL_LINEAR, Targets, fused_expert_parameters, name_matches, select_modules
from lightning_peft.core.weights import import_bitsandbytes, is_quantized, quantized_format
from lightning_peft.lightning.callback import ModelSetupCallback, setup_callbacks
from lightning_peft.quantization.layers import MODES, describe_in_config, forget_quantization, quantize_linear
from lightning_peft.quantization.memory import release_file_pages, return_freed_memory

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZABLE = (torch.float32, torch.float16, torch.bfloat16)  # what bitsandbytes quantizes


class QuantizeBase(ModelSetupCallback):
    """Store the frozen ``nn.Linear`` layers of the base in int8, nf4 or fp4 (bitsandbytes) to save memory (QLoRA).

    A callback like the PEFT methods, applied at setup one layer at a time; ``inject`` applies it
    to a module outside a Trainer. It works before or after the PEFT methods: a layer that a method
    already wraps has its innermost base quantized, and a method injected later wraps the quantized
    layer. The output head, the methods' own layers, modules they train, the modules a transformers
    model keeps in float32 (``_keep_in_fp32_modules``, as T5's ``wo``) and ``skip_modules`` stay in
    full precision, as do GPT-2's Conv1D layers and fused expert weights (a warning gives their
    size). Each layer's full-precision weight is freed as soon as it is quantized. It changes how
    the base is stored and owns no adapter: nothing of it is saved with adapters, which load on the
    plain base. Needs the ``bitsandbytes`` package.

    Args:
        mode: ``"int8"`` (LLM.int8() weights, ``bnb.nn.Linear8bitLt``), ``"nf4"`` or ``"fp4"``
            (``bnb.nn.Linear4bit``).
        double_quant: 4-bit modes: quantize the per-block scales too (QLoRA's double quantization).
        compute_dtype: 4-bit modes: dtype of the matmuls, ``"float32"``, ``"bfloat16"``,
            ``"float16"`` or one of those torch dtypes; ``None`` follows the input. Half precision
            on CPU is slow, and a warning says so.
        skip_modules: module-name suffixes (a list) or a regex that must match the whole module name
            (a string), of modules to keep in full precision; a name that matches nothing raises a
            ValueError at setup.

    Raises:
        ValueError: when ``mode`` or ``compute_dtype`` is not an allowed value, or ``compute_dtype``
            is given with ``mode="int8"``. At setup (or `inject`): when there is no ``nn.Linear``
            layer to quantize, or ``skip_modules`` matches nothing.
        ImportError: when bitsandbytes is not installed or fails to import.

    Examples:
        ```python
        import lightning as L
        from lightning_peft import LoRA, QuantizeBase

        trainer = L.Trainer(callbacks=[QuantizeBase(mode="nf4"), LoRA(r=16, target_modules="all-linear")])
        trainer.fit(module)
        ```
    """

    replaces_base_layers = True  # setup's rollback record of the replaced layers is dropped once setup is done

    def __init__(self, mode: str = "nf4", double_quant: bool = True, compute_dtype: str | torch.dtype | None = None,
                 skip_modules: Targets = None) -> None:
        if mode not in MODES:
            raise ValueError(f"QuantizeBase mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "int8" and compute_dtype is not None:
            raise ValueError("QuantizeBase compute_dtype applies to the 4-bit modes; "
                             "int8 computes in the input's dtype")
        import_bitsandbytes("QuantizeBase")
        self.mode, self.double_quant, self.skip_modules = mode, double_quant, skip_modules
        self._compute_dtype = _as_compute_dtype(compute_dtype)
        self.compute_dtype = None if compute_dtype is None else str(self._compute_dtype).removeprefix("torch.")
        self._device: torch.device | None = None
        self._trained_whole: list[str] = []  # the trainer's methods' modules_to_save: they stay in full precision
        self.base_bytes: tuple[int, int] | None = None  # frozen base weights before and after quantizing
        self.quantized_layers = 0
        self._applied: weakref.WeakSet[nn.Module] = weakref.WeakSet()

    def prepare(self, trainer: L.Trainer) -> None:
        self._device = trainer.strategy.root_device  # quantize on the device it trains on, before it moves there
        self._trained_whole = [name for callback in setup_callbacks(trainer)
                               for name in getattr(callback, "modules_to_save", ())]

    def apply(self, module: nn.Module) -> nn.Module:
        """Quantize the frozen linear layers of ``module`` (once)."""
        if module not in self._applied or not any(is_quantized(m) for m in module.modules()):  # a rollback undoes it
            check_unmerged(module, "QuantizeBase", "or save the merged model and quantize it as a new base")
            self._quantize_all(module)
            self._applied.add(module)
        return module

    inject = apply  # as the PEFT methods spell it, for use outside a Trainer

    def config(self) -> dict[str, Any]:
        """How the base is stored (not how it computes): a checkpoint keeps it, and a fit from one on a base stored
        otherwise is warned."""
        return {"mode": self.mode, "double_quant": self.double_quant, "skip_modules": self.skip_modules}

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config()}

    def _quantize_all(self, module: nn.Module) -> None:
        self._check_no_other_format(module)
        names = self._layers_to_quantize(module)
        self._check_dtypes(module, names)  # before any layer changes: a failure half-way would leave half a base
        self._warn_fused_experts(module)  # warnings too (an error under -W error then changes nothing)
        if names:
            self._warn_if_slow(self._device or module.get_submodule(names[0]).weight.device)
        before, places = base_weight_bytes(module), ModulePlaces(module)
        for name in names:
            self._quantize(places, name)
            return_freed_memory()
        self.base_bytes, self.quantized_layers = (before, base_weight_bytes(module)), len(names)
        keep_pytorch_fast_paths_off(module)
        describe_in_config(module, self.mode, self.double_quant)

    def _check_dtypes(self, module: nn.Module, names: list[str]) -> None:
        """Refuse weights bitsandbytes cannot quantize (float64, say), naming the first, before anything changes."""
        for name in names:
            dtype = module.get_submodule(name).weight.dtype
            if dtype not in QUANTIZABLE:
                raise TypeError(f"QuantizeBase({self.mode!r}) quantizes float32, float16 and bfloat16 weights; "
                                f"'{name}' holds {dtype}: cast the model (model.float()) or keep the layer in full "
                                "precision with skip_modules")

    def _check_no_other_format(self, module: nn.Module) -> None:
        """A base quantized in another format already (by another QuantizeBase, or transformers) is refused."""
        other = sorted({quantized_format(m) for m in module.modules() if is_quantized(m)} - {self.mode})
        if other:
            raise ValueError(f"QuantizeBase({self.mode}): the base holds {other[0]} layers already; quantize it "
                             "once, in one format")

    def _warn_fused_experts(self, module: nn.Module) -> None:
        """Fused expert weights stay in full precision (bitsandbytes quantizes 2-D linear layers): say how much."""
        fused = [p.param for p in fused_expert_parameters(module)]
        if fused:
            size = sum(p.numel() * p.element_size() for p in fused)
            warnings.warn(f"QuantizeBase keeps {len(fused)} fused expert weights ({size_text(size)}) in full "
                          "precision: bitsandbytes quantizes nn.Linear layers, and these are 3-D parameters that "
                          "their module reads itself", stacklevel=3)

    def summary(self) -> str:
        """One line: how many layers were quantized and the frozen base's bytes before and after."""
        if self.base_bytes is None:
            return f"QuantizeBase({self.mode}): not injected yet"
        before, after = self.base_bytes
        return (f"QuantizeBase({self.mode}): {self.quantized_layers} linear layers quantized; frozen base weights "
                f"{size_text(before)} -> {size_text(after)} ({after / max(before, 1):.2f}x)")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        rank_zero_info(f"lightning_peft: {self.summary()}")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """After a failed setup is rolled back (by the first callback: this one, or one called before), the config
        says no more that the base is quantized."""
        super().on_exception(trainer, pl_module, exception)
        forget_quantization(pl_module)

    def _layers_to_quantize(self, module: nn.Module) -> list[str]:
        """Names of the base's full-precision nn.Linear layers to quantize, innermost under any PEFT layer."""
        skipped = []  # a block named here keeps every layer inside it in full precision, as transformers does
        if self.skip_modules is not None:  # a name that matches nothing is a typo: the error lists what exists
            skipped = [name for name, _ in select_modules(module, self.skip_modules, supported=(nn.Module,),
                                                          method="QuantizeBase", option="skip_modules",
                                                          whole_modules=True)]  # a head trained whole: kept
        try:
            chosen = select_modules(module, ALL_LINEAR, self.skip_modules, supported=(nn.Linear,),
                                    method="QuantizeBase", check_exclusions=False)  # skip_modules checked above
        except ValueError:
            raise ValueError("QuantizeBase found no nn.Linear layer to quantize outside the output head and "
                             "skip_modules (transformers' Conv1D, as in GPT-2, is not quantized)") from None
        trained = owners(module)
        kept = kept_in_full_precision(module)
        whole = [name for name, _ in module.named_modules() if name_matches(name, self._trained_whole)] + skipped
        names, tied, where = [], [], holders(module)
        for name, layer in chosen:
            if set(name.split(".")) & kept or any(name == w or name.startswith(w + ".") for w in whole):
                continue
            while isinstance(layer, PEFTLayer):
                name, layer = f"{name}.base_layer", layer.base_layer
            if is_quantized(layer) or id(layer.weight) in trained:
                continue
            (tied if len(where.get(id(layer.weight), ())) > 1 else names).append(name)  # none: computed
        if tied:
            warnings.warn(f"QuantizeBase keeps {', '.join(map(repr, tied))} in full precision: its weight is tied to "
                          "another module's (an embedding's, say), which quantizing it would untie", stacklevel=4)
        return names

    def _quantize(self, places: ModulePlaces, name: str) -> None:
        """Replace one layer by its quantized copy; the full-precision weight leaves memory on return."""
        layer = places.root.get_submodule(name)
        device = self._device or layer.weight.device
        places.put_in_place_of(layer, quantize_linear(layer, self.mode, self.double_quant, self._compute_dtype, device))
        release_file_pages(layer.weight)  # a memory-mapped checkpoint's pages would stay resident otherwise

    def _warn_if_slow(self, device: torch.device) -> None:
        """Half-precision 4-bit matmuls work on CPU but measured 11-14x slower than float32 ones: say so."""
        if self._compute_dtype in (torch.bfloat16, torch.float16) and torch.device(device).type == "cpu":
            warnings.warn(f"QuantizeBase compute_dtype={self.compute_dtype} on CPU: bitsandbytes runs half-precision "
                          "4-bit matmuls 11-14x slower there than float32 ones; leave compute_dtype=None on CPU",
                          stacklevel=2)


def kept_in_full_precision(module: nn.Module) -> set[str]:
    """Module names that the transformers models inside keep in float32 when quantized (T5's ``wo`` casts to it)."""
    return {name for _, model in transformers_models(module)
            for name in (*(model._keep_in_fp32_modules or ()), *(model._keep_in_fp32_modules_strict or ()))}


def _as_compute_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """The torch dtype that ``compute_dtype`` names, or a ValueError listing the choices."""
    if value is None or value in COMPUTE_DTYPES.values():
        return value
    if value not in COMPUTE_DTYPES:
        raise ValueError(f"QuantizeBase compute_dtype must be one of {', '.join(COMPUTE_DTYPES)} or None, "
                         f"got {value!r}")
    return COMPUTE_DTYPES[value]
