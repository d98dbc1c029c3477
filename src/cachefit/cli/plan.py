"""``cachefit plan``: partition a model over cards so each partition fits on-chip."""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any, cast

import click

from cachefit import api
from cachefit.cli._common import (
    EXIT_INFEASIBLE,
    emit_json,
    err,
    fail,
    handle_errors,
    model_arguments,
    model_options,
    out,
)
from cachefit.core.files import check_output
from cachefit.core.layers import LayerTable
from cachefit.core.memory import MemoryModel
from cachefit.core.records import Plan, Strategy
from cachefit.output import report


@click.command("plan")
@click.argument("model")
@click.option("--device", help="A catalog device (cachefit devices); capacity = its usable on-chip memory.")
@click.option("--capacity", help="Bytes per card: 52428800, 50MiB, 1.5GB; a,b,c for different cards in order.")
@click.option("--cards", type=click.IntRange(min=1), help="Exactly K cards (default: the fewest that fit).")
@click.option("--strategy", type=click.Choice(["balanced", "greedy"]), default="balanced", show_default=True,
              help="balanced: least bottleneck (proven); greedy: the seed's fill-in-order.")
@click.option("--memory-model", type=click.Choice(["peak", "sum", "pipeline"]), default="peak", show_default=True,
              help="peak: buffers reused layer by layer; sum: the seed's additive model; pipeline: peak plus the "
                   "receive buffer cachefit run keeps on each card.")
@click.option("--split", type=click.Choice(["auto", "never", "always"]), default="auto", show_default=True,
              help="Tensor groups (a stage's layers split over several cards, Megatron-style): auto only when "
                   "whole layers cannot fit; always: the fewest cards over every width.")
@click.option("--baseline", metavar="tp=T,pp=P",
              help="The classic plan instead: P stages of equal layer counts, every layer split T ways; says "
                   "whether it fits on-chip (exit 3 when not; the plan is written either way and runs).")
@click.option("--objective", type=click.Choice(["memory", "time"]), default="memory", show_default=True,
              help="memory: the least fullest card; time: the least slowest predicted stage on --device's figures "
                   "(with --capacity: cards of that size), every card within capacity.")
@click.option("--micro-batch", type=click.Choice(["auto"]),
              help="auto: the largest batch (sequences per pass, up to --batch) at which a plan exists.")
@model_options
@click.option("--for", "peer", type=click.Choice(["vllm", "accelerate"]),
              help="Plan for a peer's constraint (still optimal under it): vllm, every stage holds a decoder "
                   "layer; accelerate, a tied head on its embedding's card.")
@click.option("--devices-file", type=click.Path(dir_okay=False), help="TOML adding devices or overriding figures.")
@click.option("--format", "output_format", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Also write the plan JSON to this file.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG: each card's footprint against C.")
@handle_errors
def plan_command(model: str, device: str | None, capacity: str | None, cards: int | None, strategy: str,
                 memory_model: str, split: str, baseline: str | None, objective: str, micro_batch: str | None,
                 peer: str | None, devices_file: str | None, output_format: str, output: str | None,
                 plot: str | None, **kwargs: Any) -> None:
    """Split MODEL's layers into contiguous partitions, one per card, each fitting the card's capacity.

    Exits 3 (and still prints the plan, with a diagnosis) when nothing fits.

    \b
    Examples:
      cachefit plan llama-3-8b --device dmatrix-corsair
      cachefit plan seed-dense16 --device h100              # does not fit: says why
      cachefit plan tiny-llama --capacity 1MiB --cards 4 --plot plan.png
      cachefit plan layers.csv --capacity 40MiB,40MiB,96MiB --format json -o plan.json
      cachefit plan tiny-llama --capacity 300KiB --split always    # stages may be tensor groups
      cachefit plan seed-dense16 --device h100 --baseline tp=8,pp=2
      cachefit plan seed-dense16 --capacity 1GB --phase prefill --seq 512 --micro-batch auto
      cachefit plan llama-3-8b --device h100 --capacity 2GB --objective time   # fastest slowest stage
      cachefit plan hf/llama-3-8b --capacity 4GB --cards 7 --for vllm -o p.json   # then: export --to vllm
    """
    if (device is None) == (capacity is None) and not (objective == "time" and device is not None):
        fail("give exactly one of --device NAME and --capacity SIZE[,SIZE...] (both only with --objective time)")
    for path, what in ((output, "plan"), (plot, "plot")):
        if path:
            check_output(path, what)          # before any work: a bad path fails first and nothing is written
    arguments = model_arguments(kwargs)
    options: dict[str, Any] = dict(device=device, cards=cards, memory_model=cast(MemoryModel, memory_model),
                                   strategy=cast(Strategy, strategy), split=cast(api.SplitMode, split),
                                   baseline=baseline, objective=cast(api.Objective, objective),
                                   devices_file=devices_file, peer=peer)
    if micro_batch == "auto":
        table, result = _largest_micro_batch(model, capacity, options, arguments)
    else:
        table = api.load_model(model, **arguments)
        result = api.plan(table, capacity, **options)
    if output:
        result.write(output)
        err.print(f"wrote {output}")
    if plot:
        report.plot_plan(result, table, plot)
        err.print(f"wrote {plot}")
    if output_format == "json":
        emit_json(result.to_dict())
    else:
        out.print(report.plan_summary(result))
        if result.partitions:
            out.print(report.plan_table(result))
        for line in result.diagnosis:
            out.print(f"- {line}", highlight=False)
    if not result.feasible:           # nothing found, or (a baseline) found but not fitting on-chip
        sys.exit(EXIT_INFEASIBLE)


def _largest_micro_batch(model: str, capacity: str | None, options: dict[str, Any], arguments: dict[str, Any]
                         ) -> tuple[LayerTable, Plan]:
    """Plan at the largest batch that fits; when none does, the plan (and diagnosis) at batch 1."""
    found = api.largest_micro_batch(model, capacity, **options, **arguments)
    if found is None:
        table = api.load_model(model, **{**arguments, "batch": 1})
        result = api.plan(table, capacity, **options)
        return table, replace(result, diagnosis=("no micro-batch fits, not even one sequence per pass",
                                                 *result.diagnosis))
    batch, result = found
    table = api.load_model(model, **{**arguments, "batch": batch})
    tokens = batch * (table.seq or 1) if table.phase == "prefill" else batch
    err.print(f"micro-batch: {batch} sequences per pass ({tokens} tokens), the largest that plans")
    return table, replace(result, diagnosis=(f"micro-batch {batch}: the largest batch per pass that plans "
                                             f"({tokens} tokens per pass)", *result.diagnosis))
