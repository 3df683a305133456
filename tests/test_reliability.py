"""Bad input, as a new user gives it: one line naming what is wrong, exit code 2, nothing changed.

Each case of the table runs a mistake through the command line (in process, as the console
script runs it) or the Python API and asserts the exit code or exception type, that the message
is one line with the words that say what is wrong, and that every input file (recipe, data,
model, checkpoint, adapter) and the module are as they were.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.abc
import json
import math
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

import lightning_peft.core.adapter_files as adapter_files
from lightning_peft import (
    IA3,
    Adapter,
    BitFit,
    LoRA,
    PromptTuning,
    QuantizeBase,
    Selective,
    adapter_names,
    cli,
    combine_adapters,
    delete_adapter,
    disable_adapters,
    load_adapter,
    merge,
    save_adapter,
    set_adapter,
)
from lightning_peft.export import rebuild_from_checkpoint
from lightning_peft.tasks import SequenceClassification

from conftest import (
    TokenModule,
    fail_half_way_with_enospc,
    make_trainer,
    tiny_bert,
    tiny_bert_folder,
    tiny_llama,
    token_loader,
)

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "movie", "plot", "the", "was", "very", "not"]


# --- the inputs: a tiny model folder, data, a recipe, a trained checkpoint and adapter ------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    tiny_bert_folder(folder / "model", WORDS)
    rows = "".join(f"the movie was {w},{'pos' if i % 2 else 'neg'}\n" for i, w in enumerate(WORDS * 2))
    (folder / "train.csv").write_text("text,label\n" + rows)
    (folder / "texts.txt").write_text("the movie was good\nthe plot was awful\n")
    (folder / "comma.csv").write_text("text,label\nthe movie was good,pos\nthe movie, sadly, was bad,neg\n")
    (folder / "blank_label.csv").write_text("text,label\nthe movie was good,1\nthe movie was bad,\n")
    (folder / "latin1.csv").write_bytes("text,label\nthe movie was g\xe9od,1\n".encode("latin-1"))
    (folder / "three_classes.csv").write_text("text,label\n" + "".join(f"the movie was {w},{'abc'[i % 3]}\n"
                                                                         for i, w in enumerate(WORDS)))
    (folder / "one_class.csv").write_text("text,label\nthe movie was good,pos\nthe plot was great,pos\n")
    (folder / "empty.ckpt").write_bytes(b"")
    write_recipe(folder, "recipe.yaml")
    write_recipe(folder, "typo_key.yaml", trainer={"max_step": 3})
    write_recipe(folder, "typo_arg.yaml", lora={"rank": 4})
    write_recipe(folder, "typo_class.yaml", lora_class="lightning_peft.LoRa")
    write_recipe(folder, "inf_alpha.yaml", lora={"alpha": math.inf})
    write_recipe(folder, "no_callbacks.yaml", callbacks=[])
    write_recipe(folder, "no_head.yaml", lora={"modules_to_save": None})
    assert run_cli(["fit", "--config", str(folder / "recipe.yaml"),
                    "--trainer.default_root_dir", str(folder / "trained")])[0] == 0
    checkpoint = next((folder / "trained" / "checkpoints").glob("*.ckpt"))
    checkpoint.rename(folder / "trained.ckpt")
    (folder / "truncated.ckpt").write_bytes((folder / "trained.ckpt").read_bytes()[:1000])
    (folder / "sharded.ckpt").mkdir()  # as FSDP writes a full checkpoint: a folder of shards
    for name in (".metadata", "__0_0.distcp", "meta.pt"):
        (folder / "sharded.ckpt" / name).write_bytes(b"")
    mismatched = folder / "adapter_r8"  # the trained adapter's files, with a config that says r=8
    mismatched.mkdir()
    config = json.loads((folder / "trained" / "adapter" / "adapter_config.json").read_text())
    (mismatched / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    (mismatched / "adapter_model.safetensors").write_bytes(
        (folder / "trained" / "adapter" / "adapter_model.safetensors").read_bytes())
    return folder


def write_recipe(folder: Path, name: str, trainer: dict | None = None, lora: dict | None = None,
                 lora_class: str = "lightning_peft.LoRA", callbacks: list | None = None) -> Path:
    lora_callback = {"class_path": lora_class, "init_args": {"r": 4, "target_modules": ["query", "value"],
                                                             "modules_to_save": ["classifier"], **(lora or {})}}
    if "rank" in (lora or {}):
        del lora_callback["init_args"]["r"]
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 3, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(folder.parent / "run"),
                    "callbacks": [lora_callback] if callbacks is None else callbacks, **(trainer or {})},
        "model": {"class_path": "lightning_peft.tasks.SequenceClassification",
                  "init_args": {"model": str(folder / "model")}},
        "data": {"class_path": "lightning_peft.data.TextClassificationData",
                 "init_args": {"train_file": str(folder / "train.csv"), "batch_size": 8, "max_length": 16}},
    }
    (folder / name).write_text(yaml.safe_dump(config))
    return folder / name


def run_cli(args: list[str], stdout: list[str] | None = None) -> tuple[int, str]:
    """Exit code and stderr of the ``lightning-peft`` command run in this process (its stdout lines into ``stdout``)."""
    import contextlib
    import io

    err, out = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            cli.main(args)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    if stdout is not None:
        stdout.extend(out.getvalue().splitlines())
    return code, err.getvalue()


def file_digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- the command line ---------------------------------------------------------------------------------
CLI_CASES = {
    "yaml key typo": (["fit", "--config", "{typo_key.yaml}"], ["unknown option 'trainer.max_step'",
                                                               "did you mean 'trainer.max_steps'"]),
    "command-line key typo": (["fit", "--config", "{recipe.yaml}", "--trainer.max_stepz", "3"],
                              ["did you mean 'trainer.max_steps'"]),
    "callback argument typo in yaml": (["fit", "--config", "{typo_arg.yaml}"],
                                       ["LoRA does not take 'rank'", "LoRA takes: r, alpha"]),
    "class_path typo": (["fit", "--config", "{typo_class.yaml}"], ["did you mean 'lightning_peft.LoRA'"]),
    "task argument typo": (["fit", "--config", "{recipe.yaml}", "--model.init_args.learning_rat", "1"],
                           ["does not take 'learning_rat'", "did you mean 'learning_rate'"]),
    "unknown command": (["fiit", "--config", "{recipe.yaml}"], ["unknown command 'fiit'", "did you mean 'fit'"]),
    "predict with other settings than the checkpoint's": (
        ["predict", "--config", "{recipe.yaml}", "--ckpt_path", "{trained.ckpt}", "--data.init_args.predict_file",
         "{texts.txt}", "--trainer.callbacks.init_args.r", "8"],
        ["trained with r=4 (here 8); load it with the settings it was trained with"]),  # was: "resume ... new run"
    "a spawning strategy": (["fit", "--config", "{recipe.yaml}", "--trainer.devices=2", "--trainer.strategy=ddp_spawn"],
                            ["LoRA: this strategy starts its processes by multiprocessing"]),  # was: a traceback
    "predict on several processes": (["predict", "--config", "{recipe.yaml}", "--untrained", "true",
                                      "--data.init_args.predict_file", "{texts.txt}", "--trainer.devices=2",
                                      "--trainer.strategy=ddp"], ["predict prints its predictions in input order "
                                                                  "from one process"]),  # was: once per process
    "unknown own command": (["comapre", "--config", "{recipe.yaml}"],
                            ["unknown command 'comapre'", "did you mean 'compare'", "export, compare, estimate)"]),
    "value of the wrong type": (["fit", "--config", "{recipe.yaml}", "--trainer.max_steps", "many"],
                                ["trainer.max_steps: expected int, got 'many'"]),
    "missing recipe": (["fit", "--config", "{missing.yaml}"], ["missing.yaml", "does not exist"]),
    "infinite alpha in yaml": (["fit", "--config", "{inf_alpha.yaml}"], ["LoRA alpha must be a finite number"]),
    "negative learning rate": (["fit", "--config", "{recipe.yaml}", "--model.init_args.learning_rate", "-1"],
                               ["learning_rate must be a finite number > 0"]),
    "val_fraction out of range": (["fit", "--config", "{recipe.yaml}", "--data.init_args.val_fraction", "1.5"],
                                  ["val_fraction must be in [0, 1)"]),
    "unknown model": (["fit", "--config", "{recipe.yaml}", "--model.init_args.model", "no-such-model"],
                      ["'no-such-model' is neither a built-in name"]),
    "missing data file": (["fit", "--config", "{recipe.yaml}", "--data.init_args.train_file", "{nope.csv}"],
                          ["nope.csv does not exist"]),
    "unquoted comma in a csv text": (["fit", "--config", "{recipe.yaml}", "--data.init_args.train_file",
                                      "{comma.csv}"], ["comma.csv, line 3: 4 fields where the header has 2",
                                                       "quote a text"]),
    "blank label": (["fit", "--config", "{recipe.yaml}", "--data.init_args.train_file", "{blank_label.csv}"],
                    ["blank_label.csv, line 3: no 'label' value"]),
    "a new head that nothing trains": (
        ["fit", "--config", "{no_head.yaml}", "--data.init_args.train_file", "{three_classes.csv}"],
        ["the classification head (classifier) is new, initialized at random (the model folder has no head of 3 "
         "classes), and no method trains its weights: add 'classifier' to the PEFT method's modules_to_save"]),
    "an option cut short on the command line": (
        ["fit", "--config", "{recipe.yaml}", "--trainer.max_step=1"],
        ["unknown option 'trainer.max_step'; did you mean 'trainer.max_steps'?"]),  # was: taken as max_steps
    "a compare option cut short": (["compare", "--config", "{recipe.yaml}", "--methods", "lora", "--max_step", "1"],
                                   ["unrecognized arguments: --max_step 1"]),
    "one class": (["fit", "--config", "{recipe.yaml}", "--data.init_args.train_file", "{one_class.csv}"],
                  ["a classifier needs at least two classes, but this one has 1 ('pos')"]),  # was: torchmetrics'
    "non-utf-8 data": (["fit", "--config", "{recipe.yaml}", "--data.init_args.train_file", "{latin1.csv}"],
                       ["latin1.csv, line 2: not UTF-8"]),
    "predict without trained weights": (["predict", "--config", "{recipe.yaml}", "--data.init_args.predict_file",
                                         "{texts.txt}"], ["predict needs trained weights", "--ckpt_path", "--adapter"]),
    "predict from a missing adapter folder": (["predict", "--config", "{recipe.yaml}", "--data.init_args.predict_file",
                                               "{texts.txt}", "--adapter", "{nowhere}"],
                                              ["nowhere/adapter_config.json does not exist"]),
    "predict with an adapter folder that does not fit": (
        ["predict", "--config", "{recipe.yaml}", "--data.init_args.predict_file", "{texts.txt}", "--adapter",
         "{adapter_r8}"], ["adapter_r8/adapter_model.safetensors: tensor", "has shape (4, 32)"]),
    "predict into a table of unknown format": (["predict", "--config", "{recipe.yaml}", "--data.init_args.predict_file",
                                                "{texts.txt}", "--ckpt_path", "{trained.ckpt}", "--output",
                                                "{out.txt}"], ["write predictions to a .csv or .jsonl file"]),
    "predict into a table under a file": (["predict", "--config", "{recipe.yaml}", "--data.init_args.predict_file",
                                           "{texts.txt}", "--ckpt_path", "{trained.ckpt}", "--output",
                                           "{texts.txt/out.csv}"], ["texts.txt/out.csv: cannot write there"]),
    "a bad value for a method's setting": (["fit", "--config", "{recipe.yaml}", "--trainer.callbacks.init_args.r",
                                            "four"], ["trainer.callbacks.r: expected int, got 'four'"]),
    "an unknown accelerator": (["fit", "--config", "{recipe.yaml}", "--trainer.accelerator", "gpuu"],
                               ["invalid accelerator name", "'gpuu'"]),
    "a batch size of 0": (["fit", "--config", "{recipe.yaml}", "--data.init_args.batch_size", "0"],
                          ["batch_size should be a positive integer value"]),
    "fit with --output": (["fit", "--config", "{recipe.yaml}", "--output", "{out.csv}"], ["--output is for predict"]),
    "fit with an adapter folder": (["fit", "--config", "{recipe.yaml}", "--adapter", "{trained}"],
                                   ["--adapter is for validate, test and predict"]),
    "resume from a truncated checkpoint": (["fit", "--config", "{recipe.yaml}", "--ckpt_path", "{truncated.ckpt}"],
                                           ["truncated.ckpt cannot be read"]),
    "predict from an empty checkpoint": (["predict", "--config", "{recipe.yaml}", "--data.init_args.predict_file",
                                          "{texts.txt}", "--ckpt_path", "{empty.ckpt}"], ["empty.ckpt cannot be read"]),
    "export a truncated checkpoint": (["export", "{truncated.ckpt}", "--out", "{out}"],
                                      ["truncated.ckpt cannot be read"]),
    "export a data file": (["export", "{train.csv}", "--out", "{out}"], ["train.csv cannot be read"]),
    "export a sharded checkpoint": (["export", "{sharded.ckpt}", "--out", "{out}"],
                                    ["sharded.ckpt is a sharded checkpoint", "checkpoint='adapter'"]),
    "export into a file": (["export", "{trained.ckpt}", "--out", "{train.csv}"],
                           ["--out", "train.csv is a file; give a folder"]),
    "export without --out": (["export", "{trained.ckpt}"], ["required: --out"]),
    "resume an adapter-only checkpoint without its method": (
        ["fit", "--config", "{no_callbacks.yaml}", "--ckpt_path", "{trained.ckpt}", "--trainer.max_steps", "5"],
        ["holds only the adapter of LoRA(r=4", "add the callback it was trained with"]),
    "resume with another alpha": (["fit", "--config", "{recipe.yaml}", "--ckpt_path", "{trained.ckpt}",
                                   "--trainer.max_steps", "5", "--trainer.callbacks.init_args.alpha", "32"],
                                  ["alpha=16.0 (here 32.0)"]),
}


def fill(arg: str, folder: Path) -> str:
    return str(folder / arg[1:-1]) if arg.startswith("{") else arg


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_a_command_line_mistake_is_one_line_and_exit_code_2(case, inputs):
    args, words = CLI_CASES[case]
    before = file_digests(inputs)
    code, stderr = run_cli([fill(arg, inputs) for arg in args])
    errors = [line for line in stderr.splitlines() if line.startswith("lightning-peft: error: ")]
    assert code == 2, stderr[-2000:]
    assert len(errors) == 1 and "Traceback" not in stderr and "usage:" not in stderr, stderr[-2000:]
    for word in words:
        assert word in errors[0], errors[0]
    assert file_digests(inputs) == before


def test_predict_runs_from_a_checkpoint_an_adapter_folder_or_untrained_on_request(inputs):
    common = ["predict", "--config", str(inputs / "recipe.yaml"), "--data.init_args.predict_file",
              str(inputs / "texts.txt")]
    from_checkpoint, from_folder, untrained = [], [], []
    assert run_cli([*common, "--ckpt_path", str(inputs / "trained.ckpt")], from_checkpoint)[0] == 0
    assert run_cli([*common, "--adapter", str(inputs / "trained" / "adapter")], from_folder)[0] == 0
    assert run_cli([*common, "--untrained", "true"], untrained)[0] == 0
    assert len(from_checkpoint) == 2 and all(line.split("\t")[0] in ("pos", "neg") for line in from_checkpoint)
    assert from_folder == from_checkpoint  # the same labels and probabilities
    assert len(untrained) == 2


def test_an_adapter_folder_at_setup_gives_the_checkpoint_model(inputs):
    from lightning_peft.registry import LoadAdapter

    ids = torch.tensor([[2, 13, 11, 14, 5, 3]])
    expected = rebuild_from_checkpoint(inputs / "trained.ckpt")(ids)
    module = SequenceClassification(model=str(inputs / "model"), labels=["neg", "pos"])
    module.configure_model()
    LoadAdapter(inputs / "trained" / "adapter").apply(module)
    assert torch.allclose(module.eval()(ids), expected, atol=1e-6)


class BrokenBitsandbytes(importlib.abc.MetaPathFinder):
    """An installed bitsandbytes whose import raises, as a failed CUDA setup does."""

    def find_spec(self, name, path, target=None):
        if name == "bitsandbytes":
            raise RuntimeError("CUDA Setup failed despite GPU being available")
        return None


def test_a_broken_bitsandbytes_is_one_line_and_only_for_what_needs_it(inputs, monkeypatch):
    for name in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [BrokenBitsandbytes(), *sys.meta_path])
    recipe = str(inputs / "recipe.yaml")
    code, stderr = run_cli(["fit", "--config", recipe, "--model.init_args.optimizer", "adamw8bit"])
    errors = [line for line in stderr.splitlines() if line.startswith("lightning-peft: error: ")]
    assert code == 2 and len(errors) == 1, stderr[-2000:]
    assert "needs bitsandbytes, which is installed but fails to import (RuntimeError: CUDA Setup" in errors[0]
    assert run_cli(["fit", "--config", recipe])[0] == 0  # a LoRA recipe does not need it


def test_a_library_bug_keeps_its_traceback_and_debug_shows_any(inputs, monkeypatch):
    def bug(*args, **kwargs):
        raise TypeError("unsupported operand")  # raised outside lightning_peft: not a user mistake

    monkeypatch.setattr(torch.optim.lr_scheduler, "LambdaLR", lambda *a, **k: bug())
    with pytest.raises(TypeError, match="unsupported operand"):
        cli.main(["fit", "--config", str(inputs / "recipe.yaml")])
    monkeypatch.setenv("LIGHTNING_PEFT_DEBUG", "1")
    with pytest.raises(cli.ConfigError, match="unknown option"):
        cli.main(["fit", "--config", str(inputs / "typo_key.yaml")])


# --- the Python API -----------------------------------------------------------------------------------
@dataclass
class ApiCase:
    """A call that must fail with ``error`` whose message holds ``words``, leaving the module and files as they were."""

    call: Callable[[torch.nn.Module, Path], object]
    error: type[BaseException]
    words: list[str] = field(default_factory=list)


def two_methods_on_one_parameter(module, folder):
    trainer = make_trainer([LoRA(r=4, target_modules=["query"], modules_to_save=["classifier"]),
                            BitFit(modules_to_save=["classifier"])], max_steps=1)
    trainer.fit(TokenModule(module), token_loader())


def saved_adapter(folder: Path) -> Path:
    """An adapter folder written by save_adapter from a fresh LoRA model (made once per folder)."""
    out = folder / "adapter"
    if not out.exists():
        torch.manual_seed(1)
        save_adapter(LoRA(r=4, target_modules=["query"]).inject(tiny_bert()), out)
    return out


def damaged_copy(folder: Path, damage: Callable[[Path], None]) -> Path:
    source = saved_adapter(folder)
    copy = folder / f"damaged-{damage.__name__}"
    copy.mkdir(exist_ok=True)
    for file in source.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    damage(copy)
    return copy


def flip_a_byte(copy: Path) -> None:
    path = copy / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's bytes: the header still parses
    path.write_bytes(bytes(data))


def drop_target_modules(copy: Path) -> None:
    config = json.loads((copy / "adapter_config.json").read_text())
    del config["target_modules"]
    (copy / "adapter_config.json").write_text(json.dumps(config))


def truncate_weights(copy: Path) -> None:
    path = copy / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:50])


def empty_checkpoint(folder: Path) -> Path:
    (folder / "empty.ckpt").write_bytes(b"")
    return folder / "empty.ckpt"


API_CASES = {
    "infinite alpha": ApiCase(lambda m, f: LoRA(alpha=math.inf), ValueError, ["alpha must be a finite number"]),
    "nan alpha": ApiCase(lambda m, f: LoRA(alpha=math.nan), ValueError, ["alpha must be a finite number"]),
    "rank zero": ApiCase(lambda m, f: LoRA(r=0), ValueError, ["r must be a positive integer"]),
    "dropout of one": ApiCase(lambda m, f: LoRA(dropout=1.0), ValueError, ["dropout must be in [0, 1)"]),
    "string target is a full-match regex": ApiCase(
        lambda m, f: LoRA(target_modules="query").inject(m), ValueError,
        ["matched no module", "query (Linear)", "A string is a regular expression", "['query']"]),
    "unknown target": ApiCase(lambda m, f: LoRA(target_modules=["qurey"]).inject(m), ValueError,
                              ["matched no module", "query (Linear)"]),
    "two methods on one parameter": ApiCase(two_methods_on_one_parameter, ValueError,
                                            ["BitFit[default]", "in modules_to_save of LoRA[default]"]),
    "a flipped byte in an adapter file": ApiCase(lambda m, f: load_adapter(m, damaged_copy(f, flip_a_byte)),
                                                 ValueError, ["adapter_model.safetensors is corrupt", "checksum"]),
    "adapter_config.json without target_modules": ApiCase(
        lambda m, f: load_adapter(m, damaged_copy(f, drop_target_modules)), ValueError,
        ["adapter_config.json: LoRA needs target_modules"]),
    "truncated adapter file": ApiCase(lambda m, f: load_adapter(m, damaged_copy(f, truncate_weights)), ValueError,
                                      ["not a valid safetensors file"]),
    "missing adapter folder": ApiCase(lambda m, f: load_adapter(m, f / "nowhere"), FileNotFoundError,
                                      ["nowhere/adapter_config.json does not exist"]),
    "export an empty checkpoint": ApiCase(lambda m, f: rebuild_from_checkpoint(empty_checkpoint(f)), ValueError,
                                          ["empty.ckpt cannot be read"]),
    "resume from an empty checkpoint": ApiCase(
        lambda m, f: make_trainer([LoRA(r=4, target_modules=["query"])]).fit(
            TokenModule(m), token_loader(), ckpt_path=empty_checkpoint(f)), ValueError, ["empty.ckpt cannot be read"]),
    "negative learning rate": ApiCase(lambda m, f: SequenceClassification(model="x", learning_rate=-1e-3), ValueError,
                                      ["learning_rate must be a finite number > 0"]),
    "adapter bottleneck zero": ApiCase(lambda m, f: Adapter(bottleneck_dim=0), ValueError, ["bottleneck_dim"]),
    "no virtual tokens": ApiCase(lambda m, f: PromptTuning(num_virtual_tokens=0), ValueError, ["num_virtual_tokens"]),
    "unknown quantization": ApiCase(lambda m, f: QuantizeBase(mode="int3"), ValueError, ["int3", "nf4"]),
    "IA3 on a missing module": ApiCase(lambda m, f: IA3(target_modules=["nope"], feedforward_modules=[]).inject(m),
                                       ValueError, ["nope", "matched no module"]),
    "selective on a missing module": ApiCase(lambda m, f: Selective(modules=["q_porj"]).inject(m), ValueError,
                                             ["q_porj"]),
    "save an adapter that does not exist": ApiCase(lambda m, f: save_adapter(m, f / "out", adapter_name="nope"),
                                                   ValueError, ["no adapter named 'nope'"]),
    "activate an adapter that does not exist": ApiCase(lambda m, f: set_adapter(m, "nope"), ValueError,
                                                       ["no adapter named 'nope'"]),
}


def module_record(module: torch.nn.Module) -> tuple:
    return ({n: type(m) for n, m in module.named_modules()},
            {n: (p.detach().clone(), p.requires_grad) for n, p in module.named_parameters()})


@pytest.mark.parametrize("case", list(API_CASES))
def test_an_api_mistake_is_one_line_and_changes_nothing(case, tmp_path):
    spec = API_CASES[case]
    module = tiny_bert()
    saved_adapter(tmp_path)  # the files that exist before the mistake
    before_files, (types, params) = file_digests(tmp_path), module_record(module)
    with pytest.raises(spec.error) as info:
        spec.call(module, tmp_path)
    message = str(info.value)
    assert "\n" not in message, message
    for word in spec.words:
        assert word in message, message
    after_types, after_params = module_record(module)
    assert after_types == types
    assert after_params.keys() == params.keys()
    for name, (tensor, requires_grad) in params.items():
        assert torch.equal(after_params[name][0], tensor) and after_params[name][1] == requires_grad, name
    after_files = file_digests(tmp_path)
    assert {k: v for k, v in after_files.items() if k in before_files} == before_files
    assert not [k for k in after_files if k not in before_files and not k.startswith(("damaged-", "empty.ckpt"))]


def perturbed(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every trainable tensor moved off its initial value (a LoRA B of zeros changes nothing)."""
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.2)
    return module


