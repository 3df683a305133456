"""LoRA as a Lightning callback: low-rank updates of frozen weights (rsLoRA, DoRA, PiSSA)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lightning_peft.core.checks import check_choice, check_positive_int, check_probability
from lightning_peft.core.injection import wrap_modules
from lightning_peft.core.layer import innermost_base
from lightning_peft.core.targeting import Targets, linear_types, select_modules
from lightning_peft.lightning.callback import CheckpointPolicy, PEFTCallback
from lightning_peft.lora.layers import INITS, LoRALayer, lora_layer_for
from lightning_peft.lora.peft_format import LORA_FORMAT


class LoRA(PEFTCallback):
    """Train ``scale * B @ A`` beside each targeted weight; scale = alpha / r (alpha / sqrt(r) with rsLoRA).

    Args:
        r: rank of the update.
        alpha: scaling numerator.
        dropout: dropout on the adapter's input.
        target_modules: module-name suffixes, a full-match regex, or ``"all-linear"``.
        exclude_modules: the same forms, taken out of the targets.
        layers: block indices to adapt (all when ``None``).
        use_dora: DoRA, a learned magnitude per output feature (linear layers).
        use_rslora: scale by ``alpha / sqrt(r)``.
        init: ``"default"`` (B = 0), ``"gaussian"`` or ``"pissa"`` (principal singular components).
        modules_to_save: whole modules trained and saved with the adapter, e.g. ``["classifier"]``.
        adapter_name: name of this adapter; several can live on one model.
        checkpoint: ``"adapter"`` keeps checkpoints to the trainable tensors, ``"full"`` keeps all.
    """

    method_name = "LoRA"
    peft_format = LORA_FORMAT

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        target_modules: Targets = "all-linear",
        exclude_modules: Targets = None,
        layers: Sequence[int] | None = None,
        use_dora: bool = False,
        use_rslora: bool = False,
        init: str = "default",
        modules_to_save: Sequence[str] | None = None,
        adapter_name: str = "default",
        checkpoint: CheckpointPolicy = "adapter",
    ) -> None:
        super().__init__(adapter_name=adapter_name, checkpoint=checkpoint, modules_to_save=modules_to_save)
        check_positive_int("LoRA", "r", r)
        if not alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
        check_probability("LoRA", "dropout", dropout)
        check_choice("LoRA", "init", init, INITS)
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.target_modules, self.exclude_modules, self.layers = target_modules, exclude_modules, layers
        self.use_dora, self.use_rslora, self.init = use_dora, use_rslora, init

    def inject_into(self, module: nn.Module) -> list[nn.Parameter]:
        chosen = select_modules(
            module, self.target_modules, self.exclude_modules, self.layers,
            supported=(*linear_types(), nn.Embedding, nn.Conv1d, nn.Conv2d), method="LoRA",
        )
        self._check_before_injecting(module, chosen)
        layers = wrap_modules(module, chosen, lora_layer_for, LoRALayer, innermost=True)
        params = []
        for _, layer in layers:
            adapter = layer.add_adapter(self.adapter_name, self.r, self.alpha, self.dropout, self.use_rslora,
                                        self.use_dora, self.init)
            params.extend(adapter.parameters())
        return params

    def _check_before_injecting(self, root: nn.Module, chosen: list[tuple[str, nn.Module]]) -> None:
        """Refuse what would fail half-way, so a refused injection leaves the model untouched."""
        for name, module in chosen:
            base = innermost_base(module)
            if (self.use_dora or self.init == "pissa") and not isinstance(base, linear_types()):
                what = "DoRA" if self.use_dora else "init='pissa'"
                raise TypeError(f"LoRA {what} needs linear layers; '{name}' is {type(base).__name__}")
            if isinstance(base, (nn.Conv1d, nn.Conv2d)) and (base.groups != 1 or base.padding_mode != "zeros"):
                raise TypeError(f"LoRA adapts convolutions with groups=1 and padding_mode='zeros'; '{name}' is not")
