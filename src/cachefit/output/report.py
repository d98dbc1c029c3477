"""What people see: rich tables of layer tables, plans and devices, and the plan plot (matplotlib)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cachefit.core.files import atomic_output
from cachefit.core.hardware import KIND_NAMES, Device
from cachefit.core.layers import LayerTable
from cachefit.core.memory import breakdown, interval_cost
from cachefit.core.records import CardSummary, Plan, RunSummary, Verification
from cachefit.core.units import format_size

__all__ = ["console", "devices_table", "layer_table", "plan_summary", "plan_table", "plot_plan", "print_run_summary"]

KINDS = ("weights", "KV cache", "activations", "workspace")
_COLORS = ("#4C72B0", "#8172B3", "#55A868", "#DD8452")


def console(stderr: bool = False) -> Console:
    """A console for people: rich falls back to 80 columns when output is not a terminal (pipes, CI logs), and
    the plan tables need more."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 140)


def _flops(value: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f}"


def layer_table(table: LayerTable, memory_model: str = "peak") -> Table:
    cost = interval_cost(table, "peak" if memory_model == "peak" else "sum")
    title = f"{table.name}: {len(table.layers)} layers" + "".join(
        f", {label} {value}" for label, value in (("dtype", table.dtype), ("batch", table.batch),
                                                   ("seq", table.seq), ("phase", table.phase)) if value is not None)
    view = Table(title=title, caption=f"input {format_size(table.input_bytes)}; footprint alone: {memory_model} model")
    for header in ("#", "layer", "weights", "activations", "workspace", "KV cache", "FLOPs", "footprint alone"):
        view.add_column(header, justify="left" if header == "layer" else "right")
    for index, layer in enumerate(table.layers):
        view.add_row(str(index), layer.name, format_size(layer.weight_bytes), format_size(layer.activation_bytes),
                     format_size(layer.workspace_bytes), format_size(layer.kv_cache_bytes), _flops(layer.flops),
                     format_size(cost.footprint(index, index)))
    view.add_section()
    view.add_row("", "total", format_size(sum(x.weight_bytes for x in table.layers)), "", "",
                 format_size(sum(x.kv_cache_bytes for x in table.layers)), _flops(sum(x.flops for x in table.layers)),
                 format_size(cost.footprint(0, len(table.layers) - 1)) + " (one card)")
    return view


def plan_summary(plan: Plan) -> str:
    where = plan.device.label if plan.device else "cards"
    sizes = sorted(set(plan.capacity_bytes))
    capacity = format_size(sizes[0]) if len(sizes) == 1 else ", ".join(format_size(c) for c in plan.capacity_bytes)
    how = f"{plan.memory_model} memory model, {_choices(plan)}"
    if not plan.found:
        return f"[bold red]No feasible plan[/] for {plan.model.name} on {where} of {capacity} ({how})."
    verdict = ("[bold green]fits on-chip[/]" if plan.feasible else "[bold red]does not fit on-chip[/]")
    proof = ("proven optimal" if plan.optimal else "as laid out" if plan.strategy is None
             else "not optimised (greedy)")
    name = f"[bold green]{plan.model.name}[/]" if plan.feasible else f"[bold]{plan.model.name}[/]"
    return (f"{name} on {plan.cards} x {where} of {capacity} ({how}): fullest card "
            f"{format_size(plan.bottleneck_bytes)} ({proof}; lower bound {format_size(plan.lower_bound_bytes)}), "
            f"{verdict}")


def _choices(plan: Plan) -> str:
    """The layout, objective and strategy a plan was made with, in words."""
    layout = {"whole": "whole layers", "groups": "tensor groups", "baseline": "baseline TP x PP"}[plan.layout]
    if plan.objective == "time":
        return f"{layout}, least slowest predicted stage"
    return layout if plan.strategy is None else f"{layout}, {plan.strategy}"


