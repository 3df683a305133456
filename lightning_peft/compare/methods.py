"""Which callbacks and learning rate each compared method trains with, derived from the user's recipe.

The recipe's own method keeps the recipe's settings and rate. Another method's come from the
built-in recipe of that method for the same task when there is one (``ia3_sentiment`` beside
``lora_sentiment``), else from the defaults below (the settings and rates of this project's
recipes); ``--set METHOD.KEY=VALUE`` overrides any of them.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_peft.builtin_recipes import RECIPES
from lightning_peft.cli_messages import class_named, full_class_path
from lightning_peft.core.targeting import HEAD_NAMES
from lightning_peft.lightning.callback import ModelSetupCallback, PEFTCallback
from lightning_peft.selective import BitFit, Selective

RECIPE_PREFIX = {"lora": "lora", "ia3": "ia3", "adapter": "adapter", "prompt_tuning": "prompt_tuning",
                 "prefix_tuning": "prefix_tuning", "bitfit": "bitfit", "full": "full_finetune",
                 "head_only": "head_only", "qlora": "qlora"}  # method -> the built-in recipes' name prefix


def _entry(class_path: str, **init_args: Any) -> dict:
    return {"class_path": class_path, "init_args": init_args}


DEFAULTS: dict[str, tuple[list[dict], float]] = {  # method -> (callbacks, learning rate) without a built-in recipe
    "lora": ([_entry("lightning_peft.LoRA", r=8, alpha=16, dropout=0.05, target_modules="all-linear")], 1e-3),
    "dora": ([_entry("lightning_peft.LoRA", r=8, alpha=16, dropout=0.05, target_modules="all-linear",
                     use_dora=True)], 1e-3),  # the LoRA defaults with use_dora: a like-for-like comparison
    "ia3": ([_entry("lightning_peft.IA3")], 1e-2),
    "adapter": ([_entry("lightning_peft.Adapter", bottleneck_dim=64)], 1e-3),
    "prompt_tuning": ([_entry("lightning_peft.PromptTuning", num_virtual_tokens=20)], 3e-2),
    "prefix_tuning": ([_entry("lightning_peft.PrefixTuning", num_virtual_tokens=20)], 5e-4),
    "bitfit": ([_entry("lightning_peft.BitFit")], 5e-3),
    "head_only": ([_entry("lightning_peft.Selective")], 1e-3),
    "full": ([], 5e-5),
    "qlora": ([_entry("lightning_peft.QuantizeBase", mode="nf4", double_quant=True),
               _entry("lightning_peft.LoRA", r=8, alpha=16, dropout=0.05, target_modules="all-linear")], 1e-3),
}
METHOD_NAMES = list(DEFAULTS)
TRAINING_KEYS = ("learning_rate", "gradient_clip_val")  # --set keys that are not the callback's


class CompareError(ValueError):
    """A mistake in what compare was asked: one line for the user."""


@dataclass
class MethodPlan:
    """What one compared method trains with: its callbacks (recipe entries), learning rate and clipping."""

    method: str
    callbacks: list[dict]
    learning_rate: float
    gradient_clip_val: float | None
    source: str  # where the settings came from: a built-in recipe's name, or "defaults"
    overrides: dict[str, Any] = field(default_factory=dict)


def normalized_callbacks(recipe: Any) -> Any:
    """``recipe`` with its trainer callbacks as a list of ``{"class_path": ...}`` entries, each class path in full
    (``LoRA`` -> ``lightning_peft.LoRA``, a bare string an entry of its own), as jsonargparse reads them."""
    trainer = recipe.get("trainer") if isinstance(recipe, dict) else None
    if isinstance(trainer, dict) and trainer.get("callbacks"):
        given = trainer["callbacks"]
        trainer["callbacks"] = [_full_entry(entry) for entry in (given if isinstance(given, list) else [given])]
    return recipe


def _full_entry(entry: Any) -> Any:
    """One callback entry as a mapping with a full class path (anything else as it is, for jsonargparse to judge)."""
    entry = {"class_path": entry} if isinstance(entry, str) else entry
    if isinstance(entry, dict) and isinstance(entry.get("class_path"), str):
        return {**entry, "class_path": full_class_path(entry["class_path"])}
    return entry


def callback_class(entry: dict | str) -> type | None:
    """The class a recipe's callback entry names, or None when it cannot be imported."""
    return class_named(entry if isinstance(entry, str) else entry.get("class_path", ""))


