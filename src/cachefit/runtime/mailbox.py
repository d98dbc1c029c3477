"""A rank's point-to-point traffic (issue 15, item 3): receives posted ahead into reused buffers, sends in flight.

Every message a rank will receive is known before the run starts (the passes, the micro-batches, the stage), so
the inbox posts the receive of message j as soon as its buffer is free: the buffers form a ring, one per
micro-batch, and message j lands in buffer j mod M. A peer's send then completes while this rank computes, and a
receive waits only when the message really is late. The ring takes what the plan already counts: under the
``pipeline`` memory model a card keeps a receive buffer for the largest activation passed between layers (the
whole batch at the plan's prompt chunk), and M buffers of one micro-batch each are that much.

The outbox keeps one send in flight per micro-batch: before micro-batch m sends again, its previous send is
finished, so a rank never holds more than M outgoing tensors and nothing is allocated per token for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from cachefit.runtime.trace import Recorder

__all__ = ["Inbox", "Outbox", "Timed"]

Timed = Callable[..., Any]      # Clock.timed: (kind, function, *args) -> the function's result, its time counted


class Inbox:
    """The messages one rank receives, in the order it consumes them (``shapes``), from ``source`` (None: the
    rank receives nothing point to point; its stage's inputs come another way, and the buffers still hold
    them)."""

    def __init__(self, buffers: Sequence[torch.Tensor], shapes: Sequence[tuple[int, ...]], source: int | None,
                 timed: Timed, trace: Recorder) -> None:
        if any(math.prod(shape) > buffers[0].numel() for shape in shapes):
            raise AssertionError("a message is larger than the receive buffers the plan counted; this is a bug")
        self._buffers, self._shapes, self._source = list(buffers), list(shapes), source
        self._timed, self._trace = timed, trace
        self._handles: dict[int, Any] = {}
        self._next = 0                  # the message the next take returns
        for message in range(min(len(self._buffers), len(self._shapes))):
            self._post(message)

    def view(self, message: int) -> torch.Tensor:
        shape = self._shapes[message]
        return self._buffers[message % len(self._buffers)][:math.prod(shape)].view(shape)

    def _post(self, message: int) -> None:
        if self._source is not None:
            self._handles[message] = dist.irecv(self.view(message), self._source)

    def take(self) -> torch.Tensor:
        """The next message, waiting for it if it has not arrived (that wait is the trace's receive)."""
        message = self._next
        handle = self._handles.pop(message, None)
        if handle is not None:
            self._trace.receive(self._timed, "wait", handle.wait)
        return self.view(message)

    def done(self) -> None:
        """The message taken last is consumed: its buffer takes the message M later."""
        message, self._next = self._next, self._next + 1
        if message + len(self._buffers) < len(self._shapes):
            self._post(message + len(self._buffers))

    @property
    def buffers(self) -> list[torch.Tensor]:
        return self._buffers


class Outbox:
    """One send in flight per micro-batch, to ``peer``."""

    def __init__(self, micro: int, peer: int, timed: Timed, trace: Recorder) -> None:
        self._flight: list[Any] = [None] * micro
        self._peer, self._timed, self._trace = peer, timed, trace

    def send(self, micro: int, tensor: torch.Tensor) -> None:
        self._finish(micro)
        self._trace.posted()
        self._flight[micro] = dist.isend(tensor.contiguous(), self._peer)

    def _finish(self, micro: int) -> None:
        handle, self._flight[micro] = self._flight[micro], None
        if handle is not None:
            self._timed("send", handle.wait)

    def finish(self) -> None:
        for micro in range(len(self._flight)):
            self._finish(micro)
