"""Peak training memory per device, estimated before training: formulas for the tensors, a probe for activations.

The probe builds the recipe's real model with the method injected and runs three training steps
on cuts of one batch (``b1``, ``b1``, ``b2`` rows, padded to the recipe's longest sequence): the
first allocates the optimizer's states, the next two measure how the step's peak grows with the
batch, which is extrapolated to the recipe's batch. On CPU the meter is the process's resident
memory (what the machine must have: runtime, weights, data, the allocator's holes); on CUDA the
allocated memory. Weights, gradients and optimizer states come from formulas, which also give
the split across devices under DDP and FSDP.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_peft.cli import build_cli

MIB = 2**20
OPTIMIZER_STATES = 2  # AdamW's exp_avg and exp_avg_sq, each the size of its parameter


@dataclass
class MemoryParts:
    """What a training process holds at its peak, in MiB, measured on one device for the recipe's batch."""

    weights: float  # parameters and buffers after injection (a quantized base at its stored size)
    trainable: float  # the trained parameters: their gradients and each optimizer state are this size again
    runtime: float  # the process without the model: interpreter, libraries, data (0 on CUDA)
    step: float  # a training step's growth above its start at the recipe's batch: activations, gradients
    load_peak: float  # the peak while the model was built (loading can briefly hold weights twice)
    batch_size: int
    probe_batches: tuple[int, int]


def per_device(parts: MemoryParts, devices: int = 1, strategy: str = "single") -> float:
    """One device's estimated peak (MiB): the probe's single-device figures split as the strategy splits them.

    DDP keeps everything on every device and adds gradient buckets the size of the gradients; FSDP
    shards weights, gradients and optimizer states across the devices. Every process builds the
    whole model first, so the loading peak stays.
    """
    states = parts.trainable * OPTIMIZER_STATES
    if strategy == "fsdp" and devices > 1:
        step = parts.step - parts.trainable * (1 - 1 / devices)  # the step's gradients, sharded
        return max(parts.load_peak, parts.runtime + (parts.weights + states) / devices + step)
    buckets = parts.trainable if strategy == "ddp" and devices > 1 else 0.0
    return max(parts.load_peak, parts.runtime + parts.weights + states + parts.step + buckets)


class Meter:
    """The memory a probe reads: resident memory and its high-water mark on CPU, allocated memory on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        return torch.cuda.memory_allocated() / MIB if self.cuda else _status_kib("VmRSS") / 1024

    def peak(self) -> float:
        return torch.cuda.max_memory_allocated() / MIB if self.cuda else _status_kib("VmHWM") / 1024

    def reset_peak(self) -> None:
        """Start a new high-water mark from the present (Linux: writing 5 to /proc/self/clear_refs)."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"/proc/self/status has no {field}: the memory estimate needs Linux")
    return int(match.group(1))


class ProbeSteps(L.Callback):
    """Record the memory at the start of training and each probe step's growth above its own start."""

    def __init__(self) -> None:
        self.meter: Meter | None = None
        self.start = self.load_peak = 0.0
        self.growth: list[float] = []
        self._before = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.meter = Meter(pl_module.device)
        self.start, self.load_peak = self.meter.now(), self.meter.peak()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.meter.reset_peak()
        self._before = self.meter.now()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           idx: int) -> None:
        self.growth.append(self.meter.peak() - self._before)


def probe_sizes(batch_size: int) -> tuple[int, int]:
    """Two cut-down batch sizes: a quarter of the batch and half of that (at least 1 and 2 rows)."""
    larger = min(batch_size, max(2, batch_size // 4))
    return max(1, larger // 2), larger


def cut(batch: dict[str, torch.Tensor], rows: int, length: int, pad: dict[str, int]) -> dict[str, torch.Tensor]:
    """The first ``rows`` of a batch, its sequences padded to ``length`` (the longest a recipe's batch can be)."""
    out = {}
    for key, value in batch.items():
        value = value[:rows]
        if value.dim() == 2 and value.shape[1] < length and key in pad:
            value = torch.nn.functional.pad(value, (0, length - value.shape[1]), value=pad[key])
        out[key] = value
    return out


class Batches:
    """A few ready batches as a train loader (a plain list would be read as several loaders)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def probe_loader(original: Callable[[], Any], sizes: tuple[int, int], length: int | None,
                 pad_id: int) -> Callable[[], Batches]:
    """A train loader of three cuts of the recipe's first batch: b1 (warm-up: optimizer states), b1, b2."""
    def loader() -> Batches:
        batch = next(iter(original()))
        longest = max(length or 0, batch["input_ids"].shape[1])
        pad = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0, "labels": -100}
        return Batches([cut(batch, rows, longest, pad) for rows in (sizes[0], sizes[0], sizes[1])])

    return loader


def probe(config: Path) -> MemoryParts:
    """Build the recipe of ``config`` and measure what its training holds, for the recipe's batch size."""
    cli = build_cli(["--config", str(config), "--trainer.max_steps=3", "--trainer.limit_val_batches=0",
                     "--trainer.logger=false", "--trainer.enable_checkpointing=false",
                     "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                     f"--trainer.default_root_dir={config.parent / 'probe'}"],  # the probe's files apart from the run's
                    run=False)
    trainer, module, data = cli.trainer, cli.model, cli.datamodule
    batch_size = data.batch_size
    sizes = probe_sizes(batch_size)
    pad_id = module.tokenizer.pad_token_id if module.tokenizer.pad_token_id is not None else 0
    data.train_dataloader = probe_loader(data.train_dataloader, sizes, getattr(data, "max_length", None), pad_id)
    steps = ProbeSteps()
    trainer.callbacks.append(steps)
    trainer.fit(module, datamodule=data)
    weights = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers())) / MIB
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad) / MIB
    _, small, large = steps.growth
    slope = (large - small) / (sizes[1] - sizes[0]) if sizes[1] > sizes[0] else 0.0
    step = large + max(slope, 0.0) * (batch_size - sizes[1])
    runtime = 0.0 if steps.meter.cuda else steps.start - weights
    return MemoryParts(weights, trainable, runtime, step, steps.load_peak, batch_size, sizes)


def as_row(parts: MemoryParts, devices: int, strategy: str) -> dict[str, Any]:
    """The estimate and its parts, for a result row."""
    return {"estimate_mib": per_device(parts, devices, strategy), **{f"estimate_{k}": v for k, v in
                                                                     asdict(parts).items()}}