def names_a(entry: dict | str, base: type) -> bool:
    """Whether a recipe's callback entry names a subclass of ``base``."""
    cls = callback_class(entry)
    return isinstance(cls, type) and issubclass(cls, base)


def is_method_slot(entry: dict | str) -> bool:
    """Whether a callback entry sets up the model (a PEFT method, a quantized base): what compare replaces."""
    return names_a(entry, ModelSetupCallback)


def method_slot(recipe: dict, name: str) -> list[dict]:
    """The recipe's PEFT method entries, or a CompareError: compare needs a slot to put each method in."""
    callbacks = (recipe.get("trainer") or {}).get("callbacks") or []
    slot = [entry for entry in (callbacks if isinstance(callbacks, list) else [callbacks]) if is_method_slot(entry)]
    if not slot:
        raise CompareError(f"recipe {name} has no PEFT method in trainer.callbacks (a class_path such as "
                           "lightning_peft.LoRA): compare puts each method in that slot")
    return slot


def own_method(slot: list[dict]) -> str | None:
    """The compared method that the recipe's slot holds (``lora`` for LoRA callbacks, one per adapter or task), if
    it is one of them."""
    if len(slot) == 1 and _selected_head(slot[0]):
        return "head_only"
    classes = {str(callback_class(e)) for e in slot}
    dora = any(isinstance(e, dict) and (e.get("init_args") or {}).get("use_dora") for e in slot)
    for method, (callbacks, _) in DEFAULTS.items():
        if method != "head_only" and (method == "dora") == dora and classes == {
                str(callback_class(e)) for e in callbacks}:  # a recipe's Selective may select more than a head
            return method
    return None


def task_names(recipe: dict) -> list[str]:
    """The tasks of a multi-task recipe (``MultiTaskData``), each trained by an adapter of its name; else none."""
    tasks = ((recipe.get("data") or {}).get("init_args") or {}).get("tasks")
    return list(tasks) if isinstance(tasks, dict) and len(tasks) > 1 else []


def _one_per_task(callbacks: list[dict], slot: list[dict], tasks: list[str]) -> list[dict]:
    """A method's entries, one per task of a multi-task recipe (named as the task, with the ``modules_to_save`` of
    the recipe's entry of that name); as they are for one task."""
    if not tasks:
        return callbacks
    saved = {(e.get("init_args") or {}).get("adapter_name"): _modules_to_save([e]) for e in slot if isinstance(e, dict)}
    out = []
    for entry in callbacks:
        if not names_a(entry, PEFTCallback):
            out.append(entry)  # a quantized base: one for the model
            continue
        for task in tasks:
            own = _with_args(entry, adapter_name=task)
            if "modules_to_save" in _arguments(entry):
                own = _with_head(_with_args(own, modules_to_save=None), saved.get(task, _modules_to_save(slot)))
            out.append(own)
    return out


def _check_per_task(method: str, callbacks: list[dict], tasks: list[str]) -> None:
    """Refuse, when planning, a method that cannot give each task of a multi-task recipe an adapter of its own."""
    shared = [e for e in callbacks if names_a(e, Selective)]
    if tasks and (shared or not any(names_a(e, PEFTCallback) for e in callbacks)):
        raise CompareError(f"{method} cannot give each task of this multi-task recipe ({', '.join(tasks)}) an "
                           "adapter of its own: it trains the model's own parameters, which every task shares; "
                           "leave it out of --methods here")


