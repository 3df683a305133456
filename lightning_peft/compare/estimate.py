"""Peak training memory per device, estimated before training: formulas for the tensors, a probe for the step.

The probe builds the recipe's real model with the method injected and trains on cut-down batches
of two sizes (``b1`` rows, then ``b2``): the recipe's own batches with their own lengths, the first
of each size padded to the recipe's longest sequence. It records the process's peak above its
start after each size, and extrapolates that growth linearly to the recipe's batch. On CUDA the
meter is the allocated memory. On CPU it is the resident memory, which is what the machine must
have: there the heap keeps freed blocks that the next batch's other shapes cannot reuse, so the
peak creeps up for many steps; that creep grows with the batch like the activations do, so the
probe runs enough steps of each size to see most of it. Weights, gradients and optimizer states
come from formulas, which also give the split across devices under DDP and FSDP.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_peft.cli import build_cli
from lightning_peft.core.weights import is_quantized

MIB = 2**20
OPTIMIZER_STATES = 2  # AdamW's exp_avg and exp_avg_sq, each the size of its parameter
PROBE_STEPS = 20  # steps per probe size: on CPU the heap's creep from mixed shapes levels off by then (measured)


@dataclass
class MemoryParts:
    """What a training process holds at its peak, in MiB, measured on one device for the recipe's batch."""

    weights: float  # parameters and buffers after injection (a quantized base at its stored size)
    trainable: float  # the trained parameters: their gradients and each optimizer state are this size again
    runtime: float  # the process without the model: interpreter, libraries, data (0 on CUDA)
    step: float  # training's growth above its start at the recipe's batch, less the optimizer states: activations,
    # gradients and (CPU) the heap's kept holes
    load_peak: float  # the peak while the model was built (loading can briefly hold weights twice)
    batch_size: int
    probe_batches: tuple[int, int]
    unsharded: float = 0.0  # of ``weights``: a quantized base's, which FSDP keeps whole on every device


def per_device(parts: MemoryParts, devices: int = 1, strategy: str = "single") -> float:
    """One device's estimated peak (MiB): the larger of the loading peak and what training holds there."""
    held = on_each_device(parts, devices, strategy)
    return max(held.load_peak, held.runtime + held.weights + held.trainable * OPTIMIZER_STATES + held.step)


def on_each_device(parts: MemoryParts, devices: int = 1, strategy: str = "single") -> MemoryParts:
    """The probe's single-device parts as each device of ``strategy`` holds them.

    DDP keeps everything on every device and adds gradient buckets the size of the gradients (in
    ``step``); FSDP shards weights (but a quantized base's, which it leaves whole), gradients and
    optimizer states across the devices. Every process builds the whole model first, so the loading
    peak stays.
    """
    if devices > 1 and strategy == "fsdp":
        return replace(parts, weights=parts.unsharded + (parts.weights - parts.unsharded) / devices,
                       trainable=parts.trainable / devices,
                       step=parts.step - parts.trainable * (1 - 1 / devices))  # the step's gradients, sharded
    if devices > 1 and strategy == "ddp":
        return replace(parts, step=parts.step + parts.trainable)
    return parts


class Meter:
    """The memory a probe reads: resident memory and its high-water mark on CPU, allocated memory on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        return torch.cuda.memory_allocated() / MIB if self.cuda else status_kib("VmRSS") / 1024

    def peak(self) -> float:
        return torch.cuda.max_memory_allocated() / MIB if self.cuda else status_kib("VmHWM") / 1024

    def reset_peak(self) -> None:
        """Start a new high-water mark from the present (Linux: writing 5 to /proc/self/clear_refs)."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")


def status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (``VmRSS``, ``VmHWM``), in KiB; OSError off Linux."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"/proc/self/status has no {field}: the memory estimate needs Linux")
    return int(match.group(1))


class ProbeSteps(L.Callback):
    """Record the memory at the start of training and the peak above it after each probe step."""

    def __init__(self) -> None:
        self.meter: Meter | None = None
        self.start = self.load_peak = 0.0
        self.growth: list[float] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.meter = Meter(pl_module.device)
        self.start, self.load_peak = self.meter.now(), self.meter.peak()
        self.meter.reset_peak()  # training's peak apart from the loading's

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           idx: int) -> None:
        self.growth.append(self.meter.peak() - self.start)


