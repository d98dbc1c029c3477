"""Plans a peer takes as they are: the constraints a peer puts on stages, planned for rather than refused after.

- vLLM (``VLLM_PP_LAYER_PARTITION``) gives each pipeline stage a count of decoder layers and puts the embedding on
  the first stage and the final norm and head on the last itself, so a stage without a decoder layer cannot be
  written. Every layer that is not a decoder block joins one (those before the first block join it, the others the
  block before them) in a unit no cut may split.
- accelerate (a ``device_map``) keeps tied parameters on one device: a tied LM head runs on the embedding's card
  (its ``infer_auto_device_map`` places tied modules together, and a map that parts them fails with disk offload).
  A layer that uses a tensor an earlier layer owns joins the owner's unit, out of order: that card also holds the
  head's input, logits and workspace, when the head runs.

The units are planned with the usual partitioners. A unit is a layer whose footprints equal the original ones on
every run of whole units, for each memory model (``core/memory.py``): weights and KV cache add up; its transient
term is its members' largest, max_l(in_l + A_l + B_l) (``peak``; ``pipeline`` adds the receive buffer, the largest
activation between units, and keeps the rest of the original R in the unit), or the sum of their activations and
workspace (``sum``), each member with its own input and output. So the partitioners stay exact and the plan is
optimal under the constraint. (Only where a unit's workspace would have to be negative to say so is it counted as
0: an over-count, and the plan is then not claimed optimal.)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from cachefit.core.errors import InputError
from cachefit.core.layers import Layer, LayerTable, SharedTensor, Split
from cachefit.core.memory import MemoryModel, receive_buffer_bytes
from cachefit.core.records import ModelInfo, Plan
from cachefit.core.spec import is_decoder_block
from cachefit.planning.builder import Settings, Stage, build_plan

__all__ = ["PEERS", "Peer", "Units", "for_peer", "on_original_layers"]

Peer = Literal["vllm", "accelerate"]
PEERS: tuple[Peer, ...] = ("vllm", "accelerate")
NOTES: dict[Peer, str] = {
    "vllm": "planned for vllm: every stage holds a decoder layer (the embedding with the first, the norm and head "
            "with the last)",
    "accelerate": "planned for accelerate: tied parameters on one card (a tied head runs on its embedding's card, "
                  "which holds its input, logits and workspace too)",
}


@dataclass(frozen=True, slots=True)
class Units:
    """The table of units a peer's constraint leaves, and which original layers each unit holds."""

    table: LayerTable
    members: tuple[tuple[int, ...], ...]   # per unit, its original layers in order (accelerate: maybe not contiguous)
    exact: bool                            # no unit's workspace was clipped at 0

    @property
    def contiguous(self) -> bool:
        return all(m[-1] - m[0] == len(m) - 1 for m in self.members)


def decoder_units(table: LayerTable) -> list[tuple[int, ...]]:
    """vLLM: each decoder block with the layers that join it."""
    decoders = [i for i, layer in enumerate(table.layers)
                if any(is_decoder_block(m) for m in layer.modules or (layer.name,))]
    if not decoders:
        raise InputError(f"{table.name} has no decoder layers (modules named like model.layers.N): vLLM cannot "
                         "run it; plan without peer='vllm'", parameters=("peer",))
    starts = [0, *decoders[1:]]
    ends = [start - 1 for start in starts[1:]] + [len(table.layers) - 1]
    return [tuple(range(first, last + 1)) for first, last in zip(starts, ends)]


def tied_units(table: LayerTable) -> list[tuple[int, ...]]:
    """accelerate: each layer alone, except that a layer using an earlier layer's tensor joins that layer."""
    index = {layer.name: i for i, layer in enumerate(table.layers)}
    home = list(range(len(table.layers)))
    for i, layer in enumerate(table.layers):
        if layer.shared:
            home[i] = home[min(index[s.owner] for s in layer.shared)]
    groups: dict[int, list[int]] = {}
    for i, root in enumerate(home):
        groups.setdefault(root, []).append(i)
    return [tuple(groups[root]) for root in sorted(groups)]