def test_loading_under_a_name_the_model_has_is_refused_and_changes_nothing(tmp_path):
    torch.manual_seed(0)
    save_adapter(perturbed(LoRA(r=4, target_modules=["query"]).inject(tiny_bert())), tmp_path / "other")
    module = perturbed(load_adapter(tiny_bert(), tmp_path / "other", adapter_name="a"))  # the same settings
    _, params = module_record(module)
    with pytest.raises(ValueError, match="has a LoRA adapter named 'a' already") as info:
        load_adapter(module, tmp_path / "other", adapter_name="a")  # was: its tensors written over adapter 'a'
    assert "\n" not in str(info.value) and "delete_adapter(model, 'a')" in str(info.value)
    assert all(torch.equal(p, params[n][0]) for n, p in module.named_parameters())


def test_a_failed_load_leaves_the_other_adapters_and_which_is_active_as_they_were(tmp_path):
    torch.manual_seed(0)
    save_adapter(perturbed(LoRA(r=4, target_modules=["query"], modules_to_save=["classifier"]).inject(
        tiny_bert(num_labels=3))), tmp_path / "three_labels")
    module = perturbed(LoRA(r=4, target_modules=["query"], adapter_name="a").inject(tiny_bert().eval()))
    perturbed(LoRA(r=4, target_modules=["query"], adapter_name="b").inject(module))
    set_adapter(module, "b")
    ids = torch.randint(0, 32, (2, 6))
    before, (types, params) = module(input_ids=ids).logits, module_record(module)
    with pytest.raises(ValueError, match="has shape"), warnings.catch_warnings():
        warnings.simplefilter("error")  # no adapter deleted or switched on the way back
        load_adapter(module, tmp_path / "three_labels", adapter_name="c")  # fails after injecting 'c'
    assert module_record(module)[0] == types
    assert {n: p.requires_grad for n, p in module.named_parameters()} == {n: g for n, (_, g) in params.items()}
    torch.testing.assert_close(module(input_ids=ids).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("change", ["combine", "load", "inject", "set_adapter", "delete", "merge"])
def test_switching_adapters_on_inside_a_disable_adapters_block_is_refused_and_changes_nothing(change, tmp_path):
    from lightning_peft import combine_adapters

    torch.manual_seed(0)
    save_adapter(perturbed(LoRA(r=4, target_modules=["query"]).inject(tiny_bert())), tmp_path / "c")
    module = LoRA(r=4, target_modules=["query"], adapter_name="a").inject(tiny_bert().eval())
    perturbed(LoRA(r=4, target_modules=["query"], adapter_name="b").inject(module))
    calls = {"combine": lambda: combine_adapters(module, {"a": 1.0, "b": 1.0}, new_name="ab", how="cat"),
             "load": lambda: load_adapter(module, tmp_path / "c", adapter_name="c"),
             "inject": lambda: LoRA(r=2, target_modules=["key"], adapter_name="k").inject(module),
             "set_adapter": lambda: set_adapter(module, "b"),
             "delete": lambda: delete_adapter(module, "b"),  # was: done, leaving no adapter active after the block
             "merge": lambda: merge(module)}  # was: merged no adapter, the model computing the base for good
    ids = torch.randint(0, 32, (2, 6))
    with disable_adapters(module):
        base, (types, _) = module(input_ids=ids).logits, module_record(module)
        with pytest.raises(ValueError, match="inside a disable_adapters block"):
            calls[change]()  # was: done, so the "disabled" model computed with the new adapter
        torch.testing.assert_close(module(input_ids=ids).logits, base, rtol=0, atol=0)
        assert module_record(module)[0] == types
        copied = copy.deepcopy(module)
    calls[change]()  # after the block it goes ahead
    set_adapter(copied, "a")  # a copy made inside the block is not inside one


def test_an_export_whose_flush_fails_renames_nothing_and_a_killed_ones_stage_goes_at_the_next(tmp_path, monkeypatch):
    import os

    import lightning_peft.core.files as files
    from lightning_peft.export import export_adapters

    def trained(alpha):
        return perturbed(LoRA(r=4, alpha=alpha, target_modules=["query"]).inject(tiny_bert()))

    export_adapters(trained(8), tmp_path)
    before, durable, flushed = file_digests(tmp_path), files._make_durable, []

    def full_at_the_second_flush(path):
        flushed.append(path)
        if len(flushed) == 2:  # a quota or network disk reports a full disk at the flush
            raise OSError(28, "No space left on device")
        durable(path)

    monkeypatch.setattr(files, "_make_durable", full_at_the_second_flush)
    with pytest.raises(OSError, match="No space left"):
        export_adapters(trained(64), tmp_path)  # was: the first file renamed before the second was flushed
    assert file_digests(tmp_path) == before
    monkeypatch.setattr(files, "_make_durable", durable)
    killed = tmp_path / f".export.{files._host()}-{2**22 + 7}.abc.tmp"  # a stage a killed export left (no such pid)
    killed.mkdir()
    (killed / "adapter_model.safetensors").write_bytes(b"partial")
    assert not any(str(2**22 + 7) in line for line in os.popen("ps -e -o pid").read().split())
    export_adapters(trained(64), tmp_path)
    assert not killed.exists()  # was: left, as large as the export, one more with every kill


def test_a_full_disk_on_export_is_one_line_and_keeps_the_previous_adapter(inputs, tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    assert run_cli(["export", str(inputs / "trained.ckpt"), "--out", str(out)])[0] == 0
    before = file_digests(out)
    monkeypatch.setattr(adapter_files, "write_safetensors", fail_half_way_with_enospc(adapter_files.write_safetensors))
    code, stderr = run_cli(["export", str(inputs / "trained.ckpt"), "--out", str(out)])
    errors = [line for line in stderr.splitlines() if line.startswith("lightning-peft: error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert "No space left on device" in errors[0] and "adapter_model.safetensors" in errors[0]
    assert file_digests(out) == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".lightning-peft-files"]


def test_a_full_disk_on_a_merged_export_keeps_the_previous_model_folder(inputs, tmp_path, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    out = tmp_path / "merged"
    assert run_cli(["export", str(inputs / "trained.ckpt"), "--out", str(out), "--merged"])[0] == 0
    before = file_digests(out)
    monkeypatch.setattr(modeling_utils, "safe_save_file", fail_half_way_with_enospc(modeling_utils.safe_save_file))
    code, stderr = run_cli(["export", str(inputs / "trained.ckpt"), "--out", str(out), "--merged"])
    assert code == 2 and "No space left on device" in stderr
    assert file_digests(out) == before  # was: model.safetensors cut to 100 bytes, the folder unloadable
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".lightning-peft-files"]  # no staging left


def test_the_table_covers_at_least_thirty_mistakes():
    assert len(CLI_CASES) + len(API_CASES) + 1 >= 30  # + the broken bitsandbytes


def test_a_flipped_byte_in_a_checkpoint_tensor_is_detected(tmp_path):
    module = TokenModule(tiny_bert())
    trainer = make_trainer([LoRA(r=4, target_modules=["query"])], max_steps=1)
    trainer.fit(module, token_loader())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    checkpoint = torch.load(tmp_path / "a.ckpt", weights_only=True)
    key = next(k for k in checkpoint["state_dict"] if k.endswith("lora_B"))
    checkpoint["state_dict"][key][0, 0] += 1e-3  # a flipped low bit, as a disk would: the file is still valid
    torch.save(checkpoint, tmp_path / "b.ckpt")
    with pytest.raises(ValueError, match="b.ckpt is corrupt"):
        make_trainer([LoRA(r=4, target_modules=["query"])], max_steps=2).fit(
            TokenModule(tiny_bert()), token_loader(), ckpt_path=tmp_path / "b.ckpt")


def test_a_bug_inside_the_package_keeps_its_traceback(inputs, monkeypatch):
    import lightning_peft.data.files as files

    def buggy(path, columns):
        return len(path) + columns  # a TypeError that Python raises inside the package: a bug, not a mistake

    buggy.__code__ = buggy.__code__.replace(co_filename=files.__file__, co_firstlineno=1)  # as if written there
    monkeypatch.setattr(files, "read_rows", buggy)
    monkeypatch.setattr("lightning_peft.data.text_classification.read_rows", buggy)
    with pytest.raises(TypeError):
        cli.main(["fit", "--config", str(inputs / "recipe.yaml")])


def test_a_failed_run_leaves_no_configure_model_wrapper_behind(tmp_path):
    class BuiltInConfigureModel(TokenModule):
        def __init__(self):
            super().__init__(model=None)

        def configure_model(self):
            if self.model is None:
                torch.manual_seed(0)
                self.model = tiny_bert()

    module = BuiltInConfigureModel()
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.ckpt cannot be read"):
        make_trainer([LoRA(r=4, target_modules=["query"])]).fit(module, token_loader(),
                                                                ckpt_path=tmp_path / "empty.ckpt")
    assert "configure_model" not in module.__dict__  # the restore would have put the wrapper back before
    assert not any(".adapters." in name for name, _ in module.named_parameters())


def test_a_run_failing_after_the_model_was_cast_keeps_its_changes_and_says_so():
    class NoOptimizer(TokenModule):
        def configure_optimizers(self):
            raise ValueError("no optimizer today")

    module = NoOptimizer(tiny_bert())
    with pytest.warns(UserWarning, match="prepared for training"), pytest.raises(ValueError, match="no optimizer"):
        make_trainer([LoRA(r=4, target_modules=["query"])], precision="bf16-true").fit(module, token_loader())
    assert any(".adapters." in name for name, _ in module.named_parameters())  # not half-restored


def test_jsonl_texts_may_hold_unicode_line_separators_and_csv_a_byte_order_mark(tmp_path):
    from lightning_peft.data.files import read_rows

    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "one\u2028two", "label": 1}, ensure_ascii=False) + "\n")
    assert read_rows(tmp_path / "rows.jsonl", ["text", "label"]) == [{"text": "one\u2028two", "label": 1}]
    (tmp_path / "rows.csv").write_bytes("\ufefftext,label\ngood,1\n".encode())
    assert read_rows(tmp_path / "rows.csv", ["text", "label"]) == [{"text": "good", "label": "1"}]


