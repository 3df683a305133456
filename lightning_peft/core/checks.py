"""Argument checks and optional imports: one wording for every method's bad input."""

from __future__ import annotations

import importlib
import math
from collections.abc import Collection, Sequence
from types import ModuleType
from typing import Any

from torch import nn


def check_positive_int(owner: str, name: str, value: Any) -> None:
    """Raise unless ``value`` is a positive integer (a bool is not)."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{owner} {name} must be a positive integer, got {value!r}")


def check_positive_number(owner: str, name: str, value: Any, zero_allowed: bool = False) -> None:
    """Raise unless ``value`` is a finite number above zero (or at least zero): inf and nan poison every output."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero_allowed):
        bound = ">= 0" if zero_allowed else "> 0"
        raise ValueError(f"{owner} {name} must be a finite number {bound}, got {value!r}")


def check_probability(owner: str, name: str, value: Any) -> None:
    """Raise unless ``value`` lies in [0, 1), as a dropout rate must."""
    if not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{owner} {name} must be in [0, 1), got {value!r}")


def layer_list(layers: int | Sequence[int] | None) -> list[int] | None:
    """Block indices as a list: one index alone (as peft's ``layers_to_transform`` takes it) is a list of one."""
    return None if layers is None else [layers] if isinstance(layers, int) else list(layers)


def check_choice(owner: str, name: str, value: Any, choices: Collection[Any]) -> None:
    """Raise unless ``value`` is one of ``choices``, listing them."""
    if value not in choices:
        raise ValueError(f"{owner} {name} must be one of {tuple(choices)}, got {value!r}")


def import_optional(module: str, extra: str, needed_by: str) -> ModuleType:
    """Import an optional dependency, or raise an ImportError naming what needs it and what to do."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{needed_by} needs {module}, which is not installed. Run: "
                          f'pip install "lightning-peft[{extra}]"') from err
    except Exception as err:  # noqa: BLE001 (installed but broken: a CUDA setup failure, a bad build)
        reason = " ".join(str(err).split())[:200]
        raise ImportError(f"{needed_by} needs {module}, which is installed but fails to import "
                          f"({type(err).__name__}: {reason}); reinstall it, or leave out what needs it") from err


def check_adapter_name(owner: str, name: Any) -> None:
    """Refuse an adapter name that cannot key the module dict holding a method's adapters: not a string, empty,
    dotted, or an attribute every module dict has (``keys``, ``items``, ``training``...)."""
    if not isinstance(name, str) or not name or "." in name or hasattr(_MODULE_DICT, name):
        raise ValueError(f"{owner}: the adapter name {name!r} cannot name a module (it is empty, dotted, or an "
                         "attribute of the module dict that holds adapters: keys, items, values, update, "
                         "training...); give the adapter another adapter_name")


_MODULE_DICT = nn.ModuleDict()
