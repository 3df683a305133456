"""The ``lightning-peft`` command: LightningCLI recipes (fit, validate, test, predict) and export.

PEFT methods are configured as ``trainer.callbacks`` with ``class_path`` in the YAML recipe;
every key can be overridden on the command line. A user's mistake (a bad key or value, a
missing or unreadable file, a full disk) ends with one line on stderr and exit code 2, before
any training step where it can be found then; a bug of this library still shows its
traceback, and ``LIGHTNING_PEFT_DEBUG=1`` shows the traceback of any error.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import linecache
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
from fsspec.core import url_to_fs
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info

import lightning_peft
from lightning_peft.assets import AssetError
from lightning_peft.builtin_recipes import builtin_recipes, recipe_path
from lightning_peft.cli_messages import CommandParser, ConfigError, class_named, one_line
from lightning_peft.core.adapter_files import CONFIG_FILE, read_adapter_files
from lightning_peft.core.ownership import adapter_refs
from lightning_peft.core.summary import trainable_summary
from lightning_peft.data.files import numbered_lines
from lightning_peft.export import export_adapters, export_checkpoint
from lightning_peft.lightning.callback import PEFTCallback, check_launcher, setup_callbacks
from lightning_peft.lightning.checkpointing import CheckpointTheLastStep, read_checkpoint
from lightning_peft.lightning.curves import plot_curves
from lightning_peft.lightning.predictions import PredictionWriter
from lightning_peft.lightning.progress import StepProgressBar
from lightning_peft.lightning.row_adapters import RowAdapterRouting, parse_adapters, prompt_lengths, split_rows
from lightning_peft.registry import METHODS, LoadAdapter
from lightning_peft.selective import Selective
from lightning_peft.tasks.base import check_resumed_optimization
from lightning_peft.tasks.causal_lm import CausalLM

DEBUG_VARIABLE = "LIGHTNING_PEFT_DEBUG"
USAGE_ERROR = 2  # the exit code of every user mistake, as argparse uses


class PEFTArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors are one line (with a "did you mean") instead of a usage report."""

    top_level = False  # jsonargparse parses nested classes with parsers of this class too: they report upwards

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.top_level:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        raise ConfigError(one_line(message, option_names(parser))) from ex


def option_names(parser: argparse.ArgumentParser) -> list[str]:
    """Every option key of ``parser`` and of its subcommands' parsers (``trainer.max_steps``, ...)."""
    names = [action.dest for action in parser._actions if action.dest not in (None, "help", argparse.SUPPRESS)]
    subcommands = getattr(parser, "_subcommands_action", None)
    for child in subcommands._name_parser_map.values() if subcommands else ():
        names += option_names(child)
    return list(dict.fromkeys(names))


