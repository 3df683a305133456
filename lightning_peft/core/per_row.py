"""Per-row adapters: one forward in which each row of the batch computes with its own named adapter, or none.

The context manager puts a :class:`RowAdapters` routing on every PEFT part of the model; a part
that supports it (``per_row = True``) computes each adapter's formula on that adapter's rows only,
so a row's output is what the model gives for that row alone with only its adapter active. Parts
that hold none of the named adapters compute as their base while the block lasts. Under
torch.compile each part computes every adapter it holds on all rows and keeps each row's own, with
the routing as tensors, so one compiled graph serves every assignment of adapters to rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from lightning_peft.core.layer import PEFTModule
from lightning_peft.core.merging import merged_layers
from lightning_peft.core.ownership import AdapterRef, adapter_refs, owners
from lightning_peft.core.rows import RowMask, RowSet
from lightning_peft.core.targeting import base_parameters


@dataclass(frozen=True)
class RowAdapters:
    """Which adapter each row of a batch uses: ``names`` per row, and the rows of each named adapter.

    ``slots`` numbers every adapter of the model, and ``row_slots`` holds each row's adapter's number
    (-1 for none, on the model's device): the routing as torch.compile sees it. ``sharded``: the
    model is sharded by FSDP2, whose gradient reduction takes every parameter of a unit that has a
    gradient, so every process must give the same adapters gradients (`with_resting`).
    """

    names: tuple[str | None, ...]
    rows: dict[str, RowSet]
    slots: dict[str, int]
    row_slots: Tensor
    sharded: bool = False

    @classmethod
    def of(cls, names: Sequence[str | None], adapters: Sequence[str], device: torch.device,
           sharded: bool = False) -> RowAdapters:
        """The routing of ``names`` (one per row) on a model holding ``adapters``, its ``row_slots`` on ``device``."""
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            if name is not None:
                rows.setdefault(name, []).append(i)
        slots = {name: slot for slot, name in enumerate(adapters)}
        row_slots = torch.tensor([-1 if n is None else slots[n] for n in names], device=device)
        return cls(tuple(names), {name: RowSet.of(index) for name, index in rows.items()}, slots, row_slots, sharded)

    def groups(self, part: PEFTModule, batch: Tensor) -> list[tuple[nn.Module, RowSet | RowMask]]:
        """``(adapter, its rows)`` for each named adapter that ``part`` holds, once ``batch`` has a row per name.

        Under torch.compile: every adapter ``part`` holds, its rows as a mask, so that the graph
        reads nothing of the routing but tensors and a new routing compiles nothing.
        """
        return self._masked_groups(part, batch) if torch.compiler.is_compiling() else self.row_sets(part, batch)

    def row_sets(self, part: PEFTModule, batch: Tensor) -> list[tuple[nn.Module, RowSet]]:
        """``(adapter, its rows by index)`` for each named adapter that ``part`` holds, compiled or not (a compiled
        graph then follows this routing alone)."""
        if batch.shape[0] != len(self.names):
            raise ValueError(f"per_row_adapters was given {len(self.names)} names, but a {part.method} layer got a "
                             f"batch of {batch.shape[0]} rows (input shape {tuple(batch.shape)}); give one name per "
                             "row, and a model whose adapted layers see the batch as their first dimension (generate "
                             "with num_beams or num_return_sequences k makes k rows of each: repeat each name k "
                             "times in a row)")
        return [(part.adapters[name], rows) for name, rows in self.rows.items() if name in part.adapters]

    def _masked_groups(self, part: PEFTModule, batch: Tensor) -> list[tuple[nn.Module, RowMask]]:
        """``(adapter, its rows as a mask)`` for every adapter that ``part`` holds (compiled: no Python routing)."""
        if batch.shape[0] != self.row_slots.shape[0]:
            raise ValueError(f"per_row_adapters was given {self.row_slots.shape[0]} names, but a compiled "
                             f"{part.method} layer got a batch of {batch.shape[0]} rows (input shape "
                             f"{tuple(batch.shape)}); give one name per row")
        return [(adapter, RowMask(self.row_slots == self.slots[name])) for name, adapter in part.adapters.items()
                if name in self.slots]

    def with_resting(self, part: PEFTModule, out: Tensor) -> Tensor:
        """``out``, and under FSDP2 training a zero that gives ``part``'s adapters without rows a zero gradient.

        Another process's batch may hold rows of them: its reduction then waits for theirs here.
        Adapters that no process's rows named lose the zeros again before the optimizer steps.
        """
        if not (self.sharded and torch.is_grad_enabled()) or torch.compiler.is_compiling():
            return out  # compiled, every adapter computes every row, and so has a gradient
        resting = [param for name, adapter in part.adapters.items() if name not in self.rows
                   for param in adapter.parameters() if param.requires_grad]
        return out + sum(param.sum() for param in resting) * 0 if resting else out


def add_to_rows(out: Tensor, groups: list[tuple[nn.Module, RowSet | RowMask]], delta_for) -> Tensor:
    """``out`` plus, on each group's rows, ``delta_for(adapter, rows)``; other rows stay as they are."""
    if not groups:
        return out
    every_row = all(rows.only_these for _, rows in groups) and sum(len(rows) for _, rows in groups) == out.shape[0]
    delta = out.new_empty(out.shape) if every_row else out.new_zeros(out.shape)
    for adapter, rows in groups:
        rows.put(delta, delta_for(adapter, rows).to(out.dtype))
    return out + delta


def replace_rows(out: Tensor, groups: list[tuple[nn.Module, RowSet | RowMask]], rows_for) -> Tensor:
    """``out`` with each group's rows replaced by ``rows_for(adapter, rows)``; other rows stay as they are."""
    if not groups:
        return out
    result = out.clone()
    for adapter, rows in groups:
        rows.put(result, rows_for(adapter, rows).to(out.dtype))
    return result


@contextmanager
def per_row_adapters(module: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Let each row of a batch use its own adapter inside a ``with`` block: one forward serves many tasks.

    Row ``i`` of every batch that goes through ``module`` inside the block computes with the
    adapter ``names[i]`` alone, or with none (the base model) where ``names[i]`` is None: its
    output is what ``module`` gives for that row alone after ``set_adapter(module, names[i])``.
    It works through any forward (a LightningModule's ``predict_step`` too), under
    ``torch.no_grad`` and ``torch.compile``, for LoRA (DoRA included), IA3, Adapter and
    PromptTuning, and each adapter's ``modules_to_save`` copies (its own head). Parameters of the
    model itself that a method trains (Selective, BitFit) serve every row, as with `set_adapter`.
    On leaving the block (also on an exception) the adapters that were active are active again.

    Args:
        module: a model with adapters, or a LightningModule holding one.
        names: one adapter name (one of `adapter_names` of ``module``) or None per row of the batches.

    Yields:
        ``module`` itself, routing rows to their adapters.

    Raises:
        ValueError: when ``names`` is empty or names an adapter that ``module`` lacks, when a named
            adapter's method has no per-row forward (PrefixTuning), when rows name an adapter that
            trains the model's own parameters (Selective, BitFit) beside rows of others, or when
            ``module`` holds merged adapters; inside the block, when a batch does not have one row
            per name, and on `set_adapter`, `merge`, `load_adapter` or a method's injection.
        TypeError: when a name is neither a string nor None.

    Examples:
        ```python
        from lightning_peft import per_row_adapters

        with per_row_adapters(model, ["sentiment", "topic", None, "sentiment"]):
            logits = model(**batch).logits  # a batch of 4 rows, each with its own adapter
        ```
    """
    names = list(names)  # an iterator would be spent by the check
    parts = _checked_parts(module, names)
    routing = RowAdapters.of(names, _adapter_names(module), _device_of(module),
                             sharded=any(isinstance(m, FSDPModule) for m in module.modules()))
    saved = _route(parts, routing)
    try:
        with _recomputed_with(module, parts, routing):
            yield module
    finally:
        _unroute(saved)


_Saved = list[tuple[PEFTModule, RowAdapters | None, list[str]]]


def _route(parts: list[PEFTModule], routing: RowAdapters) -> _Saved:
    """Put ``routing`` on each part (parts without a per-row forward compute as their base); return what was there."""
    saved = [(part, part.row_adapters, list(part.active_adapters)) for part in parts]
    for part in parts:
        if part.per_row:
            part.row_adapters = routing
        else:
            part.set_active([])
    return saved


def _unroute(saved: _Saved) -> None:
    """Give each part back the routing and active adapters that ``_route`` found."""
    for part, routing, active in saved:
        part.row_adapters = routing
        part.set_active(active)


@contextmanager
def _recomputed_with(module: nn.Module, parts: list[PEFTModule], routing: RowAdapters) -> Iterator[None]:
    """Make each checkpointed layer recompute, in backward, with the routing of its first forward.

    Backward usually runs after the block has ended (Lightning's does): a layer recomputed then would
    otherwise give every row every active adapter, and wrong gradients. Checkpointed layers are
    transformers' (``_gradient_checkpointing_func``) and torch's ``checkpoint_wrapper`` (FSDP's
    activation checkpointing: ``checkpoint_fn``).
    """
    routed, originals = set(parts), []
    for layer, attribute in _checkpointing_functions(module):
        original = layer.__dict__[attribute]
        inside = [part for part in layer.modules() if part in routed]
        setattr(layer, attribute, _routed(original, inside, routing))
        originals.append((layer, attribute, original))
    try:
        yield
    finally:
        for layer, attribute, original in originals:
            if getattr(layer.__dict__.get(attribute), "checkpoint", None) is original:  # still ours: put it back
                setattr(layer, attribute, original)


def _checkpointing_functions(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(layer, attribute)`` of each checkpointing function that the layers of ``module`` call their forward with."""
    found = []
    for layer in module.modules():
        if layer.__dict__.get("gradient_checkpointing") is True and callable(
                layer.__dict__.get("_gradient_checkpointing_func")):
            found.append((layer, "_gradient_checkpointing_func"))
        elif callable(layer.__dict__.get("checkpoint_fn")) and hasattr(layer, "_checkpoint_wrapped_module"):
            found.append((layer, "checkpoint_fn"))
    return found


def _routed(checkpoint, parts: list[PEFTModule], routing: RowAdapters):
    """``checkpoint`` whose function runs with ``routing`` on ``parts``, in the forward and in its recompute alike."""
    def checkpoint_routed(function, *args, **kwargs):
        def run_routed(*inputs, **options):
            saved = _route(parts, routing)
            try:
                return function(*inputs, **options)
            finally:
                _unroute(saved)
        return checkpoint(run_routed, *args, **kwargs)
    checkpoint_routed.checkpoint = checkpoint
    return checkpoint_routed


def check_routable(module: nn.Module, names: Sequence[str | None]) -> None:
    """Refuse, before any batch, rows ``names`` that `per_row_adapters` would refuse (over all of a run's rows)."""
    _checked_parts(module, list(names))


def _checked_parts(module: nn.Module, names: list) -> list[PEFTModule]:
    """The PEFT parts of ``module``, once ``names`` is known to fit them; else one clear error."""
    if not names:
        raise ValueError("per_row_adapters needs one adapter name (or None) per row; got no names")
    wrong = next((n for n in names if n is not None and not isinstance(n, str)), None)
    if wrong is not None:
        raise TypeError(f"per_row_adapters takes adapter names (str) or None per row; got {type(wrong).__name__} "
                        f"{wrong!r}")
    if merged_layers(module):
        raise ValueError("per_row_adapters: this model has merged adapters, which every row would use; unmerge it "
                         "first")
    known = _adapter_names(module)
    unknown = next((n for n in names if n is not None and n not in known), None)
    if unknown is not None:
        raise ValueError(f"per_row_adapters: no adapter named '{unknown}'; this model has: "
                         f"{', '.join(known) or 'none'}")
    parts = [m for m in module.modules() if isinstance(m, PEFTModule)]
    unsupported = sorted({f"{p.method} ({type(p).__name__})" for p in parts
                          if not p.per_row and set(p.adapters) & set(names)})
    if unsupported:
        raise ValueError(f"per_row_adapters: {', '.join(unsupported)} adapters have no per-row forward; per-row "
                         "routing works for LoRA on layers (not on target_parameters or nn.MultiheadAttention), "
                         "IA3, Adapter and PromptTuning")
    _check_no_row_names_a_shared_adapter(module, names)
    _check_batch_first(module)
    return parts


def _check_batch_first(module: nn.Module) -> None:
    """Refuse adapted layers inside PyTorch attention that computes sequence-first (``batch_first=False``): their
    inputs' first dimension is the sequence, not the rows, so rows would go to the wrong adapters."""
    for name, part in module.named_modules():
        layer = isinstance(part, nn.TransformerEncoderLayer | nn.TransformerDecoderLayer)
        attention = part.self_attn if layer else part
        if isinstance(attention, nn.MultiheadAttention) and not attention.batch_first and any(
                isinstance(inner, PEFTModule) for inner in part.modules()):
            raise ValueError(f"per_row_adapters: '{name or type(part).__name__}' computes sequence-first "
                             "(batch_first=False), so its adapted layers see the sequence where the rows should "
                             "be: build it with batch_first=True")


def _check_no_row_names_a_shared_adapter(module: nn.Module, names: list) -> None:
    """Refuse rows that name an adapter training the model's own parameters (Selective, BitFit) beside other rows:
    those parameters serve every row, so the other rows would compute with that adapter too. Rows that name none get
    such an adapter whole, unless it has copies of modules too (a head), which go to its own rows only: refused."""
    if len(set(names)) == 1 and names[0] is not None:
        return
    base = {id(b.param): b.name for b in base_parameters(module)}
    claimed = owners(module)
    own: dict[AdapterRef, list[str]] = {}  # each adapter of the model's own parameters: their names
    for param, ref in claimed.items():
        if param in base:
            own.setdefault(ref, []).append(base[param])
    if None in names and own:
        parts_of = {claimed.get(id(param)) for part in module.modules() if isinstance(part, PEFTModule)
                    for param in part.adapters.parameters()}  # the refs that hold parts of their own (a head's copy)
        split = next((ref for ref in own if ref in parts_of), None)
        if split is not None:
            raise ValueError(f"per_row_adapters: a row names no adapter, but '{split.name}' trains the model's own "
                             f"parameters ({_some(own[split])}), which serve every row, and copies of modules of its "
                             "own (its head), which go to its rows only: a row of no adapter would compute with part "
                             f"of it. Name '{split.name}' for those rows, or run them on a model without it")
    named = next((ref for name in names for ref in own if ref.name == name), None)
    if named is not None:
        raise ValueError(f"per_row_adapters: rows name '{named.name}', whose adapter trains the model's own "
                         f"parameters ({_some(own[named])}): they serve every row, so the rows of other adapters "
                         f"would compute with '{named.name}' too. Route adapters that add parts of their own (LoRA, "
                         "IA3, Adapter, PromptTuning); one that trains the model's parameters goes to every row or to "
                         "none")


def _some(names: list[str]) -> str:
    """The first three of ``names``, and ``...`` for more."""
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def _adapter_names(module: nn.Module) -> list[str]:
    """The names of ``module``'s adapters, each once, in the order they were added."""
    return list(dict.fromkeys(ref.name for ref in adapter_refs(module)))


def _device_of(module: nn.Module) -> torch.device:
    """Where ``module``'s first parameter lives (the CPU for a model without parameters)."""
    return next((param.device for param in module.parameters()), torch.device("cpu"))