def test_a_column_named_twice_and_a_label_that_is_a_json_list_are_refused_at_their_line(tmp_path):
    from lightning_peft.data.files import read_rows

    (tmp_path / "blank_names.csv").write_text("text,label,,\ngood,pos,,\n")  # unnamed columns may repeat
    assert read_rows(tmp_path / "blank_names.csv", ["text", "label"])[0]["label"] == "pos"
    (tmp_path / "twice.csv").write_text("text,label,text\ngood,pos,bad\n")
    with pytest.raises(ValueError, match="twice.csv, line 1: the header names column 'text' twice"):
        read_rows(tmp_path / "twice.csv", ["text", "label"])  # was: the last 'text' column read
    (tmp_path / "array.json").write_text('[\n  {"text": "good", "label": 1}\n]\n')
    with pytest.raises(ValueError, match="array.json is one JSON array; .json files are read as JSON Lines"):
        read_rows(tmp_path / "array.json", ["text", "label"])  # was: "line 1: not valid JSON (Expecting value)"
    (tmp_path / "lists.jsonl").write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": [0]}\n')
    with pytest.raises(ValueError, match=r"lists.jsonl, line 2: the 'label' value is a JSON list \(\[0\]\)"):
        read_rows(tmp_path / "lists.jsonl", ["text", "label"])  # was: a class named "[0]"


