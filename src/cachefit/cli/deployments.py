"""``cachefit deployments``: published SRAM deployments beside cachefit's plans and predictions."""

from __future__ import annotations

from pathlib import Path

import click

from cachefit.cli._common import err, handle_errors


@click.command("deployments")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="docs/deployments.md", show_default=True,
              help="The Markdown report.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="The PNG of cards and speeds (default: beside the report, deployments.png).")
@click.option("--deployments-file", type=click.Path(dir_okay=False),
              help="Your own deployments, in the form of the bundled data/deployments.toml.")
@handle_errors
def deployments_command(output: str, plot_path: str | None, deployments_file: str | None) -> None:
    """Plan and predict well-known public deployments on SRAM chips (Llama-3.1 on Cerebras WSE-3; Llama-2 and
    Mixtral on Groq LPUs) and write them beside their published chip counts and tokens/s, with the ratios and
    the reasons they differ.

    \b
    Examples:
      cachefit deployments                                  # docs/deployments.md and docs/deployments.png
      cachefit deployments -o /tmp/d.md --plot /tmp/d.png
      cachefit deployments --deployments-file mine.toml -o mine.md
    """
    from cachefit.apps.deployments import plot, published_deployments, reproduce_all
    from cachefit.apps.deployments_text import render
    from cachefit.core.files import atomic_write_text, check_output

    report = check_output(output, "report")
    picture = check_output(plot_path or report.with_name("deployments.png"), "plot")
    entries = published_deployments(Path(deployments_file) if deployments_file else None)
    with err.status("planning ...") as status:
        rows = reproduce_all(entries, lambda step: status.update(f"planning {step} ..."))
    plot(rows, picture)
    atomic_write_text(report, render(rows, _relative(picture, report)))
    err.print(f"wrote {report} and {picture}")


def _relative(picture: Path, report: Path) -> str:
    """The plot as the report links it: by name when they share a folder."""
    return picture.name if picture.resolve().parent == report.resolve().parent else str(picture.resolve())
