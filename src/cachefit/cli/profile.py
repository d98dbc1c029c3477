"""``cachefit profile``: a model's layer table (bytes and FLOPs per layer)."""

from __future__ import annotations

import sys
from typing import Any

import click

from cachefit import api
from cachefit.cli._common import emit_json, err, fail, handle_errors, model_arguments, model_options, out
from cachefit.core.errors import EXIT_FAILED
from cachefit.core.files import check_output
from cachefit.output import report
from cachefit.sources import TorchOptions


@click.command("profile")
@click.argument("model")
@model_options
@click.option("--format", "output_format", type=click.Choice(["table", "json", "csv"]), default="table",
              show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Also write the table (JSON; CSV if *.csv).")
@click.option("--verify", is_flag=True,
              help="Hugging Face configs and factories that return their inputs: build the model for real here "
                   "(random weights) and measure each layer's activation + workspace against the estimate; exit 1 "
                   "when an estimate is below it.")
@click.option("--verify-limit", default="4GiB", show_default=True,
              help="Refuse --verify when the real build would need more of this host's memory.")
@handle_errors
def profile_command(model: str, output_format: str, output: str | None, verify: bool, verify_limit: str,
                    **kwargs: Any) -> None:
    """Profile MODEL: weights, activations, workspace, KV cache and FLOPs of every layer.

    MODEL is a preset (seed-dense16, llama-3-8b, ...), a model spec (.toml), a layer table (.json/.csv), a Hugging
    Face config.json / folder / bundled hf/NAME, or package.module:factory (torch models are measured on meta).

    \b
    Examples:
      cachefit profile seed-dense16
      cachefit profile llama-3-8b --batch 8 --seq 4096 --phase prefill --attention flash
      cachefit profile seed-dense16 --format json -o seed.json
      cachefit profile layers.csv --input-bytes 16384 --format json
      cachefit profile hf/mixtral-8x7b --seq 8192
      cachefit profile path/to/config.json --phase prefill --seq 2048
      cachefit profile mypkg.models:build --input-shape 1,128 --input-dtype int64 --granularity leaf
      cachefit profile tiny-llama --measure
      cachefit profile hf/gpt2 --seq 256 --verify          # the estimate against a real forward here
      cachefit profile mypkg.models:build --verify         # a factory returning (module, inputs)
    """
    if verify:
        _verify(model, verify_limit, output_format, output, kwargs)
        return
    if output:
        check_output(output, "layer table")
    table = api.load_model(model, **model_arguments(kwargs))
    text = table.to_csv() if output_format == "csv" else None       # before -o: a table CSV cannot hold fails first
    if output:
        table.write(output)
        err.print(f"wrote {output}")
    if output_format == "json":
        emit_json(table.to_dict())
    elif text is not None:
        click.echo(text, nl=False)
    else:
        out.print(report.layer_table(table))


def _verify(model: str, limit: str, output_format: str, output: str | None, kwargs: dict[str, Any]) -> None:
    arguments = model_arguments(kwargs)
    options = arguments.pop("torch_options")
    if output or output_format != "table" or arguments.pop("input_bytes") is not None or options != TorchOptions():
        fail("--verify prints a comparison: drop -o, --format and the profiling options (it checks the default "
             "block profile)")
    with err.status("building the model for real and measuring a forward ..."):
        verification = api.verify(model, limit, **arguments)
    out.print(report.verification_table(verification))
    if not verification.trusted:
        under = [check.name for check in verification.checks if check.under]
        err.print(f"cachefit: the estimate is below the real forward at {', '.join(under)}: a plan of this profile "
                  "may overfill a card", highlight=False)
        sys.exit(EXIT_FAILED)
