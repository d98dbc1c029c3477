"""``cachefit seed-report``: the seed's experiment, redone honestly, written by the tool (docs/seed-experiment.md).

Full scale, analytical: does seed-dense16 fit an H100's L2, what would (splitting, micro-batch, SRAM chips), and the
predicted speed of the seed's baseline and of layer-wise placement beside the seed's claims. CPU scale, measured:
the same shape scaled down, the same number of ranks, the baseline against layer-wise, each beside its prediction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachefit import Prediction, api
from cachefit.apps.seed_text import render
from cachefit.core.files import atomic_output, atomic_write_text
from cachefit.core.memory import interval_cost
from cachefit.core.records import Plan
from cachefit.core.units import format_size
from cachefit.output import report
from cachefit.sources import TorchOptions
from cachefit.sources.spec import parse_spec_text

__all__ = ["CLAIMS", "Row", "full_scale", "measured_small", "write_report"]

# seed.md, "Experimental Results": 16 H100s, FP16, batch 1024, seq 10000.
CLAIMS = {"baseline tp=8,pp=2": (12800.0, 0.078), "layer-wise (seed)": (15360.0, 0.065)}
SUBLAYER = TorchOptions(granularity="sublayer")


@dataclass(frozen=True, slots=True)
class Row:
    """One predicted (or measured) layout: what, on how many cards, its speed, and whether it is resident."""

    layout: str
    workload: str
    cards: int
    resident: str
    tokens_per_s: float
    tpot_ms: float
    note: str = ""


def _predicted(layout: str, workload: str, plan: Plan, device: str, micro: int = 1, note: str = "") -> Row:
    prediction: Prediction = api.predict(plan, device=device, micro_batches=micro)[0]
    resident = sum(s.resident for s in prediction.stages)
    return Row(layout, workload, plan.cards, f"{resident}/{len(prediction.stages)} stages",
               prediction.decode_tokens_per_s, prediction.decode_tpot_s * 1e3, note)


def full_scale(folder: Path) -> dict[str, Any]:
    """The analytical half: facts, what would fit, predictions. Writes the plots into ``folder``."""
    table = api.load_model("seed-dense16")
    h100 = api.devices()["h100"]
    whole = api.plan(table, device="h100", split="never")
    report.plot_plan(whole, table, folder / "seed-layers-vs-h100-l2.png")
    facts: dict[str, Any] = {
        "table": table, "layer": table.layers[0], "h100": h100, "single": interval_cost(table, "peak").footprint(0, 0),
        "kv_total": sum(x.kv_cache_bytes for x in table.layers),
        "hbm_total": 16 * int(h100.figure("off_chip_bytes").value),  # type: ignore[union-attr]
        "blocks": api.plan(table, device="h100"),
        "sublayer": api.plan("seed-dense16", device="h100", torch_options=SUBLAYER),
        "micro": api.largest_micro_batch("seed-dense16", device="h100", torch_options=SUBLAYER),
        "short": api.plan("seed-dense16", device="h100", batch=1, seq=1000, torch_options=SUBLAYER),
        "sram": _sram_cards(), "small": parse_spec_text(SMALL_SPEC, "seed-small")[:2]}
    facts["rows"] = _predictions(facts["short"])
    _plot_predictions(facts["rows"], folder / "seed-predicted-speed.png")
    return facts


def _sram_cards() -> list[tuple[str, str]]:
    """Catalog devices on which seed-dense16 at batch 1 (seq 10000, decode) has a whole-layer plan."""
    found = []
    table = api.load_model("seed-dense16", batch=1)
    for name, device in api.devices().items():
        plan = api.plan(table, device=name, split="never")
        found.append((f"{device.label} ({format_size(device.capacity_bytes)})",
                      f"{plan.cards} card{'s' if plan.cards > 1 else ''}" if plan.feasible
                      else "no: a layer does not fit"))
    return found


def _predictions(short: Plan) -> list[Row]:
    """The seed's baseline and layer-wise placement on 16 H100s at the seed's context, two batches (the seed's, and
    one sequence, which its own TPS x TPOT implies), and the L2-resident plan where one exists."""
    rows = []
    for batch in (1024, 1):
        workload = f"batch {batch}, seq 10000"
        base = api.plan("seed-dense16", device="h100", baseline="tp=8,pp=2", batch=batch)
        layerwise = api.plan("seed-dense16", device="h100", baseline="tp=1,pp=16", batch=batch)
        # As many micro-batches as stages (when the batch allows), so every stage of a pipeline works at once.
        rows.append(_predicted("baseline tp=8,pp=2", workload, base, "h100", min(batch, 2),
                               note=f"{min(batch, 2)} micro-batch(es)"))
        rows.append(_predicted("layer-wise pp=16 (one layer per H100)", workload, layerwise, "h100",
                               min(batch, 16), note=f"{min(batch, 16)} micro-batch(es)"))
    workload = "batch 1, seq 1000"
    base = api.plan("seed-dense16", device="h100", baseline="tp=8,pp=2", batch=1, seq=1000)
    rows.append(_predicted("baseline tp=8,pp=2", workload, base, "h100"))
    rows.append(_predicted(f"L2-resident split plan ({short.cards} H100s)", workload, short, "h100",
                           note="attention split by heads, the MLP by columns (--granularity sublayer)"))
    return rows


def _plot_predictions(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.layout}\n{r.workload}" for r in rows] + [f"seed claim: {k}" for k in CLAIMS]
    values = [r.tokens_per_s for r in rows] + [v[0] for v in CLAIMS.values()]
    colors = ["#4C72B0"] * len(rows) + ["#C44E52"] * len(CLAIMS)
    figure, axes = plt.subplots(figsize=(10, 5))
    axes.barh(range(len(values)), values, color=colors)
    axes.set_yticks(range(len(values)), labels, fontsize=7)
    axes.set_xscale("log")
    axes.set_xlabel("decode tokens/s (log scale): predicted (blue), claimed by the seed (red)")
    axes.set_title("seed-dense16: predicted decode throughput (cachefit predict) vs the seed's claims")
    figure.tight_layout()
    with atomic_output(path, "plot") as temporary:
        figure.savefig(str(temporary), dpi=120, format="png")
    plt.close(figure)


def write_report(path: Path, facts: dict[str, Any], measured: list[Row] | None) -> None:
    atomic_write_text(path, render(facts, measured, CLAIMS))


# The seed's shape scaled down: 16 dense layers, 16 heads, MLP 4x the hidden size (as 32768 / 8192), FP32 on CPU.
SMALL_SPEC = ('family = "dense"\nname = "seed-small"\nlayers = 16\nheads = 16\nhead_dim = 8\nmlp_hidden = 512\n'
              'vocab = 256\n[workload]\nbatch = 16\nseq = 48\nphase = "decode"\ndtype = "float32"\n')
PROMPT, NEW, MICRO, CHUNK = 16, 16, 2, 8


def measured_small(folder: Path, baseline: str = "tp=8,pp=2", progress: Callable[[str], None] = lambda _: None
                   ) -> list[Row]:
    """The baseline and layer-wise placement on the same number of local ranks, run with --check, each beside its
    prediction on this host (measured by cachefit calibrate first)."""
    from cachefit.runtime import init_weights, shard_checkpoint
    from cachefit.runtime.calibrate import measure_host, to_toml
    from cachefit.runtime.launch import RunOptions, run_plan
    from cachefit.sources import spec_of

    spec_path, devices = folder / "seed-small.toml", folder / "host.toml"
    spec_path.write_text(SMALL_SPEC)
    progress("calibrating this host")
    devices.write_text(to_toml(measure_host()))
    table = api.load_model(spec_path, torch_options=TorchOptions(measure=True, prefill_chunk=CHUNK))
    ways, stages = api.parse_baseline(baseline)
    layouts = {f"baseline {baseline}": api.plan(table, capacity=1 << 40, memory_model="pipeline", baseline=baseline),
               f"layer-wise pp={ways * stages}": api.plan(table, capacity=1 << 40, memory_model="pipeline",
                                                          cards=ways * stages)}
    spec, work = spec_of(spec_path)
    weights = folder / "seed-small.safetensors"
    init_weights(spec, work, weights, seed=0)
    rows: list[Row] = []
    for name, plan in layouts.items():
        progress(f"running {name} on {plan.cards} local ranks")
        plan_file, shards = folder / f"{plan.cards}-{len(rows)}.json", folder / f"shards-{len(rows)}"
        plan.write(plan_file)
        shard_checkpoint(plan, weights, shards)
        result = run_plan(str(plan_file), str(shards), RunOptions(PROMPT, NEW, MICRO, check=True, timeout=120))
        summary = result.summary
        assert summary is not None
        predicted = api.predict(plan, device="host", devices_file=devices, micro_batches=MICRO, prompt_len=PROMPT,
                                chunk=CHUNK)[0]
        rows.append(Row(name, "measured", plan.cards, "tokens identical" if result.checked else "-",
                        summary.decode_tokens_per_s or 0.0, summary.tpot_median_ms or 0.0))
        rows.append(Row(name, "predicted", plan.cards, "", predicted.decode_tokens_per_s,
                        predicted.decode_tpot_s * 1e3))
    return rows
