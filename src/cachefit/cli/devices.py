"""``cachefit devices``: the device catalog."""

from __future__ import annotations

import click

from cachefit import api
from cachefit.cli._common import emit_json, handle_errors, out
from cachefit.output import report


@click.command("devices")
@click.option("--format", "output_format", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--devices-file", type=click.Path(dir_okay=False), help="TOML adding devices or overriding figures.")
@handle_errors
def devices_command(output_format: str, devices_file: str | None) -> None:
    """List the devices plans can target, each figure with its source.

    \b
    Examples:
      cachefit devices
      cachefit devices --format json | jq '.h100.usable_fraction'
      cachefit devices --devices-file my-cards.toml
    """
    catalog = api.devices(devices_file)
    if output_format == "json":
        emit_json({name: device.to_dict() for name, device in catalog.items()})
    else:
        out.print(report.devices_table(catalog.values()))
