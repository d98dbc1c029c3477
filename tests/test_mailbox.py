"""The inbox's ring: message j lands in buffer j mod M, and a receive is posted only once its buffer is free."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from cachefit.runtime import idle, mailbox  # noqa: E402
from cachefit.runtime.mailbox import Inbox, Outbox  # noqa: E402
from cachefit.runtime.trace import Recorder  # noqa: E402


class Wire:
    """Stands in for gloo: records what is posted, and delivers message j (its values all j) on wait."""

    def __init__(self) -> None:
        self.posted: list[tuple[int, int]] = []          # (message, data pointer of its buffer)
        self.sent: list[Any] = []

    def irecv(self, tensor: Any, source: int) -> Any:
        message = len(self.posted)
        self.posted.append((message, tensor.data_ptr()))
        return type("Handle", (), {"wait": lambda _: tensor.fill_(message)})()

    def isend(self, tensor: Any, peer: int) -> Any:
        self.sent.append(tensor)
        return type("Handle", (), {"wait": lambda _: self.sent.remove(tensor)})()


def timed(kind: str, function: Any, *args: Any) -> Any:
    return function(*args)


def test_receives_are_posted_ahead_one_per_free_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    wire = Wire()
    monkeypatch.setattr(mailbox.dist, "irecv", wire.irecv)
    buffers = [torch.zeros(6) for _ in range(2)]
    shapes = [(2, 3), (2, 3), (1, 3), (1, 3), (1, 3)]            # a prompt pass, then decode passes, M = 2
    inbox = Inbox(buffers, shapes, 0, timed, Recorder(lambda: (0.0, 0.0, 0.0)))
    assert len(wire.posted) == 2                                 # both buffers at once, nothing more
    for message, shape in enumerate(shapes):
        got = inbox.take()
        assert tuple(got.shape) == shape and bool((got == message).all())
        assert got.data_ptr() == buffers[message % 2].data_ptr()
        assert len(wire.posted) == min(message + 2, len(shapes))  # the next receive waits for this buffer
        inbox.done()
    assert [pointer for _, pointer in wire.posted] == [buffers[j % 2].data_ptr() for j in range(len(shapes))]


def test_a_message_larger_than_the_planned_buffers_is_a_bug() -> None:
    with pytest.raises(AssertionError, match="larger than the receive buffers"):
        Inbox([torch.zeros(4)], [(1, 5)], 0, timed, Recorder(lambda: (0.0, 0.0, 0.0)))


def test_each_micro_batch_keeps_one_send_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    wire = Wire()
    monkeypatch.setattr(mailbox.dist, "isend", wire.isend)
    outbox = Outbox(2, 1, timed, Recorder(lambda: (0.0, 0.0, 0.0)))
    first, second, third = torch.ones(1), torch.ones(1) * 2, torch.ones(1) * 3
    outbox.send(0, first)
    outbox.send(1, second)
    outbox.send(0, third)                      # micro-batch 0's earlier send is finished first
    assert [t.item() for t in wire.sent] == [2.0, 3.0]
    outbox.finish()
    assert wire.sent == []


_GLOO_THREADS = """
import json, os, sys, tempfile
import torch.distributed as dist
from cachefit.runtime.idle import idle_transport_threads
os.environ["GLOO_SOCKET_IFNAME"] = "lo"
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
changed = idle_transport_threads()
threads = {open(f"/proc/self/task/{t}/comm").read().strip() + ":" + t: os.sched_getscheduler(int(t))
           for t in os.listdir("/proc/self/task")}
print(json.dumps({"changed": changed, "threads": threads, "idle": os.SCHED_IDLE}))
"""


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
@pytest.mark.parametrize("setting", [None, "0"])
def test_gloo_loop_thread_runs_idle_and_nothing_else_does(setting: str | None) -> None:
    # A real gloo group (one rank) in a fresh process: its TCP loop thread, and only it, becomes SCHED_IDLE;
    # CACHEFIT_GLOO_LOOP_IDLE=0 leaves every thread as it was.
    env = {k: v for k, v in os.environ.items() if k != idle.IDLE_VARIABLE}
    env |= {idle.IDLE_VARIABLE: setting} if setting else {}
    found = json.loads(subprocess.run([sys.executable, "-c", _GLOO_THREADS], env=env, capture_output=True, text=True,
                                      check=True).stdout)
    loops = [policy for name, policy in found["threads"].items() if name.startswith(idle.LOOP_THREAD + ":")]
    others = [policy for name, policy in found["threads"].items() if not name.startswith(idle.LOOP_THREAD + ":")]
    assert loops and others
    expected = found["idle"] if setting is None else 0
    assert found["changed"] == (len(loops) if setting is None else 0)
    assert all(policy == expected for policy in loops) and all(policy != found["idle"] for policy in others)


def test_the_launcher_counts_the_cores_its_ranks_leave(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1, 2, 3}, raising=False)
    assert [idle.spare_cores(ranks, threads) for ranks, threads in ((2, 1), (4, 1), (2, 2), (3, 2))] == [2, 0, 0, -2]
