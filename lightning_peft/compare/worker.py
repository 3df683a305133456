"""One compared run in its own process: train a recipe, test it, and measure what the report compares.

``python -m lightning_peft.compare.worker RUN_DIR`` reads ``RUN_DIR/config.yaml`` and
``RUN_DIR/plan.json`` and writes ``RUN_DIR/result.json`` (atomically; ``status`` "ok" or "failed"
with the error on one line), and ``RUN_DIR/progress.json`` after each step for the parent's display.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.cli import build_cli, error_line, user_mistake
from lightning_peft.compare.estimate import as_row, probe, status_kib
from lightning_peft.core.adapter_control import disable_adapters
from lightning_peft.core.files import atomic_write
from lightning_peft.core.layer import PEFTModule
from lightning_peft.core.merging import merge, unmerge
from lightning_peft.core.ownership import adapter_refs
from lightning_peft.core.summary import trainable_summary
from lightning_peft.export import export_adapters

WARMUP_STEPS = 2  # steps left out of the step time: first-call allocations and lazy initialisation
LATENCY_REPEATS = 5
METRIC_PREFERENCE = (("acc", True), ("ppl", False), ("loss", False))  # a split's metric name, higher is better


def write_json(path: Path, data: dict[str, Any]) -> None:
    """``data`` as JSON at ``path``, atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, default=float)))


class MeasureTraining(L.Callback):
    """Time each optimizer step (all its accumulated batches), count its samples and tokens, report progress to a
    file."""

    def __init__(self, progress: Path) -> None:
        self.progress = progress
        self.durations: list[float] = []
        self.counts: list[tuple[int, int]] = []  # each step's samples and tokens
        self.samples = self.tokens = 0  # of the step under way
        self._step_start: float | None = None
        self._fit_start = self.train_time = 0.0
        self._steps_done = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self._steps_done = trainer.global_step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if self._step_start is None:  # the first batch of an optimizer step
            self._step_start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           idx: int) -> None:
        self.samples += len(batch["input_ids"])
        self.tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        if trainer.global_step > self._steps_done:  # the optimizer stepped: the step's batches are done
            self.durations.append(time.perf_counter() - self._step_start)
            self.counts.append((self.samples, self.tokens))
            self.samples = self.tokens = 0
            self._step_start, self._steps_done = None, trainer.global_step
            # once a step, between steps: the file's write is in no step's time
            write_json(self.progress, {"step": trainer.global_step, "max_steps": trainer.max_steps,
                                       "elapsed_s": time.perf_counter() - self._fit_start})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_time = time.perf_counter() - self._fit_start

    def figures(self) -> dict[str, float]:
        """Step time (median) and throughput over the same steps, those after warm-up; training time."""
        start = WARMUP_STEPS if len(self.durations) > 2 * WARMUP_STEPS else 0
        timed, counts = self.durations[start:], self.counts[start:]
        total = sum(timed)
        return {"steps": len(self.durations), "train_time_s": self.train_time,
                "step_time_s": statistics.median(timed) if timed else None,
                "samples_per_s": sum(n for n, _ in counts) / total if total else None,
                "tokens_per_s": sum(t for _, t in counts) / total if total else None}