class PEFTCLI(LightningCLI):
    """LightningCLI that tests after fit when there is test data, then prints a short summary."""

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**{"prog": "lightning-peft", "allow_abbrev": False, **kwargs})  # python -m too;
        # allow_abbrev: a misspelt option that begins a real one (--trainer.max_step) is an error, not that option
        parser.top_level = True
        return parser

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The trainer, logging to CSV under ``default_root_dir`` unless the recipe names a logger (or none), with
        Lightning's progress bar replaced by one on stderr that counts steps."""
        settings = self._get(self.config_init, "trainer", default={})
        if settings.get("logger") in (None, True) and "logger" not in kwargs:
            root = settings.get("default_root_dir") or os.getcwd()
            kwargs["logger"] = False if self.subcommand == "predict" else CSVLogger(root, name="logs")
        configured = settings.get("callbacks") or []
        configured = list(configured) if isinstance(configured, list) else [configured]  # one may stand alone
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(CheckpointTheLastStep())
        for index, callback in enumerate(trainer.callbacks):
            if isinstance(callback, ProgressBar) and not any(callback is c for c in configured):  # Lightning's pick
                trainer.callbacks[index] = StepProgressBar()
        return trainer

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self._given = list(args) if isinstance(args, list) else sys.argv[1:]  # what the command line itself says
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI puts the checkpoint's model hyperparameters over the recipe's: an unreadable checkpoint is
        one line naming it, and a model setting given on the command line itself (``--model.init_args.K``) wins."""
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path") if self.config.get("subcommand") else None
        if ckpt_path and Path(ckpt_path).is_file():
            checkpoint = read_checkpoint(ckpt_path)
            if self.config.subcommand == "fit":  # before the checkpoint's settings replace the recipe's
                check_resumed_optimization(checkpoint.get("hyper_parameters") or {},
                                           _settings_set(self.config["fit"].get("model")), ckpt_path)
        given = self._model_settings_given() if ckpt_path else {}
        super()._parse_ckpt_path()
        model = self.config[self.config.subcommand].get("model") if self.config.get("subcommand") else None
        for key, value in given.items():
            for part in ("init_args", "dict_kwargs"):
                if model is not None and model.get(part) is not None and key in model[part]:
                    model[part][key] = value

    def before_instantiate_classes(self) -> None:
        """Say which callback a ``--trainer.callbacks.init_args.K`` flag changed: jsonargparse gives it to the last."""
        given = [arg.split("=", 1)[0] for arg in getattr(self, "_given", [])
                 if arg.startswith("--trainer.callbacks.init_args.")]
        trainer = self.config[self.subcommand].get("trainer") if self.subcommand else self.config.get("trainer")
        callbacks = (trainer or {}).get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if given and len(callbacks) > 1:
            last = callbacks[-1]
            name = str(last.get("class_path", last)).rsplit(".", 1)[-1] if hasattr(last, "get") else type(last).__name__
            adapter = (last.get("init_args") or {}).get("adapter_name") if hasattr(last, "get") else None
            name += f"[{adapter}]" if adapter else ""
            warnings.warn(f"{given[0]} changes the last of the recipe's {len(callbacks)} callbacks ({name}) only; to "
                          "change another, edit the recipe (or give the whole list: --trainer.callbacks)", stacklevel=1)

    def _model_settings_given(self) -> dict[str, Any]:
        """The model's init arguments named on the command line, with the values the parser gave them."""
        names = [arg.split("=", 1)[0].removeprefix("--model.").removeprefix("init_args.")
                 for arg in getattr(self, "_given", []) if arg.startswith("--model.")]
        model = self.config[self.config.subcommand].get("model")
        init_args = model.get("init_args") if model is not None else None
        return {name: init_args[name] for name in names if init_args is not None and name in init_args}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--adapter", type=str | None, default=None,
                            help="validate, test, predict: an adapter folder (as fit or export writes) to use "
                                 "instead of the recipe's PEFT methods")
        parser.add_argument("--adapters", nargs="+", type=str, default=None,
                            help="predict: several adapter folders at once, as NAME=DIR ...; each input line is then "
                                 "NAME<TAB>text (NAME '-': the base model), and each row uses its adapter")
        parser.add_argument("--output", type=str | None, default=None,
                            help="predict: also write every input and its prediction to this .csv or .jsonl file")
        parser.add_argument("--untrained", type=bool, default=False,
                            help="predict: predict without --ckpt_path or --adapter, with the model as built "
                                 "(adapters and new heads untrained)")

    def before_fit(self) -> None:
        if self.config[self.subcommand].get("adapter"):
            raise ConfigError("fit trains a new adapter: --adapter is for validate, test and predict "
                              "(to continue a run, give --ckpt_path)")
        self._refuse_predict_options()

    def before_validate(self) -> None:
        self._refuse_predict_options()
        if self.trainer.limit_val_batches == 0:
            raise ConfigError("validate has nothing to run: the recipe sets trainer.limit_val_batches to 0 (give "
                              "--trainer.limit_val_batches 1.0)")
        data = self.datamodule
        parts = list(getattr(data, "parts", {}).values()) or [data]  # MultiTaskData: each task holds its own split
        if not any((getattr(p, "files", None) or {}).get("val") or getattr(p, "val_fraction", 1) for p in parts):
            raise ConfigError("validate has no data: the recipe holds out no validation rows (give "
                              "--data.init_args.val_file FILE, or a val_fraction above 0 for a fresh fit"
                              + ("; each task's, under data.init_args.tasks)" if len(parts) > 1 else ")"))
        self._use_adapter_folder()

    def before_test(self) -> None:
        self._refuse_predict_options()
        if self.trainer.limit_test_batches == 0:
            raise ConfigError("test has nothing to run: trainer.limit_test_batches is 0 (give "
                              "--trainer.limit_test_batches 1.0)")
        self._use_adapter_folder()

    def _refuse_predict_options(self) -> None:
        """``--adapters``, ``--output`` and ``--untrained`` mean something to predict alone: elsewhere, one line."""
        self._check_processes()
        for option in ("untrained", "output", "adapters"):
            if self.config[self.subcommand].get(option):
                raise ConfigError(f"--{option} is for predict, not {self.subcommand}"
                                  + (" (give one folder with --adapter)" if option == "adapters" else ""))

    def _check_processes(self) -> None:
        """Refuse here, once, what each process the strategy starts would refuse after building the model."""
        setups = setup_callbacks(self.trainer)
        if setups:
            check_launcher(self.trainer, type(setups[0]).__name__)
        if self.subcommand == "predict" and self.trainer.world_size > 1:
            raise ConfigError("predict prints its predictions in input order from one process: run it with "
                              "--trainer.devices=1 (and one node)")

    def before_predict(self) -> None:
        """Refuse to predict with untrained adapters and heads, which would print confident nonsense."""
        self._check_processes()
        settings = self.config[self.subcommand]
        weights = ("ckpt_path", "adapter", "untrained", "adapters")
        if not any(settings.get(option) for option in weights):
            raise ConfigError("predict needs trained weights: give --ckpt_path CHECKPOINT or --adapter FOLDER (the "
                              "fit summary names both), or --untrained true to predict with the model as built")
        writer = next(cb for cb in self.trainer.callbacks if isinstance(cb, PredictionWriter))
        if settings.get("output"):
            writer.output = PredictionWriter(settings["output"]).output  # the same check of the file's format
        if settings.get("adapters"):
            given = [f"--{option}" for option in weights[:3] if settings.get(option)]
            if given:
                raise ConfigError(f"give --adapters or {' / '.join(given)}, not both")
            writer.row_adapters = self._use_adapter_folders(parse_adapters(settings["adapters"]))
        else:
            self._use_adapter_folder()

    def _use_adapter_folders(self, folders: dict[str, str]) -> list[str | None]:
        """With ``--adapters``: load every folder under its name, and route each input row to the one it names."""
        parts = {name: [path for _, path in _one_adapter(_adapter_folders(Path(folder)), Path(folder),
                                                          f"--adapters {name}={folder}")]
                 for name, folder in folders.items()}
        configs = {name: _prompt_config([read_adapter_files(path)[0] for path in paths])
                   for name, paths in parts.items()}  # a damaged file: one line now
        data = self.datamodule
        if getattr(data, "predict_file", None) is None:
            raise ConfigError("no texts to predict: give data.predict_file, one NAME<TAB>text line per row (or -)")
        causal = isinstance(self.model, CausalLM)
        names, texts = split_rows(numbered_lines(data.predict_file, keep_spaces=True), list(folders),
                                  f"predict file {data.predict_file}", keep_spaces=causal)
        lengths = prompt_lengths(configs, names)
        if len(lengths) > 1 and isinstance(self.model, CausalLM) and data.batch_size > 1:
            warnings.warn(f"predict generates one row at a time: the rows' soft prompts have different lengths "
                          f"({', '.join(map(str, sorted(lengths)))}), and one generated batch takes one length",
                          stacklevel=1)
            data.batch_size = 1
        self._texts = tempfile.TemporaryDirectory(prefix="lightning-peft-predict-")
        data.predict_file = str(Path(self._texts.name) / "texts.txt")
        Path(data.predict_file).write_text("".join(text + "\n" for text in texts), encoding="utf-8")
        others = [cb for cb in self.trainer.callbacks if not isinstance(cb, PEFTCallback)]
        loads = [LoadAdapter(path, adapter_name=name) for name, paths in parts.items() for path in paths]
        self.trainer.callbacks = [*loads, RowAdapterRouting(names), *others]
        return names

    def _use_adapter_folder(self) -> None:
        """With ``--adapter``: load that folder at setup instead of injecting the recipe's PEFT methods."""
        settings = self.config[self.subcommand]
        folder = settings.get("adapter")
        if folder is None:
            return
        if settings.get("ckpt_path") is not None:
            raise ConfigError("give --ckpt_path or --adapter, not both")
        tasks = set(getattr(self.datamodule, "task_names", None) or []) if self.subcommand != "predict" else set()
        pairs = _adapter_folders(Path(folder))  # multi-task data routes each row to its task's adapter (others shared)
        names = {name for name, _ in pairs}
        if tasks and not tasks <= names and len(names) == 1:
            raise ConfigError(f"--adapter {folder} holds the adapter {next(iter(names))!r}, and the data's tasks "
                              f"{', '.join(sorted(tasks - names))} need adapters of their names: give the folder a "
                              "multi-task fit wrote, which holds each task's")
        if not tasks or not tasks <= names:
            pairs = _one_adapter(pairs, Path(folder), f"--adapter {folder}", routes=self.subcommand == "predict")
        loads = [LoadAdapter(path, adapter_name=name) for name, path in pairs]
        others = [cb for cb in self.trainer.callbacks if not isinstance(cb, PEFTCallback)]
        self.trainer.callbacks = [*loads, *others]

    def after_fit(self) -> None:
        trainer, module = self.trainer, self.model
        if trainer.interrupted:
            return
        _retire_requeue_checkpoints(trainer)
        results = {}
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint is not None and checkpoint.monitor else ""
        if _has_test_data(self.datamodule):  # a monitored best checkpoint is what is tested (and then exported)
            tested = trainer.test(module, datamodule=self.datamodule, ckpt_path=best or None, verbose=False)
            results = tested[0] if tested else {}  # none with --trainer.limit_test_batches=0
        summary = trainable_summary(module)
        lines = [f"{name}: {value:.4f}" for name, value in results.items()]
        lines.append(f"trainable parameters: {summary.trainable:,} of {summary.total:,} ({summary.percent:.3f}%)")
        path = checkpoint and (checkpoint.best_model_path or checkpoint.last_model_path)
        if path:
            tested = "tested and exported" if trainer.world_size == 1 else "tested"
            weights = tested if _has_test_data(self.datamodule) else "the adapter is the last step's"
            lines.append(f"checkpoint: {path}" + (f" (best by {checkpoint.monitor}; {weights})" if best else ""))
        if adapter_refs(module):
            lines.append(_export_after_fit(trainer, module, path))
        if trainer.is_global_zero:
            lines.append(_curves_after_fit(trainer))
            print("\n".join(["", "lightning-peft fit summary:", *("  " + line for line in lines if line)]),
                  flush=True)


