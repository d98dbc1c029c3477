"""``cachefit export``: a plan in the formats of accelerate, torchtitan, vLLM and torch.distributed.pipelining."""

from __future__ import annotations

from typing import cast

import click

from cachefit import api
from cachefit.cli._common import err, handle_errors
from cachefit.core.files import atomic_write_text, check_output
from cachefit.core.records import Plan
from cachefit.output.export import PEERS, TARGETS, Target


@click.command("export")
@click.argument("plan_file", metavar="PLAN")
@click.option("--to", "target", type=click.Choice(TARGETS), required=True, help="The peer's format.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write to this file instead of stdout.")
@handle_errors
def export_command(plan_file: str, target: str, output: str | None) -> None:
    """Write PLAN for a peer: accelerate's device_map (JSON), torchtitan's module FQNs per stage (JSON, in its
    Llama's names), vLLM's VLLM_PP_LAYER_PARTITION, or torch.distributed.pipelining's split_spec (JSON). Which
    version and naming it targets goes to stderr.

    \b
    Examples:
      cachefit plan hf/llama-3-8b --capacity 4GB -o plan.json
      cachefit export plan.json --to accelerate -o device_map.json
      cachefit export plan.json --to torchtitan
      export $(cachefit export plan.json --to vllm)
      cachefit export plan.json --to pipelining    # {"split_spec": {"model.layers.16": "beginning"}, ...}
    """
    if output:
        check_output(output, "export")
    plan = Plan.read(plan_file)
    text = api.export(plan, cast(Target, target))
    err.print(f"for {PEERS[cast(Target, target)]}", highlight=False)
    if target == "accelerate" and plan.peer != "accelerate":
        err.print("accelerate keeps tied parameters on one device: for a model whose head is tied to its "
                  "embedding, plan with --for accelerate (the head then runs on the embedding's card)",
                  highlight=False)
    if output:
        atomic_write_text(output, text)
        err.print(f"wrote {output}")
    else:
        click.echo(text, nl=False)
