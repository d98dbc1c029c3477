"""``cachefit demo``: the main job behind ``make demo`` (the narrative is an app: cachefit.apps.demo)."""

from __future__ import annotations

from pathlib import Path

import click

from cachefit.cli._common import handle_errors


@click.command("demo")
@click.option("--out-dir", type=click.Path(file_okay=False), default="cachefit-demo", show_default=True,
              help="Where the weights, shards, plans (JSON), plots (PNG) and run report go.")
@click.option("--plans-only", is_flag=True, help="Skip the run (no torch needed).")
@handle_errors
def demo_command(out_dir: str, plans_only: bool) -> None:
    """Make a bundled model's weights, plan it for cards that need 3 of them, shard it, run it on 3 local CPU
    processes checked against the unpartitioned model; then show why the seed's network does not fit an H100's
    L2 and where whole-layer residency does pay.

    \b
    Example:
      cachefit demo --out-dir /tmp/demo
    """
    from cachefit.apps.demo import run_demo

    run_demo(Path(out_dir), plans_only)
