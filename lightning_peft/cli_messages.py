"""One line for a configuration mistake: jsonargparse's 15-line reports cut to the cause, with a "did you mean".

jsonargparse explains a bad key or class by listing every type it tried; the user needs the
one key that is wrong, what was meant, and what exists.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib
import inspect
import re
from collections.abc import Iterable
from typing import Any, NoReturn

_GENERIC = re.compile(r"^(Does not validate|Subtypes:|Errors:|Given value|Not a valid subclass|Subclass types|- a |"
                      r"- Expected a <class 'NoneType'>|Expected a <class 'NoneType'>|tip:|usage:)")
KEY_CLASSES = {  # where a bad init_args key has no class_path in the message: the classes that key takes
    "model": ("lightning_peft.tasks.SequenceClassification", "lightning_peft.tasks.CausalLM"),
    "data": ("lightning_peft.data.TextClassificationData", "lightning_peft.data.CausalLMData",
             "lightning_peft.data.MultiTaskData"),
}


class ConfigError(Exception):
    """A mistake in the command line or the recipe, already said in one line."""


class CommandParser(argparse.ArgumentParser):
    """argparse for the plain subcommands (export, compare, estimate), with the same one-line errors; an option
    is spelt out whole (``--method`` is not taken for ``--methods``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{"allow_abbrev": False, **kwargs})

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def one_line(message: str, option_names: Iterable[str] = ()) -> str:
    """The cause of a jsonargparse error ``message`` in one line; ``option_names`` are the keys that exist."""
    for rule in (_unknown_command, _unknown_class, _wrong_value, _not_accepted):  # a bad value of a key that exists
        line = rule(message)
        if line:
            return line
    return _unknown_option(message, list(option_names)) or _specific_lines(message)


OWN_COMMANDS = ("export", "compare", "estimate")  # the commands main() runs itself, beside LightningCLI's


def did_you_mean(word: str, names: Iterable[str]) -> str:
    """``; did you mean 'x'?`` for the closest of ``names``, or nothing."""
    close = difflib.get_close_matches(word, list(names), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _unknown_command(message: str) -> str | None:
    match = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if not match:
        return None
    commands = [*re.findall(r"'([^']+)'", match[2]), *OWN_COMMANDS]
    return f"unknown command '{match[1]}'{did_you_mean(match[1], commands)} (commands: {', '.join(commands)})"


def _unknown_option(message: str, names: list[str]) -> str | None:
    match = (re.search(r"does not accept option '([^']+)'", message)
             or re.search(r"nrecognized arguments: --?([^\s=]+)", message))
    if not match:
        return None
    key = match[1]
    siblings = [name for name in names if name.rpartition(".")[0] == key.rpartition(".")[0]]
    hint = did_you_mean(key, siblings) or did_you_mean(key, names)
    listing = f" (options there: {', '.join(n.rpartition('.')[2] for n in siblings)})" if siblings and not hint else ""
    return f"unknown option '{key}'{hint}{listing}"


def _unknown_class(message: str) -> str | None:
    match = re.search(r"class_path '([\w.]+)':\s*\n\s*(?:module '[\w.]+' has no attribute|No module named)", message)
    if not match:
        return None
    path = match[1]
    module_name, _, name = path.rpartition(".")
    classes = _public_classes(module_name)
    if not classes:
        return f"unknown class '{path}': there is no module '{module_name}'"
    close = difflib.get_close_matches(name, classes, n=1, cutoff=0.6)
    if close:
        return f"unknown class '{path}'; did you mean '{module_name}.{close[0]}'?"
    return f"unknown class '{path}'; {module_name} has: {', '.join(classes)}"


def _public_classes(module_name: str) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except Exception:  # noqa: BLE001 (any failure means: nothing to suggest)
        return []
    return sorted(name for name, value in vars(module).items() if inspect.isclass(value) and not name.startswith("_"))


def _not_accepted(message: str) -> str | None:
    match = re.search(r"Option '([^']+)' is not accepted", message)
    if not match:
        return None
    option = match[1]
    for path in _candidate_classes(message, option):
        accepted = _init_arguments(path)
        if accepted and option not in accepted:  # a class that takes the option is not the one it was given to
            name, hint = path.rpartition(".")[2], did_you_mean(option, accepted)
            return f"{name} does not take '{option}'{hint} ({name} takes: {', '.join(accepted)})"
    if 'Parser key "trainer.callbacks"' in message:
        return (f"unknown setting '{option}' for the recipe's last callback: a --trainer.callbacks.init_args flag "
                "goes to the last entry of trainer.callbacks (edit the recipe to set another)")
    return f"unknown setting '{option}'"


def _candidate_classes(message: str, option: str) -> list[str]:
    """The classes whose arguments a bad ``option`` was given to: from the value shown, else by the key."""
    given = re.search(r"Given value: (.*)$", message, re.MULTILINE)
    found = []
    if given:
        try:
            value = ast.literal_eval(given[1])
        except (ValueError, SyntaxError):
            value = None
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict) and option in (item.get("init_args") or {}) and item.get("class_path"):
                found.append(item["class_path"])  # an overlay's entry may give init_args alone
    key = re.search(r'Parser key "([^"]+)"', message)
    return found + list(KEY_CLASSES.get(key[1] if key else "", ()))


SHORT_NAME_HOMES = ("lightning_peft", "lightning_peft.tasks", "lightning_peft.data", "lightning.pytorch.callbacks")


def full_class_path(path: str) -> str:
    """``path`` with its module: a bare class name (``LoRA``), which jsonargparse finds among the classes imported,
    is looked up in lightning_peft and Lightning's callbacks (``lightning_peft.LoRA``); else ``path`` as it is."""
    if "." in path:
        return path
    return next((f"{home}.{path}" for home in SHORT_NAME_HOMES
                 if isinstance(getattr(importlib.import_module(home), path, None), type)), path)


def class_named(path: str) -> type | None:
    """The class a ``class_path`` (``lightning_peft.LoRA``, or ``LoRA``) names, or None where it cannot be
    imported."""
    module_name, _, name = full_class_path(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except Exception:  # noqa: BLE001 (a module that fails to import names no class either)
        return None


def _init_arguments(path: str) -> list[str]:
    cls = class_named(path)
    if cls is None:
        return []
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]


def _wrong_value(message: str) -> str | None:
    """``data.batch_size: expected int, got 'x'`` from jsonargparse's nested ``Parser key`` reports."""
    match = re.search(r"Expected a <class '(\w+)'>\. Got value: (.*)$", message, re.MULTILINE)
    if not match:
        return None
    key = ".".join(re.findall(r'Parser key "([^"]+)"', message))
    return f"{key}: expected {match[1]}, got {match[2].strip()!r}"


def _specific_lines(message: str) -> str:
    """The message's own lines without jsonargparse's listing of the types it tried, joined into one."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    kept = [line.lstrip("- ") for line in lines if not _GENERIC.match(line)]
    text = " ".join(kept) or lines[0]
    return re.sub(r'Parser key "([^"]+)":\s*', r"\1: ", text)