def peak_memory_mib(device: torch.device) -> tuple[float, str]:
    """The process's peak so far: its RSS high-water mark on CPU, allocated memory on CUDA.

    Linux's ``VmHWM`` is this process's own; ``ru_maxrss`` (elsewhere) keeps the parent's across exec.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_allocated"
    try:
        return status_kib("VmHWM") / 1024, "rss"
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss"


def ranked_metric(results: dict[str, float], split: str = "test") -> tuple[str | None, float | None, bool]:
    """The metric a split is ranked by: accuracy, else perplexity, else loss."""
    for name, higher in METRIC_PREFERENCE:
        if f"{split}_{name}" in results:
            return f"{split}_{name}", float(results[f"{split}_{name}"]), higher
    return None, None, True


def forward_ms(model: nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    """Median milliseconds of one no-grad forward of ``model`` on ``inputs``, after one warm-up call."""
    times = []
    with torch.no_grad():
        for _ in range(LATENCY_REPEATS + 1):
            start = time.perf_counter()
            model(**inputs)
            if inputs["input_ids"].is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])


def latencies(module: L.LightningModule, batch: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """Forward latency at batch 1 and at the recipe's batch: tuned, merged (when it merges) and the bare base."""
    model = module.model.eval()
    device = next(model.parameters()).device
    full = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    sizes = {"b1": {k: v[:1] for k, v in full.items()}, "batch": full}
    out: dict[str, float | None] = {}
    for label, inputs in sizes.items():
        out[f"latency_{label}_ms"] = forward_ms(model, inputs)
        with disable_adapters(model):
            out[f"base_latency_{label}_ms"] = forward_ms(model, inputs)
    merged = _merged(model)
    for label, inputs in sizes.items():
        out[f"latency_{label}_merged_ms"] = forward_ms(model, inputs) if merged else None
    if merged:
        unmerge(model)
    return out


def _merged(model: nn.Module) -> bool:
    """Merge ``model``'s adapters when it has PEFT layers and they merge."""
    if not any(isinstance(part, PEFTModule) for part in model.modules()):
        return False
    try:
        merge(model)
    except ValueError:  # adapters that cannot merge (bottleneck adapters, prompts)
        return False
    return True


FORGETTING_BLOCKS = 16  # blocks of held-out text whose perplexity is measured before and after tuning


def perplexity(model: nn.Module, tokenizer: Any, text: str, block_size: int) -> float:
    """The causal LM's perplexity on the first blocks of ``text`` (mean next-token loss over whole blocks)."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    blocks = ids[: len(ids) // block_size * block_size].view(-1, block_size)[:FORGETTING_BLOCKS]
    if not len(blocks):
        raise ValueError(f"the forgetting text has {len(ids)} tokens, fewer than one block of {block_size}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():  # the loss from the logits: a soft prompt's labels would add a prediction of the first token
        losses = [F.cross_entropy(model(input_ids=block[None].to(device)).logits[0, :-1].float(), block[1:].to(device))
                  for block in blocks]
    model.train(was_training)
    return float(torch.stack(losses).mean().exp())


class MeasureForgetting:
    """Perplexity of another domain's text: the recipe's base model's, and the tuned model's.

    The base is built on its own, before the run: a method changes its model at setup (PiSSA
    rewrites base weights, a quantized base rounds them), and every method is compared with the
    same base.
    """

    def __init__(self, text: str, block_size: int, module: L.LightningModule, device: torch.device) -> None:
        self.text, self.block_size = text, block_size
        base = module.build_model().to(device)
        self.before = perplexity(base, module.tokenizer, text, block_size)
        del base
        if device.type == "cuda":  # the run's peak memory is its own, not this full-precision copy's
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

    def figures(self, module: L.LightningModule) -> dict[str, float]:
        """Before and after: the tuned model with its adapters on."""
        return {"forgetting_base_ppl": self.before,
                "forgetting_tuned_ppl": perplexity(module.model, module.tokenizer, self.text, self.block_size)}


def adapter_bytes(module: L.LightningModule, run_dir: Path) -> int:
    """Bytes of what a task stores beyond the base: the saved adapter folder, or every trained tensor."""
    if adapter_refs(module):
        folder = export_adapters(module, run_dir / "adapter")
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def build_run(run_dir: Path) -> tuple[L.Trainer, L.LightningModule, L.LightningDataModule, MeasureTraining]:
    """The trainer, module and data of ``run_dir``'s recipe, the trainer measuring its steps."""
    cli = build_cli(["--config", str(run_dir / "config.yaml")], run=False)
    measure = MeasureTraining(run_dir / "progress.json")
    cli.trainer.callbacks.append(measure)
    return cli.trainer, cli.model, cli.datamodule, measure


