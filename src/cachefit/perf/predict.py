"""``predict``: how long each stage of a plan takes per pass (the stage-time model, :mod:`cachefit.core.cost`) and
what the pipeline gives end to end.

Pipeline (forward only, k stages, M micro-batches, passes s_i + c_i; s: a stage's pass, c: its transfer):
- prefill of P passes per micro-batch: (P*M - 1) * max_i(s_i + c_i) + sum_i(s_i + c_i) (fill, steady state, drain);
- decode: a sequence's next token needs its token to go round every stage, and every stage serves M micro-batches
  per step, each a pass and its send: TPOT = max(sum_i (s_i + c_i), M * max_i (s_i + c_i)); TPS = batch / TPOT.
  The steady state's slot is s_i + c_i, as in prefill: a card posts each micro-batch's send and completes its
  receive on the thread that computes (measured on this host, 2026-12-05: 2-card tiny-llama at M = 4, 0.40 ms of
  compute and 0.06-0.07 ms of framework a pass; M x max s_i alone was 17-24% under the TPOT, docs/benchmarks.md).
Pure: plan, table and device figures in, numbers out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cachefit.core.cost import LayerCosts, Rates, StageTime, layer_costs, stage_time
from cachefit.core.errors import InputError
from cachefit.core.layers import LayerTable
from cachefit.core.memory import per_card_table, shared_bytes, shared_uses
from cachefit.core.records import Partition, Plan

__all__ = ["Prediction", "StagePrediction", "predict_plan"]


@dataclass(frozen=True, slots=True)
class StagePrediction(StageTime):
    """One stage's pass (the stage-time model's terms) and where it runs: cards ``card..card+tensor_parallel-1``,
    layers ``first..last``."""

    card: int = 0
    first: int = 0
    last: int = 0
    tensor_parallel: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"card": self.card, "layers": [self.first, self.last], "tensor_parallel": self.tensor_parallel,
                "resident": self.resident, "compute_ms": self.compute_s * 1e3, "memory_ms": self.memory_s * 1e3,
                "allreduce_ms": self.allreduce_s * 1e3, "transfer_ms": self.transfer_s * 1e3,
                "fixed_ms": self.fixed_s * 1e3, "pass_ms": self.pass_s * 1e3}


@dataclass(frozen=True, slots=True)
class Prediction:
    stages: tuple[StagePrediction, ...]            # decode passes
    prefill_stages: tuple[StagePrediction, ...]    # prompt passes (chunk tokens per sequence)
    micro_batches: int
    batch: int
    decode_tpot_s: float
    prefill_s: float
    prefill_tokens_per_s: float
    prompt_len: int
    chunk: int
    sources: Mapping[str, str] = field(default_factory=dict)    # each device figure used, with its source

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch / self.decode_tpot_s

    def to_dict(self) -> dict[str, Any]:
        return {"micro_batches": self.micro_batches, "batch": self.batch, "prompt_len": self.prompt_len,
                "prefill_chunk": self.chunk, "decode_tpot_ms": self.decode_tpot_s * 1e3,
                "decode_tokens_per_s": self.decode_tokens_per_s, "prefill_s": self.prefill_s,
                "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "figures": dict(self.sources), "stages": [s.to_dict() for s in self.stages],
                "prefill_stages": [s.to_dict() for s in self.prefill_stages]}


def predict_plan(plan: Plan, table: LayerTable, rates: Rates, micro_batches: int = 1, prompt_len: int | None = None,
                 chunk: int = 1) -> Prediction:
    """Per-stage pass times of ``plan`` (whose model ``table`` is, for its flops and activations), and the
    pipeline's prefill and decode speed with ``micro_batches`` in flight. Prefill passes carry ``chunk`` tokens
    per sequence (``prompt_len`` of them in all; default the table's sequence)."""
    batch = int(plan.model.batch or table.batch or 1)
    if micro_batches < 1 or batch % micro_batches:
        raise InputError(f"micro_batches ({micro_batches}) must divide the plan's batch ({batch})",
                         parameters=("micro_batches",))
    if not plan.found:
        raise InputError("the plan has no partitions to predict: none was found")
    share = 1.0 / micro_batches
    decode = _stages(plan, table, rates, share, 1)
    prompt = prompt_len or int(table.seq or 1)
    prefill = _stages(plan, table, rates, share, chunk)
    passes = -(-prompt // chunk) * micro_batches
    slowest = max(s.pass_s + s.transfer_s for s in prefill)
    prefill_s = (passes - 1) * slowest + sum(s.pass_s + s.transfer_s for s in prefill)
    slot = max(s.pass_s + s.transfer_s for s in decode)
    tpot = max(sum(s.pass_s + s.transfer_s for s in decode), micro_batches * slot)
    return Prediction(decode, prefill, micro_batches, batch, tpot, prefill_s, batch * prompt / prefill_s, prompt,
                      chunk, rates.sources)


def _stages(plan: Plan, table: LayerTable, rates: Rates, share: float, tokens: int) -> tuple[StagePrediction, ...]:
    costs = {ways: layer_costs(table, rates, share, tokens, ways)
             for ways in {part.tensor_parallel for part in plan.partitions}}
    # Shared tensors as a card of each width holds them (a vocab-parallel head: its slice of the tied embedding).
    uses = {ways: shared_uses(per_card_table(table, ways)[0]) for ways in costs}
    return tuple(_stage(part, costs[part.tensor_parallel],
                        shared_bytes(uses[part.tensor_parallel], part.first, part.last)) for part in plan.partitions)


def _stage(part: Partition, costs: LayerCosts, shared: int) -> StagePrediction:
    time = stage_time(costs, part.first, part.last, part.footprint_bytes, shared)
    if time.memory_s == float("inf"):
        raise InputError(f"the stage at card {part.card} does not fit on-chip and the device has no off-chip "
                         "bandwidth figure to stream from")
    return StagePrediction(time.resident, time.compute_s, time.memory_s, time.allreduce_s, time.transfer_s,
                           time.overlap, time.fixed_s, part.card, part.first, part.last, part.tensor_parallel)
