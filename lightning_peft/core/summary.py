"""How many parameters each PEFT method trains, and how many bytes its adapter takes."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lightning_peft.core.injection import owner_of


@dataclass
class MethodRow:
    method: str
    params: int
    bytes: int


@dataclass
class TrainableSummary:
    """Trainable and total parameter counts of a module, with one row per PEFT method."""

    trainable: int
    total: int
    methods: list[MethodRow] = field(default_factory=list)

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
            lines.append(f"{row.method:<28}{row.params:>14,}{share:>11.3f}%{_size(row.bytes):>14}")
        lines.append(f"{'trainable':<28}{self.trainable:>14,}{self.percent:>11.3f}%{_size(self.adapter_bytes):>14}")
        lines.append(f"{'total':<28}{self.total:>14,}")
        return "\n".join(lines)


def trainable_summary(module: nn.Module) -> TrainableSummary:
    """Count trainable/total parameters of ``module`` and the parameters and bytes of each method."""
    owners = owner_of(module)
    rows: dict[str, MethodRow] = {}
    for param in module.parameters():
        owner = owners.get(id(param))
        if owner is not None:
            row = rows.setdefault(owner, MethodRow(owner, 0, 0))
            row.params += param.numel()
            row.bytes += param.numel() * param.element_size()
    return TrainableSummary(
        trainable=sum(p.numel() for p in module.parameters() if p.requires_grad),
        total=sum(p.numel() for p in module.parameters()),
        methods=list(rows.values()),
    )


def _size(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return ""