def _settings_set(model: Any) -> dict[str, Any]:
    """The model's init arguments that differ from its class's defaults: the ones a recipe, an overlay or a flag
    set (a left-out one is the default, which a resume takes from the checkpoint instead)."""
    task = class_named(str(model.get("class_path") or "")) if model is not None else None
    if task is None:
        return {}
    parameters = inspect.signature(task).parameters
    return {key: value for key, value in dict(model.get("init_args") or {}).items()
            if key not in parameters or parameters[key].default != value}


def _adapter_folders(folder: Path) -> list[tuple[str, Path]]:
    """The adapters of an adapter folder, as ``(name, folder)``: itself, or the ``Method-name`` folder of each
    adapter that an export of several adapters (several tasks or methods) wrote inside it."""
    if not (folder / CONFIG_FILE).is_file():
        inside = sorted(folder.glob(f"*-*/{CONFIG_FILE}"), key=_own_parameters_last) if folder.is_dir() else []
        if inside:
            for config in inside:
                read_adapter_files(config.parent)  # a damaged one: one line now, not at setup
            return [(config.parent.name.split("-", 1)[1], config.parent) for config in inside]
    read_adapter_files(folder)  # a missing or damaged folder: one line now, not at setup
    return [("default", folder)]


def _one_adapter(pairs: list[tuple[str, Path]], folder: Path, given: str,
                 routes: bool = True) -> list[tuple[str, Path]]:
    """``pairs`` (`_adapter_folders` of ``folder``) where they are the methods of one adapter; several names (a
    multi-task fit's tasks) are refused: loaded together without their data's routing, every task's adapter acts on
    every row.

    ``routes``: whether to name ``--adapters`` (predict's) as the way to route rows.
    """
    names = sorted({name for name, _ in pairs})
    if len(names) > 1:
        routing = (f"route each row to its own with --adapters "
                   f"{' '.join(f'{name}={folder / path.name}' for name, path in pairs)}" if routes else
                   "give the multi-task data whose tasks they are named after (each task needs its adapter)")
        raise ConfigError(f"{given} holds adapters of several names ({', '.join(names)}: "
                          f"{', '.join(path.name for _, path in pairs)}), which together would all act on every row; "
                          f"give one of them ({folder / pairs[0][1].name}), or {routing}")
    return pairs


