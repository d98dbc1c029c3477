"""Profile a real ``torch.nn.Module`` into a layer table, on the meta device: no weight memory is allocated.

- Layers: the repeated blocks (the largest ModuleList or ModuleDict of one class) and the modules beside them on
  the path from the root (embeddings, final norm, head), in execution order; parameter-less ones join a neighbour.
  With ``granularity="leaf"`` every executed leaf module is a layer, and what runs between leaves (attention
  itself, in most models) counts with the leaf that ran last. Modules that never ran and the root's own tensors
  join a layer (their weights count).
- Weights: each parameter or buffer once, by identity, with its first user; later users list it as shared.
- Activations: at each boundary, every tensor made before it and used after it (hidden state, residual, rotary
  tables...), from a dispatch mode that sees every op's outputs and module hooks that see every layer's inputs.
- Workspace: the peak of the bytes a layer allocated and still held, minus its outputs (so input + output +
  workspace bounds what the layer held at its peak), with frees seen through storage weak references.
- KV cache (decode): the state from before the forward that a layer writes in place (a pre-allocated cache:
  transformers' StaticCache, cachefit.nn's KVCache, a model's own), read off the tensors themselves, so fused QKV
  projections and sliding windows are what they hold. A forward that writes no such state (a module given no
  cache) falls back to ``seq`` tokens of its ``k_proj`` and ``v_proj`` outputs.
- FLOPs: torch's FlopCounterMode, per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from cachefit.core.errors import InputError
from cachefit.core.layers import Layer, LayerTable, Phase, SharedTensor
from cachefit.sources.fused_attention import fused_attention
from cachefit.sources.meta_ops import run_on_meta, written_tensors

__all__ = ["Granularity", "find_blocks", "profile_module"]

Granularity = Literal["block", "leaf"]


@dataclass
class _Unit:
    """A layer being measured: one or more modules that run as one."""

    name: str
    modules: list[str]
    module_objects: list[nn.Module]
    order: int = 1 << 60                 # first time it ran
    peak_created: int = 0                # peak bytes it allocated and still held
    created_live: int = 0
    output_bytes: int = 0
    flops: float = 0.0
    weight_bytes: int = 0
    state_bytes: int = 0                 # state from before the forward it wrote in place (a KV cache)
    shared: list[SharedTensor] = field(default_factory=list)


def find_blocks(model: nn.Module) -> tuple[str, list[tuple[str, nn.Module]]] | None:
    """The repeated blocks: the ModuleList or ModuleDict (torchtitan keeps its layers in one, iterated by the
    parent) of one class, two or more, holding the most parameters; its path and its (key, block) pairs."""
    best: tuple[int, str, list[tuple[str, nn.Module]]] | None = None
    for name, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            blocks = list(module.named_children())
            if len(blocks) >= 2 and len({type(m) for _, m in blocks}) == 1:
                size = sum(p.numel() for p in module.parameters())
                if best is None or size > best[0]:
                    best = (size, name, blocks)
    return None if best is None else (best[1], best[2])


def _units(model: nn.Module, granularity: Granularity) -> list[_Unit]:
    modules = dict(model.named_modules())
    if granularity == "leaf":
        return [_Unit(name, [name], [module]) for name, module in modules.items()
                if name and not list(module.children())]
    found = find_blocks(model)
    if found is None:
        return [_Unit(name, [name], [module]) for name, module in model.named_children()]
    path, blocks = found
    units = [_Unit(f"{path}.{key}", [f"{path}.{key}"], [block]) for key, block in blocks]
    ancestors = [""] + [".".join(path.split(".")[:depth]) for depth in range(1, path.count(".") + 1)]
    on_path = set(ancestors) | {path}
    for ancestor in ancestors:
        for child_name, child in modules[ancestor].named_children():
            full = f"{ancestor}.{child_name}" if ancestor else child_name
            if full not in on_path:
                units.append(_Unit(full, [full], [child]))
    return units


class _Tracker(TorchDispatchMode):
    """Every storage an op creates: its size, the layer that made it, the last layer that reads it, its death."""

    def __init__(self, ignored: set[int], between_to_last: bool = False) -> None:
        super().__init__()
        self.ignored = ignored                      # parameters and buffers
        self.between_to_last = between_to_last      # ops outside every layer count with the one that ran last
        self.storages: dict[int, list[Any]] = {}    # cdata -> [weakref, bytes, producer, last consumer, maker]
        self.units: list[_Unit] = []
        self.active: int | None = None
        self.finished = -1                          # the last layer that ran to its end (-1: before any)
        self.history: list[tuple[int, int, int]] = []   # (producer, last consumer, bytes) of freed storages
        self.written: set[int] = set()              # storages from before the forward some layer wrote

    @property
    def charged(self) -> int | None:
        """The layer an op's allocations count with."""
        if self.active is None and self.between_to_last and self.finished >= 0:
            return self.finished
        return self.active

    def see(self, tensor: torch.Tensor, consumer: int | None = None) -> None:
        storage = tensor.untyped_storage()
        reference = StorageWeakRef(storage)
        key = reference.cdata
        if key in self.ignored:
            return
        record = self.storages.get(key)
        if record is None:
            charged = self.charged
            producer = charged if charged is not None else self.finished
            record = [reference, storage.nbytes(), producer, -1, charged]
            self.storages[key] = record
            if charged is not None:
                unit = self.units[charged]
                unit.created_live += record[1]
                unit.peak_created = max(unit.peak_created, unit.created_live)
        if consumer is not None:
            record[3] = consumer          # layers run one after another: the latest reader is the last one

    def collect(self) -> None:
        for key in [key for key, record in self.storages.items() if record[0].expired()]:
            record = self.storages.pop(key)
            self.history.append((record[2], record[3], record[1]))
            if record[4] is not None and record[4] == self.charged:
                self.units[record[4]].created_live -= record[1]

    def existing(self, tensor: torch.Tensor) -> None:
        """A storage an op reads that no op made while tracking: state from before the forward (a pre-allocated
        KV cache, say). It is not an allocation and crosses no boundary unless a layer takes it as input."""
        reference = StorageWeakRef(tensor.untyped_storage())
        if reference.cdata not in self.ignored and reference.cdata not in self.storages:
            self.storages[reference.cdata] = [reference, tensor.untyped_storage().nbytes(), -2, -1, None]

    def wrote(self, tensor: torch.Tensor) -> None:
        """An op wrote ``tensor`` in place: state from before the forward, written first by the charged layer,
        is state that layer keeps (a KV cache). A scalar (transformers' StaticCache counts its fill length in one)
        is bookkeeping, not keys or values."""
        key = StorageWeakRef(tensor.untyped_storage()).cdata
        record, charged = self.storages.get(key), self.charged
        if (record is not None and record[2] == -2 and charged is not None and key not in self.written
                and tensor.dim() > 0):
            self.written.add(key)
            self.units[charged].state_bytes += record[1]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor):
                self.existing(leaf)
        for leaf in written_tensors(func, args, kwargs or {}):
            self.wrote(leaf)
        result = run_on_meta(func, args, kwargs or {})
        self.collect()
        for leaf in tree_leaves(result):
            if isinstance(leaf, torch.Tensor):
                self.see(leaf)
        return result

    def flow(self, rank: dict[int, int]) -> list[tuple[int, int, int]]:
        """(producer, last consumer, bytes) of every storage seen, as execution ranks (-1: a model input)."""
        alive = [(record[2], record[3], record[1]) for record in self.storages.values()]
        # State from before the forward that a layer takes as input (token ids read by a .view first, say)
        # crosses every boundary up to that layer, as a model input does; state no layer takes stays out.
        return [(rank.get(producer, -1), rank.get(consumer, -1), size)
                for producer, consumer, size in self.history + alive if producer != -2 or consumer >= 0]


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    for leaf in tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            yield leaf


