"""The measured numbers of a run, from each rank's report: throughput, time per output token, time split, memory.

Ranks write their reports as JSON (``rankN.json``, runtime-internal); the launcher turns them into a
:class:`~cachefit.core.records.RunSummary`, the record every reader (the CLI, the demo, the seed report, the
benchmarks) takes, and the ``--report`` file (schema ``cachefit.run/v1``) is its ``to_dict``.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Mapping
from typing import Any

from cachefit.core.records import CardSummary, RunSummary
from cachefit.runtime.trace import card_traces

__all__ = ["run_report", "summarise"]


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def summarise(ranks: list[dict[str, Any]], batch: int, prompt_len: int, new_tokens: int) -> RunSummary:
    """Prefill tokens/s (prompt tokens over the time to the first generated token), decode tokens/s and time per
    output token (gaps between a sequence's consecutive tokens, at the last card), and per card: compute, wait,
    send seconds and measured bytes against the plan."""
    last = next((rank for rank in ranks if rank.get("emits")), ranks[-1])    # the last stage's leader
    gaps = [later - earlier for times in last["token_times"] for earlier, later in itertools.pairwise(times)]
    decode_s = last["total_s"] - last["prefill_s"]
    return RunSummary(
        prefill_tokens_per_s=batch * prompt_len / last["prefill_s"] if last["prefill_s"] else None,
        decode_tokens_per_s=batch * (new_tokens - 1) / decode_s if new_tokens > 1 and decode_s > 0 else None,
        tpot_median_ms=statistics.median(gaps) * 1e3 if gaps else None,
        tpot_p90_ms=_percentile(gaps, 0.9) * 1e3 if gaps else None,
        total_s=max(rank["total_s"] for rank in ranks),
        prefill_chunk=last.get("prefill_chunk"),
        cards=tuple(_card(rank) for rank in ranks),
        traces=card_traces(ranks, max(new_tokens - 1, 0)))


def _card(rank: dict[str, Any]) -> CardSummary:
    measured = sum(rank["memory"].values())
    return CardSummary(rank["card"], (rank["first"], rank["last"]), rank.get("tensor_parallel", 1),
                       rank["compute_s"], rank.get("allreduce_s", 0.0), rank["wait_s"], rank["send_s"],
                       rank["planned_bytes"], measured, max(0, measured - rank["planned_bytes"]),
                       dict(rank["memory"]), rank.get("residency"))


def run_report(plan_file: str, options: Any, check: Mapping[str, Any] | None,
               summary: RunSummary, prompt: Any = None, tokens: Any = None) -> dict[str, Any]:
    """The ``--report`` JSON of a run: what ran, with which options (a RunOptions), whether it matched, what was
    measured, and per sequence its prompt token ids and the ids generated (``prompt``, ``tokens``: batch x n)."""
    chosen = {key: getattr(options, key) for key in ("prompt_len", "new_tokens", "micro_batches", "seed", "threads")}
    sequences = [] if prompt is None or tokens is None else [
        {"prompt": [int(t) for t in given], "generated": [int(t) for t in made]} for given, made in zip(prompt, tokens)]
    return {"schema": "cachefit.run/v1", "plan": plan_file, "options": chosen, "check": check,
            **summary.to_dict(), "sequences": sequences}