def _prompt_config(configs: list[dict]) -> dict:
    """Of one adapter's methods' configs, the soft prompt's (whose length a row's prompt takes), else the first."""
    return next((config for config in configs if config.get("peft_type") == "PROMPT_TUNING"), configs[0])


def _own_parameters_last(config: Path) -> tuple[bool, str]:
    """Load order of an export's adapters: those training the model's own parameters (Selective, BitFit) after the
    others, as a fit must have them (a saved module of LoRA first, else the two would claim one parameter)."""
    method = METHODS.get(config.parent.name.split("-", 1)[0])
    return isinstance(method, type) and issubclass(method, Selective), config.parent.name


def _retire_requeue_checkpoints(trainer: L.Trainer) -> None:
    """After a finished fit under SLURM, rename its requeue checkpoints ``hpc_ckpt_N.ckpt`` ``hpc-ckpt-N.resumed.ckpt``.

    Lightning loads the newest of them into any later ``test`` or ``fit`` in this folder that names
    no checkpoint: the test after fit would measure (and export) the preempted weights, and a new
    job would resume a finished run.
    """
    if not SLURMEnvironment.detect():
        return
    if trainer.is_global_zero:
        fs, root = url_to_fs(str(trainer.default_root_dir))
        for path in sorted(fs.glob(f"{root.rstrip('/')}/hpc_ckpt_*.ckpt")):
            folder, _, name = path.rpartition("/")
            stem = f"{folder}/{name.replace('hpc_ckpt_', 'hpc-ckpt-').removesuffix('.ckpt')}"
            free = (f"{stem}.resumed{f'-{n}' if n else ''}.ckpt" for n in itertools.count())
            retired = next(name for name in free if not fs.exists(name))  # an earlier run's stays
            fs.mv(path, retired)
            rank_zero_info(f"lightning-peft: the fit is finished; {path} renamed {retired}, so that nothing in "
                           "this folder resumes from it again")
    trainer.strategy.barrier("lightning-peft: requeue checkpoints retired")