def test_a_quote_left_open_is_an_error_at_its_line_rather_than_rows_swallowed(tmp_path):
    from lightning_peft.data.files import read_rows

    rows = ["text", "label"], ['"Best film ever', "pos"], ["boring plot", "neg"], ['the twist" was dumb', "neg"]
    (tmp_path / "rows.csv").write_text("".join(",".join(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"rows\.csv, line 2: .* in '\"Best film ever.*'; quote a text that "
                                         "holds a quote mark whole"):
        read_rows(tmp_path / "rows.csv", ["text", "label"])  # was: two rows, a 'pos' review in a 'neg' text
    rows = ["text", "label"], ['"Best film ever', "pos"], ["boring plot", "neg"], ['the critic said: a mess."', "neg"]
    (tmp_path / "closed.csv").write_text("".join(",".join(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"closed\.csv, line 2: a quote opened here runs on to line 4, taking in 1 "
                                         r"line\(s\) that look like rows of their own, such as line 3"):
        read_rows(tmp_path / "closed.csv", ["text", "label"])  # was: one row, its text three reviews
    (tmp_path / "spans.csv").write_text('text,label\n"a review\nover two lines",pos\n')
    assert read_rows(tmp_path / "spans.csv", ["text", "label"]) == [{"text": "a review\nover two lines",
                                                                     "label": "pos"}]
    (tmp_path / "paragraphs.csv").write_text('text,label\n"Great film.\nI liked it, mostly.\nWould watch again.",pos\n'
                                             "dull,neg\n")  # was: refused, its middle line shaped like a row
    assert read_rows(tmp_path / "paragraphs.csv", ["text", "label"])[0]["text"].count("\n") == 2
    for name, text in (("numbers.csv", 'text,label\n"good movie,1\nbad movie,0\nawful plot,0\nok",1\ngreat,1\n'),
                       ("first.csv", 'label,text\npos,"good movie\nneg,bad movie\npos,ok film"\npos,fine\n')):
        (tmp_path / name).write_text(text)  # the swallowed rows' classes are in no row read: one word, or a number
        with pytest.raises(ValueError, match="a quote opened here runs on"):
            read_rows(tmp_path / name, ["text", "label"])


def test_a_csv_with_carriage_return_line_ends_and_a_text_over_three_lines_is_read(tmp_path):
    from lightning_peft.data.files import read_rows

    (tmp_path / "mac.csv").write_bytes(b'text,label\rgood film,pos\r"line one\rline two\rline three",neg\rbad,neg\r')
    rows = read_rows(tmp_path / "mac.csv", ["text", "label"])  # was: an IndexError from the open-quote check
    assert [row["label"] for row in rows] == ["pos", "neg", "neg"]


def test_quote_marks_in_a_tab_separated_file_are_text(tmp_path):
    from lightning_peft.data.files import read_rows

    rows = ["text", "label"], ['"Best film ever', "pos"], ["boring plot", "neg"], ['the critic said: a mess."', "neg"]
    (tmp_path / "rows.tsv").write_text("".join("\t".join(row) + "\n" for row in rows))
    assert [row["text"] for row in read_rows(tmp_path / "rows.tsv", ["text", "label"])] == [
        '"Best film ever', "boring plot", 'the critic said: a mess."']  # was: the three read as one text


def test_a_text_longer_than_csv_s_default_field_limit_is_read(tmp_path):
    from lightning_peft.data.files import read_rows

    (tmp_path / "long.csv").write_text(f"text,label\n{'a' * 200_000},1\n")
    assert read_rows(tmp_path / "long.csv", ["text", "label"])[0]["text"] == "a" * 200_000


def test_predict_lines_from_standard_input_split_at_line_breaks_only(monkeypatch):
    import io

    from lightning_peft.data.files import read_lines

    text = "first\u2028still first\nsecond\x0csame line\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    assert read_lines("-") == ["first\u2028still first", "second\x0csame line"]
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("fine\ncaf\u00e9\n".encode("latin-1"))))
    with pytest.raises(ValueError, match=r"standard input, line 2: not UTF-8 text \(byte 0xe9\)"):
        read_lines("-")  # was: a traceback from the tokenizer, or a UnicodeDecodeError


def test_class_names_come_from_every_training_row_or_else_from_the_task(tmp_path):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from lightning_peft.data import TextClassificationData

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_folder(tmp_path / "model", WORDS))
    rows = [{"text": f"the movie was {w}", "label": "neutral" if i == 7 else ("pos" if i % 2 else "neg")}
            for i, w in enumerate(WORDS * 2)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for seed in range(40):  # a hold-out that takes the one 'neutral' row still knows the class
        data = TextClassificationData(train_file=str(tmp_path / "train.jsonl"), val_fraction=0.2, seed=seed,
                                      tokenizer=tokenizer)
        data.setup("fit")
        assert data.labels == ["neg", "neutral", "pos"]
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": 2001, "label": "good"}) + "\n")  # a number as text
    data = TextClassificationData(test_file=str(tmp_path / "test.jsonl"), tokenizer=tokenizer)
    data.trainer = SimpleNamespace(lightning_module=SimpleNamespace(labels=["bad", "good"]))
    data.setup("test")  # was: "test data has label 'good', but training labels are integers"
    assert data.labels == ["bad", "good"] and next(iter(data.test_dataloader()))["labels"].tolist() == [1]


def test_a_new_head_must_train_its_class_weights_and_a_frozen_layer_before_them_is_a_warning():
    from transformers import (
        DistilBertConfig,
        DistilBertForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    from lightning_peft.tasks.sequence_classification import check_new_head_trains

    def model(method):
        return method.inject(DistilBertForSequenceClassification(DistilBertConfig(
            vocab_size=64, dim=32, hidden_dim=64, n_layers=1, n_heads=4, num_labels=3)))

    head = {"pre_classifier": False, "classifier": True}  # DistilBERT's new head: a projection, then the classes
    with pytest.warns(UserWarning, match="pre_classifier: new, initialized at random, and frozen"):
        check_new_head_trains(model(LoRA(r=4, target_modules=["q_lin"], modules_to_save=["classifier"])), head)
    check_new_head_trains(model(LoRA(r=4, target_modules=["q_lin"], modules_to_save=list(head))), head)  # quiet
    with pytest.raises(ValueError, match="classification head .classifier. is new.*no method trains its weights"):
        check_new_head_trains(model(BitFit()), head)  # its bias alone trains
    with pytest.raises(ValueError, match="classification head .classifier. is new"):
        check_new_head_trains(model(LoRA(r=4, target_modules=["q_lin"])), head)
    roberta = RobertaForSequenceClassification(RobertaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                             num_hidden_layers=1, num_attention_heads=4))
    head = {"classifier.dense": False, "classifier.out_proj": True}  # RoBERTa's: a dense layer, then the classes
    check_new_head_trains(LoRA(r=4, target_modules=["query", "out_proj", "dense"]).inject(copy.deepcopy(roberta)),
                          head)  # LoRA on the head trains it: quiet
    with pytest.warns(UserWarning, match="classifier.dense: new, initialized at random, and frozen"):  # was: quiet
        check_new_head_trains(Selective(modules=["classifier.out_proj"]).inject(copy.deepcopy(roberta)), head)


def test_a_fine_tuned_head_s_classes_are_put_in_the_data_s_order(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tiny_bert_folder(tmp_path / "model", WORDS, id2label={0: "POSITIVE", 1: "NEGATIVE"})
    original = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    batch = AutoTokenizer.from_pretrained(folder)(["the movie was good", "the plot was awful"], return_tensors="pt",
                                                  padding=True)
    module = SequenceClassification(str(folder), labels=["negative", "positive"])
    module.configure_model()
    with torch.no_grad():  # was: the folder's 'POSITIVE' read as class 0, 'negative' in the data's order
        assert torch.allclose(module.eval()(batch["input_ids"], batch["attention_mask"]),
                              original(**batch).logits.flip(-1), atol=1e-6)
    assert module.model.config.id2label == {0: "negative", 1: "positive"}
    with pytest.warns(UserWarning, match="names its classes POSITIVE, NEGATIVE, not the data's"):
        SequenceClassification(str(folder), labels=["bad", "good"]).configure_model()


def test_a_checkpoint_used_on_a_base_of_other_weights_says_so_and_a_moved_copy_does_not(tmp_path):
    import shutil

    from lightning_peft.data import TextClassificationData

    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"the movie was {w},{i % 2}\n"
                                                                  for i, w in enumerate(WORDS)))
    folders = [tiny_bert_folder(tmp_path / "base", WORDS, seed=0), tiny_bert_folder(tmp_path / "other", WORDS, seed=1)]
    shutil.copytree(folders[0], tmp_path / "moved")

    def run(folder: Path, fit: bool = False) -> L.Trainer:
        trainer = make_trainer([LoRA(r=4, target_modules=["query"], modules_to_save=["classifier"])], max_steps=1)
        data = TextClassificationData(train_file=str(tmp_path / "train.csv"), val_fraction=0.5, max_length=16)
        if fit:
            trainer.fit(SequenceClassification(str(folder)), datamodule=data)
        else:
            trainer.validate(SequenceClassification(str(folder)), datamodule=data, ckpt_path=tmp_path / "run.ckpt")
        return trainer

    run(folders[0], fit=True).save_checkpoint(tmp_path / "run.ckpt")
    with pytest.warns(UserWarning, match=r"was trained on the base model in .*base, and this task's base \(.*other\) "
                                         "has other weights"):
        run(folders[1])  # was: evaluated (or resumed) on another base without a word
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*has other weights")
        run(tmp_path / "moved")


def test_the_weights_fingerprint_sees_a_changed_middle_tensor_and_not_another_sharding(tmp_path):
    from lightning_peft.tasks.models import weights_fingerprint

    model = tiny_llama()
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "shards", max_shard_size="40KB")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.5)  # in a large file: between its first and last MiB
    model.save_pretrained(tmp_path / "b")
    assert len(list((tmp_path / "shards").glob("model-*.safetensors"))) > 1
    assert weights_fingerprint(tmp_path / "a") == weights_fingerprint(tmp_path / "shards")  # was: other weights
    assert weights_fingerprint(tmp_path / "a") != weights_fingerprint(tmp_path / "b")
    torch.save({}, tmp_path / "a" / "pytorch_model.bin")  # a pickled copy beside the safetensors counts for nothing,
    model.save_pretrained(tmp_path / "variant")  # and so does a variant (model.fp16.safetensors)
    (tmp_path / "variant" / "model.safetensors").rename(tmp_path / "a" / "model.fp16.safetensors")
    assert weights_fingerprint(tmp_path / "a") == weights_fingerprint(tmp_path / "shards")


