"""The ``cachefit`` command: one short file per verb over the library (cachefit.api)."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from cachefit import __version__
from cachefit.core.errors import EXIT_BUG

__all__ = ["cli", "main"]


_NO_ARGS: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())


# Each verb, in the order `cachefit --help` lists them, and the module (and object) that defines it: loaded when
# that verb runs, so `cachefit plan` does not import what `run` or `calibrate` need (click's lazy group pattern).
_VERBS = {"devices": ("devices", "devices_command"), "profile": ("profile", "profile_command"),
          "plan": ("plan", "plan_command"), "predict": ("predict", "predict_command"),
          "export": ("export", "export_command"), "init-weights": ("weights", "init_weights_command"),
          "shard": ("shard", "shard_command"), "run": ("run", "run_command"),
          "calibrate": ("calibrate", "calibrate_command"), "seed-report": ("seed_report", "seed_report_command"),
          "deployments": ("deployments", "deployments_command"), "demo": ("demo", "demo_command")}


class _Cachefit(click.Group):
    """click's usage errors as one line, like every other bad input (DESIGN.md: one clear line, exit 2); verbs
    loaded on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_VERBS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        where = _VERBS.get(cmd_name)
        if where is None:
            return None
        command = getattr(importlib.import_module(f"cachefit.cli.{where[0]}"), where[1])
        assert isinstance(command, click.Command), f"{where} is not a click command; this is a bug"
        return command

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


def main() -> None:
    cli(prog_name="cachefit")
