"""Planner speed: the exact min-max partitioner against one prefix-sum pass, the whole ``cachefit.plan`` call
around it, the CLI on a CSV table, and DeepSpeed.

    python bench/planner.py                 # the tables for docs/benchmarks.md
    python bench/planner.py --deepspeed     # also DeepSpeed's partition_balanced (needs deepspeed installed)

Tables are random (uniform per-layer bytes, seeded); "partitioner" is the whole call from per-layer arrays to an
optimal plan: IntervalCost (prefix sums) + min_max (bisection with next-fit probes + exactly-k fill). The ratio
divides it by one numpy.cumsum over the same n int64 values, timed in the same process right before.
Targets (issue 2): n = 1e6, k = 1024 within 10x the prefix sum (sum) and 20x (peak). Issue 15: ``cachefit.plan``
(a fresh LayerTable each call: its fingerprint not yet cached) within 20x the prefix sum at n = 1e6, k = 1024, and
within 3x the partitioner at every n; ``cachefit plan FILE.csv --cards 1024 --format json -o`` (a new process:
imports, reading, planning, writing) within 2 s and 400 MB peak RSS at 1e6 rows, 0.3 s at 1e4.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

import cachefit
from cachefit.core.columns import LayerColumns
from cachefit.core.layers import LayerTable
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


def layer_table(layers: int, seed: int) -> LayerTable:
    """A random table of ``layers`` rows: weights as ``tables``, activations from its transients."""
    weights, transient = tables(layers, seed)
    sizes = np.zeros((layers, 4), dtype=np.int64)
    sizes[:, 0], sizes[:, 1] = weights, transient // 2
    names = tuple(f"layers.{i}" for i in range(layers))
    return LayerTable("bench", LayerColumns(names, sizes, np.zeros(layers), {}))


def api_rows(sizes: list[int], count: int, repeats: int) -> list[dict[str, Any]]:
    """cachefit.plan on a fresh table (cold: fingerprint and columns computed in the call) against the
    partitioner on the same arrays (additive = weights, the peak model's extra = the largest activation pair)."""
    rows = []
    for layers in (n for n in sizes if n >= count):
        capacity = int(2 * 10**9 * layers / count)
        for model in ("sum", "peak"):
            table = layer_table(layers, seed=layers)
            prefix = best_of(partial(np.cumsum, table.columns.weight_bytes), repeats * 3)
            weights, transient = tables(layers, seed=layers)
            inner = best_of(partial(_plan, weights, None if model == "sum" else transient, count), repeats)
            cold = min(_fresh_plan(layer_table(layers, seed=layers), capacity, count, model) for _ in range(repeats))
            warm = best_of(partial(cachefit.plan, table, capacity, cards=count, memory_model=model), repeats)
            rows.append({"n": layers, "model": model, "cold_ms": cold * 1e3, "warm_ms": warm * 1e3,
                         "partitioner_ms": inner * 1e3, "cumsum_ms": prefix * 1e3})
    return rows


def _fresh_plan(table: LayerTable, capacity: int, count: int, model: str) -> float:
    start = time.perf_counter()
    cachefit.plan(table, capacity, cards=count, memory_model=model)  # type: ignore[arg-type]
    return time.perf_counter() - start


def cli_rows(sizes: list[int], count: int) -> list[dict[str, Any]]:
    """``cachefit plan FILE.csv --cards K --format json -o`` in a new process, one per size: wall time and the
    child's peak RSS (getrusage of the children, each size in a fresh probe process so peaks do not carry)."""
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for layers in sizes:
            source = f"{scratch}/t{layers}.csv"
            layer_table(layers, seed=layers).write(source)
            probe = ("import resource, subprocess, sys, time; start = time.perf_counter(); "
                     "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
                     "print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
            command = [sys.executable, "-c", probe, sys.executable, "-m", "cachefit", "plan", source,
                       "--capacity", str(int(2 * 10**9 * layers / count)), "--cards", str(count),
                       "--format", "json", "-o", f"{scratch}/p{layers}.json"]
            runs = [subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()
                    for _ in range(3)]
            seconds, peak = min(float(wall) for wall, _ in runs), max(int(rss) for _, rss in runs)
            rows.append({"n": layers, "s": seconds, "rss_mb": peak / 1024})
    return rows


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
    api = Table(title="cachefit.plan (k = 1024) vs the partitioner inside it (best of repeats)")
    for header in ("n", "model", "plan ms, fresh table", "plan ms, same table", "partitioner ms", "plan / part.",
                   "plan / cumsum", "target"):
        api.add_column(header, justify="right")
    for row in api_rows(sizes, 1024, args.repeats):
        target = "<= 3x part." + (", <= 20x cumsum" if row["n"] == 10**6 else "")
        api.add_row(f"{row['n']:.0e}", row["model"], f"{row['cold_ms']:.1f}", f"{row['warm_ms']:.1f}",
                    f"{row['partitioner_ms']:.2f}", f"{row['cold_ms'] / row['partitioner_ms']:.1f}x",
                    f"{row['cold_ms'] / row['cumsum_ms']:.0f}x", target)
    console.print(api)
    cli = Table(title="cachefit plan FILE.csv --cards 1024 --format json -o (new process, best wall of 3)")
    for header in ("rows", "wall s", "peak RSS MB", "target"):
        cli.add_column(header, justify="right")
    for row in cli_rows([10**4, *sizes[-1:]], 1024):
        cli.add_row(f"{row['n']:.0e}", f"{row['s']:.2f}", f"{row['rss_mb']:.0f}",
                    "<= 2 s, 400 MB" if row["n"] == 10**6 else "<= 0.3 s" if row["n"] <= 10**4 else "")
    console.print(cli)
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