def profile_module(model: nn.Module, args: tuple[Any, ...] = (), kwargs: Mapping[str, Any] | None = None, *,
                   name: str, batch: int | None = None, seq: int | None = None, phase: Phase | None = None,
                   dtype: str | None = None, granularity: Granularity = "block",
                   kv_cache_bytes: Callable[[nn.Module], int] | None = None, fused: bool = False) -> LayerTable:
    """Run ``model(*args, **kwargs)`` once (on meta tensors, normally) and measure each layer.

    In decode a layer's KV cache is the state from before the forward it writes in place; where the forward writes
    none, ``kv_cache_bytes(module)`` (by default ``batch * seq`` tokens of its ``k_proj`` and ``v_proj`` outputs).
    ``fused``: SDPA on meta counted as the fused kernel runs it (sources/fused_attention.py), not as its
    decomposition.
    """
    if granularity not in ("block", "leaf"):
        raise InputError(f"granularity must be 'block' or 'leaf', got {granularity!r}")
    units = _units(model, granularity)
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    tracker = _Tracker({StorageWeakRef(t.untyped_storage()).cdata for t in tensors.values()},
                       between_to_last=granularity == "leaf")
    tracker.units = units
    handles = _hook(units, tracker)
    counter = FlopCounterMode(display=False)

    def add_flops(value: float) -> None:
        if tracker.charged is not None:
            units[tracker.charged].flops += value

    try:
        with torch.no_grad(), tracker, counter, fused_attention(add_flops) if fused else nullcontext():
            model(*args, **(kwargs or {}))
    finally:
        for handle in handles:
            handle.remove()
    ran = sorted((unit for unit in units if unit.order < 1 << 60), key=lambda unit: unit.order)
    if not ran:
        raise InputError(f"{name}: no layer of the module ran in its forward")
    _place_idle(model, units, ran)
    rank = {units.index(unit): position for position, unit in enumerate(ran)}
    flow = tracker.flow(rank)
    flops = {key.split(".", 1)[1]: float(sum(ops.values())) for key, ops in counter.get_flop_counts().items()
             if "." in key}
    _assign_weights(model, ran)
    tokens = (batch or 1) * (seq or 0)
    fallback = kv_cache_bytes or (lambda module: tokens * _kv_from_projections(module))
    if tracker.written:
        def kv_size(unit: _Unit) -> int:
            return unit.state_bytes
    else:
        def kv_size(unit: _Unit) -> int:
            return sum(fallback(module) for module in unit.module_objects)
    layers = [_layer(group, first, flow, flops, phase == "decode", kv_size, last=first + len(group) == len(ran))
              for first, group in _groups(ran)]
    return LayerTable(name=name, layers=tuple(layers), input_bytes=_boundary(flow, -1), dtype=dtype,
                      batch=batch, seq=seq, phase=phase)