def test_a_resume_from_an_epoch_s_end_takes_any_data_and_one_from_inside_an_epoch_only_the_same(tmp_path):
    from lightning_peft.data import TextClassificationData

    folder = tiny_bert_folder(tmp_path / "model", WORDS)
    for name, words in (("train", WORDS[:8]), ("more", WORDS)):  # 8 rows: an epoch of 2 batches of 4; 12 rows: 3
        (tmp_path / f"{name}.csv").write_text("text,label\n" + "".join(f"the movie was {w},{i % 2}\n"
                                                                       for i, w in enumerate(words)))

    def fit(steps: int, data: str = "train", batch_size: int = 4, ckpt_path: Path | None = None,
            limit: int | None = None) -> L.Trainer:
        trainer = make_trainer([LoRA(r=4, target_modules=["query"], modules_to_save=["classifier"])], max_steps=steps,
                               limit_train_batches=limit)
        trainer.fit(SequenceClassification(str(folder)), ckpt_path=ckpt_path, datamodule=TextClassificationData(
            train_file=str(tmp_path / f"{data}.csv"), batch_size=batch_size, val_fraction=0, max_length=16))
        return trainer

    fit(2).save_checkpoint(tmp_path / "end.ckpt")
    fit(1, limit=1).save_checkpoint(tmp_path / "limited_end.ckpt")  # an epoch cut to one batch, ended
    fit(1).save_checkpoint(tmp_path / "inside.ckpt")
    for data, batch_size in (("more", 4), ("train", 2)):  # was: refused, though the saved epoch had ended
        assert fit(4, data, batch_size, tmp_path / "end.ckpt").global_step == 4
        assert fit(3, data, batch_size, tmp_path / "limited_end.ckpt", limit=1).global_step == 3
        with pytest.raises(ValueError, match="the checkpoint was saved inside an epoch of"):
            fit(4, data, batch_size, tmp_path / "inside.ckpt")