def for_peer(table: LayerTable, peer: Peer, memory_model: MemoryModel) -> Units:
    if peer not in PEERS:
        raise InputError(f"peer must be one of {', '.join(PEERS)}, got {peer!r}", parameters=("peer",))
    members = decoder_units(table) if peer == "vllm" else tied_units(table)
    firsts = [m[0] for m in members]
    # The activation each unit passes on: its member just before the next unit's first layer (the last unit: its
    # last layer's, the model's output).
    passed = [table.layers[max(i for i in m if i < nxt)].activation_bytes for m, nxt in zip(members, firsts[1:])]
    passed.append(table.layers[members[-1][-1]].activation_bytes)
    inputs = [table.input_bytes if i == 0 else table.layers[i - 1].activation_bytes for i in range(len(table.layers))]
    extra = 0
    if memory_model == "pipeline":      # the units' receive buffer is the largest they pass; the rest of R stays
        extra = receive_buffer_bytes(table, memory_model) - max(passed[:-1], default=0)
    unit_of = {table.layers[i].name: u for u, m in enumerate(members) for i in m}
    names = ["+".join(_span_names(table, m)) for m in members]
    layers, exact = [], True
    for u, m in enumerate(members):
        # The units' table hands each unit the activation the unit before it passes (a unit after a tied layer
        # out of order may get another than its own first layer's input: that stays inside the max).
        into = passed[u - 1] if u else table.input_bytes
        layer, clipped = _unit(table, m, names, u, inputs, into, passed[u], memory_model, extra, unit_of)
        layers.append(layer)
        exact = exact and not clipped
    return Units(replace(table, layers=tuple(layers)), tuple(members), exact)


def _span_names(table: LayerTable, members: tuple[int, ...]) -> list[str]:
    """Names of a unit's runs of consecutive layers: ``a`` or ``a..b`` each."""
    runs: list[list[int]] = []
    for i in members:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return [table.layers[r[0]].name if len(r) == 1 else f"{table.layers[r[0]].name}..{table.layers[r[-1]].name}"
            for r in runs]


def _unit(table: LayerTable, members: tuple[int, ...], names: list[str], unit: int, inputs: list[int], into: int,
          out: int, model: MemoryModel, extra: int, unit_of: dict[str, int]) -> tuple[Layer, bool]:
    layers = [table.layers[i] for i in members]
    ins = [inputs[i] for i in members]
    whole, clipped = _merged(layers, ins, into, out, [x.split(1) for x in layers], model, extra)
    assert whole is not None
    splits = []
    for ways in sorted({s.ways for x in layers for s in x.splits}):
        split, more = _merged(layers, ins, into, out, [x.split(ways) for x in layers], model, extra)
        if split is not None:
            splits.append(split)
            clipped = clipped or more
    # A tensor keeps its original owner in its name: two owners joined in one unit may each share one "tied".
    shared = tuple(SharedTensor(f"{s.owner}/{s.tensor}", names[unit_of[s.owner]], s.bytes) for x in layers
                   for s in x.shared if unit_of[s.owner] != unit)
    modules = tuple(module for x in layers for module in (x.modules or (x.name,)))
    return Layer(names[unit], whole.weight_bytes, out, whole.workspace_bytes, whole.kv_cache_bytes, whole.flops,
                 modules, shared, tuple(splits), whole.read_bytes), clipped


def _merged(layers: list[Layer], ins: list[int], into: int, out: int, shares: list[Split | None],
            model: MemoryModel, extra: int) -> tuple[Split | None, bool]:
    """One card's share of a unit at one width (ways 1: whole), with the workspace that keeps its footprints."""
    parts = [share for share in shares if share is not None]
    if len(parts) != len(layers):
        return None, False
    if model == "sum":
        workspace = sum(x.activation_bytes + s.workspace_bytes for x, s in zip(layers, parts)) - out
    else:
        peak = max(i + x.activation_bytes + s.workspace_bytes for i, x, s in zip(ins, layers, parts))
        workspace = peak + extra - into - out
    read = None if all(s.read_bytes is None for s in parts) else sum(s.bytes_read for s in parts)
    return Split(parts[0].ways, sum(s.weight_bytes for s in parts), max(workspace, 0),
                 sum(s.kv_cache_bytes for s in parts), sum(s.flops for s in parts),
                 sum(s.allreduce_bytes for s in parts), sum(s.allreduces for s in parts),
                 sum(s.allgathers for s in parts), max(s.experts for s in parts), read), workspace < 0


def on_original_layers(plan: Plan, units: Units, table: LayerTable, settings: Settings, note: str) -> Plan:
    """``plan`` (made on the units): where every unit is a run of layers, rebuilt on the original layers (each
    stage's bytes from ``table``); otherwise (a tied head out of order) the units' plan, the model named as the
    original."""
    if not plan.found:
        return replace(plan, model=ModelInfo.of(table), diagnosis=(note, *plan.diagnosis), optimal=False)
    if not units.contiguous:
        return replace(plan, diagnosis=(note, *plan.diagnosis), optimal=plan.optimal and units.exact)
    stages = [Stage(units.members[p.first][0], units.members[p.last][-1], p.tensor_parallel)
              for p in plan.partitions]
    return build_plan(table, settings, stages, plan.capacity_bytes, lower_bound=plan.lower_bound_bytes,
                      optimal=plan.optimal and units.exact, notes=(note, *plan.diagnosis))
