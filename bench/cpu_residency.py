"""The seed's claim on this CPU (issue 15, item 5): when a model's weights spill what one core reads at cache speed
but each half of a 2-card plan stays below it, do 2 cards decode more than twice as fast as one?

    python bench/cpu_residency.py               # both tables, for docs/benchmarks.md
    python bench/cpu_residency.py --sweep-only  # the cache sweep alone (half a minute)

1. The cache step: fp32 matrix-vector products (y = W x, one thread, W in 2 MiB blocks of 512 x 1024, read over
   and over) at working sets of 2 to 64 MiB: one core reading S bytes alone, and both cores at once, each reading
   its own S / 2 (what a 2-card plan asks of the shared last-level cache). Bandwidth = bytes read / median time.
2. A dense model (no norms, 2-matrix MLP) sized from that step: as many bytes as the working set where a core
   reading its half while the other reads the other half gains most over one core reading the whole, in as few
   blocks as a 2-card plan needs (one a card, by default: each block's per-op cost is paid every pass whatever its
   bytes, so fewer, wider blocks leave the weight reads to decide). 1 card against 2 cards at decode through
   ``cachefit run`` (one process per card, one thread each, gloo), micro-batches 1, 2, 4, tokens checked, beside
   ``cachefit predict`` on this host as ``cachefit calibrate`` measures it.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import cachefit
from _bench_model import calibrated_host, run, spec_file
from cachefit import api
from cachefit.core.spec import DenseSpec, Workload
from cachefit.runtime.calibrate import cache_sizes
from cachefit.runtime.launch import RunOptions
from cachefit.runtime.summary import summarise
from cachefit.sources import TorchOptions

MIB = 1 << 20
SIZES_MIB = (2, 4, 8, 12, 16, 20, 24, 28, 32, 48, 64, 96, 128, 192, 256)
BLOCK = (512, 1024)                                    # one 2 MiB fp32 matrix of the sweep
SMALLEST_MIB = 8                                       # below it a decode pass is mostly per-op cost, not bytes
VOCAB = 256
BATCH, PROMPT, NEW = 4, 8, 64


def model_spec(total_mib: float, blocks: int) -> DenseSpec:
    """A dense model of ``blocks`` blocks with about ``total_mib`` of fp32 weights: hidden d (a multiple of 64,
    64-wide heads) and MLP d, so a block holds 4 d^2 (attention) + 2 d^2 (MLP) weights, 24 d^2 bytes."""
    width = 64 * max(1, round((total_mib * MIB / (24 * blocks)) ** 0.5 / 64))
    return DenseSpec(f"residency-dense{blocks}-d{width}", layers=blocks, heads=width // 64, head_dim=64,
                     mlp_hidden=width, vocab=VOCAB)


def best_set(sweep: dict[int, tuple[float, float]]) -> tuple[int, float]:
    """The working set (MiB, at least SMALLEST_MIB) where a core reading its half while the other core reads the
    other half gains most over one core reading the whole, and that gain: the ceiling the sweep sets on a
    weight-bound 2-card decode speed-up at M = 2 (each card reads its half once per micro-batch: per step as many
    bytes as one card reading the whole once, at the half's rate)."""
    ratios = {size: together / 2 / alone for size, (alone, together) in sweep.items() if size >= SMALLEST_MIB}
    size = max(ratios, key=ratios.__getitem__)
    return size, ratios[size]


def _sweep_seconds(total_bytes: int, repeats: int = 31) -> float:
    """Median seconds to read ``total_bytes`` of weights once through matrix-vector products (one thread)."""
    blocks = [torch.randn(*BLOCK) for _ in range(max(1, total_bytes // (BLOCK[0] * BLOCK[1] * 4)))]
    return _median_sweep(blocks, functools.partial(torch.mv, vec=torch.randn(BLOCK[1])), repeats)


def _median_sweep(weights: list[torch.Tensor], product: Callable[[torch.Tensor], object], repeats: int) -> float:
    """Median seconds of ``product`` over every matrix in ``weights``, ``repeats`` times after 5 to warm."""
    times = []
    for index in range(repeats + 5):
        start = time.perf_counter()
        for weight in weights:
            product(weight)
        if index >= 5:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _worker(core: int, total_bytes: int, barrier: Any, results: Any) -> None:
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    _sweep_seconds(total_bytes, 3)                     # warm: pages touched, caches filled
    barrier.wait()
    results.put(_sweep_seconds(total_bytes))


def _both_cores(total_bytes: int, cores: tuple[int, int]) -> float:
    """Bytes per second both cores read together, each its own ``total_bytes`` at once (the slower one's time)."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_worker, args=(core, total_bytes, barrier, results)) for core in cores]
    for worker in workers:
        worker.start()
    seconds: float = max(results.get(timeout=300) for _ in workers)
    for worker in workers:
        worker.join()
    return 2 * total_bytes / seconds


def sweep(console: Console) -> dict[int, tuple[float, float]]:
    """The table; returns by working set (MiB) one core's bytes per second and both cores' together."""
    os.sched_setaffinity(0, {0})
    torch.set_num_threads(1)
    view = Table(title="fp32 matrix-vector reads: one core alone vs both cores at once (each half the set)")
    for header in ("working set S MiB", "1 core GB/s", "2 cores, S/2 each: total GB/s", "per core / 1 core"):
        view.add_column(header, justify="right")
    rates = {}
    for size in SIZES_MIB:
        alone = size * MIB / _sweep_seconds(size * MIB)
        together = _both_cores(size * MIB // 2, (0, 1))
        rates[size] = (alone, together)
        view.add_row(str(size), f"{alone / 1e9:.1f}", f"{together / 1e9:.1f}", f"{together / 2 / alone:.2f}x")
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    console.print(view)
    return rates


def decode(folder: Path, devices: Path, spec: DenseSpec, cards: int, micro: int) -> dict[str, Any]:
    work = Workload(batch=BATCH, seq=PROMPT + NEW, phase="decode", dtype="float32")
    table = cachefit.load_model(spec_file(folder, work, spec), torch_options=TorchOptions(measure=True))
    plan = cachefit.plan(table, capacity=1 << 40, cards=cards, memory_model="pipeline")
    options = RunOptions(PROMPT, NEW, micro, check=True, timeout=300)
    plan_file, result = run(folder, plan, work, options, f"k{cards}-m{micro}", spec)
    measured = summarise(result.ranks, BATCH, PROMPT, NEW)
    predicted, _ = api.predict(plan_file, device="host", devices_file=devices, micro_batches=micro,
                               prompt_len=PROMPT, chunk=1)
    weights = [p.weight_bytes for p in plan.partitions]
    return {"cards": cards, "micro": micro, "measured": measured, "predicted": predicted, "weights": weights,
            "identical": bool(result.checked and result.checked["tokens_identical"])}


def rows_table(console: Console, spec: DenseSpec) -> None:
    """What a decode pass's products read at: ``rows`` rows (a micro-batch's sequences) through the model's d x d
    fp32 matrices, one core alone, for half the model's weights (a card's of 2) and the whole (one card's). One row
    is a matrix-vector product, the sweep's kernel; a few rows take another kernel, whose rate may hide the step."""
    os.sched_setaffinity(0, {0})
    torch.set_num_threads(1)
    width = spec.heads * spec.head_dim
    view = Table(title=f"fp32 linear layers of {width} x {width}, one core: GB/s by rows per pass")
    for header in ("weights MiB", "1 row", "2 rows", "4 rows"):
        view.add_column(header, justify="right")
    whole = spec.layers * 24 * width * width
    for total in (whole // 2, whole):
        weights = [torch.randn(width, width) for _ in range(max(1, total // (4 * width * width)))]
        rates = []
        for rows in (1, 2, 4):
            product = functools.partial(torch.nn.functional.linear, torch.randn(rows, width))
            rates.append(len(weights) * 4 * width * width / _median_sweep(weights, product, 31))
        view.add_row(f"{total / MIB:.1f}", *(f"{rate / 1e9:.1f}" for rate in rates))
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    console.print(view)


def model_table(console: Console, spec: DenseSpec) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        devices = calibrated_host(folder, console)
        runs = [decode(folder, devices, spec, cards, micro) for cards in (1, 2) for micro in (1, 2, 4)]
    best_one = max(r["measured"].decode_tokens_per_s for r in runs if r["cards"] == 1)
    view = Table(title=f"{spec} decode, batch {BATCH}: cachefit run vs cachefit predict (calibrated host)")
    for header in ("cards", "micro-batches", "weights per card MiB", "decode tok/s", "vs best 1 card",
                   "TPOT ms", "predicted TPOT ms", "err", "compute / wait / send s per rank", "tokens ok"):
        view.add_column(header, justify="right")
    for result in runs:
        measured, predicted = result["measured"], result["predicted"]
        view.add_row(str(result["cards"]), str(result["micro"]),
                     ", ".join(f"{w / MIB:.1f}" for w in result["weights"]),
                     f"{measured.decode_tokens_per_s:.0f}", f"{measured.decode_tokens_per_s / best_one:.2f}x",
                     f"{measured.tpot_median_ms:.2f}", f"{predicted.decode_tpot_s * 1e3:.2f}",
                     f"{(predicted.decode_tpot_s * 1e3 - measured.tpot_median_ms) / measured.tpot_median_ms:+.0%}",
                     "; ".join(f"{c.compute_s:.2f} / {c.wait_s:.2f} / {c.send_s:.2f}" for c in measured.cards),
                     str(result["identical"]))
    console.print(view)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep-only", action="store_true", help="the cache sweep alone")
    parser.add_argument("--size-mib", type=float, help="the model's weights in MiB (default: from the sweep)")
    parser.add_argument("--blocks", type=int, default=2, help="its blocks (default 2: one a card)")
    args = parser.parse_args()
    console = Console(width=170)
    l2, last = cache_sizes()
    console.print(f"{platform.machine()}, {os.cpu_count()} cores, L2 {l2 // MIB} MiB per core, last level "
                  f"{last // MIB} MiB (sysfs), torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; "
                  f"batch {BATCH}, prompt {PROMPT}, new {NEW}")
    size, ceiling = best_set(sweep(console))
    console.print(f"largest per-core gain from halving the set (sets >= {SMALLEST_MIB} MiB): {ceiling:.2f}x at "
                  f"{size} MiB; a weight-bound 2-card decode at M = 2 can gain about that over one card")
    if not args.sweep_only:
        spec = model_spec(args.size_mib or size, args.blocks)
        rows_table(console, spec)
        model_table(console, spec)


if __name__ == "__main__":
    main()