def test_a_run_without_an_end_is_refused_before_its_first_step(tmp_path):
    from lightning_peft.data import TextClassificationData
    from lightning_peft.tasks import SequenceClassification

    folder = tiny_bert_folder(tmp_path / "model", WORDS)
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"the movie was {w},{i % 2}\n"
                                                                  for i, w in enumerate(WORDS)))
    module = SequenceClassification(str(folder))
    data = TextClassificationData(train_file=str(tmp_path / "train.csv"), val_fraction=0, max_length=16)
    trainer = make_trainer([LoRA(r=4, target_modules=["query"])], max_steps=-1, max_epochs=-1, max_time="00:00:01:00")
    with pytest.raises(ValueError, match="decays to 0 at the run's last step, so the run needs an end"):
        trainer.fit(module, datamodule=data)  # was: OverflowError at the first step
    assert trainer.global_step == 0


def test_a_loader_made_again_each_epoch_shuffles_each_epoch_as_one_loader_does(tmp_path):
    import lightning as L

    from lightning_peft.data import TextClassificationData
    from lightning_peft.tasks import SequenceClassification

    class Orders(L.Callback):
        def __init__(self):
            self.rows = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.rows.setdefault(trainer.current_epoch, []).extend(batch["input_ids"][:, 1].tolist())

    folder = tiny_bert_folder(tmp_path / "model", WORDS)
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"{w},{i % 2}\n" for i, w in enumerate(WORDS)))
    orders = {}
    for reload in (0, 1):
        orders[reload] = Orders()
        data = TextClassificationData(train_file=str(tmp_path / "train.csv"), batch_size=4, val_fraction=0,
                                      max_length=16)
        make_trainer([LoRA(r=2, target_modules=["query"]), orders[reload]], max_steps=-1, max_epochs=3,
                     reload_dataloaders_every_n_epochs=reload).fit(SequenceClassification(str(folder)), data)
    assert orders[1].rows == orders[0].rows  # was: epoch 0's order again at every reload
    assert len({tuple(rows) for rows in orders[0].rows.values()}) == 3


