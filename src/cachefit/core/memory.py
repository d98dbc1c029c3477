"""Memory models: the footprint of a partition (layers i..j), exactly as DESIGN.md defines them.

With W weights, K KV cache, A output activation, B workspace of layer l and in_l = A_{l-1} (in_0 = input_bytes):

- ``sum`` (the seed's additive model):  F(i,j) = sum_{l=i..j} (W_l + K_l + A_l + B_l)
- ``peak`` (default; a partition runs layer by layer and reuses its buffers):
  F(i,j) = sum_{l=i..j} (W_l + K_l) + max_{l=i..j} (in_l + A_l + B_l)
- ``pipeline`` (what ``cachefit run`` holds): ``peak`` plus the receive buffer a card keeps for the whole run,
  sized for the largest activation passed between layers, R = max_{l<n-1} A_l, on every card. A constant per
  card keeps footprints growing with the interval (it is added to every transient term: max(t + R) = max t + R).

Because in_l depends only on l, both are "additive part + range maximum of a fixed per-layer term", and both grow
when an interval grows; the partitioners rely on that. A tensor that a layer shares with an earlier owner (a tied
embedding) is added once to any partition holding one of its users but not its owner.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import numpy.typing as npt

from cachefit.core.errors import InputError
from cachefit.core.layers import Layer, LayerTable

__all__ = [
    "MEMORY_MODELS",
    "Breakdown",
    "IntervalCost",
    "MemoryModel",
    "SharedUse",
    "breakdown",
    "breakdowns",
    "interval_cost",
    "per_card_table",
    "receive_buffer_bytes",
    "shared_bytes",
    "shared_uses",
]

MemoryModel = Literal["sum", "peak", "pipeline"]
MEMORY_MODELS: tuple[MemoryModel, ...] = ("peak", "sum", "pipeline")
Int64Array = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class SharedUse:
    """A shared tensor as layer indices: counted by ``owner``; each of ``users`` (sorted, > owner) needs it too."""

    owner: int
    users: tuple[int, ...]
    bytes: int


@dataclass(frozen=True, slots=True)
class Breakdown:
    """A partition's footprint by kind; the four parts always add up to ``footprint_bytes``."""

    weight_bytes: int
    activation_bytes: int
    workspace_bytes: int
    kv_cache_bytes: int

    @property
    def footprint_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes + self.workspace_bytes + self.kv_cache_bytes


