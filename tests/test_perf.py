"""The performance model and ``plan --objective time``: hand-computed stage times, the exact DP against
enumeration, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefit import api
from cachefit.core.cost import LayerCosts, Rates, block_shares, rates_of, stage_time
from cachefit.core.hardware import load_devices
from cachefit.core.layers import Layer, LayerTable, Split
from cachefit.core.memory import interval_cost
from cachefit.perf.predict import predict_plan
from cachefit.planning import make_baseline_plan, make_plan
from cachefit.planning.algorithms.timed import least_time
from test_cli import run

import reference
from strategies import tables

RATES = Rates(flops=1e9, on_chip_bandwidth=1e9, off_chip_bandwidth=1e8, link_bandwidth=1e6, link_latency=1e-3,
              capacity_bytes=1000, sources={})


def _two_stage_plan() -> tuple[LayerTable, object]:
    # Two layers: 600 B of weights, 100 B out, 1e6 FLOPs each, batch 2. Capacity 800: one layer per card
    # (peak: 600 + in + out = 600 + 100 + 100 = 800).
    layers = tuple(Layer(f"l{i}", 600, 100, 0, 0, 1e6) for i in range(2))
    table = LayerTable("two", layers, input_bytes=100, batch=2, seq=4, phase="decode")
    return table, make_plan(table, [800])


def test_stage_times_by_hand() -> None:
    table, plan = _two_stage_plan()
    prediction = predict_plan(plan, table, RATES, micro_batches=2)
    first, last = prediction.stages
    # Per pass of one micro-batch (half the batch): compute 1e6 / 2 / 1e9 = 0.5 ms; footprint 800 > 1000? no:
    # resident, so memory = (600 weights + 2 x 100 / 2 activations) / 1e9 = 0.7 us.
    assert first.resident and first.compute_s == pytest.approx(5e-4) and first.memory_s == pytest.approx(7e-7)
    # Transfer of 50 B at 1 MB/s + 1 ms; the last card sends back 1 token id per sequence (8 B) instead.
    assert first.transfer_s == pytest.approx(50e-6 + 1e-3) and last.transfer_s == pytest.approx(8e-6 + 1e-3)
    # Decode: max(round trip, M x the slowest pass and its send) = max(0.5+1.05+0.5+1.008 = 3.058 ms,
    # 2 x (0.5 + 1.05) = 3.1 ms): each card posts every micro-batch's send on the thread that computes.
    assert prediction.decode_tpot_s == pytest.approx(2 * (5e-4 + 1.05e-3))
    one = predict_plan(plan, table, RATES, micro_batches=1)
    # M = 1: the whole batch a pass (1 ms; 100 B and 16 B sent): the round trip 1 + 1.1 + 1 + 1.016 ms.
    assert one.decode_tpot_s == pytest.approx(1e-3 + 1.1e-3 + 1e-3 + 1.016e-3)
    # Prefill of 4 tokens in passes of 1: 4 x 2 passes; (8 - 1) x slowest (0.5 + 1.05 ms) + one of each.
    assert prediction.prefill_s == pytest.approx(7 * 1.55e-3 + 1.55e-3 + 1.508e-3)
    assert prediction.prefill_tokens_per_s == pytest.approx(2 * 4 / prediction.prefill_s)


def test_a_table_measured_with_a_prompt_chunk_counts_a_token_s_activation_per_token() -> None:
    # The same two layers measured with prompt chunks of 4 (prefill_chunk): each holds the chunk pass's output,
    # 4 x 100 = 400 B, for memory; a decode pass (1 token) still moves 100 B in and out, a chunk pass 400 B, and the
    # first card still sends 50 B a micro-batch per token. Resident (a 10 kB card): memory = (600 + 2 x 50 x
    # tokens) / 1e9. Both plans are one layer a card (peak, chunked: 600 + 100 + 400, then 600 + 400 + 400 B).
    table, plan = _two_stage_plan()
    chunked = LayerTable("two", tuple(Layer(f"l{i}", 600, 400, 0, 0, 1e6) for i in range(2)), input_bytes=100,
                         batch=2, seq=4, phase="decode", prefill_chunk=4)
    roomy = Rates(**{**vars_of(RATES), "capacity_bytes": 10_000})
    ours = predict_plan(make_plan(chunked, [1400]), chunked, roomy, micro_batches=2, chunk=4)
    plain = predict_plan(plan, table, roomy, micro_batches=2, chunk=4)
    assert len(ours.stages) == len(plain.stages) == 2
    assert ours.stages[0].memory_s == pytest.approx(7e-7) == plain.stages[0].memory_s
    assert ours.prefill_stages[0].memory_s == pytest.approx((600 + 2 * 50 * 4) / 1e9)
    assert ours.stages[0].transfer_s == pytest.approx(50e-6 + 1e-3) == plain.stages[0].transfer_s
    assert ours.decode_tpot_s == pytest.approx(plain.decode_tpot_s)


def test_streaming_when_the_stage_is_over_the_device_capacity() -> None:
    table, plan = _two_stage_plan()
    small = Rates(**{**vars_of(RATES), "capacity_bytes": 700})
    stage = predict_plan(plan, table, small, micro_batches=1).stages[0]
    assert not stage.resident and stage.memory_s == pytest.approx((600 + 200) / 1e8)


def test_without_overlap_memory_and_compute_add_up() -> None:
    table, plan = _two_stage_plan()
    serial = Rates(**{**vars_of(RATES), "overlap": False})
    stage = predict_plan(plan, table, serial, micro_batches=2).stages[0]
    assert stage.pass_s == pytest.approx(5e-4 + 7e-7)


def test_fixed_costs_per_pass_and_per_block(tmp_path: Path) -> None:
    # embed | layers.0 | layers.1.attn, layers.1.mlp | head on one card: fixed = pass 0.2 ms + blocks 1 + 1/2 + 1/2
    # at 0.3 ms each = 0.8 ms; the embedding and head are in the pass figure. Bytes and FLOPs are nil.
    names = ["embed", "layers.0", "layers.1.attn", "layers.1.mlp", "head"]
    table = LayerTable("t", tuple(Layer(name, 0, 0, 0) for name in names), batch=1, seq=1, phase="decode")
    plan = make_plan(table, [10])
    fixed = Rates(**{**vars_of(RATES), "pass_seconds": 2e-4, "layer_seconds": 3e-4})
    stage = predict_plan(plan, table, fixed).stages[0]
    assert stage.fixed_s == pytest.approx(2e-4 + 2 * 3e-4) and stage.pass_s == pytest.approx(stage.fixed_s)
    assert predict_plan(plan, table, RATES).stages[0].fixed_s == 0.0      # datasheet devices list neither figure
    (tmp_path / "host.toml").write_text('[host]\nlabel = "h"\non_chip_bytes = 1000\non_chip_bandwidth = 1e9\n'
                                        'link_bandwidth = 1e9\nfp32_flops = 1e9\npass_seconds = 2e-4\n'
                                        'layer_seconds_llama = 3e-4\nlayer_seconds_dense = 1e-4\n')
    host = load_devices(tmp_path / "host.toml")["host"]
    assert rates_of(host, "float32", family="llama").layer_seconds == 3e-4
    assert rates_of(host, "float32", family="dense").layer_seconds == 1e-4
    assert rates_of(host, "float32").layer_seconds == 0.0 and rates_of(host, "float32").pass_seconds == 2e-4
    # A host without transformers' figures: a Hugging Face model's blocks get none, its pass the generic one.
    assert rates_of(host, "float32", family="hf").layer_seconds == 0.0
    assert rates_of(host, "float32", family="hf").pass_seconds == 2e-4


def test_hugging_face_blocks_carry_transformers_fixed_costs(tmp_path: Path) -> None:
    # model.embed_tokens | model.layers.0 | model.layers.1.self_attn, .mlp, .input_layernorm | model.norm, lm_head:
    # blocks 1 + 3 x 1/3 at 0.5 ms, plus transformers' pass 0.9 ms (not the reference models' 0.2 ms) = 1.9 ms.
    # GPT-2's blocks are transformer.h.N; a name that only ends in digits is no block.
    names = ["model.embed_tokens", "model.layers.0", "model.layers.1.self_attn", "model.layers.1.mlp",
             "model.layers.1.input_layernorm", "model.norm", "lm_head"]
    assert list(block_shares(names)) == pytest.approx([0, 1, 1 / 3, 1 / 3, 1 / 3, 0, 0])
    assert list(block_shares(["transformer.wte", "transformer.h.11", "transformer.h.11.mlp", "model.out.2"])
                ) == pytest.approx([0, 0.5, 0.5, 0])
    assert list(block_shares(["embed", "layers.0.attn", "layers.0.mlp", "layers.1", "head"])) == [0, 0.5, 0.5, 1, 0]
    (tmp_path / "host.toml").write_text('[host]\nlabel = "h"\non_chip_bytes = 1000\non_chip_bandwidth = 1e9\n'
                                        'link_bandwidth = 1e9\nfp32_flops = 1e9\npass_seconds = 2e-4\n'
                                        'pass_seconds_hf = 9e-4\nlayer_seconds_llama = 3e-4\n'
                                        'layer_seconds_hf = 5e-4\n')
    rates = rates_of(load_devices(tmp_path / "host.toml")["host"], "float32", family="hf")
    assert (rates.pass_seconds, rates.layer_seconds) == (9e-4, 5e-4) and "pass_seconds_hf" in rates.sources
    table = LayerTable("t", tuple(Layer(name, 0, 0, 0) for name in names), batch=1, seq=1, phase="decode")
    stage = predict_plan(make_plan(table, [10]), table, rates).stages[0]
    assert stage.fixed_s == pytest.approx(9e-4 + 2 * 5e-4)


def vars_of(rates: Rates) -> dict[str, object]:
    return {name: getattr(rates, name) for name in Rates.__slots__}


def test_missing_figures_name_the_fix(tmp_path: Path) -> None:
    (tmp_path / "cards.toml").write_text('[bare]\nlabel = "Bare"\non_chip_bytes = 1000000\n'
                                         'on_chip_bandwidth = 1e12\nlink_bandwidth = 1e9\n')
    with pytest.raises(ValueError, match=r"no fp16_flops figure.*devices_file"):   # the API speaks of parameters
        rates_of(load_devices(tmp_path / "cards.toml")["bare"], "float16")
    rates = rates_of(load_devices()["h100"], "bfloat16")
    assert rates.flops == 989e12 and rates.link_latency == 5e-6 and "(A)" in rates.sources["link_latency"]
    # A rate the catalog lacks comes from the nearest one it lists, said as an assumption: d-Matrix lists FP8 only.
    corsair = rates_of(load_devices()["dmatrix-corsair"], "float16")
    assert corsair.flops == 1200e12 and "assumed 0.5 x fp8_flops" in corsair.sources["flops"]


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_predict_works_on_every_catalog_device(dtype: str) -> None:
    plan = api.plan("tiny-llama", capacity="1MiB", dtype=dtype)
    for name in api.devices():
        ours, _ = api.predict(plan, device=name)
        assert ours.decode_tokens_per_s > 0 and ours.sources["flops"], name


def _brute_least_time(table: LayerTable, model: str, costs: LayerCosts, capacity: int, cards: int) -> float | None:
    best = None
    for runs in reference.compositions(len(table.layers), cards):
        sizes = [reference.footprint(table, model, a, b) for a, b in runs]
        if any(size > capacity for size in sizes):
            continue
        shared = [interval_cost(table, model).shared_bytes(a, b) for a, b in runs]
        times = [stage_time(costs, a, b, size, extra) for (a, b), size, extra in zip(runs, sizes, shared)]
        worst = max(t.pass_s + t.transfer_s for t in times)
        best = worst if best is None or worst < best else best
    return best


@settings(max_examples=300, deadline=None)
@given(tables(max_layers=6), st.sampled_from(["sum", "peak"]), st.integers(1, 6), st.integers(5, 80),
       st.integers(0, 60), st.data())
def test_least_time_matches_enumeration(table: LayerTable, model: str, cards: int, capacity: int, on_chip: int,
                                        data: st.DataObject) -> None:
    n = len(table.layers)
    draw = lambda: np.array(data.draw(st.lists(st.integers(0, 9), min_size=n, max_size=n)), dtype=float)  # noqa: E731
    rates = Rates(1.0, 2.0, 0.5, 1.0, 0.0, on_chip, {}, data.draw(st.booleans()),
                  pass_seconds=data.draw(st.sampled_from([0.0, 2.5])))
    costs = LayerCosts(1, draw(), draw(), draw(), draw(), rates, draw())    # the last: each layer's fixed cost
    found = least_time(interval_cost(table, model), costs, capacity, cards) if cards <= n else None
    expected = _brute_least_time(table, model, costs, capacity, cards) if cards <= n else None
    assert (found is None) == (expected is None)
    if found is not None:
        assert found.bottleneck_seconds == pytest.approx(expected)
        assert len(found.lasts) == cards and found.lasts[-1] == n - 1


def test_predict_cli_with_the_baseline(tmp_path: Path) -> None:
    code, _, _ = run("plan", "seed-dense16", "--device", "dmatrix-corsair", "--batch", "1", "-o",
                     str(tmp_path / "p.json"))
    assert code == 0
    code, stdout, _ = run("predict", str(tmp_path / "p.json"), "--device", "h100", "--baseline", "tp=8,pp=2",
                          "--format", "json")
    document = json.loads(stdout)
    assert code == 0 and document["baseline"]["layout"] == "tp=8,pp=2"
    assert len(document["prediction"]["stages"]) == 16 and len(document["baseline"]["stages"]) == 2
    # On an H100, one whole seed layer (1.6 GB) cannot be resident: it streams at off-chip bandwidth.
    assert not document["prediction"]["stages"][0]["resident"]
    code, stdout, _ = run("predict", str(tmp_path / "p.json"), "--device", "h100")
    assert code == 0 and "decode TPOT ms" in stdout
    code, stdout, _ = run("predict", str(tmp_path / "p.json"))          # d-Matrix: its FP16 rate assumed from FP8
    assert code == 0 and "assumed 0.5 x fp8_flops" in stdout
    code, _, stderr = run("predict", str(tmp_path / "p.json"), "--device", "nope")
    assert code == 2 and "--devices-file" in stderr                      # the CLI of flags


def test_plan_objective_time_cli() -> None:
    code, stdout, _ = run("plan", "llama-3-8b", "--device", "h100", "--capacity", "2GB", "--objective", "time",
                          "--format", "json")
    document = json.loads(stdout)
    assert code == 0 and document["objective"] == "time" and document["cards"] == 9
    assert "slowest predicted stage" in document["diagnosis"][0]
    code, _, stderr = run("plan", "llama-3-8b", "--capacity", "2GB", "--objective", "time")
    assert code == 2 and "--device" in stderr
    assert api.plan("llama-3-8b", capacity="2GB").cards == 9


def test_seed_report_writes_the_analysis_and_the_measured_runs(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    from cachefit.runtime import calibrate
    from test_calibrate import FIGURES

    monkeypatch.setattr(calibrate, "measure_host", lambda progress=None: FIGURES)
    code, _, stderr = run("seed-report", "--out-dir", str(tmp_path), "--baseline", "tp=2,pp=1")
    assert code == 0, stderr
    text = (tmp_path / "seed-experiment.md").read_text()
    assert "30.7x the whole L2" in text and "768 H100 L2s" in text and "12,800 x 0.078 ms = 1.00" in text
    assert "| baseline tp=2,pp=1 | measured | 2 | tokens identical |" in text
    assert "| layer-wise pp=2 | predicted | 2 |" in text
    assert (tmp_path / "seed-layers-vs-h100-l2.png").stat().st_size > 0
    assert (tmp_path / "seed-predicted-speed.png").stat().st_size > 0


def test_allreduce_term_by_hand() -> None:
    # Two layers of 600 B, 100 B out, each split 2 ways: 300 B and 5e5 FLOPs per card, two all-reduces of the
    # whole 100 B output per pass (after attention, after the MLP). One stage on a group of 2 cards.
    split = Split(2, 300, 0, 0, 5e5, 200, 2)
    layers = tuple(Layer(f"l{i}", 600, 100, 0, 0, 1e6, (), (), (split,)) for i in range(2))
    table = LayerTable("tp", layers, input_bytes=100, batch=2, seq=4, phase="decode")
    plan = make_baseline_plan(table, 10**6, 2, 1)
    stage = predict_plan(plan, table, RATES, micro_batches=1).stages[0]
    # Ring all-reduce of S = 100 B over t = 2: 2(t-1)/t * S / 1 MB/s + 2(t-1) x 1 ms = 0.1 ms + 2 ms = 2.1 ms;
    # four of them (2 per layer) = 8.4 ms. Compute: 2 x 5e5 / 1e9 = 1 ms; memory: 2 x (300 + 2 x 100) B / 1e9
    # (per card 600 B + 200 B transient <= 1000 B: resident) = 1 us. Pass: max(1 ms, 1 us) + 8.4 ms.
    assert stage.allreduce_s == pytest.approx(8.4e-3)
    assert stage.compute_s == pytest.approx(1e-3) and stage.memory_s == pytest.approx(1e-6)
    assert stage.pass_s == pytest.approx(9.4e-3)
    collective = Rates(**{**vars_of(RATES), "collective_latency": 1e-4})     # per ring step, when measured
    assert predict_plan(plan, table, collective).stages[0].allreduce_s == pytest.approx(4 * (1e-4 + 2e-4))


def test_allgather_term_by_hand() -> None:
    # A vocab-parallel head of 2 cards: its 100 B of logits gathered once per pass, a ring all-gather:
    # (t-1)/t x 100 B / 1 MB/s + (t-1) x 1 ms = 0.05 ms + 1 ms = 1.05 ms (half an all-reduce).
    split = Split(2, 300, 0, 0, 0.0, 0, 0, 1)
    layers = (Layer("body", 600, 100, 0, 0, 0.0, (), (), (Split(2, 300, 0),)),
              Layer("head", 600, 100, 0, 0, 0.0, (), (), (split,)))
    table = LayerTable("vocab", layers, input_bytes=100, batch=2, seq=4, phase="decode")
    stage = predict_plan(make_baseline_plan(table, 10**6, 2, 1), table, RATES).stages[0]
    assert stage.allreduce_s == pytest.approx(1.05e-3)


def _host(tmp_path: Path, pass_s: float, layer_s: float, latency: float, on_chip: int = 4 << 20) -> Path:
    # A made-up calibrated host: 10 GB/s on chip, 1 GB/s off chip, 100 GFLOP/s, fixed costs as given.
    path = tmp_path / "host.toml"
    path.write_text(f'[host]\nlabel = "h"\non_chip_bytes = {on_chip}\non_chip_bandwidth = 1e10\n'
                    'off_chip_bandwidth = 1e9\nlink_bandwidth = 1e9\nfp32_flops = 1e11\nfp16_flops = 1e11\n'
                    f'link_latency = {latency}\npass_seconds = {pass_s}\nlayer_seconds_llama = {layer_s}\n'
                    f'layer_seconds_dense = {layer_s}\n')
    return path


def test_one_card_is_said_to_be_faster_below_the_crossover(tmp_path: Path) -> None:
    # tiny-llama (1.7 MB, fits the 4 MiB cache whole): on 2 cards each pass saves ~0.1 ms of reads but pays a 1 ms
    # hop and its own 1 ms pass cost, so one card decodes faster; plan and predict both say so.
    slow = _host(tmp_path, pass_s=1e-3, layer_s=1e-4, latency=1e-3)
    code, stdout, _ = run("plan", "tiny-llama", "--device", "host", "--devices-file", str(slow), "--cards", "2",
                          "-o", str(tmp_path / "p.json"))
    assert code == 0 and "one card is faster here" in " ".join(stdout.split())
    code, stdout, _ = run("predict", str(tmp_path / "p.json"), "--devices-file", str(slow), "--micro-batches", "2")
    assert code == 0 and "One card is faster" in stdout
    alone = api.one_card(tmp_path / "p.json", devices_file=slow)
    split, _ = api.predict(tmp_path / "p.json", devices_file=slow, micro_batches=2)
    assert alone is not None and len(alone.stages) == 1 and alone.decode_tokens_per_s > split.decode_tokens_per_s


def test_above_the_crossover_the_split_is_said_to_be_faster(tmp_path: Path) -> None:
    # tiny-llama (3.3 MiB) on cards of 2 MiB, no fixed costs: whole, it streams at 1 GB/s; each half (1.8 MiB)
    # reads at 10 GB/s on chip, so the split decodes faster and the plan carries no such note.
    fast = _host(tmp_path, pass_s=0.0, layer_s=0.0, latency=1e-6, on_chip=2 << 20)
    code, stdout, _ = run("plan", "tiny-llama", "--device", "host", "--devices-file", str(fast), "--cards", "2",
                          "-o", str(tmp_path / "p.json"))
    assert code == 0 and "one card is faster" not in stdout
    code, stdout, _ = run("predict", str(tmp_path / "p.json"), "--devices-file", str(fast), "--micro-batches", "2")
    assert code == 0 and "This plan decodes" in stdout and "One card is faster" not in stdout
    alone = api.one_card(tmp_path / "p.json", devices_file=fast)
    assert alone is not None and not alone.stages[0].resident


def test_no_one_card_comparison_where_one_card_cannot_run_the_model(tmp_path: Path) -> None:
    # seed-dense16 on d-Matrix Corsair cards: SRAM only, so one card cannot stream what it does not hold.
    code, _, _ = run("plan", "seed-dense16", "--device", "dmatrix-corsair", "--batch", "1", "-o",
                     str(tmp_path / "p.json"))
    assert code == 0 and api.one_card(tmp_path / "p.json") is None
