"""Why tensor groups are slower than the performance model says on this host (docs/perf-model.md): a gloo
all-reduce of 16 KiB between two ranks (one pinned core and one thread each), back to back, and right after each
rank computes a slice of work (four 4-row linear layers of 4096 x 1024, fp32), as a tensor group's block does;
with gloo's loop thread as gloo starts it, and SCHED_IDLE as cachefit run's ranks have it (runtime/idle.py).

    python bench/allreduce_under_load.py
"""

from __future__ import annotations

import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cachefit.runtime.idle import idle_transport_threads

CALLS = 300


def _peer(rank: int, port: int, quiet: bool) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[rank % len(os.sched_getaffinity(0))]})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    if quiet:
        idle_transport_threads()
    message, weight, rows = torch.zeros(4096), torch.randn(4096, 1024), torch.randn(4, 1024)
    idle, busy, work = [], [], []
    for _ in range(CALLS):
        start = time.perf_counter()
        dist.all_reduce(message)
        idle.append(time.perf_counter() - start)
    for _ in range(CALLS):
        start = time.perf_counter()
        for _ in range(4):
            torch.nn.functional.linear(rows, weight)
        middle = time.perf_counter()
        dist.all_reduce(message)
        work.append(middle - start)
        busy.append(time.perf_counter() - middle)
    if rank == 0:
        print(f"gloo's loop thread {'SCHED_IDLE' if quiet else 'as gloo starts it'}: "
              f"all-reduce of 16 KiB, 2 ranks, median of {CALLS}: back to back {statistics.median(idle) * 1e6:.0f} us;"
              f" after {statistics.median(work) * 1e6:.0f} us of compute on each rank "
              f"{statistics.median(busy) * 1e6:.0f} us (mean {statistics.mean(busy) * 1e6:.0f} us)")
    dist.destroy_process_group()


def main() -> None:
    for quiet in (False, True):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        mp.spawn(_peer, args=(port, quiet), nprocs=2)


if __name__ == "__main__":
    main()