def run(run_dir: Path, forgetting_text: str | None = None) -> dict[str, Any]:
    """Train, test and measure the run in ``run_dir``; the result row (without method and seed)."""
    started = time.perf_counter()
    trainer, module, data, measure = build_run(run_dir)
    forgetting = MeasureForgetting(Path(forgetting_text).read_text(), data.block_size, module,
                                   trainer.strategy.root_device) if forgetting_text else None
    trainer.fit(module, datamodule=data)
    device = module.device
    peak, kind = peak_memory_mib(device)
    summary = trainable_summary(module)
    results = trainer.test(module, datamodule=data, verbose=False)[0] if "test" in getattr(data, "splits", {}) \
        else {}
    name, value, higher = ranked_metric(results)
    batch = next(iter(data.test_dataloader() if results else data.train_dataloader()))
    row = {"status": "ok", "error": None, "trainable_params": summary.trainable, "total_params": summary.total,
           "trainable_percent": summary.percent, "adapter_bytes": adapter_bytes(module, run_dir),
           "peak_memory_mib": peak, "memory_kind": kind, **measure.figures(), "metric_name": name,
           "metric": value, "higher_is_better": higher, "metrics": {k: float(v) for k, v in results.items()},
           "batch_size": len(batch["input_ids"]), **(forgetting.figures(module) if forgetting else {})}
    # last: the merged latency merges and unmerges, which rounds a quantized base's weights again
    return {**row, **latencies(module, batch), "wall_s": time.perf_counter() - started}


def score_rate(run_dir: Path) -> dict[str, Any]:
    """One learning rate of a sweep: train on the training rows, score on the validation split held out of them."""
    trainer, module, data, measure = build_run(run_dir)
    trainer.fit(module, datamodule=data)
    trainer.limit_val_batches = 1.0  # the recipe's fit may skip validation; the score needs all of it
    results = trainer.validate(module, datamodule=data, verbose=False)
    if not results:
        raise ValueError("the data holds no validation rows to choose the learning rate by (val_fraction 0, no "
                         "val_file)")
    name, value, higher = ranked_metric(results[0], "val")
    if value is None:
        raise ValueError("validation logged no val_acc, val_ppl or val_loss to choose the learning rate by")
    return {"status": "ok", "error": None, "metric_name": name, "metric": value, "higher_is_better": higher,
            "train_time_s": measure.figures()["train_time_s"]}


def failure(err: BaseException) -> str:
    """An error on one line: the user's mistake as the CLI says it, else the exception's type and message."""
    mistake = user_mistake(err)
    return error_line(mistake) if mistake is not None else f"{type(err).__name__}: {error_line(err)}"


def estimate(run_dir: Path, devices: int, strategy: str) -> dict[str, Any]:
    """The memory estimate of the run in ``run_dir``, made with a short probe before any training."""
    return {"status": "ok", "error": None, **as_row(probe(run_dir / "config.yaml"), devices, strategy)}


def main(argv: list[str] | None = None) -> int:
    """Train ``RUN_DIR``'s run, or estimate it (``--estimate DEVICES STRATEGY``); the row is written even on failure."""
    args = argv if argv is not None else sys.argv[1:]
    run_dir = Path(args[0])
    plan = json.loads((run_dir / "plan.json").read_text())
    estimating = args[1:2] == ["--estimate"]
    try:
        if estimating:
            row = estimate(run_dir, int(args[2]), args[3])
        elif plan.get("sweep"):
            row = score_rate(run_dir)
        else:
            row = run(run_dir, plan.get("forgetting_text"))
    except Exception as err:  # the row says why; the log keeps the traceback
        traceback.print_exc()
        row = {"status": "failed", "error": failure(err)}
    write_json(run_dir / ("estimate.json" if estimating else "result.json"), {**plan, **row})
    return 0 if row["status"] == "ok" else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