def test_predict_refuses_several_processes_rather_than_printing_out_of_order():
    from types import SimpleNamespace

    from lightning_peft.lightning.predictions import PredictionWriter

    with pytest.raises(ValueError, match="--trainer.devices=1"):
        PredictionWriter().on_predict_start(SimpleNamespace(world_size=2), None)


def test_a_failed_setup_undoes_quantization_too():
    from lightning_peft.core.weights import is_quantized

    module = TokenModule(tiny_bert())
    before = {name: (type(m), id(m)) for name, m in module.named_modules()}
    with pytest.raises(ValueError, match="matched no module"):
        make_trainer([QuantizeBase("int8"), LoRA(target_modules=["nope"])]).fit(module, token_loader())
    assert {name: (type(m), id(m)) for name, m in module.named_modules()} == before
    assert not any(is_quantized(m) for m in module.modules())


def test_blank_predict_lines_are_skipped_with_a_warning_naming_them(tmp_path):
    from lightning_peft.data.files import read_lines

    (tmp_path / "in.txt").write_text("good film\n\nbad film\n   \nfine\n\n")
    with pytest.warns(UserWarning, match=r"2 blank line\(s\) skipped \(line 2, 4\)"):
        assert read_lines(tmp_path / "in.txt") == ["good film", "bad film", "fine"]
    (tmp_path / "plain.txt").write_text("good film\nbad film\n\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_lines(tmp_path / "plain.txt") == ["good film", "bad film"]  # trailing blank lines: no warning


def test_a_predict_table_gives_its_text_column_and_is_refused_where_lines_are_read(tmp_path):
    from lightning_peft.data.files import read_lines

    (tmp_path / "in.csv").write_text('text,label\n"good, really",1\nbad film,0\n')
    (tmp_path / "in.jsonl").write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n')
    assert read_lines(tmp_path / "in.csv", "text") == ["good, really", "bad film"]  # was: the header line a text
    assert read_lines(tmp_path / "in.jsonl", "text") == ["good", "bad"]  # was: each JSON object a text
    with pytest.raises(ValueError, match=r"in.csv: here each line is one input \(NAME<TAB>text\)"):
        read_lines(tmp_path / "in.csv")
    (tmp_path / "routed.tsv").write_text("upbeat\tgreat day\ngloomy\tawful plot\n")
    assert read_lines(tmp_path / "routed.tsv") == ["upbeat\tgreat day", "gloomy\tawful plot"]  # NAME<TAB>text lines


def test_an_export_keeps_other_files_writes_through_links_and_replaces_only_its_own(tmp_path, monkeypatch):
    from lightning_peft import IA3, LoRA
    from lightning_peft.export import export_adapters

    two = TokenModule(tiny_llama())
    LoRA(r=2, target_modules=["q_proj"], adapter_name="a").inject(two)
    IA3(target_modules=["v_proj"], feedforward_modules=[], adapter_name="b").inject(two)
    one = LoRA(r=2, target_modules=["q_proj"]).inject(TokenModule(tiny_llama()))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / ".git").mkdir()
    (scratch / "README.md").write_text("mine")
    (tmp_path / "link").symlink_to(scratch)  # an output folder on another disk, as clusters link them
    export_adapters(two, tmp_path / "link")
    assert sorted(p.name for p in scratch.iterdir()) == [".git", ".lightning-peft-files", "IA3-b", "LoRA-a",
                                                         "README.md"]
    export_adapters(one, tmp_path / "link")  # was: the user's files deleted, the link replaced by a folder
    assert (tmp_path / "link").is_symlink()
    assert sorted(p.name for p in scratch.iterdir()) == [".git", ".lightning-peft-files", "README.md",
                                                         "adapter_config.json", "adapter_model.safetensors"]
    monkeypatch.chdir(scratch)
    export_adapters(one, ".")  # was: OSError, a folder cannot be renamed while it is the current one
    assert (scratch / "README.md").read_text() == "mine"


