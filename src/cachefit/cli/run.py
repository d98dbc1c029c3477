"""``cachefit run``: one process per card (torch.distributed.run), checked and measured."""

from __future__ import annotations

import json
import shlex
import time

import click

from cachefit import api
from cachefit.cli._common import err, handle_errors, out
from cachefit.core.files import atomic_write_text, check_output
from cachefit.core.records import Plan
from cachefit.output import report as report_


@click.command("run")
@click.argument("plan_file", metavar="PLAN")
@click.option("--weights", required=True, type=click.Path(file_okay=False), help="The shard folder (cachefit shard).")
@click.option("--prompt-len", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--new-tokens", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--micro-batches", type=click.IntRange(min=1), default=2, show_default=True,
              help="Micro-batches in flight (must divide the plan's batch).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the prompt tokens.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="Threads per rank.")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds a rank waits for a peer.")
@click.option("--check", is_flag=True, help="Compare with the unpartitioned model: identical tokens required.")
@click.option("--report", type=click.Path(dir_okay=False), help="Write the measurements as JSON.")
@click.option("--nnodes", type=click.IntRange(min=1), default=1, show_default=True, help="Hosts (with torchrun).")
@click.option("--rdzv-endpoint", help="HOST:PORT of the rendezvous for several hosts (default: loopback).")
@click.option("--print-torchrun", is_flag=True, help="Print the torchrun command to run on each host, and stop.")
@handle_errors
def run_command(plan_file: str, weights: str, prompt_len: int, new_tokens: int, micro_batches: int, seed: int,
                threads: int, timeout: float, check: bool, report: str | None, nnodes: int,
                rdzv_endpoint: str | None, print_torchrun: bool) -> None:
    """Run PLAN: one process per card (gloo on CPU, NCCL on CUDA), each loading only its shard, prefill in
    micro-batches, then greedy decoding with the last card's tokens returning to the first.

    PLAN must count what a rank holds: a decode plan of the measured reference module with the pipeline memory
    model (cachefit plan MODEL --measure --memory-model pipeline [--prefill-chunk C] ...), or a pipeline decode
    plan of a Hugging Face folder (cachefit plan CKPT_DIR --memory-model pipeline ...), whose shards
    (cachefit shard PLAN CKPT_DIR) each rank runs with transformers' own modules; --check then compares with
    transformers' generate. Stages on tensor groups (--split, --baseline tp=T,pp=P) run as torch.distributed
    sub-groups, all-reducing in every block (Hugging Face models: DTensor with the model's own tp_plan).

    \b
    Examples:
      cachefit run plan.json --weights shards/ --check
      cachefit run plan.json --weights shards/ --prompt-len 32 --new-tokens 16 --micro-batches 4 --report run.json
      cachefit plan tiny-llama --measure --memory-model pipeline --capacity 8MiB --baseline tp=2,pp=2 -o b.json
      cachefit run plan.json --weights shards/ --nnodes 2 --rdzv-endpoint 10.0.0.1:29500 --print-torchrun
      cachefit plan ckpt/llama --seq 256 --prefill-chunk 32 --memory-model pipeline --cards 2 --capacity 1GB -o p.json
      cachefit shard p.json ckpt/llama --out hf-shards/ && cachefit run p.json --weights hf-shards/ --check
    """
    from cachefit.runtime.launch import RunOptions
    from cachefit.runtime.summary import run_report

    if report:
        check_output(report, "run report")
    options = RunOptions(prompt_len, new_tokens, micro_batches, seed, threads, timeout, check, nnodes, rdzv_endpoint)
    if print_torchrun:
        command = shlex.join(api.torchrun_command(plan_file, weights, options))
        click.echo(command + "   # on each host, with --node-rank N")
        return
    plan = Plan.read(plan_file)
    started = time.monotonic()
    with err.status(f"running {plan.cards} ranks ...") as status:
        result = api.run(plan_file, weights, options,
                          progress=lambda now: status.update(f"running {plan.cards} ranks: {now - started:.0f} s"))
    summary = result.summary
    assert summary is not None
    report_.print_run_summary(out, summary, result.checked)
    if report:
        document = run_report(plan_file, options, result.checked, summary, result.prompt, result.tokens)
        atomic_write_text(report, json.dumps(document, indent=1) + "\n")
        err.print(f"wrote {report}")