def _curves_after_fit(trainer: L.Trainer) -> str:
    """Draw the run's CSV log into ``curves.png`` beside it, or say how to get the picture."""
    logger = trainer.logger
    if not isinstance(logger, CSVLogger):
        return ""
    logger.save()  # the test after fit logs too
    metrics = Path(logger.experiment.metrics_file_path)
    if not metrics.is_file():
        return ""
    try:
        return f"curves: {plot_curves(metrics, metrics.with_name('curves.png'), title=trainer.default_root_dir)}"
    except ImportError:
        return f'curves: pip install "lightning-peft[plot]" to draw {metrics}'
    except (OSError, ValueError) as err:  # training is done and checkpointed: report, do not fail
        return f"curves: not drawn ({err}); the metrics are in {metrics}"


def _export_after_fit(trainer: L.Trainer, module: L.LightningModule, checkpoint: str | None) -> str:
    """Save the trained adapters next to the run (single process), or say how to export them."""
    if trainer.world_size == 1:
        try:
            out = export_adapters(module, Path(trainer.default_root_dir) / "adapter")
        except (ValueError, TypeError, OSError) as err:  # training is done and checkpointed: report, do not fail
            return f"adapter: not saved ({err})"
        return f"adapter: {out}"
    if checkpoint and Path(checkpoint).is_dir():  # sharded (FSDP, checkpoint="full"): export reads one file
        return "adapter: not exported (the checkpoint is sharded; train with checkpoint='adapter' to export one)"
    source = checkpoint or "CHECKPOINT"
    return f"adapter: export it with `lightning-peft export {source} --out DIR`"