def sibling_recipe(recipe_name: str, method: str) -> tuple[str, dict] | None:
    """The built-in recipe of ``method`` for the same task as the built-in ``recipe_name``, if there is one."""
    stem = Path(recipe_name).name.removesuffix(".yaml")
    if not (RECIPES / f"{stem}.yaml").is_file() or method not in RECIPE_PREFIX:
        return None
    task = next((stem.removeprefix(prefix + "_") for prefix in sorted(RECIPE_PREFIX.values(), key=len, reverse=True)
                 if stem.startswith(prefix + "_")), None)
    path = RECIPES / f"{RECIPE_PREFIX[method]}_{task}.yaml"
    return (path.stem, yaml.safe_load(path.read_text())) if task and path.is_file() else None


def plan_method(recipe: dict, recipe_name: str, method: str, overrides: dict[str, Any]) -> MethodPlan:
    """The callbacks, learning rate and clipping that ``method`` trains with on this recipe's task."""
    if method not in DEFAULTS:
        raise CompareError(f"unknown method {method!r}; methods: {', '.join(METHOD_NAMES)}")
    slot = method_slot(recipe, recipe_name)
    found = sibling_recipe(recipe_name, "lora" if method == "dora" else method)
    if method == own_method(slot):
        plan = MethodPlan(method, copy.deepcopy(slot), recipe_rate(recipe), (recipe.get("trainer") or {}).get(
            "gradient_clip_val"), Path(recipe_name).name.removesuffix(".yaml"))
    elif method == "dora" and own_method(slot) == "lora":  # DoRA beside the recipe's own LoRA: its settings
        callbacks = [_with_args(e, use_dora=True) for e in slot]
        plan = MethodPlan(method, callbacks, recipe_rate(recipe), (recipe.get("trainer") or {}).get(
            "gradient_clip_val"), Path(recipe_name).name.removesuffix(".yaml"))
    elif found is not None:
        source, sibling = found
        trainer = sibling.get("trainer") or {}
        callbacks = [e for e in trainer.get("callbacks") or [] if is_method_slot(e)]
        if method == "dora":
            callbacks = [_with_args(e, use_dora=True) for e in callbacks]
        plan = MethodPlan(method, _one_per_task(callbacks, slot, task_names(recipe)),
                          float(sibling["model"]["init_args"]["learning_rate"]), trainer.get("gradient_clip_val"),
                          source)
    else:
        callbacks, rate = DEFAULTS[method]
        saved = _modules_to_save(slot)
        callbacks = _one_per_task([_with_head(e, saved) for e in copy.deepcopy(callbacks)], slot, task_names(recipe))
        plan = MethodPlan(method, callbacks, rate, (recipe.get("trainer") or {}).get("gradient_clip_val"),
                          "defaults")
    return _checked(_overridden(plan, overrides), task_names(recipe))


def _checked(plan: MethodPlan, tasks: list[str]) -> MethodPlan:
    """Refuse now what would fail in each run: head_only with no head named, a shared method for several tasks."""
    _check_per_task(plan.method, plan.callbacks, tasks)
    selective = [e for e in plan.callbacks if e.get("class_path") == "lightning_peft.Selective"]
    if plan.method == "head_only" and not any(
            (e.get("init_args") or {}).get(key) for e in selective for key in ("modules", "layers", "param_types")):
        raise CompareError("head_only trains the recipe's new head, its modules_to_save, and this recipe has none: "
                           "name the head with --set head_only.modules=[lm_head] (the module names of your model)")
    return plan


def recipe_rate(recipe: dict) -> float:
    """The learning rate that `fit` trains the recipe with: its own, else its task's default."""
    model = recipe.get("model") or {}
    rate = (model.get("init_args") or {}).get("learning_rate")
    if rate is None:
        task = callback_class(model.get("class_path", ""))
        default = inspect.signature(task).parameters.get("learning_rate") if task is not None else None
        if default is None or default.default is inspect.Parameter.empty:
            raise CompareError(f"the recipe's model ({model.get('class_path')}) sets no learning_rate, and has no "
                               "default one: set model.init_args.learning_rate")
        rate = default.default
    return float(rate)


