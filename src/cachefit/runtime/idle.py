"""Work that must not take a rank's core (issue 15, item 3): gloo's event-loop thread, and the launcher's import.

gloo's TCP transport reads sockets on one thread per process (``gloo_tcp_loop``). That thread takes a pair's lock
with ``try_lock`` and, when the rank's own thread holds it (posting a send or a receive), returns to a
level-triggered ``epoll_wait`` that fires again at once: it spins (gloo/transport/tcp/pair.cc, Pair::handleEvents;
pytorch/gloo#246). Where the rank's thread and the loop share a core (one rank per core, every core busy), the
spinning thread can be scheduled in while the rank's thread holds the lock, and spins out a whole time slice:
posting an ``isend`` or ``irecv`` then takes about 5 ms instead of 20 us. Measured here (2 ranks, 2 cores, a
~1 ms pass between messages): 111-125 of 1,200 posts over 1 ms, and a 2-card tiny-llama decode whose steps jumped
from ~1.2 to 3-7 ms at random.

Scheduling the loop thread SCHED_IDLE (Linux; no privileges needed) lets it run whenever its core is otherwise
idle, which is whenever the rank waits for a message, and never in place of the rank's own thread: 0-2 of 1,200
posts over 1 ms in the same probe. It still gets a little time under load, so a message is never starved for good.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["IDLE_VARIABLE", "LOOP_THREAD", "idle_transport_threads", "spare_cores"]

LOOP_THREAD = "gloo_tcp_loop"           # the name gloo gives its TCP device thread (/proc/<pid>/task/<tid>/comm)
IDLE_VARIABLE = "CACHEFIT_GLOO_LOOP_IDLE"   # 0: leave gloo's thread as it is (to measure what this buys)


def idle_transport_threads(tasks: Path = Path("/proc/self/task")) -> int:
    """Schedule this process's gloo loop threads SCHED_IDLE; how many were. 0 where there are none (NCCL, another
    OS), where the variable turns it off, or where the OS refuses (nothing changes then)."""
    if os.environ.get(IDLE_VARIABLE, "1") == "0" or not hasattr(os, "SCHED_IDLE") or not tasks.is_dir():
        return 0
    changed = 0
    for task in tasks.iterdir():
        try:
            if (task / "comm").read_text().strip() != LOOP_THREAD:
                continue
            os.sched_setscheduler(int(task.name), os.SCHED_IDLE, os.sched_param(0))
        except (OSError, ValueError):       # the thread ended meanwhile, or the OS said no: leave it
            continue
        changed += 1
    return changed


def spare_cores(ranks: int, threads: int) -> int:
    """Cores this process may use beyond what ``ranks`` ranks of ``threads`` threads each take. The launcher
    imports torch while its ranks run only where this is positive: on a host the ranks fill, the import took
    turns with them (2-card tiny-llama here: decode steps of 1.2 ms jumped to 3-7 ms now and then), and as a
    SCHED_IDLE thread it took the idle time gloo's loop threads need (steps of 7-8 ms)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores - ranks * threads