class IntervalCost:
    """F(i, j) in O(1) (``sum``) or O(j - i) vectorised (``peak``), and the furthest reach of a card from layer i.

    ``additive[l]`` is counted for every layer in the interval; ``transient[l]`` (``peak`` only) once, at its max.
    """

    __slots__ = ("_prefix_view", "_transient_view", "additive", "prefix", "shared", "transient")

    def __init__(self, additive: Int64Array, transient: Int64Array | None = None,
                 shared: tuple[SharedUse, ...] = ()) -> None:
        self.additive = np.ascontiguousarray(additive, dtype=np.int64)
        self.transient = None if transient is None else np.ascontiguousarray(transient, dtype=np.int64)
        self.shared = shared
        self.prefix: Int64Array = np.zeros(len(self.additive) + 1, dtype=np.int64)
        np.cumsum(self.additive, out=self.prefix[1:])
        # memoryviews index in ~40 ns and let C-level bisect search them without copies (numpy calls cost ~1 us).
        self._prefix_view = self.prefix.data
        self._transient_view = None if self.transient is None else self.transient.data

    @property
    def layers(self) -> int:
        return len(self.additive)

    def footprint(self, first: int, last: int) -> int:
        """Exact bytes of the partition ``first..last`` (inclusive)."""
        total = int(self.prefix[last + 1] - self.prefix[first])
        if self.transient is not None:
            total += int(self.transient[first:last + 1].max())
        return total + self.shared_bytes(first, last)

    def footprints_ending_at(self, last: int) -> Int64Array:
        """F(first, last) for every first <= last, vectorised (a suffix maximum of the transient term)."""
        if self.shared:
            return np.array([self.footprint(first, last) for first in range(last + 1)], dtype=np.int64)
        total = self.prefix[last + 1] - self.prefix[: last + 1]
        if self.transient is not None:
            total = total + np.maximum.accumulate(self.transient[last::-1])[::-1]
        return np.asarray(total, dtype=np.int64)

    def shared_bytes(self, first: int, last: int) -> int:
        return shared_bytes(self.shared, first, last)

    def jump(self, first: int, limit: int, hint: int = 0) -> int:
        """The largest ``last`` with F(first, last) <= limit; ``first - 1`` when layer ``first`` alone is over."""
        last, _ = self.jump_with_peak(first, limit, hint)
        return last

    def jump_with_peak(self, first: int, limit: int, hint: int = 0) -> tuple[int, int]:
        """:meth:`jump`, and the transient maximum of the partition it found (for a cheap next-layer extension).

        ``hint``: a guess of the run's length (the previous card's, say); it only speeds up the search.
        """
        reach, peak = self._base_jump(first, limit, hint)
        if not self.shared or reach < first:
            return reach, peak
        return self._jump_with_shared(first, limit, reach), -1

    def run_footprint(self, first: int, last: int, peak: int) -> int:
        """F(first, last) reusing ``peak`` (the max transient of the run, as :meth:`jump_with_peak` returns it)."""
        if peak < 0 or self.shared:
            return self.footprint(first, last)
        return self._prefix_view[last + 1] - self._prefix_view[first] + peak

    def extension(self, first: int, last: int, peak: int) -> int:
        """F(first, last + 1), reusing ``peak`` = max transient of first..last when it is known (>= 0)."""
        total = self._prefix_view[last + 2] - self._prefix_view[first]
        if self._transient_view is not None:
            if peak < 0:
                return self.footprint(first, last + 1)
            total += max(peak, self._transient_view[last + 1])
        return total + (self.shared_bytes(first, last + 1) if self.shared else 0)

    def _search(self, target: int, first: int, hint: int) -> int:
        """Index of the last prefix sum <= target, from ``first`` on. Searching a window of about twice the hinted
        run keeps the probe inside the cache; a whole-array bisection misses it on every step (~2 us a jump)."""
        prefix = self._prefix_view
        end = len(prefix)
        if hint > 0:
            window_end = first + 2 * hint + 2
            if window_end < end and prefix[window_end] > target:
                end = window_end
        return bisect_right(prefix, target, first, end) - 1

    def _base_jump(self, first: int, limit: int, hint: int = 0) -> tuple[int, int]:
        prefix = self._prefix_view
        start = prefix[first]
        if self._transient_view is None:
            return max(self._search(start + limit, first, hint) - 1, first - 1), 0
        # An upper bound first: the range max is at least transient[first].
        upper = self._search(start + limit - self._transient_view[first], first, hint) - 1
        if upper < first:
            return first - 1, 0
        assert self.transient is not None
        window = self.transient[first:upper + 1]
        peak = int(window.max())
        if prefix[upper + 1] - start + peak <= limit:
            return upper, peak
        running = np.maximum.accumulate(window)
        costs = self.prefix[first + 1:upper + 2] - start + running
        fitting = int(np.searchsorted(costs, limit, side="right"))
        return first + fitting - 1, int(running[fitting - 1])

    def _jump_with_shared(self, first: int, limit: int, reach: int) -> int:
        """Walk the few steps where shared tensors join the partition; the fit stays a prefix of layers."""
        joins = sorted((use.users[p], use.bytes) for use in self.shared if use.owner < first
                       for p in [bisect_right(use.users, first - 1)] if p < len(use.users) and use.users[p] <= reach)
        extra, segment_start = 0, first
        for join_at, size in [*joins, (reach + 1, 0)]:
            segment_end = min(join_at - 1, reach)
            if segment_end >= segment_start:
                candidate = self._base_jump(first, limit - extra)[0]
                if candidate < segment_end:
                    return max(candidate, segment_start - 1)
            extra += size
            segment_start = max(segment_start, join_at)
        return reach


def shared_bytes(uses: tuple[SharedUse, ...], first: int, last: int) -> int:
    """Bytes of tensors whose owner lies before ``first`` and which some layer in ``first..last`` uses."""
    extra = 0
    for use in uses:
        if use.owner < first:
            position = bisect_right(use.users, first - 1)
            if position < len(use.users) and use.users[position] <= last:
                extra += use.bytes
    return extra


def interval_cost(table: LayerTable, model: MemoryModel) -> IntervalCost:
    """The memory model ``model`` over ``table`` as arrays for the partitioners."""
    if model not in MEMORY_MODELS:
        raise InputError(f"memory_model must be one of {', '.join(MEMORY_MODELS)}, got {model!r}")
    columns = _columns(table)
    weights, activations, workspace, kv_cache = columns
    if model == "sum":
        return IntervalCost(weights + kv_cache + activations + workspace, None, shared_uses(table))
    transient = _held(table, model, 0, len(weights) - 1) + workspace
    return IntervalCost(weights + kv_cache, transient, shared_uses(table))


def per_card_table(table: LayerTable, ways: int) -> tuple[LayerTable, npt.NDArray[np.bool_]]:
    """What one card of a ``ways``-wide tensor group holds of each layer, and which layers allow that width (the
    others keep their whole sizes, and a plan must not give them that width). Output activations stay whole, so
    the memory models apply unchanged. A shared tensor is held per card as its owner holds it: whole, or (a tied
    embedding that is vocab-parallel) the owner's share, min(tensor, owner's per-card weights), which keeps the
    owner counting it and so footprints growing with the interval."""
    if ways == 1:                   # whole layers: the table as it is (no rebuild, no second validation)
        return table, np.ones(len(table.layers), dtype=bool)
    layers, allowed = [], []
    owners: dict[str, int] = {}
    for layer in table.layers:
        share = layer.split(ways)
        allowed.append(share is not None)
        if share is None:
            layers.append(layer)
            owners[layer.name] = layer.weight_bytes
            continue
        shared = tuple(replace(s, bytes=min(s.bytes, owners.get(s.owner, s.bytes))) for s in layer.shared)
        owners[layer.name] = share.weight_bytes
        layers.append(Layer(layer.name, share.weight_bytes, layer.activation_bytes, share.workspace_bytes,
                            share.kv_cache_bytes, share.flops, layer.modules, shared))
    card = LayerTable(table.name, tuple(layers), table.input_bytes, table.dtype, table.batch, table.seq,
                      table.phase, table.spec)
    return card, np.array(allowed, dtype=bool)