def _with_args(entry: dict, **init_args: Any) -> dict:
    entry = copy.deepcopy(entry)
    entry.setdefault("init_args", {}).update(init_args)
    return entry


def _modules_to_save(slot: list[dict]) -> list[str] | None:
    """The recipe's trained-in-full modules (a new head, or what a head-only Selective selects): every compared
    method trains them too."""
    return next((_init_args(e).get("modules_to_save") or _selected_head(e) for e in slot
                 if _init_args(e).get("modules_to_save") or _selected_head(e)), None)


def _init_args(entry: dict | str) -> dict:
    """A recipe callback entry's init_args ({} for a bare class path)."""
    return (entry.get("init_args") or {}) if isinstance(entry, dict) else {}


def _selected_head(entry: dict | str) -> list[str] | None:
    """The modules a Selective entry trains when it selects a model's head only (``classifier``, ``score``,
    ``lm_head``...: a head-only recipe), else None."""
    arguments = _init_args(entry)
    if not names_a(entry, Selective) or names_a(entry, BitFit) or arguments.get("layers") is not None or arguments.get(
            "param_types"):
        return None
    modules = arguments.get("modules")
    modules = [modules] if isinstance(modules, str) else modules
    heads = isinstance(modules, list) and modules and all(
        isinstance(name, str) and name.rsplit(".", 1)[-1] in HEAD_NAMES for name in modules)
    return modules if heads else None


def _with_head(entry: dict, modules: list[str] | None) -> dict:
    """A method's default entry, training the recipe's head too (Selective: the head is what it selects)."""
    cls = callback_class(entry)
    if modules is None or cls is None or "modules_to_save" not in inspect.signature(cls).parameters:
        return entry
    key = "modules" if entry["class_path"] == "lightning_peft.Selective" else "modules_to_save"
    return _with_args(entry, **{key: modules})


def _overridden(plan: MethodPlan, overrides: dict[str, Any]) -> MethodPlan:
    """``plan`` with ``--set`` values: a training key, or an argument of one of its callbacks."""
    for key, value in overrides.items():
        if key == "learning_rate":
            plan.learning_rate = _positive_rate(value, f"--set {plan.method}.learning_rate={value}")
        elif key == "gradient_clip_val":
            plan.gradient_clip_val = value
        else:
            entry = next((e for e in reversed(plan.callbacks) if key in _arguments(e)), None)
            if entry is None:
                known = sorted({*TRAINING_KEYS, *(k for e in plan.callbacks for k in _arguments(e))})
                raise CompareError(f"--set {plan.method}.{key}: {plan.method} has no setting {key!r}; "
                                   f"its settings: {', '.join(known)}")
            for same in (e for e in plan.callbacks if e.get("class_path") == entry.get("class_path")):
                same.setdefault("init_args", {})[key] = value  # each task's adapter alike
        plan.overrides[key] = value
    return plan


def _positive_rate(value: Any, where: str) -> float:
    try:
        rate = float(value)
    except (TypeError, ValueError):
        rate = math.nan
    if not (math.isfinite(rate) and rate > 0):
        raise CompareError(f"{where}: a learning rate is a positive number, e.g. 1e-3")
    return rate


def _arguments(entry: dict) -> list[str]:
    cls = callback_class(entry)
    return [] if cls is None else [p for p in inspect.signature(cls).parameters if p != "self"]


def parse_overrides(pairs: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """``["lora.r=16", ...]`` as {method: {key: value}}, values read as YAML; each names a compared method."""
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        method, dot, key = name.partition(".")
        if not sep or not dot or not key:
            raise CompareError(f"--set {pair}: write METHOD.KEY=VALUE, e.g. lora.r=16")
        if method not in methods:
            compared = ", ".join(methods) or "none: give --methods; the recipe's own method is not one compare sets"
            raise CompareError(f"--set {pair}: {method!r} is not among the compared methods ({compared})")
        out.setdefault(method, {})[key] = yaml.safe_load(value)
    return out
