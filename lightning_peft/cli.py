"""The ``lightning-peft`` command: LightningCLI recipes (fit, validate, test, predict) and export.

PEFT methods are configured as ``trainer.callbacks`` with ``class_path`` in the YAML recipe;
every key can be overridden on the command line. Bad input ends with one line on stderr and
a non-zero exit, before any training step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningCLI

from lightning_peft.assets import AssetError
from lightning_peft.core.ownership import adapter_refs
from lightning_peft.core.summary import trainable_summary
from lightning_peft.export import export_adapters, export_checkpoint

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, ImportError, AssetError)  # ImportError: a missing extra


class PrintPredictions(BasePredictionWriter):
    """Print each prediction (a label name, an id or a generated text) on its own line."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        for item in prediction:
            print(item, flush=True)


class PEFTCLI(LightningCLI):
    """LightningCLI that tests after fit when there is test data, then prints a short summary."""

    def after_fit(self) -> None:
        trainer, module = self.trainer, self.model
        if trainer.interrupted:
            return
        results = {}
        if _has_test_data(self.datamodule):
            results = trainer.test(module, datamodule=self.datamodule, verbose=False)[0]
        summary = trainable_summary(module)
        lines = [f"{name}: {value:.4f}" for name, value in results.items()]
        lines.append(f"trainable parameters: {summary.trainable:,} of {summary.total:,} ({summary.percent:.3f}%)")
        checkpoint = trainer.checkpoint_callback
        path = checkpoint and (checkpoint.best_model_path or checkpoint.last_model_path)
        if path:
            lines.append(f"checkpoint: {path}")
        if adapter_refs(module):
            lines.append(_export_after_fit(trainer, module, path))
        if trainer.is_global_zero:
            print("\n".join(["", "lightning-peft fit summary:", *("  " + line for line in lines)]), flush=True)


def _export_after_fit(trainer: L.Trainer, module: L.LightningModule, checkpoint: str | None) -> str:
    """Save the trained adapters next to the run (single process), or say how to export them."""
    if trainer.world_size == 1:
        try:
            out = export_adapters(module, Path(trainer.default_root_dir) / "adapter")
        except (ValueError, TypeError, OSError) as err:  # training is done and checkpointed: report, do not fail
            return f"adapter: not saved ({err})"
        return f"adapter: {out}"
    source = checkpoint or "CHECKPOINT"
    return f"adapter: export it with `lightning-peft export {source} --out DIR`"


def _has_test_data(datamodule: L.LightningDataModule | None) -> bool:
    splits = getattr(datamodule, "splits", {})
    return "test" in splits


def export_main(args: list[str]) -> None:
    """``lightning-peft export CKPT --out DIR [--merged]``."""
    parser = argparse.ArgumentParser(prog="lightning-peft export",
                                     description="Write a checkpoint's adapter in the Hugging Face PEFT layout, "
                                                 "or with --merged a full transformers model folder.")
    parser.add_argument("checkpoint", help="a Lightning checkpoint of a lightning-peft recipe")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--merged", action="store_true", help="fold the adapter into the base weights")
    options = parser.parse_args(args)
    out = export_checkpoint(options.checkpoint, options.out, merged=options.merged)
    print(f"exported {'merged model' if options.merged else 'adapter'} to {out}")


def build_cli(args: list[str] | None = None, run: bool = True) -> PEFTCLI:
    """The CLI of the ``lightning-peft`` command; ``run=False`` only builds the trainer, module and data."""
    return PEFTCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"callbacks": [PrintPredictions()]},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-peft`` console script."""
    argv = sys.argv[1:] if args is None else args
    try:
        if argv[:1] == ["export"]:
            return export_main(argv[1:])
        build_cli(args)
    except USER_ERRORS as err:
        print(f"lightning-peft: error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
