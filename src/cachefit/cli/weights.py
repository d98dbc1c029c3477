"""``cachefit init-weights``: a seeded checkpoint of the reference model (there is no model hub here)."""

from __future__ import annotations

import click

from cachefit.cli._common import err, handle_errors
from cachefit.core.files import check_output
from cachefit.sources import spec_of


@click.command("init-weights")
@click.argument("model")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The .safetensors file to write.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same weights, bit for bit.")
@click.option("--dtype", help="Weight dtype (default: the model's).")
@handle_errors
def init_weights_command(model: str, out: str, seed: int, dtype: str | None) -> None:
    """Write seeded weights of MODEL's reference transformer (a preset or a .toml spec) as safetensors.

    \b
    Examples:
      cachefit init-weights tiny-llama --out tiny-llama.safetensors
      cachefit init-weights my-model.toml --out ckpt.safetensors --seed 7 --dtype bfloat16
    """
    from dataclasses import replace

    from cachefit.runtime.weights import init_weights

    check_output(out, "checkpoint")
    spec, work = spec_of(model)
    if dtype:
        work = replace(work, dtype=dtype)
    info = init_weights(spec, work, out, seed)
    err.print(f"wrote {out}: {spec.name}, {info['dtype']}, seed {seed}")
