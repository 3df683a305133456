"""``lightning-peft export``: a Lightning checkpoint to an adapter folder or a merged model folder."""

from __future__ import annotations

import importlib
from pathlib import Path

import lightning as L
from torch import nn

from lightning_peft.core.adapter_control import adapter_names, delete_adapter
from lightning_peft.core.adapter_files import save_adapter
from lightning_peft.core.files import write_export
from lightning_peft.core.merging import merge
from lightning_peft.core.models import model_root
from lightning_peft.core.ownership import adapter_refs
from lightning_peft.lightning.checkpointing import CHECKPOINT_KEY, complete_from_model, read_checkpoint, saved_methods
from lightning_peft.registry import rebuild


def rebuild_from_checkpoint(ckpt_path: str | Path) -> L.LightningModule:
    """The task module of a lightning-peft checkpoint, with its adapters injected and loaded."""
    path = Path(ckpt_path)
    checkpoint = read_checkpoint(path)
    module = _task_from_hyperparameters(checkpoint, path)
    module.configure_model()
    methods = list(saved_methods(checkpoint).values())
    if not methods:
        raise ValueError(f"checkpoint {path} records no lightning_peft method: was it trained with one?")
    for state in methods:
        rebuild(state["method"], state.get("class_path"), state["config"], f"checkpoint {path}").inject(module)
    if checkpoint.get(CHECKPOINT_KEY, {}).get("adapter_only"):
        complete_from_model(checkpoint, module, path)
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


def _task_from_hyperparameters(checkpoint: dict, path: Path) -> L.LightningModule:
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    class_path = hparams.pop("_class_path", None)
    if class_path is None:
        raise ValueError(f"checkpoint {path} does not name its LightningModule class: export rebuilds the tasks of "
                         "lightning_peft.tasks; for a LightningModule of your own, call save_adapter(module, folder) "
                         "after training")
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}
    module_name, _, class_name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)(**hparams)


def export_checkpoint(ckpt_path: str | Path, out: str | Path, merged: bool = False, adapter: str | None = None,
                      for_original_base: bool = False) -> Path:
    """Write the checkpoint's adapter(s) in the Hugging Face PEFT layout, or a merged transformers model.

    A merged model of a checkpoint with adapters of several names (several tasks) needs ``adapter``:
    the one to merge (the others are left out), or ``"all"`` for adapters that trained together.
    ``for_original_base``: adapters that apply to the weights before injection (`save_adapter`'s).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder (new or existing) for the "
                         f"{'model' if merged else 'adapter'} files")
    if adapter is not None and not merged:
        raise ValueError("--adapter chooses what --merged merges; without --merged every adapter is exported")
    if for_original_base and merged:
        raise ValueError("--for-original-base rewrites adapters for the original weights; a --merged model holds the "
                         "adapted weights themselves: give one or the other")
    module = rebuild_from_checkpoint(ckpt_path)
    if merged:
        _keep_for_merging(module, adapter, ckpt_path)
        merge(module)
        return write_export(out, lambda folder: _save_merged(module, folder), "--out", loader_reads)
    return export_adapters(module, out, for_original_base)


def _save_merged(module: nn.Module, folder: Path) -> None:
    """The merged transformers model, its class names (a classifier's labels) and its tokenizer, in ``folder``."""
    _, model = model_root(module)
    labels = getattr(module, "labels", None)
    if labels and getattr(model.config, "num_labels", None) == len(labels):  # pipelines then say 'positive'
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {name: i for i, name in enumerate(labels)}
    model.save_pretrained(folder)
    if getattr(module, "tokenizer", None) is not None:
        module.tokenizer.save_pretrained(folder)


def loader_reads(name: str) -> bool:
    """Whether transformers or peft reads a file of this name in a model or adapter folder (a stale one misleads)."""
    return name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "config.json",
                    "pytorch_model.bin") or (name.startswith("model") and ".safetensors" in name)


def _keep_for_merging(module: nn.Module, adapter: str | None, ckpt_path: str | Path) -> None:
    """Delete every adapter but ``adapter`` (``"all"`` keeps them all); refuse to guess among several names."""
    names = adapter_names(module)
    if adapter == "all" or (adapter is None and len(names) == 1):
        return
    if adapter is None:
        raise ValueError(f"checkpoint {ckpt_path} holds adapters {', '.join(names)}; merging them all would add every "
                         "task's update to one model: give --adapter NAME for one of them, or --adapter all for "
                         "adapters that trained together")
    if adapter not in names:
        raise ValueError(f"--adapter {adapter}: checkpoint {ckpt_path} holds adapters {', '.join(names)}")
    for name in names:
        if name != adapter:
            delete_adapter(module, name)


def export_adapters(module: nn.Module, out: str | Path, for_original_base: bool = False) -> Path:
    """Save every adapter of ``module``: one straight into ``out``, several in a folder each."""
    refs = adapter_refs(module)

    def write(out: Path) -> None:
        for ref in refs:
            folder = out if len(refs) == 1 else out / f"{ref.method_name}-{ref.name}"
            save_adapter(module, folder, adapter_name=ref.name, method=ref.method_name,
                         for_original_base=for_original_base)

    return write_export(out, write, "adapter folder", loader_reads)  # no adapter of an earlier run stays beside
