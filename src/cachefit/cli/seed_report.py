"""``cachefit seed-report``: the seed's experiment redone, written to a Markdown report with plots."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from cachefit.cli._common import err, handle_errors


@click.command("seed-report")
@click.option("--out-dir", type=click.Path(file_okay=False), default="docs", show_default=True,
              help="Where seed-experiment.md and its PNG plots go.")
@click.option("--skip-runs", is_flag=True, help="Only the analytical, full-scale half (no calibration, no runs).")
@click.option("--baseline", default="tp=8,pp=2", show_default=True, metavar="tp=T,pp=P",
              help="The CPU-scale baseline; layer-wise runs on the same number of ranks (T x P).")
@handle_errors
def seed_report_command(out_dir: str, skip_runs: bool, baseline: str) -> None:
    """Redo the seed's experiment: does seed-dense16 fit an H100's L2 (no: by how much, and what would), its
    baseline and layer-wise placement predicted beside the seed's claims, and the same shape scaled down, run on
    local ranks and measured beside its prediction. Writes OUT_DIR/seed-experiment.md and two PNGs.

    \b
    Examples:
      cachefit seed-report                      # docs/seed-experiment.md (calibrates, runs 2 x 16 ranks)
      cachefit seed-report --skip-runs --out-dir /tmp/seed
      cachefit seed-report --baseline tp=2,pp=2  # a 4-rank CPU comparison
    """
    from cachefit.apps.seed_report import full_scale, measured_small, write_report

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with err.status("the full-scale analysis ...") as status:
        facts = full_scale(folder)
        measured = None
        if not skip_runs:
            with tempfile.TemporaryDirectory(prefix="cachefit-seed-") as scratch:
                measured = measured_small(Path(scratch), baseline, lambda step: status.update(step + " ..."))
        write_report(folder / "seed-experiment.md", facts, measured)
    err.print(f"wrote {folder / 'seed-experiment.md'}, {folder / 'seed-layers-vs-h100-l2.png'}, "
              f"{folder / 'seed-predicted-speed.png'}")