def _has_test_data(datamodule: L.LightningDataModule | None) -> bool:
    splits = getattr(datamodule, "splits", {})
    return "test" in splits


def export_main(args: list[str]) -> None:
    """``lightning-peft export CKPT --out DIR [--merged [--adapter NAME|all] | --for-original-base]``."""
    parser = CommandParser(prog="lightning-peft export",
                                     description="Write a checkpoint's adapter in the Hugging Face PEFT layout, "
                                                 "or with --merged a full transformers model folder.")
    parser.add_argument("checkpoint", help="a Lightning checkpoint of a lightning-peft recipe")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--merged", action="store_true", help="fold the adapter into the base weights")
    parser.add_argument("--adapter", help="with --merged and adapters of several names (tasks): the one to merge, "
                                          "or 'all' for adapters that trained together")
    parser.add_argument("--for-original-base", action="store_true",
                        help="write adapters that apply to the base weights as they were before injection: a PiSSA "
                             "adapter becomes the plain LoRA of twice its rank equal to it (for vLLM, TGI)")
    options = parser.parse_args(args)
    out = export_checkpoint(options.checkpoint, options.out, merged=options.merged, adapter=options.adapter,
                            for_original_base=options.for_original_base)
    print(f"exported {'merged model' if options.merged else 'adapter'} to {out}")


def build_cli(args: list[str] | None = None, run: bool = True) -> PEFTCLI:
    """The CLI of the ``lightning-peft`` command; ``run=False`` only builds the trainer, module and data."""
    return PEFTCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"callbacks": [PredictionWriter()]},
        save_config_kwargs={"overwrite": True},
        parser_class=PEFTArgumentParser,
        args=args,
        run=run,
    )


COMMANDS = {
    "fit": "train a recipe, then test it (when it has test data) and save its adapter",
    "validate": "evaluate a model on the recipe's validation data",
    "test": "evaluate a model on the recipe's test data",
    "predict": "label texts or continue prompts, one line each (--ckpt_path or --adapter)",
    "export": "write a checkpoint's adapter in peft's layout, or with --merged a whole model",
    "compare": "train several methods on one recipe's task and report their trade-offs (tables, plots)",
    "estimate": "estimate each method's peak training memory per device, before training",
}


def command_help() -> str:
    """``lightning-peft --help``: every command on a line."""
    width = max(map(len, COMMANDS))
    return "\n".join([
        "usage: lightning-peft COMMAND [options]",
        "",
        "Parameter-efficient fine-tuning with Lightning recipes (YAML, --config).",
        "",
        "commands:",
        *(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()),
        "",
        "Run `lightning-peft COMMAND --help` for a command's options.",
        f"Built-in recipes (--config NAME, from any folder): {', '.join(builtin_recipes())}.",
    ])


