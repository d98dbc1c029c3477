"""The stage-time model: how long one pass of a stage takes on one of its cards. One formula, used by ``predict``
(``cachefit.perf``) and by ``objective="time"`` (``cachefit.planning.timed``).

Per pass of a share of the batch (1/M of it, M micro-batches) carrying ``tokens`` new tokens per sequence, on one
card of a stage of layers i..j split t ways (Williams et al. 2009, roofline):
- compute  = FLOPs of the card's share / the card's FLOP rate at the plan's dtype;
- memory   = bytes the pass reads and writes (the card's weights, all of them, every pass, shared tensors
             included, except experts no token can take, a layer's ``read_bytes``; its KV cache rows; the
             layers' inputs and outputs) / on-chip bandwidth when the stage's footprint fits the card's on-chip
             capacity (resident), off-chip bandwidth when it does not (the weights stream);
- work     = max(compute, memory) where the device overlaps loads and arithmetic (the roofline), their sum where
             it does not (the ``overlap`` figure 0);
- all-reduce, on a group of t cards: each of a layer's ``allreduces`` (one per split matmul pair) is a ring
  all-reduce of its whole output, S bytes: 2(t-1)/t * S / link bandwidth + 2(t-1) step latencies (Patarasuk &
  Yuan 2009; the device's collective latency, else its link's);
- all-gather, likewise (a vocab-parallel head gathers its logits): (t-1)/t * S / link bandwidth + (t-1) steps;
- transfer = the stage's output to the next stage (token ids back to the first after the last layer) / link
  bandwidth + one link latency;
- fixed    = what a pass costs whatever its bytes and FLOPs (issue 15): the device's ``pass_seconds`` (a stage's
             pass outside its blocks: embedding, head, the loop) plus ``layer_seconds_<family>`` per block (a
             block's layers share it evenly: half each for its attention and MLP sublayers), both as ``cachefit
             calibrate`` measures this host's runtime; for a Hugging Face model (family ``hf``) the figures
             measured on transformers' own modules, ``pass_seconds_hf`` and ``layer_seconds_hf``; 0 where the
             device lists neither (the datasheet devices). Added to the work: on a CPU the per-op dispatch runs on
             the same thread as the arithmetic.
Pure numpy: the same functions take one stage (floats) or every start of a stage at once (arrays).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cachefit.core.errors import InputError
from cachefit.core.hardware import Device, Figure
from cachefit.core.layers import LayerTable
from cachefit.core.spec import TOKEN_ID_BYTES

__all__ = ["LayerCosts", "Rates", "StageTime", "allgather_seconds", "allreduce_seconds", "block_shares", "layer_costs",
           "memory_seconds", "rates_of", "stage_time", "token_activation_bytes", "work_seconds"]

FloatArray = npt.NDArray[np.float64]
_FLOPS_FIGURE = {"float32": "fp32_flops", "float16": "fp16_flops", "bfloat16": "fp16_flops",
                 "float8_e4m3fn": "fp8_flops", "float8_e5m2": "fp8_flops", "int8": "fp8_flops"}


@dataclass(frozen=True, slots=True)
class Rates:
    """What the model needs of a card, and where each figure came from."""

    flops: float                 # FLOP/s at the plan's dtype
    on_chip_bandwidth: float     # bytes/s
    off_chip_bandwidth: float | None     # None: the device has no off-chip memory figure (SRAM-only chips)
    link_bandwidth: float
    link_latency: float          # seconds per message
    capacity_bytes: int          # on-chip bytes a stage may fill and still be resident
    sources: Mapping[str, str]
    overlap: bool = True         # pass time = max(compute, memory); False: their sum
    collective_latency: float | None = None    # per ring step of an all-reduce; None: link_latency
    pass_seconds: float = 0.0    # fixed cost of a stage's pass (see the module's docstring)
    layer_seconds: float = 0.0   # fixed cost of one block of the plan's model family

    @property
    def step_latency(self) -> float:
        return self.collective_latency if self.collective_latency is not None else self.link_latency


def rates_of(device: Device, dtype: str | None, capacity_bytes: int | None = None, family: str | None = None
             ) -> Rates:
    """The figures of ``device`` the model uses; a missing one is an InputError naming it and the fix.
    ``family`` (dense, llama; hf: a Hugging Face model): the model's, for the fixed cost of its blocks."""
    wanted = {"on_chip_bandwidth": "on_chip_bandwidth", "link_bandwidth": "link_bandwidth"}
    values: dict[str, float] = {}
    sources: dict[str, str] = {}
    values["flops"], sources["flops"] = _flops(device, dtype)
    for key, figure_name in wanted.items():
        figure = device.figure(figure_name)
        if figure is None:
            raise InputError(f"device {device.name} has no {figure_name} figure, which predict needs; add it with "
                             "devices_file (or measure this host with cachefit calibrate)",
                             parameters=("devices_file",))
        values[key], sources[key] = figure.value, f"{figure_name}: {figure.source} ({figure.kind})"
    off_chip = _optional(device, "off_chip_bandwidth", "none (on-chip memory only)", sources)
    latency = _optional(device, "link_latency", "not in the catalog, taken as 0", sources)
    collective = _optional(device, "collective_latency", "not in the catalog, taken as link_latency", sources)
    overlap = _optional(device, "overlap", "not in the catalog, taken as 1 (roofline: max of compute and memory "
                        "time)", sources)
    fixed = _optional(device, "pass_seconds", "not in the catalog, taken as 0", sources)
    if family == "hf" and device.figure("pass_seconds_hf") is not None:    # transformers' own pass, measured
        fixed = _optional(device, "pass_seconds_hf", "", sources)
    block = (_optional(device, f"layer_seconds_{family}", "not in the catalog, taken as 0", sources)
             if family else None)
    return Rates(values["flops"], values["on_chip_bandwidth"], off_chip.value if off_chip else None,
                 values["link_bandwidth"], latency.value if latency else 0.0,
                 capacity_bytes or device.capacity_bytes, sources, overlap.value >= 0.5 if overlap else True,
                 collective.value if collective else None, fixed.value if fixed else 0.0,
                 block.value if block else 0.0)


