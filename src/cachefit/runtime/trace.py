"""A run's per-step trace (issue 15, item 3): where each pass's time goes on each card, and what a gloo hop takes.

Each rank records, per pass (all micro-batches of one prompt chunk or decode step), the seconds it computed,
waited in receives, finished sends, and the rest of the pass's wall time: the framework (Python bookkeeping,
posting sends, picking tokens). Its stage's leader also records when it posted each point-to-point send and when
each receive began and ended. A hop is a receive's end less the later of its start and the matching send's post
(the k-th message between two ranks is the k-th receive: gloo keeps a pair's order). The times are
``time.perf_counter``, CLOCK_MONOTONIC on Linux, one clock for every process of a host: hops are measured for runs
on one host, and left out across hosts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cachefit.core.records import CardTrace, StepTrace

__all__ = ["Recorder", "card_traces"]


class Recorder:
    """One rank's trace, filled while its passes run; ``totals`` reads the rank's cumulative (compute, wait, send)
    seconds."""

    def __init__(self, totals: Callable[[], tuple[float, float, float]]) -> None:
        self._totals = totals
        self._begun: tuple[float, float, float, float] | None = None
        self.steps: list[tuple[float, float, float, float]] = []      # (wall, compute, wait, send) per pass
        self.sent: list[float] = []
        self.received: list[tuple[float, float]] = []

    def begin(self) -> None:
        self._begun = (time.perf_counter(), *self._totals())

    def end(self) -> None:
        assert self._begun is not None, "a pass ended that did not begin; this is a bug"
        now = (time.perf_counter(), *self._totals())
        wall, compute, wait, send = (later - earlier for later, earlier in zip(now, self._begun))
        self.steps.append((wall, compute, wait, send))

    def posted(self) -> None:
        self.sent.append(time.perf_counter())

    def receive(self, function: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        result = function(*args)
        self.received.append((start, time.perf_counter()))
        return result

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "sent": self.sent, "received": self.received}


def card_traces(ranks: Sequence[Mapping[str, Any]], decode_steps: int) -> tuple[CardTrace, ...]:
    """Each rank's last ``decode_steps`` passes (the decode steps) and the hops into it, from the ranks' reports;
    empty where a report has no trace."""
    if not all("trace" in rank for rank in ranks):
        return ()
    senders = _senders(ranks)
    traces = []
    for rank in ranks:
        passes = rank["trace"]["steps"]
        steps = tuple(StepTrace(compute, wait, send, max(wall - compute - wait - send, 0.0))
                      for wall, compute, wait, send in (passes[len(passes) - decode_steps:] if decode_steps else []))
        sender = senders.get(rank["card"])
        hops = () if sender is None else _hops(sender["trace"]["sent"], rank["trace"]["received"])
        traces.append(CardTrace(rank["card"], steps, hops))
    return tuple(traces)


def _senders(ranks: Sequence[Mapping[str, Any]]) -> dict[int, Mapping[str, Any]]:
    """The rank whose sends each stage leader receives: the previous stage's leader (the first stage's: the
    last's). A one-stage run has none."""
    leaders = sorted((rank for rank in ranks if rank["trace"]["sent"] or rank["trace"]["received"]),
                     key=lambda rank: rank["first"])
    if len(leaders) < 2:
        return {}
    return {leaders[i]["card"]: leaders[i - 1] for i in range(len(leaders))}


def _hops(sent: Sequence[float], received: Sequence[Sequence[float]]) -> tuple[float, ...]:
    if len(sent) != len(received):          # not paired one to one: report none rather than wrong ones
        return ()
    return tuple(max(end - max(start, posted), 0.0) for posted, (start, end) in zip(sent, received))
