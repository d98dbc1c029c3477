"""The ``cachefit`` command: one short file per verb over the library (cachefit.api)."""

from __future__ import annotations

import sys
from typing import Any

import click

from cachefit import __version__
from cachefit.cli.calibrate import calibrate_command
from cachefit.cli.demo import demo_command
from cachefit.cli.deployments import deployments_command
from cachefit.cli.devices import devices_command
from cachefit.cli.export import export_command
from cachefit.cli.plan import plan_command
from cachefit.cli.predict import predict_command
from cachefit.cli.profile import profile_command
from cachefit.cli.run import run_command
from cachefit.cli.seed_report import seed_report_command
from cachefit.cli.shard import shard_command
from cachefit.cli.weights import init_weights_command
from cachefit.core.errors import EXIT_BUG

__all__ = ["cli", "main"]


_NO_ARGS: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())


class _Cachefit(click.Group):
    """click's usage errors as one line, like every other bad input (DESIGN.md: one clear line, exit 2)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.Exit as done:
            sys.exit(done.exit_code)
        except click.Abort:
            click.echo("cachefit: aborted", err=True)
            sys.exit(EXIT_BUG)
        except _NO_ARGS as help_asked:          # `cachefit` (or a group) alone: the help, as click shows it
            help_asked.show()
            sys.exit(help_asked.exit_code)
        except click.ClickException as error:
            where = getattr(getattr(error, "ctx", None), "command_path", None)
            hint = f" (see {where.replace('cli', 'cachefit', 1)} --help)" if where else ""
            message = " ".join(error.format_message().split())
            click.echo(f"cachefit: error: {message}{hint}", err=True)
            sys.exit(error.exit_code)


@click.group(cls=_Cachefit, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
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
      cachefit deployments                      public SRAM deployments beside cachefit's plans
      cachefit demo                             all of it on a bundled model
    """


for command in (devices_command, profile_command, plan_command, predict_command, export_command, init_weights_command,
                shard_command, run_command, calibrate_command, seed_report_command, deployments_command,
                demo_command):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="cachefit")