def _place_idle(model: nn.Module, units: list[_Unit], ran: list[_Unit]) -> None:
    """Weights nothing called by itself still count: a module that never ran joins the layer registered before
    it that ran (else the first that ran), by name, so exports name it too; the root's own parameters and
    buffers join the first layer that ran, by their names."""
    for position, unit in enumerate(units):
        if unit.order < 1 << 60:
            continue
        host = next((u for u in reversed(units[:position]) if u.order < 1 << 60), ran[0])
        host.modules.extend(unit.modules)
        host.module_objects.extend(unit.module_objects)
    inside = {id(t) for u in units for m in u.module_objects for t in [*m.parameters(), *m.buffers()]}
    loose = {id(t): (n, t) for n, t in [*model.named_parameters(), *model.named_buffers()] if id(t) not in inside}
    if loose:
        ran[0].module_objects.append(_Holder([t for _, t in loose.values()]))
        ran[0].modules.extend(n for n, _ in loose.values())     # by name, as a device_map must list them


class _Holder(nn.Module):
    """The root's own tensors, held for weight counting only (never called)."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__()
        for index, tensor in enumerate(tensors):
            if isinstance(tensor, nn.Parameter):
                self.register_parameter(f"p{index}", tensor)
            else:
                self.register_buffer(f"b{index}", tensor, persistent=False)


def _hook(units: list[_Unit], tracker: _Tracker) -> list[Any]:
    clock = iter(range(1 << 60))
    handles = []
    for index, unit in enumerate(units):
        def before(module: nn.Module, args: Any, kwargs: Any, index: int = index, unit: _Unit = unit) -> None:
            for tensor in _tensors((args, kwargs)):
                tracker.see(tensor, consumer=index)
            unit.order = min(unit.order, next(clock))
            unit.created_live, tracker.active = 0, index

        def after(module: nn.Module, args: Any, kwargs: Any, output: Any, index: int = index,
                  unit: _Unit = unit) -> None:
            tracker.collect()
            seen: dict[int, int] = {}
            for tensor in _tensors(output):
                tracker.see(tensor)
                storage = tensor.untyped_storage()
                seen[StorageWeakRef(storage).cdata] = storage.nbytes()
            unit.output_bytes = sum(seen.values())
            tracker.active, tracker.finished = None, index

        for module in unit.module_objects:
            handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(module.register_forward_hook(after, with_kwargs=True))
    return handles


def _kv_from_projections(module: nn.Module) -> int:
    """Bytes of keys and values per token: the outputs of every ``k_proj`` and ``v_proj`` Linear inside."""
    total = 0
    for child in module.modules():
        for attribute in ("k_proj", "v_proj"):
            projection = getattr(child, attribute, None)
            if isinstance(projection, nn.Linear):
                total += projection.out_features * projection.weight.element_size()
    return total


def _boundary(flow: list[tuple[int, int, int]], after: int) -> int:
    """Bytes of the tensors made at or before layer rank ``after`` (-1: model inputs) and read after it."""
    return sum(size for producer, consumer, size in flow if producer <= after < consumer)


def _assign_weights(model: nn.Module, ran: list[_Unit]) -> None:
    """Each parameter or buffer counts once, with the first layer to run that holds it; later holders share it."""
    names = {id(t): n for n, t in [*model.named_parameters(remove_duplicate=False),
                                   *model.named_buffers(remove_duplicate=False)]}
    owners: dict[int, str] = {}
    for unit in ran:
        held = {id(t): t for module in unit.module_objects for t in [*module.parameters(), *module.buffers()]}
        for key, tensor in held.items():
            size = tensor.numel() * tensor.element_size()
            if key not in owners:
                owners[key] = unit.name
                unit.weight_bytes += size
            elif owners[key] != unit.name:
                unit.shared.append(SharedTensor(names.get(key, unit.name), owners[key], size))


def _groups(ran: list[_Unit]) -> Iterator[tuple[int, list[_Unit]]]:
    """Runs of units that become one layer: a unit without weights joins the layer before it (or after it)."""
    groups: list[list[_Unit]] = []
    def weightless(unit: _Unit) -> bool:   # no parameters of its own (buffers such as rotary tables do not count)
        return not unit.shared and not any(True for m in unit.module_objects for _ in m.parameters())

    for unit in ran:
        if groups and (weightless(unit) or all(weightless(u) for u in groups[-1])):
            groups[-1].append(unit)
        else:
            groups.append([unit])
    first = 0
    for group in groups:
        yield first, group
        first += len(group)


def _layer(group: list[_Unit], first: int, flow: list[tuple[int, int, int]], flops: dict[str, float],
           decode: bool, kv_cache_bytes: Callable[[_Unit], int], last: bool) -> Layer:
    """One layer from units ranked first..first+len-1: input + activation + workspace bound its peak."""
    incoming = _boundary(flow, first - 1)
    activation = group[-1].output_bytes if last else _boundary(flow, first + len(group) - 1)
    held = max(_boundary(flow, first + offset - 1) + unit.peak_created for offset, unit in enumerate(group))
    named = next((unit for unit in group if unit.weight_bytes), group[0])
    inside = {unit.name for unit in group}
    return Layer(name=named.name, weight_bytes=sum(unit.weight_bytes for unit in group),
                 activation_bytes=activation, workspace_bytes=max(0, held - incoming - activation),
                 kv_cache_bytes=sum(kv_cache_bytes(unit) for unit in group) if decode else 0,
                 flops=sum(flops.get(module, 0.0) for unit in group for module in unit.modules)
                 + sum(unit.flops for unit in group),
                 modules=tuple(module for unit in group for module in unit.modules),
                 shared=tuple(s for unit in group for s in unit.shared if s.owner not in inside),
                 read_bytes=_read_bytes(group))


def _read_bytes(group: list[_Unit]) -> int | None:
    """Weight bytes a pass reads, where fewer than held: a lookup table (``nn.Embedding``, positional ones too)
    reads the rows it looks up, its output, not the whole table; None where every unit reads all it holds."""
    def lookup(unit: _Unit) -> bool:
        return any(isinstance(module, nn.Embedding) for module in unit.module_objects)
    if not any(lookup(unit) and unit.output_bytes < unit.weight_bytes for unit in group):
        return None
    return sum(min(unit.output_bytes, unit.weight_bytes) if lookup(unit) else unit.weight_bytes for unit in group)