def probe_sizes(batch_size: int) -> tuple[int, int]:
    """Two cut-down batch sizes: a quarter of the batch and half of that (at least 1 and 2 rows)."""
    larger = min(batch_size, max(2, batch_size // 4))
    return max(1, larger // 2), larger


def cut(batch: dict[str, Any], rows: int, length: int, pad: dict[str, int]) -> dict[str, Any]:
    """The first ``rows`` of a batch (its tensors and lists: MultiTaskData's tasks), its sequences padded to
    ``length`` (the longest a recipe's batch can be)."""
    out = {}
    for key, value in batch.items():
        value = value[:rows]
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] < length and key in pad:
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


def probe_loader(original: Callable[[], Any], sizes: tuple[int, int], steps: int, length: int | None,
                 pad_id: int) -> Callable[[], Batches]:
    """A train loader of ``steps`` batches of each probe size cut from the recipe's batches, smaller size first."""
    def loader() -> Batches:
        batches = list(itertools.islice(itertools.cycle(original()), steps))
        pad = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0, "labels": -100}
        longest = max(length or 0, batches[0]["input_ids"].shape[1])
        out = []
        for rows in sizes:  # the first batch of each size at the longest length: the largest activations early
            out += [cut(batch, rows, longest if i == 0 else 0, pad) for i, batch in enumerate(batches)]
        return Batches(out)

    return loader


def longest_sequence(data: L.LightningDataModule) -> int | None:
    """The most tokens a batch of ``data`` can have: ``max_length``, a causal LM's ``block_size``, or the longest of
    a multi-task data's tasks."""
    tasks = getattr(data, "parts", {}).values()
    lengths = [getattr(part, name, None) for part in (data, *tasks) for name in ("max_length", "block_size")]
    return max((n for n in lengths if isinstance(n, int)), default=None)


def probe(config: Path, steps: int = PROBE_STEPS) -> MemoryParts:
    """Build the recipe of ``config`` and measure what its training holds, for the recipe's batch size."""
    cli = build_cli(["--config", str(config), f"--trainer.max_steps={2 * steps}", "--trainer.limit_val_batches=0",
                     "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.max_epochs=-1",
                     "--trainer.limit_train_batches=1.0", "--trainer.accumulate_grad_batches=1",  # both sizes seen
                     "--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.strategy=auto",  # one device's memory
                     "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                     f"--trainer.default_root_dir={config.parent / 'probe'}"],  # the probe's files apart from the run's
                    run=False)
    trainer, module, data = cli.trainer, cli.model, cli.datamodule
    batch_size = data.batch_size
    sizes = probe_sizes(batch_size)
    pad_id = module.tokenizer.pad_token_id if module.tokenizer.pad_token_id is not None else 0
    data.train_dataloader = probe_loader(data.train_dataloader, sizes, steps, longest_sequence(data), pad_id)
    recorded = ProbeSteps()
    trainer.callbacks.append(recorded)
    trainer.fit(module, datamodule=data)
    weights = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers())) / MIB
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad) / MIB
    unsharded = sum(m.weight.numel() * m.weight.element_size() for m in module.modules() if is_quantized(m)) / MIB
    small, large = recorded.growth[steps - 1], recorded.growth[-1]
    slope = (large - small) / (sizes[1] - sizes[0]) if sizes[1] > sizes[0] else 0.0
    step = large + max(slope, 0.0) * (batch_size - sizes[1]) - trainable * OPTIMIZER_STATES
    runtime = 0.0 if recorded.meter.cuda else recorded.start - weights
    return MemoryParts(weights, trainable, runtime, step, recorded.load_peak, batch_size, sizes, unsharded)


def as_row(parts: MemoryParts, devices: int, strategy: str) -> dict[str, Any]:
    """The estimate and its parts as each device holds them, for a result row."""
    return {"estimate_mib": per_device(parts, devices, strategy), **{f"estimate_{k}": v for k, v in
                                                                     asdict(on_each_device(parts, devices,
                                                                                           strategy)).items()}}