# Where a device lists no rate for the plan's element type, the nearest one it lists, scaled by the usual ratio
# between them (FP32 half FP16's rate, FP16 half FP8's; FP8 no faster than FP16), said as an assumption.
_FALLBACKS = {"fp32_flops": (("fp16_flops", 0.5), ("fp8_flops", 0.25)), "fp16_flops": (("fp8_flops", 0.5),),
              "fp8_flops": (("fp16_flops", 1.0),)}


def _flops(device: Device, dtype: str | None) -> tuple[float, str]:
    name = _FLOPS_FIGURE.get(dtype or "float16", "fp16_flops")
    figure = device.figure(name)
    if figure is not None:
        return figure.value, f"{name}: {figure.source} ({figure.kind})"
    for other, scale in _FALLBACKS[name]:
        found = device.figure(other)
        if found is not None:
            return found.value * scale, (f"{name}: assumed {scale:g} x {other} (the catalog lists no {name} for "
                                         f"{device.name}; {other}: {found.source}) (A)")
    raise InputError(f"device {device.name} has no {name} figure, which predict needs; add it with devices_file "
                     "(or measure this host with cachefit calibrate)", parameters=("devices_file",))


def _optional(device: Device, name: str, missing: str, sources: dict[str, str]) -> Figure | None:
    """A figure the model can do without; its source (or what is assumed instead) goes into ``sources``."""
    figure = device.figure(name)
    sources[name] = f"{name}: {figure.source} ({figure.kind})" if figure else f"{name}: {missing}"
    return figure


def work_seconds(compute: FloatArray | float, memory: FloatArray | float, overlap: bool) -> FloatArray | float:
    """Roofline: the larger of compute and memory time where they overlap, their sum where they do not."""
    return np.maximum(compute, memory) if overlap else compute + memory


def memory_seconds(moved: FloatArray | float, footprint: npt.NDArray[np.int64] | int, rates: Rates
                   ) -> FloatArray | float:
    """Bytes moved at on-chip bandwidth where the footprint is resident, off-chip where not (inf: no off-chip)."""
    off_chip = rates.off_chip_bandwidth if rates.off_chip_bandwidth is not None else 0.0
    bandwidth = np.where(np.asarray(footprint) <= rates.capacity_bytes, rates.on_chip_bandwidth, off_chip)
    with np.errstate(divide="ignore"):
        seconds = np.asarray(moved, dtype=np.float64) / bandwidth
    return float(seconds) if seconds.ndim == 0 else seconds


def allreduce_seconds(size: float, ways: int, rates: Rates) -> float:
    """One ring all-reduce of ``size`` bytes over ``ways`` cards."""
    if ways <= 1:
        return 0.0
    return 2 * (ways - 1) / ways * size / rates.link_bandwidth + 2 * (ways - 1) * rates.step_latency


def allgather_seconds(size: float, ways: int, rates: Rates) -> float:
    """One ring all-gather into ``size`` bytes over ``ways`` cards: half an all-reduce's traffic and steps
    (Thakur, Rabenseifner & Gropp 2005)."""
    return allreduce_seconds(size, ways, rates) / 2


@dataclass(frozen=True, slots=True)
class LayerCosts:
    """Per layer, one pass on one card of a ``ways``-wide group: compute seconds, bytes moved (shared tensors
    apart: they depend on the stage), all-reduce seconds, and the transfer after it (the cut)."""

    ways: int
    compute: FloatArray
    moved: FloatArray
    allreduce: FloatArray
    cut: FloatArray
    rates: Rates
    fixed: FloatArray            # each layer's fixed seconds (a block's, from layer_seconds; 0 for the others)


