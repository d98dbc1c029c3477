"""The ``cachefit`` command: one short file per verb over the library (cachefit.api)."""

from __future__ import annotations

import click

from cachefit import __version__
from cachefit.cli.calibrate import calibrate_command
from cachefit.cli.demo import demo_command
from cachefit.cli.devices import devices_command
from cachefit.cli.export import export_command
from cachefit.cli.plan import plan_command
from cachefit.cli.predict import predict_command
from cachefit.cli.profile import profile_command
from cachefit.cli.run import run_command
from cachefit.cli.seed_report import seed_report_command
from cachefit.cli.shard import shard_command
from cachefit.cli.weights import init_weights_command

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="cachefit")
def cli() -> None:
    """Plan deployments whose partitions fit on-chip memory (GPU L2, accelerator SRAM).

    \b
    Start with:
      cachefit devices                          the cards and their on-chip capacity
      cachefit profile seed-dense16             bytes and FLOPs of each layer
      cachefit plan llama-3-8b --device dmatrix-corsair
      cachefit predict plan.json                speed per stage and end to end, analytically
      cachefit init-weights, shard, run         run a plan on one process per card (see cachefit run --help)
      cachefit demo                             all of it on a bundled model
    """


for command in (devices_command, profile_command, plan_command, predict_command, export_command, init_weights_command,
                shard_command, run_command, calibrate_command, seed_report_command, demo_command):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="cachefit")
