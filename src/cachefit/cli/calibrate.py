"""``cachefit calibrate``: measure this host and write a device entry the performance model uses."""

from __future__ import annotations

import re

import click

from cachefit.cli._common import err, handle_errors, out
from cachefit.core.errors import InputError
from cachefit.core.files import atomic_write_text, check_output
from cachefit.core.units import format_size

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@click.command("calibrate")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="host.toml", show_default=True,
              help="The devices file to write (use it with --devices-file).")
@click.option("--name", default="host", show_default=True, help="The device's name in that file.")
@handle_errors
def calibrate_command(output: str, name: str) -> None:
    """Measure what one rank gets on this host (one process, one thread per core): fp32 matmul rate, memory
    bandwidth with the working set in cache and beyond it (alone and with every core streaming), gloo send/recv
    latency and bandwidth on loopback, and the fixed costs of a pass and of a block (cachefit's reference
    models; transformers' Llama, where transformers is installed). Writes a devices file entry, every figure
    marked measured (M).

    \b
    Examples:
      cachefit calibrate -o host.toml
      cachefit predict plan.json --device host --devices-file host.toml --micro-batches 4
    """
    from cachefit.runtime.calibrate import measure_host, to_toml

    check_output(output, "devices file")      # before 20 s of measuring
    if not _NAME.match(name):
        raise InputError(f"--name must be a plain device name (letters, digits, - and _), got {name!r}")

    with err.status("measuring ...") as status:
        figures = measure_host(lambda step: status.update(f"measuring {step} ..."))
    atomic_write_text(output, to_toml(figures, name))
    out.print(f"linear layers {figures.linear_flops / 1e9:.1f} GFLOP/s (a square matmul "
              f"{figures.matmul_flops / 1e9:.1f}); bandwidth in cache "
              f"{figures.cache_bandwidth / 1e9:.1f} GB/s, beyond it {figures.memory_bandwidth / 1e9:.1f} GB/s alone "
              f"and {figures.memory_bandwidth_all_cores / 1e9:.1f} GB/s per core with {figures.cores} streaming; gloo "
              f"latency {figures.link_latency * 1e6:.0f} us, bandwidth {figures.link_bandwidth / 1e9:.2f} GB/s, "
              f"all-reduce of 16 KiB {figures.allreduce_seconds * 1e6:.0f} us; "
              f"cache per rank {format_size(figures.on_chip_bytes)}; memory and compute "
              f"{'overlap' if figures.overlap else 'add up'} (roofline off by {figures.overlap_errors[0]:.0%}, sum "
              f"by {figures.overlap_errors[1]:.0%}); fixed costs: a pass {figures.pass_seconds * 1e6:.0f} us, "
              + ", ".join(f"a {family} block {seconds * 1e6:.0f} us" for family, seconds in figures.layer_seconds)
              + ("" if figures.hf_pass_seconds is None
                 else f", a transformers pass {figures.hf_pass_seconds * 1e6:.0f} us"))
    err.print(f"wrote {output} (device {name!r})")
