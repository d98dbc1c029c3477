"""Slow, obviously-correct references: footprints straight from DESIGN.md's formulas, partitions by enumeration."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from fractions import Fraction

from cachefit.core.layers import LayerTable


def footprint(table: LayerTable, model: str, first: int, last: int) -> int:
    """DESIGN.md: sum = sum(W+K+A+B); peak = sum(W+K) + max(in_l + A_l + B_l); pipeline = peak + the largest
    activation between layers; plus shared tensors whose owner is outside the partition and which a layer inside
    uses (counted once each)."""
    if last < first:
        return 0
    layers = table.layers
    inside = range(first, last + 1)
    names = {layers[i].name for i in inside}
    shared = {(s.owner, s.tensor): s.bytes for i in inside for s in layers[i].shared if s.owner not in names}
    weights_kv = sum(layers[i].weight_bytes + layers[i].kv_cache_bytes for i in inside) + sum(shared.values())
    if model == "sum":
        return weights_kv + sum(layers[i].activation_bytes + layers[i].workspace_bytes for i in inside)
    def incoming(i: int) -> int:
        return table.input_bytes if i == 0 else layers[i - 1].activation_bytes
    # pipeline: a receive buffer of the largest activation passed between layers, on every card
    receive = max((x.activation_bytes for x in layers[:-1]), default=0) if model == "pipeline" else 0
    return weights_kv + receive + max(incoming(i) + layers[i].activation_bytes + layers[i].workspace_bytes
                                      for i in inside)


def compositions(layers: int, cards: int) -> Iterator[list[tuple[int, int]]]:
    """Every split of 0..layers-1 into ``cards`` non-empty contiguous runs, as (first, last) pairs."""
    for cuts in itertools.combinations(range(1, layers), cards - 1):
        bounds = (0, *cuts, layers)
        yield [(bounds[c], bounds[c + 1] - 1) for c in range(cards)]


def best_bottleneck(table: LayerTable, model: str, cards: int) -> int:
    return min(max(footprint(table, model, a, b) for a, b in runs)
               for runs in compositions(len(table.layers), cards))


def fewest_cards(table: LayerTable, model: str, capacity: int) -> int | None:
    for cards in range(1, len(table.layers) + 1):
        if best_bottleneck(table, model, cards) <= capacity:
            return cards
    return None


def ordered_runs(layers: int, cards: int) -> Iterator[list[tuple[int, int]]]:
    """Every assignment of the layers, in order, to ``cards`` cards in order, where a card may be empty."""
    for cuts in itertools.combinations_with_replacement(range(layers + 1), cards - 1):
        bounds = (0, *cuts, layers)
        yield [(bounds[c], bounds[c + 1] - 1) for c in range(cards)]


def best_ordered_fill(table: LayerTable, model: str, capacities: list[int]) -> Fraction | None:
    """The least max(footprint / capacity) over ordered assignments that fit every card, or None."""
    best: Fraction | None = None
    for runs in ordered_runs(len(table.layers), len(capacities)):
        sizes = [footprint(table, model, a, b) for a, b in runs]
        if all(size <= capacity for size, capacity in zip(sizes, capacities)):
            fill = max(Fraction(size, capacity) for size, capacity in zip(sizes, capacities))
            best = fill if best is None or fill < best else best
    return best
