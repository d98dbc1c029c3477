"""``cachefit init-weights``: a seeded checkpoint of the reference model (there is no model hub here)."""

from __future__ import annotations

import click

from cachefit.cli._common import err, handle_errors
from cachefit.sources import presets
from cachefit.sources.spec import read_spec


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
    from pathlib import Path

    from cachefit.runtime.weights import init_weights

    if model.endswith(".toml"):
        spec, work, _ = read_spec(Path(model))
    elif model in presets():
        spec, work = presets()[model].spec, presets()[model].workload
    else:
        raise ValueError(f"init-weights takes a preset ({', '.join(presets())}) or a .toml spec, got {model!r}")
    if dtype:
        work = replace(work, dtype=dtype)
    info = init_weights(spec, work, out, seed)
    err.print(f"wrote {out}: {spec.name}, {info['dtype']}, seed {seed}")
