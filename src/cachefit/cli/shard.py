"""``cachefit shard``: one safetensors file per card, holding only that card's tensors, and a manifest."""

from __future__ import annotations

import click

from cachefit import api
from cachefit.cli._common import err, handle_errors, out
from cachefit.core.units import format_size


@click.command("shard")
@click.argument("plan_file", metavar="PLAN")
@click.argument("checkpoint", metavar="CHECKPOINT")
@click.option("--out", "folder", required=True, type=click.Path(file_okay=False), help="Folder for the shards.")
@handle_errors
def shard_command(plan_file: str, checkpoint: str, folder: str) -> None:
    """Cut CHECKPOINT into one file per card of PLAN, plus manifest.json (plan fingerprint, tensors per card,
    sha256 of each file). A tensor two cards need (a tied embedding) is written to both, and the manifest says so.

    CHECKPOINT is a cachefit checkpoint (init-weights) or a Hugging Face folder (save_pretrained: config.json
    with model.safetensors, or shards and model.safetensors.index.json) that PLAN was made from; its tensors are
    read one at a time.

    \b
    Examples:
      cachefit plan tiny-llama --measure --memory-model pipeline --capacity 1MiB -o plan.json
      cachefit init-weights tiny-llama --out tiny.safetensors
      cachefit shard plan.json tiny.safetensors --out shards/
      cachefit plan ckpt/my-llama --seq 256 --memory-model pipeline --device groq-lpu -o plan.json
      cachefit shard plan.json ckpt/my-llama --out shards/
    """
    with err.status("sharding ...") as status:
        def progress(done: int, total: int) -> None:
            status.update(f"sharding: {done}/{total} tensors read")
        manifest = api.shard(plan_file, checkpoint, folder, progress)
    for card in manifest.cards:
        out.print(f"card {card.card}: {card.file}, {len(card.tensors)} tensors, {format_size(card.bytes)}")
    for shared in manifest.shared:
        out.print(f"{shared.tensor} is written to cards {', '.join(map(str, shared.cards))} "
                  f"(as {', '.join(shared.names)})")
    out.print(f"manifest: {folder}/manifest.json")
