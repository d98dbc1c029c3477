"""Measure this host for the performance model: what one rank (one process, one thread, pinned to a core) gets.

- matmul rate: fp32 matrix products of 1024 x 1024 (FLOP/s = 2 n^3 / time);
- memory bandwidth: one row through linear layers of a transformer's shapes (4096 x 1024 and 1024 x 4096, fp32),
  the working set in cache (one 16 MiB matrix, within a rank's L2 + last-level share here, read over and over)
  and beyond it (8x the last-level cache), alone and with every core streaming at once (the ranks of a pipeline run together and share the bus);
- overlap: whether those layers' time with 16 and 64 rows is nearer max(bytes / bandwidth, FLOPs / rate) (loads
  and arithmetic overlap: the roofline) or their sum;
- gloo point-to-point between two processes on loopback: latency (half a round trip of 8 bytes) and bandwidth
  (16 MiB messages).
Medians of repeated timings (time.perf_counter around the operation, after a warm-up).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch

__all__ = ["HostFigures", "cache_sizes", "measure_host", "to_toml"]


@dataclass(frozen=True, slots=True)
class HostFigures:
    matmul_flops: float
    cache_bandwidth: float
    memory_bandwidth: float
    memory_bandwidth_all_cores: float
    link_latency: float
    link_bandwidth: float
    on_chip_bytes: int
    cores: int
    overlap: bool
    overlap_errors: tuple[float, float]      # relative error of (max, sum) over the rows tried


def cache_sizes() -> tuple[int, int]:
    """(L2 bytes of core 0, last-level cache bytes) from Linux sysfs; (2 MiB, 32 MiB) when not readable."""
    sizes: dict[int, int] = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip()
            kind = (index / "type").read_text().strip()
        except (OSError, ValueError):
            continue
        if kind != "Instruction" and text.endswith("K"):
            sizes[level] = int(text[:-1]) * 1024
    return sizes.get(2, 2 << 20), sizes.get(max(sizes), 32 << 20) if sizes else 32 << 20


def _median_time(operation: Callable[[], object], repeats: int) -> float:
    operation()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        operation()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _matmul_rate() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024**3 / _median_time(lambda: a @ b, 9)


_LAYER = 4096 * 1024 * 4          # bytes of one fp32 4096 x 1024 matrix


def _linear_seconds(total_bytes: int, rows: int, repeats: int = 9) -> tuple[float, int, float]:
    """Median seconds for ``rows`` rows through linear layers of ``total_bytes`` (alternating 4096 x 1024 and
    1024 x 4096), the bytes and the FLOPs of one such sweep. Small sets are swept several times per timing."""
    count = max(1, total_bytes // _LAYER)
    weights = [torch.randn(4096, 1024) if i % 2 == 0 else torch.randn(1024, 4096) for i in range(count)]
    inputs = {1024: torch.randn(rows, 1024), 4096: torch.randn(rows, 4096)}
    sweeps = max(1, (64 << 20) // (count * _LAYER))

    def sweep() -> None:
        for _ in range(sweeps):
            for weight in weights:
                torch.nn.functional.linear(inputs[weight.shape[1]], weight)
    seconds = _median_time(sweep, repeats) / sweeps
    return seconds, count * _LAYER, 2.0 * rows * count * _LAYER / 4


def _bandwidth(total_bytes: int, repeats: int = 9) -> float:
    seconds, moved, _ = _linear_seconds(total_bytes, 1, repeats)
    return moved / seconds


def _streaming_worker(core: int, matrix_bytes: int, results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    results.put(_bandwidth(matrix_bytes, 5))


def _all_cores_bandwidth(matrix_bytes: int, cores: list[int]) -> float:
    """Per-core bandwidth when every core streams its own matrix at once (the slowest core's)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_streaming_worker, args=(core, matrix_bytes, results)) for core in cores]
    for worker in workers:
        worker.start()
    values = [results.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join()
    return min(values)


def _gloo_peer(rank: int, port: int, results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    small, large = torch.zeros(1, dtype=torch.float64), torch.zeros(4 << 20)      # 8 B and 16 MiB

    def ping_pong(tensor: torch.Tensor) -> None:
        if rank == 0:
            dist.send(tensor, 1)
            dist.recv(tensor, 1)
        else:
            dist.recv(tensor, 0)
            dist.send(tensor, 0)
    latency = _median_time(lambda: ping_pong(small), 200) / 2
    per_message = _median_time(lambda: ping_pong(large), 9) / 2
    if rank == 0:
        results.put((latency, large.numel() * 4 / max(per_message - latency, 1e-9)))
    dist.barrier()
    dist.destroy_process_group()


def _gloo_link() -> tuple[float, float]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    peers = [context.Process(target=_gloo_peer, args=(rank, port, results)) for rank in (0, 1)]
    for peer in peers:
        peer.start()
    latency, bandwidth = results.get(timeout=300)
    for peer in peers:
        peer.join()
    return latency, bandwidth


def measure_host(progress: Callable[[str], None] = lambda _: None) -> HostFigures:
    """Every figure, one after the other (a few tens of seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        l2, last_level = cache_sizes()
        cores = (sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else list(range(os.cpu_count() or 1)))
        progress("matmul rate")
        flops = _matmul_rate()
        progress("bandwidth in cache")
        in_cache = _bandwidth(_LAYER, 21)
        progress("bandwidth beyond cache")
        beyond = _bandwidth(8 * last_level)
        progress("overlap of loads and arithmetic")
        overlap_errors = _overlap_errors(8 * last_level, beyond, flops)
        progress(f"bandwidth with {len(cores)} cores streaming")
        shared = _all_cores_bandwidth(8 * last_level, cores)
        progress("gloo latency and bandwidth")
        latency, link = _gloo_link()
    finally:
        torch.set_num_threads(threads)
    return HostFigures(flops, in_cache, beyond, shared, latency, link, l2 + last_level // len(cores), len(cores),
                       overlap_errors[0] <= overlap_errors[1], overlap_errors)


def _overlap_errors(total_bytes: int, bandwidth: float, flops: float) -> tuple[float, float]:
    """Mean relative error of the roofline (max) and of the sum, predicting linear layers with 16 and 64 rows."""
    errors: list[tuple[float, float]] = []
    for rows in (16, 64):
        seconds, moved, work = _linear_seconds(total_bytes, rows, 5)
        memory, compute = moved / bandwidth, work / flops
        errors.append((abs(max(memory, compute) - seconds) / seconds, abs(memory + compute - seconds) / seconds))
    return (statistics.mean(e[0] for e in errors), statistics.mean(e[1] for e in errors))


def to_toml(figures: HostFigures, name: str = "host") -> str:
    """A devices file entry (cachefit --devices-file) with every figure measured here."""
    where = f"cachefit calibrate on {socket.gethostname()}, {date.today().isoformat()}"

    def line(key: str, value: float, how: str) -> str:
        shown = str(int(value)) if key.endswith("_bytes") else f"{value:.6g}"
        return f'{key} = {{ value = {shown}, kind = "M", source = "{where}: {how}" }}\n'
    roofline, serial = figures.overlap_errors
    return (f"[{name}]\nlabel = \"this host, one rank per core ({figures.cores} cores)\"\nmemory = \"L2 + L3 share\"\n"
            + line("on_chip_bytes", figures.on_chip_bytes, "L2 of a core + its share of the last-level cache (sysfs)")
            + 'usable_fraction = { value = 1.0, kind = "A", source = "a rank may use all of its cache share" }\n'
            + line("on_chip_bandwidth", figures.cache_bandwidth, "one row through a 16 MiB fp32 linear layer, in cache, 1 thread")
            + line("off_chip_bandwidth", figures.memory_bandwidth_all_cores,
                   f"one row through fp32 linear layers beyond the caches, every core at once (alone: "
                   f"{figures.memory_bandwidth:.3g} B/s)")
            + line("fp32_flops", figures.matmul_flops, "fp32 1024^3 matrix product, 1 thread")
            + line("link_bandwidth", figures.link_bandwidth, "gloo send/recv of 16 MiB over loopback")
            + line("link_latency", figures.link_latency, "gloo send/recv of 8 bytes over loopback, half a round trip")
            + line("overlap", 1.0 if figures.overlap else 0.0,
                   f"linear layers with 16 and 64 rows: max(memory, compute) off by {roofline:.0%}, their sum by "
                   f"{serial:.0%}"))
