"""``cachefit demo``: the main job behind ``make demo`` -- profile and plan bundled models, end to end."""

from __future__ import annotations

from pathlib import Path

import click

from cachefit import api, report
from cachefit.cli._common import handle_errors, out
from cachefit.units import format_size


@click.command("demo")
@click.option("--out-dir", type=click.Path(file_okay=False), default="cachefit-demo", show_default=True,
              help="Where the plans (JSON) and plots (PNG) go.")
@handle_errors
def demo_command(out_dir: str) -> None:
    """Profile and plan bundled models: one that fits, the seed's network that does not, and where it would.

    \b
    Example:
      cachefit demo --out-dir /tmp/demo
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    out.rule("1. profile: tiny-llama, every layer's bytes")
    out.print(report.layer_table(api.load_model("tiny-llama")))
    _show("2. a model that fits: Llama-3-8B (decode, batch 1, 8k context) on d-Matrix Corsair SRAM",
          "llama-3-8b", folder, device="dmatrix-corsair")
    _show("3. the seed's own network on H100 L2 (batch 1024, seq 10000): it does not fit", "seed-dense16", folder,
          device="h100")
    table = api.load_model("seed-dense16", batch=1)
    per_layer = table.layers[0].weight_bytes
    h100 = api.devices()["h100"]
    out.print(f"Even one layer's weights ({format_size(per_layer)}) are {per_layer / h100.on_chip_bytes:.1f}x an "
              f"H100's whole L2 ({format_size(h100.on_chip_bytes)}): whole-layer residency cannot work there.")
    _show("4. where it pays: the seed's network at batch 1 (decode) on 2 GB-SRAM cards, one layer per card",
          "seed-dense16", folder, device="dmatrix-corsair", batch=1)
    out.print(f"\nplans and plots are in {folder}/")


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