def with_recipe_paths(argv: list[str]) -> list[str]:
    """``argv`` with each ``--config``/``-c`` value that names a built-in recipe replaced by its path."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = recipe_path(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + recipe_path(arg.removeprefix("--config="))
    return out


def _warn_of_settings_before_a_recipe(argv: list[str]) -> None:
    """Say that settings given before a ``--config`` lose to what its recipe sets (jsonargparse: the later wins)."""
    last = max((i for i, arg in enumerate(argv) if arg in ("--config", "-c") or arg.startswith("--config=")),
               default=None)
    early = [arg.split("=")[0] for arg in argv[1:last] if arg.startswith("--") and "." in arg.split("=")[0]]
    if last is not None and early:
        warnings.warn(f"{', '.join(early)} come(s) before --config, so the recipe's own value wins where it sets one "
                      "(the later setting wins): give settings after --config", stacklevel=2)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-peft`` console script."""
    argv = sys.argv[1:] if args is None else args
    if not argv or argv[0] in ("-h", "--help"):
        print(command_help())
        return
    try:
        if argv[:1] == ["export"]:
            return export_main(argv[1:])
        if argv[:1] in (["compare"], ["estimate"]):
            from lightning_peft.compare import runner  # on demand: report plotting and planning stay out of fit

            return (runner.compare_main if argv[0] == "compare" else runner.estimate_main)(argv[1:])
        resolved = with_recipe_paths(argv)
        _warn_of_settings_before_a_recipe(argv)
        if args is None:  # LightningCLI reads sys.argv itself, and warns when given both
            sys.argv[1:], resolved = resolved, None
        build_cli(resolved)
    except KeyboardInterrupt as err:  # Ctrl-C, or compare stopped by SIGTERM: one line, the shell's code for it
        print(f"lightning-peft: {err or 'interrupted'}", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        mistake = user_mistake(err)
        if os.environ.get(DEBUG_VARIABLE) == "1" or mistake is None:
            raise
        print(f"lightning-peft: error: {error_line(mistake)}", file=sys.stderr)
        sys.exit(USAGE_ERROR)


# where Lightning and torch check the trainer's and loaders' settings (an accelerator name, batch_size=0)
SETTING_CHECKS = (os.path.join("lightning", "pytorch", "trainer", "connectors", ""),
                  os.path.join("torch", "utils", "data", ""))


def user_mistake(err: BaseException) -> BaseException | None:
    """The user's mistake behind ``err``: itself, or the cause that jsonargparse wrapped while building a class."""
    chain = []
    while err is not None:
        chain.append(err)
        err = err.__cause__
    return next((cause for cause in reversed(chain) if is_user_error(cause)), None)


def is_user_error(err: BaseException) -> bool:
    """A mistake in what was asked, not a bug: said on purpose by this library or the parser, or a file/OS problem."""
    if isinstance(err, (ConfigError, OSError, ImportError, AssetError, MisconfigurationException)):
        return True
    return isinstance(err, (ValueError, TypeError, KeyError)) and _raised_here(err)


def _raised_here(err: BaseException) -> bool:
    """Whether lightning_peft raised ``err`` on purpose: its innermost frame is a ``raise`` statement of the package.

    A TypeError that Python raises for a bad call inside the package is a bug, and keeps its traceback.
    """
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    filename = os.path.abspath(tb.tb_frame.f_code.co_filename)
    in_package = filename.startswith(os.path.dirname(lightning_peft.__file__) + os.sep)
    checks_settings = any(part in filename for part in SETTING_CHECKS)
    return (in_package or checks_settings) and linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise ")


def error_line(err: BaseException) -> str:
    """The error's message on one line (a KeyError's message is its repr)."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(text.split()) or type(err).__name__


if __name__ == "__main__":
    main()
