"""Exact partitioners: pure functions from an interval cost (numpy arrays) to contiguous runs of layers."""

from cachefit.planning.algorithms.probe import Probe, fill_exactly, greedy_probe
from cachefit.planning.algorithms.solve import (
    Solution,
    fewest_cards,
    front_fill,
    lower_bound,
    min_max,
    ordered_fill,
    ordered_min_max,
    single_layer_footprints,
)

__all__ = [
    "Probe",
    "Solution",
    "fewest_cards",
    "fill_exactly",
    "front_fill",
    "greedy_probe",
    "lower_bound",
    "min_max",
    "ordered_fill",
    "ordered_min_max",
    "single_layer_footprints",
]
