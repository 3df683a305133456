"""FSDP1 (Lightning's FSDPStrategy) with LoRA on CUDA, checked in one go.

    python benchmarks/gpu/fsdp1_check.py [OUT_DIR]      # one or two GPUs, about a minute

On min(2, GPUs) processes, with ``FSDPStrategy()`` (use_orig_params=True, and no auto_wrap_policy:
the LoRA callback supplies one), it checks that every PEFT layer and its base layer are FSDP
units of their own; that the adapter after two epochs matches a one-process CPU run with the same
global batches; that the checkpoint holds the adapter only; and that resuming from it continues
exactly. Rank 0 prints one PASS line per check; the first failure exits non-zero.
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from distributed_worker import SEQUENCES, SeededLlama, lora  # noqa: E402
from lightning.pytorch.strategies import FSDPStrategy  # noqa: E402
from torch.distributed.fsdp import FullyShardedDataParallel  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from lightning_peft.core.layer import PEFTLayer  # noqa: E402
from lightning_peft.lightning.sharding import full_adapter_state_dict  # noqa: E402

from conftest import token_loader  # noqa: E402

DEVICES = min(2, torch.cuda.device_count())
GLOBAL_BATCH = 4
TOLERANCE = 1e-4  # CUDA against CPU, TF32 off


def quiet_trainer(**kwargs) -> L.Trainer:
    settings = dict(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
    return L.Trainer(**{**settings, **kwargs})


def fsdp1_fit(out: Path, name: str, epochs: int, ckpt_path: Path | None = None) -> tuple[L.Trainer, Path]:
    """Fit under FSDPStrategy and save a checkpoint ``{out}/{name}.ckpt`` (through the strategy, rank 0 writes)."""
    trainer = quiet_trainer(accelerator="cuda", devices=DEVICES, strategy=FSDPStrategy(), max_epochs=epochs,
                            callbacks=[lora()])
    trainer.fit(SeededLlama(), token_loader(n=SEQUENCES, batch=GLOBAL_BATCH // DEVICES), ckpt_path=ckpt_path)
    path = out / f"{name}.ckpt"
    trainer.save_checkpoint(path)
    return trainer, path


def cpu_reference() -> dict[str, torch.Tensor]:
    """One CPU process reading the global batches that Lightning's DistributedSampler(seed=0) makes."""
    dataset = token_loader(n=SEQUENCES).dataset
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    module = SeededLlama()
    quiet_trainer(accelerator="cpu", devices=1, callbacks=[lora()]).fit(
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


def main(out: Path) -> None:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    reference = cpu_reference()
    trainer, two_epochs = fsdp1_fit(out, "two_epochs", epochs=2)
    units_apart = peft_layers_are_units_of_their_own(trainer.lightning_module)
    _, one_epoch = fsdp1_fit(out, "one_epoch", epochs=1)
    resumed_trainer, resumed = fsdp1_fit(out, "resumed", epochs=2, ckpt_path=one_epoch)
    if not resumed_trainer.is_global_zero:
        return
    check(units_apart, f"FSDP1 on {DEVICES} GPU(s): each PEFT layer and its base layer are units of their own")
    check(close(adapter_in(two_epochs), reference, TOLERANCE), "the adapter matches a one-process CPU run")
    check(adapter_in(one_epoch).keys() == reference.keys() and one_epoch.stat().st_size < 100_000,
          "the checkpoint holds the adapter only, as full tensors")
    check(close(adapter_in(resumed), adapter_in(two_epochs), 1e-6), "resuming from it continues exactly")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("fsdp1_check.py needs CUDA")
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.gettempdir()) / "lightning_peft_fsdp1_check")