class FirstBatch(L.Callback):
    """Keeps the token ids of the first training batch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.ids = getattr(self, "ids", batch["input_ids"].tolist())


def test_data_reused_for_a_model_with_another_tokenizer_is_tokenized_with_that_one(tmp_path):
    from lightning_peft.data import TextClassificationData

    words = ["good", "bad", "the", "movie", "was"]
    rows = "".join(f"the movie was {word},{word}\n" for word in ["good", "bad"] * 4)
    (tmp_path / "rows.csv").write_text("text,label\n" + rows)
    data = TextClassificationData(train_file=str(tmp_path / "rows.csv"), batch_size=4, val_fraction=0, max_length=16)
    for name, vocabulary in (("a", words), ("b", list(reversed(words)))):  # the same words under other ids
        task = SequenceClassification(str(tiny_bert_folder(tmp_path / name, vocabulary)), warmup_steps=0)
        first = FirstBatch()
        make_trainer([first], max_steps=1).fit(task, datamodule=data)
        texts = {task.tokenizer.decode(ids, skip_special_tokens=True) for ids in first.ids}
        assert texts <= {"the movie was good", "the movie was bad"}, texts  # was: b's rows were a's ids


def test_label_names_and_column_names_lose_the_spaces_around_them(tmp_path):
    from lightning_peft.data import TextClassificationData

    (tmp_path / "rows.csv").write_text("text, label\nthe plot was great, pos\nthe plot was dull,neg\ngood film,pos\n")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_folder(tmp_path / "model", WORDS))
    data = TextClassificationData(train_file=str(tmp_path / "rows.csv"), val_fraction=0, tokenizer=tokenizer)
    data.setup("fit")  # was: no column 'label', and with it ' pos' and 'pos' as two classes
    assert data.labels == ["neg", "pos"]


def test_a_decoder_classifier_whose_tokenizer_has_no_pad_token_trains_and_reads_each_row_s_last_token(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    from lightning_peft.data import TextClassificationData

    vocabulary = {word: i for i, word in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(tmp_path / "model")  # no pad token
    LlamaForSequenceClassification(LlamaConfig(vocab_size=len(vocabulary), hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                               eos_token_id=2, bos_token_id=1, pad_token_id=0),  # <unk>
                                   ).save_pretrained(tmp_path / "model")
    rows = "".join(f"the {'very ' * (i % 3)}movie was {word},{word}\n" for i, word in enumerate(["good", "bad"] * 4))
    (tmp_path / "rows.csv").write_text("text,label\n" + rows)
    task = SequenceClassification(str(tmp_path / "model"), warmup_steps=0)
    data = TextClassificationData(train_file=str(tmp_path / "rows.csv"), batch_size=4, val_fraction=0)
    make_trainer([LoRA(r=2, target_modules=["q_proj"])], max_steps=2).fit(task, datamodule=data)  # was: no pad token
    batch = task.tokenizer(["the movie was good", "the very very movie was bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        together = task(batch["input_ids"], batch["attention_mask"])
        alone = task(task.tokenizer(["the movie was good"], return_tensors="pt")["input_ids"])
    torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=0)  # the padded row reads its own last token


def test_a_generated_text_is_one_line_that_reads_back_as_it_was():
    from lightning_peft.lightning.predictions import prediction_line

    text = "a path C:\\new\nthen a line\r\nand one more\u2028or\x85so, café"
    line = prediction_line(text)
    assert len(line.splitlines()) == 1  # was: C:\new read back as a break, \r, U+2028 and U+0085 left as breaks
    assert line == "a path C:\\\\new\\nthen a line\\r\\nand one more\\u2028or\\x85so, café"


def test_rows_longer_than_the_models_learned_positions_are_refused_before_training(tmp_path):
    from lightning_peft.data import TextClassificationData

    folder = tiny_bert_folder(tmp_path / "model", WORDS)  # 32 learned positions
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"the movie was {w},{i % 2}\n"
                                                                  for i, w in enumerate(WORDS)))
    task = SequenceClassification(str(folder))
    data = TextClassificationData(train_file=str(tmp_path / "train.csv"), val_fraction=0)  # max_length 128
    steps = []
    task.on_train_batch_start = lambda batch, batch_idx: steps.append(batch_idx)
    with pytest.raises(ValueError, match="the data's max_length is 128 tokens, but BertForSequenceClassification has "
                                         "32 learned positions: give max_length at most 32"):
        make_trainer([LoRA(r=2, target_modules=["query"])], max_steps=2).fit(task, datamodule=data)
    assert not steps  # was: a size mismatch at the first row over 32 tokens, maybe deep into training


def test_an_adapter_name_that_cannot_key_a_module_dict_is_refused_in_one_line():
    for name in ("keys", "a.b", "", "training"):  # was (keys): "attribute 'keys' already exists" at injection
        model = tiny_bert()
        with pytest.raises(ValueError, match=f"LoRA\\[{re.escape(name)}\\]: the adapter name '{re.escape(name)}' "
                                             "cannot name a module"):
            LoRA(target_modules=["query"], adapter_name=name).inject(model)
        assert not adapter_names(model)  # nothing changed
    Selective(modules=["query"], adapter_name="keys").inject(tiny_bert())  # no module dict: any name


def _failing_at_call(function, n: int):
    """``function``, raising a RuntimeError at its ``n``-th call (out of memory half-way, say)."""
    calls = []

    def failing(*args, **kwargs):
        calls.append(None)
        if len(calls) == n:
            raise RuntimeError("failed half-way")
        return function(*args, **kwargs)

    return failing


@pytest.mark.parametrize("operation", ["delete_adapter", "combine_adapters", "dequantize_base"])
def test_an_operation_failing_half_way_changes_nothing(operation, monkeypatch):
    import lightning_peft.core.adapter_control as adapter_control
    import lightning_peft.lora.combine as combine
    import lightning_peft.quantization.layers as quantized_layers

    torch.manual_seed(0)
    module = tiny_bert().eval()
    if operation == "dequantize_base":
        QuantizeBase("int8").inject(module)
    if operation in ("delete_adapter", "combine_adapters"):
        for name in ("a", "b"):
            perturbed(LoRA(r=4, target_modules=["query", "value"], modules_to_save=["classifier"],
                           adapter_name=name).inject(module))
    failing, run = {  # what fails, at which call, and the operation (each was: left half done)
        "delete_adapter": ((adapter_control, "freeze_unclaimed", 1), lambda: delete_adapter(module, "a")),
        "combine_adapters": ((combine, "_combine_heads", 1), lambda: combine_adapters(module, {"a": 1.0}, "c")),
        "dequantize_base": ((quantized_layers, "dequantized_weight", 3),
                            lambda: quantized_layers.dequantize_base(module)),
    }[operation]
    owner, name, n = failing
    types, params = module_record(module)
    ids = torch.randint(0, 32, (2, 6))
    with torch.no_grad():
        before = module(input_ids=ids).logits
    monkeypatch.setattr(owner, name, _failing_at_call(getattr(owner, name), n))
    with pytest.raises(RuntimeError, match="failed half-way"):
        run()
    after_types, after_params = module_record(module)
    assert after_types == types and after_params.keys() == params.keys()
    assert all(torch.equal(after_params[k][0], v) and after_params[k][1] == g for k, (v, g) in params.items())
    with torch.no_grad():
        torch.testing.assert_close(module(input_ids=ids).logits, before, rtol=0, atol=0)
    monkeypatch.undo()
    if operation == "delete_adapter":  # its warning that another adapter is active now, made an error
        set_adapter(module, "a")
        with warnings.catch_warnings(), pytest.raises(UserWarning, match="'a' was active and is deleted"):
            warnings.simplefilter("error")
            run()  # was: 'a' deleted, 'b' active, and a retry "no adapter named 'a'"
        assert module_record(module)[0] == types
    run()  # and a second try goes through


def test_quantize_base_failing_half_way_leaves_no_claim_of_a_quantized_base_and_a_retry_finishes(monkeypatch):
    import lightning_peft.quantization.callback as quantizing
    from lightning_peft.core.weights import is_quantized

    module = tiny_llama()
    quantize = QuantizeBase("int8")
    monkeypatch.setattr(quantizing, "quantize_linear", _failing_at_call(quantizing.quantize_linear, 3))
    with pytest.raises(RuntimeError, match="failed half-way"):  # layer by layer: memory stays at one layer more
        quantize.inject(module)
    assert getattr(module.config, "quantization_config", None) is None and quantize.base_bytes is None
    monkeypatch.undo()
    quantize.inject(module)
    assert module.config.quantization_config is not None
    assert not [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear) and not is_quantized(m)
                and n != "lm_head"]