def plan_table(plan: Plan) -> Table:
    grouped = any(part.tensor_parallel > 1 for part in plan.partitions)
    view = Table(title=f"plan: {plan.model.name} ({plan.model.layers} layers)",
                 caption="sizes per card: each card of a tensor group holds the same share" if grouped else None)
    for header in ("card", "layers", "weights", "KV cache", "activations", "workspace", "footprint", "% of C"):
        view.add_column(header, justify="left" if header == "layers" else "right")
    for part in plan.partitions:
        capacity = plan.capacity_bytes[part.card]
        names = part.layers[0] if part.first == part.last else f"{part.layers[0]}..{part.layers[-1]}"
        cards = (str(part.card) if part.tensor_parallel == 1
                 else f"{part.card}-{part.cards[-1]} (tp {part.tensor_parallel})")
        view.add_row(cards, f"{part.first}-{part.last} {names}", format_size(part.weight_bytes),
                     format_size(part.kv_cache_bytes), format_size(part.activation_bytes),
                     format_size(part.workspace_bytes), format_size(part.footprint_bytes),
                     f"{100 * part.footprint_bytes / capacity:.1f}%")
    return view


def devices_table(devices: Iterable[Device]) -> Table:
    legend = ", ".join(f"{kind} {name}" for kind, name in KIND_NAMES.items())
    view = Table(title="device catalog", caption=f"{legend}; sources: cachefit devices --format json")
    for header in ("name", "device", "on-chip", "usable", "plan capacity", "on-chip BW", "off-chip BW",
                   "FP16", "link"):
        view.add_column(header, justify="left" if header in ("name", "device") else "right")
    for device in devices:
        view.add_row(device.name, f"{device.label} [{device.memory}]", _figure(device, "on_chip_bytes"),
                     f"{device.usable_fraction:.0%} ({device.figures['usable_fraction'].kind})",
                     format_size(device.capacity_bytes), _figure(device, "on_chip_bandwidth", "TB/s", 1e12),
                     _figure(device, "off_chip_bandwidth", "TB/s", 1e12),
                     _figure(device, "fp16_flops", "TFLOP/s", 1e12), _figure(device, "link_bandwidth", "GB/s", 1e9))
    return view


def _figure(device: Device, key: str, unit: str = "", scale: float = 1.0) -> str:
    figure = device.figure(key)
    if figure is None:
        return "-"
    value = format_size(figure.value) if not unit else f"{figure.value / scale:g} {unit}"
    return f"{value} ({figure.kind})"


