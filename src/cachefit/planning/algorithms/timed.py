"""Least slowest-stage time over exactly k cards, every card within its capacity (``plan --objective time``).

A stage i..j takes T(i, j) = max(compute(i, j), bytes(i, j) / bandwidth) + cut(j) (or their sum, on devices
that do not overlap them): compute time and bytes add up
over its layers (roofline per pass), the bandwidth is on-chip when the stage's footprint fits the device's on-chip
capacity and off-chip when not, and cut(j) is the transfer of layer j's output to the next card. The cut term does not
grow with the interval (a longer stage may end at a smaller activation), so bisection with a greedy probe is not
exact; a DP over cut points is: best[m][j] = min over i of max(best[m-1][i], T(i, j-1)) over stages that fit,
vectorised over i (O(k n) numpy passes of length n).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cachefit.core.memory import IntervalCost

__all__ = ["StageCosts", "TimedSolution", "least_time"]

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class StageCosts:
    """Per layer: compute seconds, bytes a pass moves, and the seconds to send its output on (the cut after it;
    the last layer's is what the last card sends back); and the device's bandwidths and on-chip capacity."""

    compute: FloatArray
    bytes: FloatArray
    cut: FloatArray
    on_chip_bandwidth: float
    off_chip_bandwidth: float
    on_chip_bytes: int
    overlap: bool = True        # max(compute, memory) (roofline); False: compute + memory

    def stage_seconds(self, first: int, last: int, footprint: int) -> float:
        bandwidth = self.on_chip_bandwidth if footprint <= self.on_chip_bytes else self.off_chip_bandwidth
        moved = float(self.bytes[first:last + 1].sum()) / bandwidth
        compute = float(self.compute[first:last + 1].sum())
        return float((max(compute, moved) if self.overlap else compute + moved) + self.cut[last])


@dataclass(frozen=True, slots=True)
class TimedSolution:
    lasts: tuple[int, ...]
    seconds: tuple[float, ...]

    @property
    def bottleneck_seconds(self) -> float:
        return max(self.seconds)


def least_time(cost: IntervalCost, costs: StageCosts, capacity: int, cards: int) -> TimedSolution | None:
    """Exactly ``cards`` contiguous stages, each within ``capacity``, with the least slowest-stage time; None when
    no such split exists."""
    n = cost.layers
    compute_prefix = np.concatenate(([0.0], np.cumsum(costs.compute)))
    bytes_prefix = np.concatenate(([0.0], np.cumsum(costs.bytes)))
    best = np.full((cards + 1, n + 1), np.inf)
    best[0, 0] = 0.0
    choice = np.zeros((cards + 1, n + 1), dtype=np.int64)
    for end in range(1, n + 1):
        footprints = cost.footprints_ending_at(end - 1)
        bandwidth = np.where(footprints <= costs.on_chip_bytes, costs.on_chip_bandwidth, costs.off_chip_bandwidth)
        moved = (bytes_prefix[end] - bytes_prefix[:end]) / bandwidth
        compute = compute_prefix[end] - compute_prefix[:end]
        seconds = (np.maximum(compute, moved) if costs.overlap else compute + moved) + costs.cut[end - 1]
        seconds = np.where(footprints <= capacity, seconds, np.inf)
        for used in range(1, min(cards, end) + 1):
            candidates = np.maximum(best[used - 1, :end], seconds)
            start = int(np.argmin(candidates))
            best[used, end], choice[used, end] = candidates[start], start
    if not np.isfinite(best[cards, n]):
        return None
    lasts, end = [], n
    for used in range(cards, 0, -1):
        lasts.append(end - 1)
        end = int(choice[used, end])
    lasts.reverse()
    firsts = [0, *[last + 1 for last in lasts[:-1]]]
    return TimedSolution(tuple(lasts), tuple(costs.stage_seconds(first, last, cost.footprint(first, last))
                                             for first, last in zip(firsts, lasts)))
