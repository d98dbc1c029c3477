"""Tensor groups: exact split plans against enumeration, hand-sized plans, the baseline, formats and the seed."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefit import api
from cachefit.core.layers import Layer, LayerTable, SharedTensor, Split
from cachefit.core.memory import per_card_table
from cachefit.core.records import Plan
from cachefit.planning import make_baseline_plan, make_split_plan, parse_baseline
from cachefit.sources import TorchOptions

import reference
from strategies import SIZES, tables

WIDTHS = (2, 3)


@st.composite
def split_tables(draw: st.DrawFn) -> LayerTable:
    """Random tables whose layers allow random widths with random per-card sizes (no tied weights)."""
    table = draw(tables(max_layers=5, shared=False))
    layers = []
    for layer in table.layers:
        splits = tuple(Split(ways, draw(SIZES), draw(SIZES), draw(SIZES)) for ways in WIDTHS if draw(st.booleans()))
        layers.append(Layer(layer.name, layer.weight_bytes, layer.activation_bytes, layer.workspace_bytes,
                            layer.kv_cache_bytes, 0.0, (), (), splits))
    return LayerTable("random", tuple(layers), table.input_bytes)


@st.composite
def tied_split_tables(draw: st.DrawFn) -> LayerTable:
    """Random split tables (2-5 layers) whose last layer shares a tensor the first owns, as a tied head shares
    the embedding; every layer splits both ways, so a vocab-parallel head's share of the tie is drawn too."""
    table = draw(split_tables().filter(lambda t: len(t.layers) >= 2))
    tie = draw(SIZES)
    first, *middle, last = table.layers
    owner_splits = tuple(Split(w, tie // w + draw(SIZES), draw(SIZES), draw(SIZES)) for w in WIDTHS)
    owner = Layer(first.name, first.weight_bytes + tie, first.activation_bytes, first.workspace_bytes,
                  first.kv_cache_bytes, 0.0, (), (), owner_splits)
    user = Layer(last.name, last.weight_bytes, last.activation_bytes, last.workspace_bytes, last.kv_cache_bytes,
                 0.0, (), (SharedTensor("tied", first.name, tie),),
                 tuple(Split(w, draw(SIZES), draw(SIZES), draw(SIZES)) for w in WIDTHS))
    return LayerTable("tied", (owner, *middle, user), table.input_bytes)


def _share(table: LayerTable, ways: int) -> tuple[LayerTable, list[bool]]:
    """The per-card table of width ``ways`` (layers without that width left whole) and which layers allow it,
    written out independently of cachefit.core.memory. A shared tensor is held per card as its owner holds it at
    that width: min(tensor, the owner's share) (a vocab-parallel head needs its slice of the tied embedding)."""
    owners = {x.name: x for x in table.layers}
    layers, allowed = [], []
    for x in table.layers:
        found = [s for s in x.splits if s.ways == ways]
        allowed.append(ways == 1 or bool(found))
        if ways > 1 and found:
            shared = []
            for tie in x.shared:
                held = [s.weight_bytes for s in owners[tie.owner].splits if s.ways == ways]
                shared.append(SharedTensor(tie.tensor, tie.owner, min(tie.bytes, *held)))
            x = Layer(x.name, found[0].weight_bytes, x.activation_bytes, found[0].workspace_bytes,
                      found[0].kv_cache_bytes, 0.0, (), tuple(shared))
        layers.append(x)
    return LayerTable(table.name, tuple(layers), table.input_bytes), allowed


def _all_plans(table: LayerTable, model: str) -> list[tuple[int, int]]:
    """(cards, bottleneck) of every split plan: every composition, every width per stage."""
    n, found = len(table.layers), []
    shares = {ways: _share(table, ways) for ways in (1, *WIDTHS)}
    for stages in range(1, n + 1):
        for runs in reference.compositions(n, stages):
            for widths in itertools.product((1, *WIDTHS), repeat=stages):
                sizes = []
                for (first, last), ways in zip(runs, widths):
                    share, allowed = shares[ways]
                    if not all(allowed[first:last + 1]):
                        break
                    sizes.append(_stage_footprint(table, share, model, first, last))
                else:
                    found.append((sum(widths), max(sizes)))
    return found


def _stage_footprint(table: LayerTable, share: LayerTable, model: str, first: int, last: int) -> int:
    """reference.footprint of the stage on its cards, with the whole table's receive buffer for ``pipeline``."""
    base = reference.footprint(share, "peak" if model == "pipeline" else model, first, last)
    if model == "pipeline" and len(table.layers) > 1:
        base += max(x.activation_bytes for x in table.layers[:-1])
    return base


@settings(max_examples=300, deadline=None)
@given(split_tables(), st.sampled_from(["sum", "peak", "pipeline"]), st.integers(1, 60))
def test_fewest_split_cards_matches_enumeration(table: LayerTable, model: str, capacity: int) -> None:
    plans = _all_plans(table, model)
    fitting = [cards for cards, bottleneck in plans if bottleneck <= capacity]
    plan = make_split_plan(table, capacity, memory_model=model)  # type: ignore[arg-type]
    assert plan.feasible == bool(fitting)
    if fitting:
        assert plan.cards == min(fitting)
        best = min(b for c, b in plans if c <= plan.cards)
        assert plan.bottleneck_bytes == best
        assert plan.lower_bound_bytes <= best
        assert max(p.footprint_bytes for p in plan.partitions) == plan.bottleneck_bytes <= capacity


@settings(max_examples=300, deadline=None)
@given(split_tables(), st.sampled_from(["sum", "peak"]), st.integers(1, 8))
def test_split_min_max_matches_enumeration(table: LayerTable, model: str, budget: int) -> None:
    best = min(b for c, b in _all_plans(table, model) if c <= budget) if budget >= 1 else None
    plan = make_split_plan(table, 10**9, cards=budget, memory_model=model)  # type: ignore[arg-type]
    assert plan.feasible and plan.bottleneck_bytes == best and plan.cards <= budget
    assert plan.lower_bound_bytes <= best
    assert [p.tensor_parallel for p in plan.partitions] and all(
        p.footprint_bytes == p.weight_bytes + p.activation_bytes + p.workspace_bytes + p.kv_cache_bytes
        for p in plan.partitions)


@settings(max_examples=200, deadline=None)
@given(tied_split_tables(), st.sampled_from(["sum", "peak", "pipeline"]), st.integers(1, 8))
def test_split_plans_with_a_tied_vocab_parallel_head_match_enumeration(table: LayerTable, model: str,
                                                                      budget: int) -> None:
    best = min(b for c, b in _all_plans(table, model) if c <= budget)
    plan = make_split_plan(table, 10**9, cards=budget, memory_model=model)  # type: ignore[arg-type]
    assert plan.feasible and plan.bottleneck_bytes == best and plan.cards <= budget
    assert plan.lower_bound_bytes <= best


def _two_layer_table() -> LayerTable:
    # Two layers of 60 B weights, 4 B out, 0 workspace, splittable 2 ways into 30 B each. input 4 B.
    # Whole (peak): one layer = 60 + (4 + 4) = 68 B; both = 120 + 8 = 128 B.
    # Split 2 ways: one layer per card = 30 + 8 = 38 B; both layers on a group of 2 = 60 + 8 = 68 B.
    layer = [Layer(f"l{i}", 60, 4, 0, 0, 0.0, (), (), (Split(2, 30, 0),)) for i in range(2)]
    return LayerTable("two", tuple(layer), input_bytes=4)


def test_hand_sized_split_plan() -> None:
    table = _two_layer_table()
    # capacity 70: whole layers need 2 cards (68 B each); a group of 2 holding both also needs 2 cards (68 B):
    # a tie, so the narrower groups win.
    plan = make_split_plan(table, 70)
    assert plan.cards == 2 and [p.tensor_parallel for p in plan.partitions] == [1, 1]
    # capacity 50: no layer fits whole (68 B); split 2 ways, one group of 2 holds both (68 B)? no, 68 > 50;
    # so each layer on its own group of 2: 38 B per card, 4 cards.
    plan = make_split_plan(table, 50)
    assert plan.cards == 4 and plan.bottleneck_bytes == 38
    assert [(p.card, p.cards, p.tensor_parallel) for p in plan.partitions] == [(0, (0, 1), 2), (2, (2, 3), 2)]
    # capacity 37: nothing fits; the weights alone need 120 B over cards of 37 B: at least 4 cards.
    plan = make_split_plan(table, 37)
    assert not plan.feasible and "38" in plan.diagnosis[0] and "at least 4 cards" in plan.diagnosis[-1]


def test_auto_split_only_when_whole_layers_do_not_fit() -> None:
    table = _two_layer_table()
    assert all(p.tensor_parallel == 1 for p in api.plan(table, 70).partitions)
    grouped = api.plan(table, 50)
    assert grouped.feasible and grouped.cards == 4 and "tensor groups" in grouped.diagnosis[0]
    assert not api.plan(table, 50, split="never").feasible


def test_plan_with_groups_round_trips(tmp_path) -> None:
    plan = make_split_plan(_two_layer_table(), 50)
    plan.write(tmp_path / "plan.json")
    assert Plan.read(tmp_path / "plan.json") == plan
    document = json.loads((tmp_path / "plan.json").read_text())
    assert document["partitions"][1]["cards"] == [2, 3] and document["partitions"][1]["tensor_parallel"] == 2
    document["partitions"][1]["cards"] = [2, 5]
    with pytest.raises(ValueError, match=r"partitions\[1\].cards must be 2..3"):
        Plan.from_dict(document)
    del document["partitions"][1]["cards"], document["partitions"][1]["tensor_parallel"]
    with pytest.raises(ValueError, match="on 4 cards"):       # a width-1 stage 1 leaves card 3 uncovered
        Plan.from_dict(document)


def test_layer_table_with_splits_round_trips(tmp_path) -> None:
    table = api.load_model("tiny-llama")
    assert table.split_ways[0] == 1 and len(table.split_ways) > 1
    table.write(tmp_path / "t.json")
    assert LayerTable.read(tmp_path / "t.json") == table
    document = json.loads((tmp_path / "t.json").read_text())
    document["layers"][1]["splits"][0]["ways"] = 1
    with pytest.raises(ValueError, match=r"ways"):
        LayerTable.from_dict(document)


@pytest.mark.parametrize("preset", ["tiny-dense4", "tiny-llama", "llama-3-8b", "seed-dense16"])
def test_family_splits_divide_what_the_split_divides(preset: str) -> None:
    table = api.load_model(preset)
    for layer in table.layers:
        for share in layer.splits:
            if layer.name.startswith("layers."):
                # Dense blocks have no norms: weights divide exactly. Llama keeps two d-vectors of norms whole,
                # and K/V heads replicate once the width passes the KV heads: never less than whole / ways.
                assert share.weight_bytes * share.ways >= layer.weight_bytes
                assert share.kv_cache_bytes * share.ways >= layer.kv_cache_bytes
                assert share.weight_bytes < layer.weight_bytes
                if preset.startswith(("tiny-dense", "seed")):
                    assert share.weight_bytes * share.ways == layer.weight_bytes
                    assert share.kv_cache_bytes * share.ways == layer.kv_cache_bytes
            elif layer.name == "embed":         # vocab-parallel: the widths the blocks allow all divide V here
                assert share.weight_bytes * share.ways == layer.weight_bytes and share.allreduces == 1
            else:                               # the head's columns by vocabulary, then one all-gather
                assert share.allgathers == 1 and share.weight_bytes <= layer.weight_bytes


def test_vocab_parallel_embedding_and_head_by_hand() -> None:
    # tiny-llama: V = 512, d = 128, float32 (p = 4), batch 2, decode (T = 2 tokens), head tied to the embedding.
    table = api.load_model("tiny-llama")
    embed, head = table.layers[0].split(2), table.layers[-1].split(2)
    assert embed is not None and head is not None
    # Embedding split 2 ways: 256 rows x 128 x 4 B = 131,072 B per card; the ids shifted, masked and clamped
    # (8 + 1 + 8 B a token) = 34 B; one all-reduce of the T x d x p = 1,024 B output.
    assert (embed.weight_bytes, embed.workspace_bytes, embed.allreduce_bytes, embed.allreduces) == (131072, 34,
                                                                                                   1024, 1)
    # Head: its final norm (128 x 4 B) of its own (tied); local logits b x V/2 x p = 2,048 B and the gathered
    # pieces b x V x p = 4,096 B; 2 x b x d x V/2 = 131,072 FLOPs; one all-gather.
    assert (head.weight_bytes, head.workspace_bytes, head.flops, head.allgathers) == (512, 6144, 131072.0, 1)
    # On a card of a 2-wide group the tied embedding the head uses is the card's half of it.
    card, _ = per_card_table(table, 2)
    assert card.layers[-1].shared[0].bytes == 131072 == card.layers[0].weight_bytes


def test_sram_chips_plan_mainstream_models_with_the_embedding_split() -> None:
    # The 1,002 MiB embedding of Llama-3-8B fits no 220 MiB Groq LPU whole; split by vocabulary it does.
    plan = api.plan("llama-3-8b", device="groq-lpu")
    assert plan.feasible and plan.partitions[0].first == 0 and plan.partitions[0].tensor_parallel >= 5
    assert plan.bottleneck_bytes <= plan.capacity_bytes[0]


def test_baseline_plan_is_built_and_says_whether_it_fits() -> None:
    table = api.load_model("seed-dense16")
    plan = make_baseline_plan(table, 39321600, 8, 2)
    assert plan.cards == 16 and plan.layout == "baseline" and plan.strategy is None and plan.found and not plan.feasible
    assert [(p.first, p.last, p.tensor_parallel) for p in plan.partitions] == [(0, 7, 8), (8, 15, 8)]
    # 8 layers x 1/8 of 1,610,612,736 B of weights per card, plus their KV share
    assert plan.partitions[0].weight_bytes == 8 * 1610612736 // 8
    assert "does not fit on-chip" in plan.diagnosis[0]
    assert Plan.from_dict(plan.to_dict()) == plan
    uneven = make_baseline_plan(api.load_model("tiny-dense4"), 10**9, 2, 4)   # 6 layers over 4 stages
    assert [(p.first, p.last) for p in uneven.partitions] == [(0, 1), (2, 3), (4, 4), (5, 5)]
    assert uneven.feasible and uneven.cards == 8
    with pytest.raises(ValueError, match="tp=3 is not a split every layer allows"):
        make_baseline_plan(table, 10**9, 3, 2)
    with pytest.raises(ValueError, match="tp=8,pp=2"):
        parse_baseline("tp=eight")


def test_seed_gets_an_honest_answer() -> None:
    plan = api.plan("seed-dense16", device="h100")
    assert not plan.feasible
    text = "\n".join(plan.diagnosis)
    assert "split 16 ways" in text and "96.0 MiB per card" in text
    assert "at least" in plan.diagnosis[-1] and "cards of 37.5 MiB" in plan.diagnosis[-1]


def test_sublayers_keep_the_block_totals_and_split_the_mlp_finer() -> None:
    blocks = api.load_model("llama-3-8b")
    halves = api.load_model("llama-3-8b", torch_options=TorchOptions(granularity="sublayer"))
    assert len(halves.layers) == len(blocks.layers) + 32
    for column in ("weight_bytes", "kv_cache_bytes", "flops"):
        assert sum(getattr(x, column) for x in halves.layers) == sum(getattr(x, column) for x in blocks.layers)
    attention, mlp = halves.layers[1], halves.layers[2]
    assert attention.name == "layers.0.attn" and mlp.name == "layers.0.mlp"
    assert max(s.ways for s in attention.splits) == 32 and max(s.ways for s in mlp.splits) == 14336
    with pytest.raises(ValueError, match="sublayer"):
        api.load_model("tiny-llama", torch_options=TorchOptions(granularity="sublayer", measure=True))


def test_the_seed_fits_h100_l2_only_split_finer_and_with_a_short_context() -> None:
    # Attention split by its 16 heads holds 32 MiB of weights per card, the MLP split 32 ways 32 MiB: both fit the
    # 37.5 MiB an H100's L2 is planned with, when the context is short (1,000 tokens, one sequence).
    sublayer = TorchOptions(granularity="sublayer")
    plan = api.plan("seed-dense16", device="h100", batch=1, seq=1000, torch_options=sublayer)
    assert plan.feasible and plan.bottleneck_bytes <= 39321600
    # No plan uses fewer cards than the weights need: 16 x 1,610,612,736 B over 39,321,600 B per card.
    assert plan.cards >= -(-16 * 1610612736 // 39321600) == 656
    assert plan.lower_bound_bytes <= plan.bottleneck_bytes
    # The seed's own context (10,000 tokens): one head's KV cache is 20 MB, beside its 32 MiB of weights.
    assert api.largest_micro_batch("seed-dense16", device="h100", torch_options=sublayer) is None
