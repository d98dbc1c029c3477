"""Measure this host for the performance model: what one rank (one process, one thread, pinned to a core) gets.

- matmul rate: fp32 matrix products of 1024 x 1024 (FLOP/s = 2 n^3 / time);
- memory bandwidth: one row through linear layers of a transformer's shapes (4096 x 1024 and 1024 x 4096, fp32),
  the working set in cache (one 16 MiB matrix, within a rank's L2 + last-level share here, read over and over)
  and beyond it (8x the last-level cache), alone and with every core streaming at once (the ranks of a pipeline
  run together and share the bus);
- a fit of those layers' time with 4, 16 and 64 rows to bytes / B + FLOPs / R (the rate R of such products, and
  the bandwidth B), and whether that sum or the roofline max(bytes / B, FLOPs / R) fits better (overlap);
- gloo point-to-point between two processes on loopback: latency as a pipeline's hop (each rank computing, then
  sending without waiting and blocking on the next receive: half a round trip less one pass; an idle ping-pong of
  8 bytes is kept in the figure's source), bandwidth (16 MiB messages), and an all-reduce of 16 KiB (the
  collective's latency per ring step);
- the fixed costs of a pass (issue 15): cachefit's reference model of each family at tiny widths (hidden 64, its
  bytes and FLOPs negligible), 1 and 5 blocks, decoding one token per pass with a KV cache: t(L) = pass + L x block
  through both points gives the cost of a block (``layer_seconds_<family>``) and of what a pass has besides its
  blocks (embedding, head, the loop: ``pass_seconds``, the two families' mean); the same for transformers' own
  Llama (``layer_seconds_hf``, ``pass_seconds_hf``: its mask, rotary tables and output records are per pass),
  where transformers is installed: what a Hugging Face stage's pass pays besides its products.
Medians of repeated timings (time.perf_counter around the operation, after a warm-up).
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch

from cachefit.runtime.idle import idle_transport_threads

__all__ = ["HostFigures", "cache_sizes", "measure_host", "to_toml"]


@dataclass(frozen=True, slots=True)
class HostFigures:
    linear_flops: float                      # the fitted rate of transformer-shaped linear layers
    matmul_flops: float                      # a large square product, for reference
    cache_bandwidth: float
    memory_bandwidth: float
    memory_bandwidth_all_cores: float
    link_latency: float
    link_bandwidth: float
    allreduce_seconds: float                 # two ranks, 16 KiB
    on_chip_bytes: int
    cores: int
    overlap: bool
    overlap_errors: tuple[float, float]      # relative error of (max, sum) over the rows tried
    idle_link_latency: float = 0.0           # an idle ping-pong's half round trip (link_latency: a busy hop)
    pass_seconds: float = 0.0                # a pass's fixed cost besides its blocks
    layer_seconds: tuple[tuple[str, float], ...] = ()    # (family, fixed seconds of one block)
    hf_pass_seconds: float | None = None     # a transformers pass's fixed cost besides its blocks (None: not measured)


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


ROWS = (4, 16, 64)                 # rows per pass the fit uses: micro-batches of a few sequences to prompt chunks


def _fit(total_bytes: int) -> tuple[float, float, float, float]:
    """Least-squares fit of t = bytes / B + FLOPs / R over ``ROWS``: (B, R), and the mean relative error of that
    sum and of the roofline max(bytes / B, FLOPs / R) with the same B and R."""
    timings = [_linear_seconds(total_bytes, rows, 5) for rows in ROWS]
    moved = timings[0][1]
    flops = [work for _, _, work in timings]
    seconds = [t for t, _, _ in timings]
    mean_f, mean_t = statistics.mean(flops), statistics.mean(seconds)
    slope = (sum((f - mean_f) * (t - mean_t) for f, t in zip(flops, seconds))
             / sum((f - mean_f) ** 2 for f in flops))
    intercept = max(mean_t - slope * mean_f, 1e-9)
    bandwidth, rate = moved / intercept, 1.0 / slope
    serial = statistics.mean(abs(intercept + f * slope - t) / t for f, t in zip(flops, seconds))
    roofline = statistics.mean(abs(max(intercept, f * slope) - t) / t for f, t in zip(flops, seconds))
    return bandwidth, rate, roofline, serial


def _bandwidth_at(total_bytes: int, rate: float, repeats: int = 9) -> float:
    """Bandwidth of a 4-row pass once its arithmetic (FLOPs / rate) is taken out."""
    seconds, moved, work = _linear_seconds(total_bytes, ROWS[0], repeats)
    return moved / max(seconds - work / rate, 1e-9)


def _streaming_worker(core: int, matrix_bytes: int, rate: float, results: multiprocessing.Queue  # type: ignore[type-arg]
                      ) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    results.put(_bandwidth_at(matrix_bytes, rate, 5))


def _all_cores_bandwidth(matrix_bytes: int, rate: float, cores: list[int]) -> float:
    """Per-core bandwidth when every core streams its own matrices at once (the slowest core's)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_streaming_worker, args=(core, matrix_bytes, rate, results))
               for core in cores]
    for worker in workers:
        worker.start()
    values = [results.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join()
    return min(values)


def _gloo_peer(rank: int, store: str, results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    import torch.distributed as dist

    # As cachefit run does: a file store (no port) and gloo on loopback only.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)            # a rank's default (cachefit run --threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    idle_transport_threads()            # as a rank of cachefit run schedules gloo's loop thread
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
    reduced = torch.zeros(4 * 1024)                     # 16 KiB: 4 rows of a 1024-wide hidden state
    allreduce = _median_time(lambda: dist.all_reduce(reduced), 200)
    hop = _busy_hop(rank)
    if rank == 0:
        results.put((max(latency, hop), large.numel() * 4 / max(per_message - latency, 1e-9), allreduce, latency))
    dist.barrier()
    dist.destroy_process_group()


def _busy_hop(rank: int, steps: int = 100) -> float:
    """A hop as a pipeline takes it: each rank computes (a pass of small products, ~1 ms), sends without waiting
    (isend) and blocks on the next receive, as cachefit run's ranks do; a round trip is two passes and two hops.
    With both cores computing, a message waits for its receiver's gloo loop thread (idle-scheduled, as in a run)
    to get a core: the hop costs more than an idle ping-pong (64-75 against 44-53 us here, 2026-12-04)."""
    import torch.distributed as dist

    block = torch.randn(64, 64)

    def work() -> None:
        for _ in range(100):
            block @ block
    compute = 0.0
    for turn in (0, 1):                 # each rank's pass timed while the other waits, as in the ring
        if rank == turn:
            compute = _median_time(work, 20)
        dist.barrier()
    handles, times = [], []
    for _ in range(steps):
        began, inbox = time.perf_counter(), torch.zeros(1, dtype=torch.float64)
        if rank == 0:
            work()
            handles.append(dist.isend(torch.zeros(1, dtype=torch.float64), 1))
            dist.recv(inbox, 1)
        else:
            dist.recv(inbox, 0)
            work()
            handles.append(dist.isend(torch.zeros(1, dtype=torch.float64), 0))
        times.append(time.perf_counter() - began)
    for handle in handles:
        if handle is not None:
            handle.wait()
    return max(statistics.median(times[10:]) / 2 - compute, 0.0)


def _gloo_link() -> tuple[float, float, float, float]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory(prefix="cachefit-calibrate-") as folder:
        store = str(Path(folder) / "store")
        peers = [context.Process(target=_gloo_peer, args=(rank, store, results)) for rank in (0, 1)]
        for peer in peers:
            peer.start()
        latency, bandwidth, allreduce, idle = results.get(timeout=300)
        for peer in peers:
            peer.join()
    return latency, bandwidth, allreduce, idle


_PROBE_BLOCKS = (1, 5)
_WARM = 10                          # passes before the timed ones


def _median_decode_pass(step: Callable[[int], object], passes: int) -> float:
    """Median seconds of ``step(position)``, one decode pass at each position, over ``passes`` after the warm."""
    times = []
    with torch.no_grad():
        for position in range(passes + _WARM):
            start = time.perf_counter()
            step(position)
            if position >= _WARM:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def _pass_seconds(family: str, blocks: int, passes: int = 60) -> float:
    """Median seconds of one decode pass (one token, batch 1, KV cache) of the tiny reference model."""
    from cachefit.core.spec import DenseSpec, LlamaSpec
    from cachefit.nn import KVCache, build_model

    spec = (DenseSpec("probe", layers=blocks, heads=2, head_dim=32, mlp_hidden=128, vocab=64) if family == "dense"
            else LlamaSpec("probe", layers=blocks, hidden=64, heads=2, kv_heads=1, ffn_hidden=128, vocab=64))
    model = build_model(spec, seed=0)
    config = model.config
    caches = [KVCache(1, config.kv_heads, passes + _WARM, config.head_dim, torch.float32) for _ in range(blocks)]
    token = torch.zeros(1, 1, dtype=torch.long)
    return _median_decode_pass(lambda position: model(token, caches, position), passes)


def _hf_pass_seconds(blocks: int, passes: int = 60) -> float:
    """Median seconds of one decode pass (one token, batch 1, a StaticCache) of transformers' Llama at tiny widths,
    called as a Hugging Face stage calls it (runtime/hf_stage.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM, StaticCache

    from cachefit.sources.hf import cache_argument

    config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=blocks, num_attention_heads=2, num_key_value_heads=1,
                                  max_position_embeddings=passes + _WARM)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    cache = {cache_argument(model): StaticCache(config=config, max_cache_len=passes + _WARM)}
    token = torch.zeros(1, 1, dtype=torch.long)
    return _median_decode_pass(lambda position: model(input_ids=token, use_cache=True, logits_to_keep=1,
                                                      position_ids=torch.tensor([[position]]), **cache), passes)


def _through_two_points(measure: Callable[[int], float]) -> tuple[float, float]:
    """(pass, block) seconds from t(L) = pass + L x block at the two probe sizes."""
    few, many = _PROBE_BLOCKS
    small, large = measure(few), measure(many)
    block = max((large - small) / (many - few), 0.0)
    return max(small - few * block, 0.0), block


def _fixed_costs() -> tuple[float, tuple[tuple[str, float], ...], float | None]:
    """(pass seconds, ((family, block seconds), ...), transformers' pass seconds or None)."""
    passes, blocks = [], []
    for family in ("dense", "llama"):
        fixed, block = _through_two_points(functools.partial(_pass_seconds, family))
        blocks.append((family, block))
        passes.append(fixed)
    try:
        hf_pass, hf_block = _through_two_points(_hf_pass_seconds)
    except ImportError:                      # transformers not installed: no Hugging Face figures
        return statistics.mean(passes), tuple(blocks), None
    return statistics.mean(passes), (*blocks, ("hf", hf_block)), hf_pass


def measure_host(progress: Callable[[str], None] = lambda _: None) -> HostFigures:
    """Every figure, one after the other (a few tens of seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        l2, last_level = cache_sizes()
        cores = (sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else list(range(os.cpu_count() or 1)))
        progress("matmul rate")
        matmul = _matmul_rate()
        progress("linear layers beyond cache, 4 to 64 rows")
        beyond, rate, roofline, serial = _fit(8 * last_level)
        progress("bandwidth in cache")
        in_cache = _bandwidth_at(_LAYER, rate, 21)
        progress(f"bandwidth with {len(cores)} cores streaming")
        shared = _all_cores_bandwidth(8 * last_level, rate, cores)
        progress("gloo latency, bandwidth and all-reduce")
        latency, link, allreduce, idle = _gloo_link()
        progress("fixed costs of a pass and of a block")
        fixed, blocks, hf_pass = _fixed_costs()
    finally:
        torch.set_num_threads(threads)
    return HostFigures(rate, matmul, in_cache, beyond, shared, latency, link, allreduce,
                       l2 + last_level // len(cores), len(cores), roofline <= serial, (roofline, serial), idle,
                       fixed, blocks, hf_pass)


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
            + line("on_chip_bandwidth", figures.cache_bandwidth,
                   "4 rows through a 16 MiB fp32 linear layer in cache, arithmetic taken out, 1 thread")
            + line("off_chip_bandwidth", figures.memory_bandwidth_all_cores,
                   f"4 rows through fp32 linear layers beyond the caches, arithmetic taken out, every core at once "
                   f"(alone, fitted over 4-64 rows: {figures.memory_bandwidth:.3g} B/s)")
            + line("fp32_flops", figures.linear_flops,
                   f"fp32 linear layers of 4-64 rows, fitted with the bandwidth; 1 thread (a 1024^3 product: "
                   f"{figures.matmul_flops:.3g} FLOP/s)")
            + line("link_bandwidth", figures.link_bandwidth, "gloo send/recv of 16 MiB over loopback")
            + line("link_latency", figures.link_latency,
                   "a gloo hop over loopback between two busy ranks (compute, isend, blocking recv: half a round "
                   f"trip less one pass); idle ping-pong of 8 bytes {figures.idle_link_latency:.3g} s")
            + line("collective_latency", max(figures.allreduce_seconds / 2 - 16384 / figures.link_bandwidth, 1e-9),
                   f"gloo all-reduce of 16 KiB on 2 ranks ({figures.allreduce_seconds:.3g} s) = 2 ring steps")
            + line("overlap", 1.0 if figures.overlap else 0.0,
                   f"linear layers with 16 and 64 rows: max(memory, compute) off by {roofline:.0%}, their sum by "
                   f"{serial:.0%}")
            + _fixed_lines(figures, line))


def _fixed_lines(figures: HostFigures, line: Callable[[str, float, str], str]) -> str:
    if not figures.layer_seconds:
        return ""
    few, many = _PROBE_BLOCKS
    points = f"(hidden 64, one token, 1 thread) at {few} and {many} blocks"
    how = {"dense": f"a decode pass of cachefit's tiny reference model {points}",
           "hf": f"a decode pass of transformers' Llama {points}, as a Hugging Face stage runs it"}
    how["llama"] = how["dense"]
    lines = line("pass_seconds", figures.pass_seconds, f"{how['dense']}: what a pass costs besides its blocks "
                 "(both families' mean)")
    if figures.hf_pass_seconds is not None:
        lines += line("pass_seconds_hf", figures.hf_pass_seconds, f"{how['hf']}: what a pass costs besides its blocks")
    return lines + "".join(line(f"layer_seconds_{family}", seconds, f"{how[family]}: one {family} block")
                           for family, seconds in figures.layer_seconds)
