"""``cachefit export``: a plan in the formats of accelerate, torchtitan and vLLM."""

from __future__ import annotations

from typing import cast

import click

from cachefit import api
from cachefit.cli._common import err, handle_errors
from cachefit.core.files import atomic_write_text, check_output
from cachefit.output.export import TARGETS, Target


@click.command("export")
@click.argument("plan_file", metavar="PLAN")
@click.option("--to", "target", type=click.Choice(TARGETS), required=True, help="The peer's format.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write to this file instead of stdout.")
@handle_errors
def export_command(plan_file: str, target: str, output: str | None) -> None:
    """Write PLAN for a peer: accelerate's device_map (JSON), torchtitan's module FQNs per stage (JSON), or vLLM's
    VLLM_PP_LAYER_PARTITION.

    \b
    Examples:
      cachefit plan hf/llama-3-8b --capacity 4GB -o plan.json
      cachefit export plan.json --to accelerate -o device_map.json
      cachefit export plan.json --to torchtitan
      export $(cachefit export plan.json --to vllm)
    """
    if output:
        check_output(output, "export")
    text = api.export(plan_file, cast(Target, target))
    if output:
        atomic_write_text(output, text)
        err.print(f"wrote {output}")
    else:
        click.echo(text, nl=False)