def verification_table(verification: Verification) -> Table:
    """Per layer: the estimate (meta) beside a real forward's measurement, and their ratio."""
    table = Table(title=f"{verification.model}, {verification.phase}: activation + workspace, estimated on meta "
                        "against a real forward on this host")
    for column in ("layer", "estimate", "measured", "ratio", "weights, KV cache"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for check in verification.checks:
        exact = "exact" if check.weights_match and check.kv_cache_match else "DIFFER"
        ratio = f"{check.ratio:.2f}x" if check.measured_bytes else "-"
        table.add_row(check.name, format_size(check.estimate_bytes), format_size(check.measured_bytes),
                      f"[red]{ratio}[/red]" if check.under else ratio, exact)
    return table


def plot_plan(plan: Plan, table: LayerTable, path: str | Path) -> None:
    """Stacked bars of each card's footprint by kind against its capacity; when nothing fits, each layer alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars, labels = _bars(plan, table)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.35 * len(bars) + 3), 4.5))
    positions = list(range(len(bars)))
    bottoms = [0.0] * len(bars)
    for kind, color in zip(KINDS, _COLORS):
        heights = [bar[kind] / 2**20 for bar in bars]
        axes.bar(positions, heights, bottom=bottoms, color=color, label=kind)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    # One capacity per bar: a card's, or a group's (its cards share one size); each layer's when none fits.
    capacities = ([plan.capacity_bytes[p.card] for p in plan.partitions] if plan.found
                  else [plan.capacity_bytes[0]] * len(bars))
    axes.step([p - 0.5 for p in positions] + [positions[-1] + 0.5],
              [c / 2**20 for c in capacities] + [capacities[-1] / 2**20], where="post", color="black",
              linestyle="--", label="capacity C")
    axes.set_xticks(positions, labels, rotation=90 if len(bars) > 12 else 0, fontsize=8)
    axes.set_ylabel("MiB")
    if max(bottoms) > 20 * max(capacities) / 2**20:
        # Far over capacity (the seed on an H100): a linear axis would hide the capacity line at the bottom.
        axes.set_yscale("log", nonpositive="clip")
        axes.set_ylabel("MiB (log scale)")
    axes.annotate(f"C = {format_size(capacities[0])}", (positions[0] - 0.45, capacities[0] / 2**20),
                  textcoords="offset points", xytext=(0, 3), fontsize=8)
    state = "per card" if plan.found else "no feasible plan: each layer alone"
    axes.set_title(f"{plan.model.name}: {state} ({plan.memory_model} model)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    with atomic_output(path, "plot") as temporary:
        figure.savefig(str(temporary), dpi=120, format="png")
    plt.close(figure)


def _bars(plan: Plan, table: LayerTable) -> tuple[list[dict[str, int]], list[str]]:
    if plan.found:
        bars = [{"weights": p.weight_bytes, "KV cache": p.kv_cache_bytes, "activations": p.activation_bytes,
                 "workspace": p.workspace_bytes} for p in plan.partitions]
        return bars, [f"card {p.card}" if p.tensor_parallel == 1 else f"cards {p.card}-{p.cards[-1]}"
                      for p in plan.partitions]
    bars = []
    shared = interval_cost(table, plan.memory_model).shared
    for index in range(len(table.layers)):
        parts = breakdown(table, plan.memory_model, index, index, shared)
        bars.append({"weights": parts.weight_bytes, "KV cache": parts.kv_cache_bytes,
                     "activations": parts.activation_bytes, "workspace": parts.workspace_bytes})
    return bars, [layer.name for layer in table.layers]


def _print_residency(out: Console, cards: tuple[CardSummary, ...]) -> None:
    """Whether each card's weights were pinned in L2 (CUDA), grouped by outcome."""
    outcomes: dict[str, list[int]] = {}
    for card in cards:
        state = card.residency or {}
        label = "applied" if state.get("applied") else f"not applied: {state.get('reason', 'not reported')}"
        outcomes.setdefault(label, []).append(card.card)
    for label, found in outcomes.items():
        out.print(f"L2 residency {label} (cards {', '.join(map(str, found))})", highlight=False)


def print_run_summary(out: Console, summary: RunSummary, checked: dict[str, Any] | None) -> None:
    """A run's measurements: speed, then per card time and memory against the plan, residency, the check."""
    def number(value: float | None, digits: str = ".1f") -> str:
        return "-" if value is None else format(value, digits)
    out.print(f"prefill {number(summary.prefill_tokens_per_s)} tokens/s ({summary.prefill_chunk} prompt "
              "token(s) per sequence per pass, as the plan counts); "
              f"decode {number(summary.decode_tokens_per_s)} tokens/s; TPOT median "
              f"{number(summary.tpot_median_ms, '.2f')} ms, p90 {number(summary.tpot_p90_ms, '.2f')} ms")
    view = Table(title="per card", caption="compute includes the all-reduces of tensor groups; wait includes "
                 "receives and a group's broadcasts")
    for header in ("card", "layers", "tp", "compute s", "all-reduce s", "wait s", "send s", "planned", "measured",
                   "over plan"):
        view.add_column(header, justify="right")
    for card in summary.cards:
        view.add_row(str(card.card), f"{card.layers[0]}-{card.layers[1]}", str(card.tensor_parallel),
                     f"{card.compute_s:.3f}", f"{card.allreduce_s:.3f}", f"{card.wait_s:.3f}", f"{card.send_s:.3f}",
                     format_size(card.planned_bytes), format_size(card.measured_bytes),
                     format_size(card.over_plan_bytes) if card.over_plan_bytes else "-")
    out.print(view)
    _print_residency(out, summary.cards)
    if checked is not None:
        against = "transformers' generate on the unpartitioned model" if checked.get("reference") else \
            "the unpartitioned model"
        out.print(f"check: tokens identical to {against}; largest logit difference "
                  f"{checked['max_logit_difference']:.3g}")
    if any(card.over_plan_bytes for card in summary.cards):
        out.print("note: measured bytes exceed the plan by each card's pre-allocated receive buffer, which the "
                  "peak memory model does not count yet (docs/runtime.md)")
    out.file.flush()
