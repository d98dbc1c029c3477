"""Why nothing fits, in words a user can act on: which layer, how far over, what share is what, what would fit."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cachefit.core.layers import Layer, LayerTable
from cachefit.core.memory import Breakdown, IntervalCost, MemoryModel, breakdown, per_card_table
from cachefit.core.units import format_size
from cachefit.planning.algorithms import single_layer_footprints
from cachefit.planning.algorithms.split import SplitOption

__all__ = ["explain_order", "explain_oversized", "explain_too_few_cards", "explain_unsplittable", "oversized_layers"]

_SHOWN = 3   # layers described one by one; the rest are counted


def oversized_layers(table: LayerTable, cost: IntervalCost, capacity: int) -> list[int]:
    """Indices of layers whose footprint alone exceeds ``capacity``, largest first (ties in layer order)."""
    singles = single_layer_footprints(cost)
    over = np.flatnonzero(singles > capacity)
    return [int(index) for index in over[np.lexsort((over, -singles[over]))]]


def explain_oversized(table: LayerTable, model: MemoryModel, cost: IntervalCost, capacity: int,
                      oversized: Sequence[int], larger_devices: Sequence[tuple[str, int]] = ()) -> list[str]:
    lines = []
    for index in oversized[:_SHOWN]:
        parts = breakdown(table, model, index, index, cost.shared)
        lines.append(_layer_line(table, index, parts, capacity))
    if len(oversized) > _SHOWN:
        lines.append(f"{len(oversized) - _SHOWN} more layers are over capacity too")
    worst = breakdown(table, model, oversized[0], oversized[0], cost.shared)
    lines += _remedies(table, worst, capacity, larger_devices, oversized[0])
    return lines


WHOLE_ONLY = "a layer cannot be split across cards by whole-layer partitioning"


def _layer_line(table: LayerTable, index: int, parts: Breakdown, capacity: int, why: str = WHOLE_ONLY) -> str:
    total = parts.footprint_bytes
    shares = ", ".join(f"{label} {value / total:.1%}" for label, value in (
        ("weights", parts.weight_bytes), ("activations", parts.activation_bytes),
        ("workspace", parts.workspace_bytes), ("KV cache", parts.kv_cache_bytes)) if value)
    return (f"layer {index} ({table.layers[index].name}) needs {format_size(total)} ({shares}) but a card holds "
            f"{format_size(capacity)}: over by {format_size(total - capacity)} ({total / capacity:.1f}x); {why}")


def _remedies(table: LayerTable, worst: Breakdown, capacity: int,
              larger_devices: Sequence[tuple[str, int]], index: int) -> list[str]:
    need = worst.footprint_bytes
    lines = [f"to fit: a card holding at least {format_size(need)} ({need} bytes)"
             + (f", e.g. {', '.join(name for name, _ in larger_devices[:4])}" if larger_devices else "")]
    if worst.weight_bytes > capacity:
        lines.append(f"its weights alone ({format_size(worst.weight_bytes)}) exceed the card, so no batch or "
                     f"sequence fits: {_split_remedy(table.layers[index], capacity)}, or store the weights in a "
                     "narrower dtype")
        return lines
    scaling = worst.activation_bytes + worst.workspace_bytes + worst.kv_cache_bytes
    room = capacity - worst.weight_bytes
    if table.batch is not None and table.batch > 1 and scaling > 0:
        batch = table.batch * room // scaling
        if batch >= 1:
            lines.append(f"or a smaller batch: activations, workspace and KV cache grow about linearly with batch, "
                         f"so batch <= {batch} (now {table.batch}) should fit; re-plan to confirm")
            return lines
    if table.seq is not None and scaling > 0:
        lines.append(f"or a shorter sequence (now {table.seq}): activations, workspace and KV cache take "
                     f"{format_size(scaling)} of the layer and only {format_size(room)} is left after its weights")
    return lines


def _split_remedy(layer: Layer, capacity: int) -> str:
    """The width to split a layer at, from the widths its shapes allow (the ones the planner can use): the least
    whose per-card weights fit, or why none does."""
    needed = -(-layer.weight_bytes // capacity)
    widths = sorted(s.ways for s in layer.splits)
    fitting = [s.ways for s in sorted(layer.splits, key=lambda s: s.ways) if s.weight_bytes <= capacity]
    if fitting:
        return (f"split it across {fitting[0]} cards (a tensor group; its shapes allow widths "
                f"{', '.join(map(str, widths))}), planned with split 'auto' or 'always'")
    if widths:
        return (f"even at its widest split ({widths[-1]} cards, the most its shapes allow) its weights per card "
                f"exceed the card; it would need at least {needed} cards' worth of memory")
    return f"its shapes allow no split (it would need at least {needed} cards' worth of memory)"


def explain_too_few_cards(cards: int, capacity: int, best_bottleneck: int, fewest: int) -> list[str]:
    return [f"{cards} cards are too few: the best split over {cards} cards puts {format_size(best_bottleneck)} "
            f"on its fullest card, {format_size(best_bottleneck - capacity)} over the {format_size(capacity)} "
            f"capacity ({best_bottleneck / capacity:.2f}x)",
            f"to fit: use at least {fewest} cards (the fewest that hold every layer), or cards of at least "
            f"{format_size(best_bottleneck)}"]


def explain_order(table: LayerTable, cost: IntervalCost, capacities: Sequence[int], placed: int) -> list[str]:
    """Different-size cards in a fixed order that run out before the last layer."""
    remaining = cost.footprint(placed, len(table.layers) - 1)
    return [f"the {len(capacities)} cards, filled in order, hold layers 0..{placed - 1}; layers {placed}.."
            f"{len(table.layers) - 1} (from {table.layers[placed].name}, {format_size(remaining)} as one "
            "partition) are left over",
            f"to fit: add cards after the last one (one of at least {format_size(remaining)} would do), "
            "use larger cards, or put the larger cards where the larger layers are"]


def explain_unsplittable(table: LayerTable, model: MemoryModel, options: Sequence[SplitOption],
                         capacity: int) -> list[str]:
    """Layers that fit no card at any width their shapes allow: each at its best width, by kind, and what would."""
    singles = {o.ways: single_layer_footprints(o.cost) for o in options}
    best: list[tuple[int, int, int]] = []        # (per-card footprint at the best width, layer, width)
    for index in range(len(table.layers)):
        size, ways = min((int(singles[o.ways][index]), o.ways) for o in options if o.allowed[index])
        if size > capacity:
            best.append((size, index, ways))
    best.sort(key=lambda item: (-item[0], item[1]))
    shares = {ways: per_card_table(table, ways)[0] for _, _, ways in best[:_SHOWN]}
    lines = []
    for _size, index, ways in best[:_SHOWN]:
        widest = max(o.ways for o in options if o.allowed[index])
        lines.append(_layer_line(table, index, breakdown(shares[ways], model, index, index), capacity,
                                 f"that is per card split {ways} ways (widths up to {widest} allowed by its shapes)"))
    if len(best) > _SHOWN:
        lines.append(f"{len(best) - _SHOWN} more layers fit no card at any split")
    size, index, ways = best[0]
    parts = breakdown(shares[ways], model, index, index)
    if parts.weight_bytes > capacity:
        whole_experts = any(s.experts for s in table.layers[index].splits)
        finer = ("experts 'tensor', every expert split by columns, splits far finer than whole experts can"
                 if whole_experts else "for presets and specs, granularity 'sublayer' plans attention and the MLP "
                 "apart, and the MLP splits by columns far beyond the heads")
        lines.append(f"its weights alone, split {ways} ways, are {format_size(parts.weight_bytes)} per card: no "
                     f"batch or sequence fits; a card of at least {format_size(size)}, a narrower dtype, or a "
                     f"finer split would ({finer})")
        return lines
    scaling = parts.activation_bytes + parts.workspace_bytes + parts.kv_cache_bytes
    lines.append(f"activations are not split: every card of a group holds the layer's whole input and output "
                 f"({format_size(parts.activation_bytes)} here); with {format_size(capacity - parts.weight_bytes)}"
                 " left after its weights share, activations, workspace and KV cache must shrink")
    if table.batch is not None and scaling > 0:
        batch = table.batch * (capacity - parts.weight_bytes) // scaling
        lines.append(f"micro-batch: about {batch} sequences per pass (now {table.batch}) would fit by a linear "
                     "estimate" if batch >= 1 else
                     f"no micro-batch fits: one sequence of {table.seq} tokens already needs more; a shorter "
                     "sequence (or prompt chunk) would")
        lines.append("micro-batch 'auto' finds the largest micro-batch that plans, exactly")
    return lines
