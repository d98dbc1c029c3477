"""``cachefit predict``: the analytical speed of a plan (and of the TP x PP baseline beside it)."""

from __future__ import annotations

import json

import click
from rich.table import Table

from cachefit import Prediction, api
from cachefit.cli._common import emit_json, err, handle_errors, out
from cachefit.core.files import atomic_write_text, check_output


@click.command("predict")
@click.argument("plan_file", metavar="PLAN")
@click.option("--device", help="Catalog device to predict on (default: the plan's; a calibrated host via "
                               "--devices-file).")
@click.option("--micro-batches", type=click.IntRange(min=1), default=1, show_default=True,
              help="Micro-batches in flight (must divide the plan's batch).")
@click.option("--baseline", metavar="tp=T,pp=P", help="Also predict the classic layout of the same model.")
@click.option("--prompt-len", type=click.IntRange(min=1), help="Prompt tokens per sequence (default: the plan's seq).")
@click.option("--prefill-chunk", type=click.IntRange(min=1), help="Prompt tokens per pass (default: the plan's).")
@click.option("--devices-file", type=click.Path(dir_okay=False), help="TOML adding devices or overriding figures.")
@click.option("--model", "model", metavar="PATH", help="The Hugging Face folder or config, or the layer table file, "
                                                      "the plan was made from (a preset's or spec's plan keeps it).")
@click.option("--format", "output_format", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Also write the prediction JSON here.")
@handle_errors
def predict_command(plan_file: str, device: str | None, micro_batches: int, baseline: str | None,
                    prompt_len: int | None, prefill_chunk: int | None, devices_file: str | None, model: str | None,
                    output_format: str, output: str | None) -> None:
    """Predict PLAN's speed per stage (compute, memory at on-chip or off-chip bandwidth, all-reduces, transfers)
    and end to end: prefill tokens/s, decode time per output token (TPOT) and tokens/s. Figures come from the
    device catalog, each with its source (cachefit devices --format json).

    \b
    Examples:
      cachefit plan seed-dense16 --device h100 --baseline tp=8,pp=2 -o base.json
      cachefit predict base.json
      cachefit plan seed-dense16 --batch 1 --device dmatrix-corsair -o plan.json
      cachefit predict plan.json --micro-batches 1 --baseline tp=8,pp=2 --device dmatrix-corsair
      cachefit calibrate -o host.toml && cachefit predict run-plan.json --device host --devices-file host.toml
      cachefit plan ckpt/llama --capacity 1GB --cards 2 -o hf-plan.json
      cachefit predict hf-plan.json --model ckpt/llama --device host --devices-file host.toml --micro-batches 2
    """
    if output:
        check_output(output, "prediction")
    ours, classic = api.predict(plan_file, device=device, micro_batches=micro_batches, prompt_len=prompt_len,
                                chunk=prefill_chunk, baseline=baseline, devices_file=devices_file, model=model)
    alone = (api.one_card(plan_file, device=device, prompt_len=prompt_len, chunk=prefill_chunk,
                          devices_file=devices_file, model=model) if len(ours.stages) > 1 else None)
    document = {"schema": "cachefit.prediction/v1", "plan": plan_file, "prediction": ours.to_dict(),
                "baseline": None if classic is None else {"layout": baseline, **classic.to_dict()},
                "one_card": None if alone is None else alone.to_dict()}
    if output:
        atomic_write_text(output, json.dumps(document, indent=1) + "\n")
        err.print(f"wrote {output}")
    if output_format == "json":
        emit_json(document)
        return
    out.print(stage_table(ours, "per stage, one pass of one micro-batch (one card of each group)"))
    if classic is not None:
        out.print(stage_table(classic, f"baseline {baseline}, per stage"))
    out.print(summary_table(ours, classic, baseline, alone))
    if alone is not None:
        out.print(crossover_line(ours, alone), highlight=False)
    for source in ours.sources.values():
        out.print(f"- {source}", highlight=False)


def stage_table(prediction: Prediction, title: str) -> Table:
    view = Table(title=title)
    for header in ("cards", "layers", "tp", "resident", "compute ms", "memory ms", "all-reduce ms", "fixed ms",
                   "transfer ms", "pass ms"):
        view.add_column(header, justify="right")
    for s in prediction.stages:
        view.add_row(str(s.card), f"{s.first}-{s.last}", str(s.tensor_parallel), "yes" if s.resident else "no",
                     f"{s.compute_s * 1e3:.4g}", f"{s.memory_s * 1e3:.4g}", f"{s.allreduce_s * 1e3:.4g}",
                     f"{s.fixed_s * 1e3:.4g}", f"{s.transfer_s * 1e3:.4g}", f"{s.pass_s * 1e3:.4g}")
    return view


def crossover_line(ours: Prediction, alone: Prediction) -> str:
    ratio = ours.decode_tokens_per_s / alone.decode_tokens_per_s
    if ratio < 1:
        return (f"One card is faster: {alone.decode_tokens_per_s:,.0f} decode tokens/s against this plan's "
                f"{ours.decode_tokens_per_s:,.0f} ({ratio:.2f}x): what each card saves is less than its passes' "
                "fixed costs and the hops add (see the fixed and transfer columns).")
    return (f"This plan decodes {ratio:.2f}x one card ({ours.decode_tokens_per_s:,.0f} against "
            f"{alone.decode_tokens_per_s:,.0f} tokens/s at {alone.micro_batches} micro-batch(es)).")


def summary_table(ours: Prediction, classic: Prediction | None, baseline: str | None,
                  alone: Prediction | None = None) -> Table:
    view = Table(title=f"predicted end to end ({ours.micro_batches} micro-batch(es), batch {ours.batch})")
    for header in ("layout", "prefill tokens/s", "decode TPOT ms", "decode tokens/s"):
        view.add_column(header, justify="right")
    rows = [("this plan", ours)] + ([(f"baseline {baseline}", classic)] if classic is not None else [])
    rows += [(f"one card, {alone.micro_batches} micro-batch(es)", alone)] if alone is not None else []
    for name, value in rows:
        view.add_row(name, f"{value.prefill_tokens_per_s:,.0f}", f"{value.decode_tpot_s * 1e3:.4g}",
                     f"{value.decode_tokens_per_s:,.0f}")
    return view
