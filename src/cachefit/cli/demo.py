"""``cachefit demo``: the main job behind ``make demo``: the whole path on a bundled model, then the seed's case."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from cachefit import api
from cachefit.cli._common import handle_errors, out
from cachefit.core.files import atomic_write_text
from cachefit.core.units import format_size
from cachefit.output import report

MODEL, CARDS = "tiny-llama", 3


@click.command("demo")
@click.option("--out-dir", type=click.Path(file_okay=False), default="cachefit-demo", show_default=True,
              help="Where the weights, shards, plans (JSON), plots (PNG) and run report go.")
@click.option("--plans-only", is_flag=True, help="Skip the run (no torch needed).")
@handle_errors
def demo_command(out_dir: str, plans_only: bool) -> None:
    """Make a bundled model's weights, plan it for cards that need 3 of them, shard it, run it on 3 local CPU
    processes checked against the unpartitioned model; then show why the seed's network does not fit an H100's
    L2 and where whole-layer residency does pay.

    \b
    Example:
      cachefit demo --out-dir /tmp/demo
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if not plans_only:
        _run_section(folder)
    _show("a model that fits: Llama-3-8B (decode, batch 1, 8k context) on d-Matrix Corsair SRAM",
          "llama-3-8b", folder, device="dmatrix-corsair")
    _show("the seed's own network on H100 L2 (batch 1024, seq 10000): it does not fit", "seed-dense16", folder,
          device="h100")
    table = api.load_model("seed-dense16", batch=1)
    per_layer = table.layers[0].weight_bytes
    h100 = api.devices()["h100"]
    out.print(f"Even one layer's weights ({format_size(per_layer)}) are {per_layer / h100.on_chip_bytes:.1f}x an "
              f"H100's whole L2 ({format_size(h100.on_chip_bytes)}): whole-layer residency cannot work there.")
    _split_finer(out)
    _show("where it pays: the seed's network at batch 1 (decode) on 2 GB-SRAM cards, one layer per card",
          "seed-dense16", folder, device="dmatrix-corsair", batch=1)
    out.print(f"\nplans, plots, weights, shards and the run report are in {folder}/")


def _split_finer(console: Any) -> None:
    """The seed split as finely as its shapes allow (attention by heads, the MLP by columns): when it fits."""
    from cachefit.sources import TorchOptions

    finer = TorchOptions(granularity="sublayer")
    short = api.plan("seed-dense16", device="h100", batch=1, seq=1000, torch_options=finer)
    own = api.largest_micro_batch("seed-dense16", device="h100", torch_options=finer)
    console.print(f"Split finer (attention by its 16 heads, the MLP by columns): one sequence of 1,000 tokens fits "
                  f"{short.cards} H100 L2s ({format_size(short.bottleneck_bytes)} on the fullest); at the seed's "
                  f"10,000 tokens {'no batch fits, not even one sequence' if own is None else f'batch {own[0]} fits'}"
                  " (`cachefit plan seed-dense16 --device h100 --granularity sublayer --micro-batch auto`).")


def _run_section(folder: Path) -> None:
    from cachefit.cli.run import print_summary
    from cachefit.runtime import init_weights, shard_checkpoint
    from cachefit.runtime.launch import RunOptions, run_plan
    from cachefit.runtime.summary import run_report, summarise
    from cachefit.sources import TorchOptions, presets

    out.rule(f"1. {MODEL}: measured on meta (decode + 8-token prompt chunks), planned for cards that need {CARDS}, "
             "sharded, run with --check")
    table = api.load_model(MODEL, torch_options=TorchOptions(measure=True, prefill_chunk=8))
    best = api.plan(table, capacity=1 << 40, cards=CARDS, memory_model="pipeline").bottleneck_bytes
    capacity = -(-best // 65536) * 65536                        # the least 64 KiB multiple that holds 3 cards
    plan = api.plan(table, capacity=capacity, memory_model="pipeline")
    plan_file, weights, shards = folder / "plan.json", folder / f"{MODEL}.safetensors", folder / "shards"
    plan.write(plan_file)
    report.plot_plan(plan, table, folder / "plan.png")
    out.print(report.plan_summary(plan))
    out.print(report.plan_table(plan))
    preset = presets()[MODEL]
    init_weights(preset.spec, preset.workload, weights, seed=0)
    shard_checkpoint(plan, weights, shards)
    options = RunOptions(prompt_len=16, new_tokens=16, micro_batches=2, check=True)
    out.print(f"running {plan.cards} processes (torch.distributed, gloo on loopback) ...")
    result = run_plan(str(plan_file), str(shards), options)
    summary = summarise(result.ranks, int(plan.model.batch or 1), options.prompt_len, options.new_tokens)
    print_summary(summary, result.checked)
    document = run_report(str(plan_file), options, result.checked, summary)
    atomic_write_text(folder / "run.json", json.dumps(document, indent=1) + "\n")
    out.print(f"plot: {folder / 'plan.png'}; run report: {folder / 'run.json'}")


def _show(title: str, model: str, folder: Path, device: str, batch: int | None = None) -> None:
    out.rule(title)
    table = api.load_model(model, batch=batch)
    result = api.plan(table, device=device)
    stem = f"{model}-{device}" + (f"-batch{batch}" if batch else "")
    result.write(folder / f"{stem}.json")
    report.plot_plan(result, table, folder / f"{stem}.png")
    out.print(report.plan_summary(result))
    if result.partitions:
        out.print(report.plan_table(result))
    for line in result.diagnosis:
        out.print(f"- {line}", highlight=False)
