"""All-or-nothing changes to a module tree: a failure half-way puts every module back as it was.

Methods change a model by replacing submodules, adding parameters, hooks and claims, and
setting ``requires_grad``: all of it lives in the modules' own attributes, so a shallow record
of each module's attributes (and of the dicts, sets and lists among them) is enough to undo it. Weights that a
method rewrites (PiSSA's residual) are replaced by new tensors, never written in place, so the
record keeps the old ones.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

_CONTAINERS = (dict, set, list)  # module attributes changed in place: _modules, _parameters, hooks, buffer sets


class TreeRecord:
    """The attributes of every module under a root, and each parameter's ``requires_grad`` and version."""

    def __init__(self, root: nn.Module) -> None:
        self.modules: list[tuple[nn.Module, dict[str, Any], dict[str, Any]]] = [
            (m, dict(m.__dict__), {k: copy.copy(v) for k, v in m.__dict__.items() if isinstance(v, _CONTAINERS)})
            for m in root.modules()
        ]
        self.parameters = [(p, p.requires_grad, p._version, p.device, p.dtype) for p in root.parameters()]
        self.classes = [(m, type(m)) for m in root.modules()]

    def untouched(self) -> bool:
        """Whether the recorded tensors and modules are as they were: not written, moved, cast or wrapped.

        Training's preparation (moving to a device, casting for precision, DDP's broadcast, FSDP's
        sharding) changes them in ways this record cannot undo.
        """
        return all(p._version == version and p.device == device and p.dtype == dtype
                   for p, _, version, device, dtype in self.parameters) and \
            all(type(m) is cls for m, cls in self.classes)

    def restore(self) -> None:
        """Put every recorded module's attributes back, and each parameter's ``requires_grad``."""
        for module, attributes, containers in self.modules:
            module.__dict__.clear()
            module.__dict__.update(attributes)
            for key, content in containers.items():
                _refill(attributes[key], content)
        for param, requires_grad, *_ in self.parameters:
            param.requires_grad_(requires_grad)


def _refill(container: dict | set | list, content: dict | set | list) -> None:
    """Give ``container`` back its recorded ``content``, keeping the object (others may hold it)."""
    container.clear()
    if isinstance(container, list):
        container.extend(content)
    else:
        container.update(content)


@contextmanager
def all_or_nothing(root: nn.Module) -> Iterator[TreeRecord]:
    """Inside this block, an exception undoes every change made to ``root``'s module tree.

    The record it yields can undo the changes later too, until it is dropped.
    """
    record = TreeRecord(root)
    try:
        yield record
    except BaseException:
        record.restore()
        raise