def receive_buffer_bytes(table: LayerTable, model: MemoryModel) -> int:
    """``pipeline``: the receive buffer every card keeps, the largest activation passed between layers."""
    if model != "pipeline" or len(table.layers) < 2:
        return 0
    return int(table.columns.activation_bytes[:-1].max())


def breakdown(table: LayerTable, model: MemoryModel, first: int, last: int,
              shared: tuple[SharedUse, ...] | None = None) -> Breakdown:
    """The footprint of ``first..last`` by kind. For ``peak``, activations and workspace are those of the layer
    where the transient term peaks (its input, output and workspace), so the parts add up to the footprint.
    Reads only the run's rows (diagnoses and reports call it layer by layer)."""
    columns = table.columns
    uses = shared_uses(table) if shared is None else shared     # pass cost.shared to skip rebuilding it
    weight, activation, workspace, kv_cache = columns.sizes[first:last + 1].sum(axis=0).tolist()
    weight += shared_bytes(uses, first, last)
    if model == "sum":
        return Breakdown(weight, activation, workspace, kv_cache)
    held = _held(table, model, first, last)
    peak = int(np.argmax(held + columns.workspace_bytes[first:last + 1]))
    return Breakdown(weight, int(held[peak]), int(columns.workspace_bytes[first + peak]), kv_cache)


def breakdowns(table: LayerTable, model: MemoryModel, firsts: Sequence[int], lasts: Sequence[int],
               shared: tuple[SharedUse, ...] | None = None) -> list[Breakdown]:
    """:func:`breakdown` of consecutive non-empty runs that cover the layers (a plan's stages), at once: one
    segmented sum (issue 15: 1,024 stages over 1e6 layers in milliseconds)."""
    columns = table.columns
    uses = shared_uses(table) if shared is None else shared
    totals = np.add.reduceat(columns.sizes, np.asarray(firsts, dtype=np.int64), axis=0).tolist()
    if lasts[-1] != len(columns) - 1 or any(b != a + 1 for a, b in zip(lasts[:-1], firsts[1:])):
        raise AssertionError(f"breakdowns takes runs covering the layers in order, got {firsts}..{lasts}; a bug")
    extra = [shared_bytes(uses, first, last) for first, last in zip(firsts, lasts)] if uses else [0] * len(firsts)
    if model == "sum":
        return [Breakdown(w + more, a, b, kv) for (w, a, b, kv), more in zip(totals, extra)]
    held = _held(table, model, 0, len(columns) - 1)
    transient = held + columns.workspace_bytes
    # One argmax per run: a few microseconds each, cheaper than a segmented argmax over every layer.
    peaks = [first + int(transient[first:last + 1].argmax()) for first, last in zip(firsts, lasts)]
    return [Breakdown(w + more, int(held[peak]), int(columns.workspace_bytes[peak]), kv)
            for (w, _, _, kv), more, peak in zip(totals, extra, peaks)]


def _held(table: LayerTable, model: MemoryModel, first: int, last: int) -> Int64Array:
    """What each of layers first..last holds during its pass besides its workspace: its input (the table's input
    for layer 0), its output and, under ``pipeline``, the card's receive buffer."""
    activations = table.columns.activation_bytes
    inputs = np.empty(last - first + 1, dtype=np.int64)
    inputs[0] = table.input_bytes if first == 0 else activations[first - 1]
    inputs[1:] = activations[first:last]
    return inputs + activations[first:last + 1] + receive_buffer_bytes(table, model)


def _columns(table: LayerTable) -> tuple[Int64Array, Int64Array, Int64Array, Int64Array]:
    columns = table.columns
    return columns.weight_bytes, columns.activation_bytes, columns.workspace_bytes, columns.kv_cache_bytes


def shared_uses(table: LayerTable) -> tuple[SharedUse, ...]:
    if not table.columns.any_shared:
        return ()
    index = {layer.name: position for position, layer in enumerate(table.layers)}
    users: dict[tuple[str, str], list[int]] = {}
    sizes: dict[tuple[str, str], int] = {}
    for position, layer in sorted(table.columns.extras.items()):
        for shared in layer.shared:
            key = (shared.owner, shared.tensor)
            users.setdefault(key, []).append(position)
            sizes[key] = max(sizes.get(key, 0), shared.bytes)
    return tuple(SharedUse(index[owner], tuple(found), sizes[(owner, tensor)])
                 for (owner, tensor), found in users.items())
