"""Planner speed: the exact min-max partitioner against one prefix-sum pass, and against DeepSpeed.

    python bench/planner.py                 # the table for docs/benchmarks.md
    python bench/planner.py --deepspeed     # also DeepSpeed's partition_balanced (needs deepspeed installed)

Tables are random (uniform per-layer bytes, seeded); "partitioner" is the whole call from per-layer arrays to an
optimal plan: IntervalCost (prefix sums) + min_max (bisection with next-fit probes + exactly-k fill). The ratio
divides it by one numpy.cumsum over the same n int64 values, timed in the same process right before.
Targets (issue 2): n = 1e6, k = 1024 within 10x the prefix sum (sum) and 20x (peak).
"""

from __future__ import annotations

import argparse
import itertools
import platform
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from cachefit.core.memory import IntervalCost
from cachefit.planning.algorithms import min_max

TARGET = {"sum": 10.0, "peak": 20.0}


def best_of(function: Callable[[], Any], repeats: int) -> float:
    """Least wall time of ``repeats`` calls (the least is the one least disturbed by the machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def tables(layers: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Layer weights up to 1 GB, transients (in + out activation + workspace) up to 100 MB.
    return rng.integers(0, 10**9, layers, dtype=np.int64), rng.integers(0, 10**8, layers, dtype=np.int64)


def planner_rows(sizes: list[int], cards: list[int], repeats: int) -> list[dict[str, Any]]:
    rows = []
    for layers in sizes:
        additive, transient = tables(layers, seed=layers)
        for count in cards:
            if count > layers:
                continue
            for model in ("sum", "peak"):
                prefix = best_of(partial(np.cumsum, additive), repeats * 3)
                extra = None if model == "sum" else transient
                solution = min_max(IntervalCost(additive, extra), count)
                elapsed = best_of(partial(_plan, additive, extra, count), repeats)
                rows.append({"n": layers, "k": count, "model": model, "partitioner_ms": elapsed * 1e3,
                             "cumsum_ms": prefix * 1e3, "ratio": elapsed / prefix, "probes": solution.probes,
                             "bottleneck": solution.bottleneck})
    return rows


def _plan(additive: np.ndarray, transient: np.ndarray | None, cards: int) -> Any:
    return min_max(IntervalCost(additive, transient), cards)


DEEPSPEED_TABLES = {"bytes, uniform 0..1e9": 10**9, "small weights, uniform 0..100": 100}


def deepspeed_rows(repeats: int) -> list[dict[str, Any]] | None:
    """n = 1000, k = 16 under ``sum`` (weights only): DeepSpeed's partition_balanced against min_max."""
    try:
        from deepspeed.runtime.utils import partition_balanced
    except ImportError:
        return None
    rows = []
    for label, largest in DEEPSPEED_TABLES.items():
        weights = np.random.default_rng(1000).integers(0, largest, 1000, dtype=np.int64)
        listed = [int(w) for w in weights]
        ours = min_max(IntervalCost(weights), 16)
        parts = partition_balanced(weights=listed, num_parts=16)
        theirs = max(sum(listed[a:b]) for a, b in itertools.pairwise(parts))
        ours_s = best_of(partial(_plan, weights, None, 16), repeats * 5)
        theirs_s = best_of(partial(partition_balanced, weights=listed, num_parts=16), repeats)
        rows.append({"table": label, "ours_ms": ours_s * 1e3, "deepspeed_ms": theirs_s * 1e3,
                     "speedup": theirs_s / ours_s, "ours": ours.bottleneck, "deepspeed": theirs})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--deepspeed", action="store_true", help="compare with deepspeed's partition_balanced")
    parser.add_argument("--quick", action="store_true", help="n <= 1e5 only")
    args = parser.parse_args()
    console = Console(width=140)
    console.print(f"{platform.processor() or platform.machine()}, {platform.python_implementation()} "
                  f"{platform.python_version()}, numpy {np.__version__}, {time.strftime('%Y-%m-%d')}")
    sizes = [10**3, 10**4, 10**5] + ([] if args.quick else [10**6])
    view = Table(title="exact min-max partitioner vs one prefix sum (best of repeats)")
    for header in ("n", "k", "model", "partitioner ms", "cumsum ms", "ratio", "probes", "target"):
        view.add_column(header, justify="right")
    for row in planner_rows(sizes, [16, 256, 1024], args.repeats):
        target = f"<= {TARGET[row['model']]:.0f}x" if (row["n"], row["k"]) == (10**6, 1024) else ""
        view.add_row(f"{row['n']:.0e}", str(row["k"]), row["model"], f"{row['partitioner_ms']:.2f}",
                     f"{row['cumsum_ms']:.3f}", f"{row['ratio']:.1f}x", str(row["probes"]), target)
    console.print(view)
    if args.deepspeed:
        rows = deepspeed_rows(args.repeats)
        if rows is None:
            console.print("deepspeed is not installed; see docs/benchmarks.md for the throwaway environment")
            return
        versus = Table(title="n = 1000, k = 16, sum model: DeepSpeed partition_balanced vs cachefit min_max")
        for header in ("table", "cachefit ms", "DeepSpeed ms", "speed-up", "cachefit bottleneck",
                       "DeepSpeed bottleneck"):
            versus.add_column(header, justify="right")
        for row in rows:
            versus.add_row(row["table"], f"{row['ours_ms']:.3f}", f"{row['deepspeed_ms']:.1f}",
                           f"{row['speedup']:.0f}x", str(row["ours"]), str(row["deepspeed"]))
        console.print(versus)


if __name__ == "__main__":
    main()