def layer_costs(table: LayerTable, rates: Rates, share: float = 1.0, tokens: int = 1, ways: int = 1) -> LayerCosts:
    """The terms of the stage time per layer for ``share`` of the batch and ``tokens`` new tokens per sequence; a
    layer its shapes do not let split ``ways`` ways costs nothing here (a plan never gives it that width)."""
    compute: list[float] = []
    moved: list[float] = []
    allreduce: list[float] = []
    for layer in table.layers:
        split = layer.split(ways)
        size = token_activation_bytes(table, layer.activation_bytes) * share * tokens
        if split is None:       # a plan never gives this layer this width: nothing to count
            terms = (0.0, 0.0, 0.0)
        else:                   # weights and KV rows read; the input read and the output written, whole
            terms = (split.flops * share * tokens / rates.flops,
                     split.bytes_read + split.kv_cache_bytes * share + 2 * size,
                     split.allreduces * allreduce_seconds(size, ways, rates)
                     + split.allgathers * allgather_seconds(size, ways, rates))
        for column, value in zip((compute, moved, allreduce), terms):
            column.append(value)
    cut = [send_seconds(table, index, share, tokens, rates) for index in range(len(table.layers))]
    names = table.columns.names
    fixed = rates.layer_seconds * block_shares(names) if rates.layer_seconds else np.zeros(len(names))
    return LayerCosts(ways, np.array(compute), np.array(moved), np.array(allreduce), np.array(cut), rates, fixed)


# A decoder block by its name: cachefit's ``layers.N``, and transformers' ``<base>.layers.N`` (Llama, Qwen,
# Mistral, Mixtral, Phi-3, Gemma 2, GPT-NeoX, OPT's ``model.decoder.layers.N``) or ``<base>.h.N`` (GPT-2).
_BLOCK = re.compile(r"^((?:.+\.)?(?:layers|h)\.\d+)(?:\.|$)")


def block_shares(names: Sequence[str]) -> FloatArray:
    """How much of a decoder block each layer is: 1 for a whole block, 1/n for each of the n layers a table
    splits one block into (its attention and MLP sublayers, or its leaves: assumed, the fixed cost is not measured
    per piece), 0 outside the blocks (the embedding and head: their cost is in pass_seconds)."""
    blocks = [found.group(1) if (found := _BLOCK.match(name)) else None for name in names]
    pieces = Counter(block for block in blocks if block is not None)
    return np.array([1.0 / pieces[block] if block is not None else 0.0 for block in blocks])


def token_activation_bytes(table: LayerTable, activation_bytes: float) -> float:
    """A layer's output for one new token per sequence of the whole batch. A decode table measured with a prompt
    chunk of C tokens (``prefill_chunk``) holds each layer's larger activation, the chunk pass's, for memory: a
    token's is 1/C of it (a layer's output grows with its tokens)."""
    return activation_bytes / (table.prefill_chunk or 1)


def send_seconds(table: LayerTable, last: int, share: float, tokens: int, rates: Rates) -> float:
    """Sending layer ``last``'s output to the next card; after the model's last layer, token ids back to the
    first."""
    if last == len(table.layers) - 1:
        sent = (table.batch or 1) * share * TOKEN_ID_BYTES
    else:
        sent = token_activation_bytes(table, table.layers[last].activation_bytes) * share * tokens
    return sent / rates.link_bandwidth + rates.link_latency


@dataclass(frozen=True, slots=True)
class StageTime:
    """One pass of a stage on one of its cards, by term."""

    resident: bool
    compute_s: float
    memory_s: float
    allreduce_s: float
    transfer_s: float
    overlap: bool = True
    fixed_s: float = 0.0

    @property
    def pass_s(self) -> float:
        return float(work_seconds(self.compute_s, self.memory_s, self.overlap)) + self.allreduce_s + self.fixed_s


def stage_time(costs: LayerCosts, first: int, last: int, footprint: int, shared_bytes: int = 0) -> StageTime:
    """Layers ``first..last`` as one stage whose per-card footprint is ``footprint`` (``shared_bytes``: tensors
    of earlier layers it holds too, read every pass like its own weights)."""
    window = slice(first, last + 1)
    rates = costs.rates
    moved = float(costs.moved[window].sum()) + shared_bytes
    return StageTime(footprint <= rates.capacity_bytes, float(costs.compute[window].sum()),
                     float(memory_seconds(moved, footprint, rates)), float(costs.allreduce[window].sum()),
                     float(costs.cut[last]), rates.overlap, rates.pass_seconds + float(costs.fixed[window].sum()))
