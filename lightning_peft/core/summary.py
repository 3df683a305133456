"""How many parameters each adapter trains, how many bytes it takes, and how the frozen base is stored."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from lightning_peft.core.ownership import owners
from lightning_peft.core.weights import element_count, is_quantized, quantized_format, statistics_bytes


@dataclass
class MethodRow:
    method: str
    params: int
    bytes: int


@dataclass
class TrainableSummary:
    """Trainable and total parameter counts of a module, one row per adapter, and the frozen base's storage."""

    trainable: int
    total: int
    methods: list[MethodRow] = field(default_factory=list)
    base_bytes: int = 0  # the parameters no adapter trains, with quantization statistics
    quantized_layers: dict[str, int] = field(default_factory=dict)  # storage format -> layers (e.g. {"nf4": 210})

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    @property
    def adapter_bytes(self) -> int:
        return sum(row.bytes for row in self.methods)

    def __str__(self) -> str:
        lines = [f"{'method':<28}{'params':>14}{'% of total':>12}{'bytes':>14}"]
        for row in self.methods:
            share = 100.0 * row.params / self.total if self.total else 0.0
            lines.append(f"{row.method:<28}{row.params:>14,}{share:>11.3f}%{size_text(row.bytes):>14}")
        lines.append(f"{'trainable':<28}{self.trainable:>14,}{self.percent:>11.3f}%"
                     f"{size_text(self.adapter_bytes):>14}")
        lines.append(f"{'total':<28}{self.total:>14,}")
        storage = ", ".join(f"{n} {kind} layers" for kind, n in self.quantized_layers.items()) or "not quantized"
        lines.append(f"{'frozen base (' + storage + ')':<54}{size_text(self.base_bytes):>14}")
        return "\n".join(lines)


def trainable_summary(module: nn.Module) -> TrainableSummary:
    """Count what trains and what is stored: trainable and total parameters, each adapter's size, the frozen base's.

    Printed, the summary is a table with one row per adapter (``LoRA[default]``: parameters,
    share of the total, bytes), the trainable and total counts, and the frozen base's bytes with
    its storage (not quantized, or how many layers are quantized in which format). The PEFT
    callbacks log it at the start of ``fit``.

    Args:
        module: any module: a model with adapters, a LightningModule, or a plain model.

    Returns:
        A ``TrainableSummary`` with ``trainable`` and ``total`` parameter counts, ``percent``
        (trainable share, in percent), ``methods`` (per adapter: its label, parameters and bytes),
        ``adapter_bytes``, ``base_bytes`` (the parameters no adapter trains, with quantization
        statistics) and ``quantized_layers`` (storage format -> number of layers).

    Examples:
        ```python
        from lightning_peft import trainable_summary

        print(trainable_summary(module))
        trainable_summary(module).percent  # the trainable share, in percent
        ```
    """
    claimed = owners(module)
    rows: dict[str, MethodRow] = {}
    for param in module.parameters():
        ref = claimed.get(id(param))
        if ref is not None:
            row = rows.setdefault(str(ref), MethodRow(str(ref), 0, 0))
            row.params += param.numel()
            row.bytes += param.nbytes
    return TrainableSummary(
        trainable=sum(p.numel() for p in module.parameters() if p.requires_grad),
        total=sum(element_count(p) for p in module.parameters()),  # a 4-bit base's weights by their real shape
        methods=list(rows.values()),
        base_bytes=base_weight_bytes(module, claimed),
        quantized_layers=dict(Counter(quantized_format(m) for m in module.modules() if is_quantized(m))),
    )


def base_weight_bytes(module: nn.Module, claimed: dict | None = None) -> int:
    """Bytes of the frozen base: the parameters that no adapter trains, plus quantization statistics."""
    claimed = owners(module) if claimed is None else claimed
    params = sum(p.nbytes for p in module.parameters() if id(p) not in claimed)
    return params + sum(statistics_bytes(m) for m in module.modules() if is_quantized(m))


def size_text(num_bytes: float) -> str:
    """``num_bytes`` in B, KiB, MiB or GiB (powers of 1024, named so), for people."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return ""
