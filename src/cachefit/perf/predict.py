"""The analytical performance model: how long each stage of a plan takes per pass, and what the pipeline gives.

Per pass of one micro-batch (1/M of the plan's batch) on one card of a stage (Williams et al. 2009, roofline):
- compute  = FLOPs of the card's share / the card's FLOP rate at the plan's dtype;
- memory   = bytes the pass reads and writes (the card's weights, all of them, every pass; its KV cache rows; the
             layers' inputs and outputs) / on-chip bandwidth when the stage's footprint fits the card's capacity
             (resident), off-chip bandwidth when it does not (the weights stream);
- a pass takes max(compute, memory) where the device overlaps loads and arithmetic (the roofline; GPUs and
  accelerators by default), compute + memory where it does not (``overlap`` figure 0: measured so on this
  project's CPU host by cachefit calibrate, whose small-row matrix products do not overlap them);
- plus, on a tensor group of t cards, its all-reduces: ring all-reduce of S bytes, 2(t-1)/t * S / link
  bandwidth + 2(t-1) step latencies (Patarasuk & Yuan 2009; the device's collective latency, else its link's);
- and a transfer to the next stage: its output / link bandwidth + one latency.
Pipeline (forward only, k stages, M micro-batches, passes s_i + c_i):
- prefill of P passes per micro-batch: (P*M - 1) * max_i(s_i + c_i) + sum_i(s_i + c_i) (fill, steady state, drain);
- decode: a sequence's next token needs its token to go round every stage, and every stage serves M micro-batches
  per step: TPOT = max(sum_i (s_i + c_i), M * max_i s_i); TPS = batch / TPOT.
Pure: plan, table and device figures in, numbers out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cachefit.core.errors import InputError
from cachefit.core.hardware import Device, Figure
from cachefit.core.layers import LayerTable
from cachefit.planning.algorithms.timed import StageCosts
from cachefit.planning.plan import Partition, Plan

__all__ = ["Prediction", "Rates", "StagePrediction", "layer_costs", "predict_plan", "rates_of"]

TOKEN_ID_BYTES = 8


@dataclass(frozen=True, slots=True)
class Rates:
    """What the model needs of a card, and where each figure came from."""

    flops: float                 # FLOP/s at the plan's dtype
    on_chip_bandwidth: float     # bytes/s
    off_chip_bandwidth: float | None     # None: the device has no off-chip memory figure (SRAM-only chips)
    link_bandwidth: float
    link_latency: float          # seconds per message
    capacity_bytes: int
    sources: Mapping[str, str]
    overlap: bool = True         # pass time = max(compute, memory); False: their sum
    collective_latency: float | None = None    # per ring step of an all-reduce; None: link_latency


@dataclass(frozen=True, slots=True)
class StagePrediction:
    card: int
    first: int
    last: int
    tensor_parallel: int
    resident: bool
    compute_s: float
    memory_s: float
    allreduce_s: float
    transfer_s: float
    overlap: bool = True

    @property
    def pass_s(self) -> float:
        work = max(self.compute_s, self.memory_s) if self.overlap else self.compute_s + self.memory_s
        return work + self.allreduce_s


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
                "figures": dict(self.sources), "stages": [_stage_dict(s) for s in self.stages],
                "prefill_stages": [_stage_dict(s) for s in self.prefill_stages]}


def _stage_dict(s: StagePrediction) -> dict[str, Any]:
    return {"card": s.card, "layers": [s.first, s.last], "tensor_parallel": s.tensor_parallel, "resident": s.resident,
            "compute_ms": s.compute_s * 1e3, "memory_ms": s.memory_s * 1e3, "allreduce_ms": s.allreduce_s * 1e3,
            "transfer_ms": s.transfer_s * 1e3, "pass_ms": s.pass_s * 1e3}


_FLOPS_FIGURE = {"float32": "fp32_flops", "float16": "fp16_flops", "bfloat16": "fp16_flops",
                 "float8_e4m3fn": "fp8_flops", "float8_e5m2": "fp8_flops", "int8": "fp8_flops"}


def rates_of(device: Device, dtype: str | None, capacity_bytes: int | None = None) -> Rates:
    """The figures of ``device`` the model uses; a missing one is a ValueError naming it and the fix."""
    wanted = {"flops": _FLOPS_FIGURE.get(dtype or "float16", "fp16_flops"), "on_chip_bandwidth": "on_chip_bandwidth",
              "link_bandwidth": "link_bandwidth"}
    values: dict[str, float] = {}
    sources: dict[str, str] = {}
    for key, figure_name in wanted.items():
        figure = device.figure(figure_name)
        if figure is None:
            raise InputError(f"device {device.name} has no {figure_name} figure, which predict needs; add it with "
                             "--devices-file (or measure this host with cachefit calibrate)")
        values[key], sources[key] = figure.value, f"{figure_name}: {figure.source} ({figure.kind})"
    off_chip = _optional(device, "off_chip_bandwidth", "none (on-chip memory only)", sources)
    latency = _optional(device, "link_latency", "not in the catalog, taken as 0", sources)
    collective = _optional(device, "collective_latency", "not in the catalog, taken as link_latency", sources)
    overlap = _optional(device, "overlap", "not in the catalog, taken as 1 (roofline: max of compute and memory "
                        "time)", sources)
    return Rates(values["flops"], values["on_chip_bandwidth"], off_chip.value if off_chip else None,
                 values["link_bandwidth"], latency.value if latency else 0.0,
                 capacity_bytes or device.capacity_bytes, sources, overlap.value >= 0.5 if overlap else True,
                 collective.value if collective else None)


def _optional(device: Device, name: str, missing: str, sources: dict[str, str]) -> Figure | None:
    """A figure the model can do without; its source (or what is assumed instead) goes into ``sources``."""
    figure = device.figure(name)
    sources[name] = f"{name}: {figure.source} ({figure.kind})" if figure else f"{name}: {missing}"
    return figure


def predict_plan(plan: Plan, table: LayerTable, rates: Rates, micro_batches: int = 1, prompt_len: int | None = None,
                 chunk: int = 1) -> Prediction:
    """Per-stage pass times of ``plan`` (whose model ``table`` is, for its flops and activations), and the
    pipeline's prefill and decode speed with ``micro_batches`` in flight. Prefill passes carry ``chunk`` tokens
    per sequence (``prompt_len`` of them in all; default the table's sequence)."""
    batch = int(plan.model.batch or table.batch or 1)
    if micro_batches < 1 or batch % micro_batches:
        raise InputError(f"micro-batches ({micro_batches}) must divide the plan's batch ({batch})")
    if not plan.partitions:
        raise InputError("the plan has no partitions to predict: it is not feasible")
    share = 1.0 / micro_batches
    decode = tuple(_stage(part, table, rates, share, 1) for part in plan.partitions)
    prompt = prompt_len or int(table.seq or 1)
    prefill = tuple(_stage(part, table, rates, share, chunk) for part in plan.partitions)
    passes = -(-prompt // chunk) * micro_batches
    slowest = max(s.pass_s + s.transfer_s for s in prefill)
    prefill_s = (passes - 1) * slowest + sum(s.pass_s + s.transfer_s for s in prefill)
    tpot = max(sum(s.pass_s + s.transfer_s for s in decode), micro_batches * max(s.pass_s for s in decode))
    return Prediction(decode, prefill, micro_batches, batch, tpot, prefill_s, batch * prompt / prefill_s, prompt,
                      chunk, rates.sources)


def _stage(part: Partition, table: LayerTable, rates: Rates, share: float, tokens: int) -> StagePrediction:
    """One pass of ``share`` of the batch with ``tokens`` new tokens per sequence on one card of ``part``."""
    layers = table.layers[part.first:part.last + 1]
    ways = part.tensor_parallel
    shares = [layer.split(ways) for layer in layers]
    flops = sum(s.flops for s in shares if s is not None) * share * tokens
    kv_bytes = part.kv_cache_bytes * share
    activation_bytes = sum(x.activation_bytes for x in layers) * share * tokens * 2     # read and written
    resident = part.footprint_bytes <= rates.capacity_bytes
    bandwidth = rates.on_chip_bandwidth if resident else rates.off_chip_bandwidth
    if bandwidth is None:
        raise InputError(f"the stage at card {part.card} does not fit on-chip and the device has no off-chip "
                         "bandwidth figure to stream from")
    memory_s = (part.weight_bytes + kv_bytes + activation_bytes) / bandwidth
    allreduce_s = 0.0
    step = rates.collective_latency if rates.collective_latency is not None else rates.link_latency
    for layer, split in zip(layers, shares):
        if ways > 1 and split is not None and split.allreduce_bytes and layer.activation_bytes:
            count = round(split.allreduce_bytes / layer.activation_bytes)      # messages of one output each
            size = layer.activation_bytes * share * tokens
            allreduce_s += count * (2 * (ways - 1) / ways * size / rates.link_bandwidth + 2 * (ways - 1) * step)
    transfer_s = _send_seconds(table, part.last, share, tokens, rates)
    return StagePrediction(part.card, part.first, part.last, ways, resident, flops / rates.flops, memory_s,
                           allreduce_s, transfer_s, rates.overlap)


def _send_seconds(table: LayerTable, last: int, share: float, tokens: int, rates: Rates) -> float:
    """Sending layer ``last``'s output to the next card; after the model's last layer, token ids back to the
    first."""
    if last == len(table.layers) - 1:
        sent = (table.batch or 1) * share * TOKEN_ID_BYTES
    else:
        sent = table.layers[last].activation_bytes * share * tokens
    return sent / rates.link_bandwidth + rates.link_latency


def layer_costs(table: LayerTable, rates: Rates, micro_batches: int = 1) -> StageCosts:
    """Per layer, whole (one card), one decode pass of 1/M of the batch: the terms of :func:`predict_plan`'s stage
    time, for ``plan --objective time``."""
    share = 1.0 / micro_batches
    compute = np.array([x.flops * share / rates.flops for x in table.layers])
    moved = np.array([x.weight_bytes + x.kv_cache_bytes * share + 2 * x.activation_bytes * share
                      for x in table.layers], dtype=np.float64)
    cut = np.array([_send_seconds(table, index, share, 1, rates) for index in range(len(table.layers))])
    off_chip = rates.off_chip_bandwidth if rates.off_chip_bandwidth is not None else rates.on_chip_bandwidth
    return StageCosts(compute, moved, cut, rates.on_chip_bandwidth, off_chip, rates.capacity_bytes, rates.overlap)
