"""LoRA and QLoRA under FSDP1 (FSDPStrategy) or FSDP2 (ModelParallelStrategy), checked in one go.

    python benchmarks/gpu/sharded_check.py --strategy fsdp1 OUT_DIR                 # LoRA, FSDP1, CUDA
    python benchmarks/gpu/sharded_check.py --strategy fsdp2 --quantize nf4 OUT_DIR  # QLoRA, FSDP2, CUDA
    python benchmarks/gpu/sharded_check.py --strategy fsdp2 --device cpu OUT_DIR    # the script's own test

On min(2, GPUs) processes (one process on CPU): with a full-precision base, the adapter after two
epochs matches a one-process CPU run that reads the same global batches; with an nf4 base (QLoRA)
the loss stays finite and falls. Either way the checkpoint holds the adapter only, as full
tensors, and resuming from it continues exactly. Under FSDP1, every PEFT layer and its base layer
are FSDP units of their own. Rank 0 prints one PASS line per check; the first failure exits
non-zero.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from distributed_worker import SEQUENCES, SeededLlama, lora  # noqa: E402
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy  # noqa: E402
from torch.distributed.fsdp import FullyShardedDataParallel  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from lightning_peft import QuantizeBase  # noqa: E402
from lightning_peft.core.layer import PEFTLayer  # noqa: E402
from lightning_peft.lightning.sharding import full_adapter_state_dict  # noqa: E402

from conftest import token_loader  # noqa: E402

GLOBAL_BATCH = 4
TOLERANCE = 1e-4  # CUDA against CPU, TF32 off


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder for checkpoints")
    parser.add_argument("--strategy", choices=("fsdp1", "fsdp2"), required=True)
    parser.add_argument("--quantize", choices=("none", "nf4"), default="none", help="nf4: QLoRA")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--processes", type=int, help="default: min(2, GPUs) on CUDA, 1 on CPU (gloo)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU (--device cpu --strategy fsdp2 tests the script itself)")
    if args.device == "cpu" and args.strategy == "fsdp1":
        parser.error("FSDP1 needs CUDA")
    args.devices = args.processes or (min(2, torch.cuda.device_count()) if args.device == "cuda" else 1)
    return args


class LossRecorder(SeededLlama):
    """The tests' seeded tiny Llama, keeping its training losses."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.losses.append(loss.item())
        return loss


def strategy_for(args: argparse.Namespace) -> Strategy:
    if args.strategy == "fsdp1":
        return FSDPStrategy()  # no auto_wrap_policy: the LoRA callback supplies one
    return ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)


def callbacks(args: argparse.Namespace) -> list[L.Callback]:
    quantize = [QuantizeBase("nf4", compute_dtype="float32")] if args.quantize == "nf4" else []
    return [*quantize, lora()]


def sharded_fit(args: argparse.Namespace, name: str, epochs: int, ckpt_path: Path | None = None):
    """Fit under the strategy and save ``{out}/{name}.ckpt`` through it."""
    trainer = L.Trainer(accelerator=args.device, devices=args.devices, strategy=strategy_for(args), max_epochs=epochs,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks(args))
    module = LossRecorder()
    trainer.fit(module, token_loader(n=SEQUENCES, batch=GLOBAL_BATCH // args.devices), ckpt_path=ckpt_path)
    path = args.out / f"{name}.ckpt"
    trainer.save_checkpoint(path)
    return trainer, module, path


def cpu_reference() -> dict[str, torch.Tensor]:
    """One CPU process reading the global batches that Lightning's DistributedSampler(seed=0) makes."""
    dataset = token_loader(n=SEQUENCES).dataset
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    module = SeededLlama()
    L.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, callbacks=[lora()]).fit(
        module, DataLoader(dataset, batch_size=GLOBAL_BATCH, sampler=sampler))
    return full_adapter_state_dict(module)


def check(condition: bool, what: str) -> None:
    if not condition:
        raise AssertionError(f"FAIL {what}")
    print(f"PASS {what}", flush=True)


def adapter_in(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float) -> bool:
    return got.keys() == expected.keys() and all(torch.allclose(got[k], expected[k], atol=atol) for k in expected)


def peft_layers_are_units_of_their_own(module: L.LightningModule) -> bool:
    wrapped = {id(m.module) for m in module.modules() if isinstance(m, FullyShardedDataParallel)}
    layers = [m for m in module.modules() if isinstance(m, PEFTLayer)]
    return bool(layers) and all(id(layer) in wrapped and isinstance(layer.base_layer, FullyShardedDataParallel)
                                for layer in layers)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    args.out.mkdir(parents=True, exist_ok=True)
    what = f"{'QLoRA (nf4)' if args.quantize == 'nf4' else 'LoRA'} under {args.strategy.upper()} on " \
           f"{args.devices} {args.device} process(es)"
    reference = cpu_reference() if args.quantize == "none" else None
    trainer, module, two_epochs = sharded_fit(args, "two_epochs", epochs=2)
    units_apart = args.strategy != "fsdp1" or peft_layers_are_units_of_their_own(trainer.lightning_module)
    _, _, one_epoch = sharded_fit(args, "one_epoch", epochs=1)
    resumed_trainer, _, resumed = sharded_fit(args, "resumed", epochs=2, ckpt_path=one_epoch)
    if not resumed_trainer.is_global_zero:
        return
    check(units_apart, f"{what}: the PEFT layers are sharding units of their own")
    if reference is not None:
        check(close(adapter_in(two_epochs), reference, TOLERANCE), f"{what}: the adapter matches a one-process CPU run")
    else:
        losses = module.losses
        check(all(map(math.isfinite, losses)) and losses[-1] < losses[0], f"{what}: the loss is finite and falls "
              f"({losses[0]:.3f} -> {losses[-1]:.3f})")
    saved = adapter_in(one_epoch)
    check(bool(saved) and all(".adapters." in key for key in saved) and one_epoch.stat().st_size < 200_000,
          f"{what}: the checkpoint holds the adapter only, as full tensors")
    check(close(adapter_in(resumed), adapter_in(two_epochs), 1e-6), f"{what}: resuming from it continues exactly")


if __name__ == "__main__":
    main()
