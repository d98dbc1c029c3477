"""Per-card shards: each card's safetensors file holds only its partition's tensors (on a tensor group, only its
share of them), and a manifest binds them to the plan (its fingerprint) and to their bytes (sha256), so a rank can
refuse a tampered or mismatched shard."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cachefit.core.errors import InputError
from cachefit.core.records import Partition, Plan
from cachefit.nn.model import ModelConfig, tensor_share
from cachefit.runtime.hf_checkpoint import (
    CONFIG,
    is_hf_checkpoint,
    matching_config,
    model_tensors,
    read_stage_tensors,
    stored_names,
    stored_tensors,
    tensor_origins,
)
from cachefit.runtime.hf_tensor_parallel import module_styles, share
from cachefit.runtime.manifest import (
    MANIFEST,
    SHARD_FILE,
    CardShard,
    Manifest,
    SharedWeight,
    file_sha256,
    plan_fingerprint,
    read_card,
    read_hf_config_copy,
    verify_card,
)
from cachefit.runtime.weights import checkpoint_spec, expected_shapes, plan_spec, read_checkpoint_info, tensor_sources
from cachefit.sources.hf import build_hf_model

__all__ = [
    "MANIFEST",
    "CardShard",
    "Manifest",
    "SharedWeight",
    "plan_fingerprint",
    "read_card",
    "read_hf_config_copy",
    "shard_checkpoint",
    "verify_card",
]

def shard_checkpoint(plan: Plan, checkpoint: str | Path, out: str | Path,
                     progress: Callable[[int, int], None] | None = None) -> Manifest:
    """Write ``out/card-K.safetensors`` for every card of ``plan`` and ``out/manifest.json``: into a new folder
    beside ``out``, swapped in whole once every file is written (a failure leaves ``out`` as it was).
    ``checkpoint``: a cachefit checkpoint file, or a Hugging Face folder (runtime/hf_checkpoint.py);
    ``progress(tensors done, tensors in all)`` is called as a Hugging Face folder's tensors are read."""
    if not plan.partitions:
        raise InputError("the plan is not feasible: there are no partitions to shard")
    plan.check_in_layer_order("shard")
    if is_hf_checkpoint(Path(checkpoint)):
        return _shard_hf(plan, Path(checkpoint), Path(out), progress)
    info = read_checkpoint_info(checkpoint)
    spec = plan_spec(plan.model)
    if checkpoint_spec(info, checkpoint) != spec:
        raise InputError(f"checkpoint {checkpoint} holds {info['spec'].get('name')!r} with other dimensions than "
                         f"the plan's model {plan.model.name!r}")
    if plan.model.dtype is not None and plan.model.dtype != info["dtype"]:
        raise InputError(f"the plan counted {plan.model.dtype} weights but the checkpoint holds {info['dtype']}; "
                         f"make one with init-weights and dtype {plan.model.dtype}", parameters=("dtype",))
    with safe_open(str(checkpoint), framework="pt") as handle:
        config = ModelConfig.of(spec)
        sources, shapes = tensor_sources(spec, set(handle.keys())), expected_shapes(spec)

        def read_stage(part: Partition) -> dict[str, torch.Tensor]:
            names = [name for name in sources if part.holds(name)]
            full = {name: handle.get_tensor(sources[name]) for name in names}
            for name, tensor in full.items():
                if tuple(tensor.shape) != shapes[name]:
                    raise InputError(f"checkpoint {checkpoint}: {sources[name]} has shape {tuple(tensor.shape)}, "
                                     f"the plan's model needs {shapes[name]}")
            return full

        def write(staging: Path) -> Manifest:
            cards, shared = _write_cards(plan, staging, read_stage, sources.__getitem__,
                                         lambda part, name, tensor, rank: tensor_share(
                                             name, tensor, config, rank, part.tensor_parallel))
            return Manifest(plan_fingerprint(plan), plan.model.fingerprint, file_sha256(Path(checkpoint)),
                            str(info["dtype"]), cards, shared)

        return _written_whole(Path(out), write)


# A stage's tensors by name; a tensor's share on one card of its stage's group: (part, name, tensor, rank).
StageReader = Callable[[Partition], dict[str, torch.Tensor]]
ShareOf = Callable[[Partition, str, torch.Tensor, int], torch.Tensor]


def _write_cards(plan: Plan, folder: Path, read_stage: StageReader, stored: Callable[[str], str], share: ShareOf
                 ) -> tuple[tuple[CardShard, ...], tuple[SharedWeight, ...]]:
    """Each card's file: its stage's tensors, read once a stage (``read_stage``), each card of a tensor group its
    share; and the stored tensors (``stored(name)``) two stages use, a tied head, say (not a group's shares)."""
    cards: list[CardShard] = []
    users: dict[str, list[tuple[str, int, int]]] = {}       # stored tensor -> (name, card, stage)
    for stage, part in enumerate(plan.partitions):
        whole = read_stage(part)
        for rank, card in enumerate(part.cards):
            tensors = _own_storage({name: share(part, name, tensor, rank) for name, tensor in whole.items()})
            path = folder / f"card-{card}.safetensors"
            _save(tensors, path, {"card": str(card)})
            cards.append(CardShard(card, path.name, file_sha256(path), path.stat().st_size, tuple(whole)))
            for name in whole:
                users.setdefault(stored(name), []).append((name, card, stage))
        del whole
    shared = tuple(SharedWeight(tensor, tuple(n for n, _, _ in uses), tuple(c for _, c, _ in uses))
                   for tensor, uses in users.items() if len({stage for _, _, stage in uses}) > 1)
    return tuple(cards), shared


def _written_whole(out: Path, write: Callable[[Path], Manifest]) -> Manifest:
    """``write`` the cards and the manifest into a new folder beside ``out``, then swap it in whole (a failure
    leaves ``out`` as it was)."""
    folder = _check_out_folder(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        manifest = write(staging)
        manifest.write(staging)
        _swap_in(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _shard_hf(plan: Plan, checkpoint: Path, out: Path, progress: Callable[[int, int], None] | None) -> Manifest:
    document = matching_config(plan, checkpoint)
    dtype = str(plan.model.dtype)
    files = stored_tensors(checkpoint)
    model, hf_config = build_hf_model(document, dtype, "meta")
    shapes, groups = model_tensors(model)
    sources = stored_names(groups, tensor_origins(model, set(files)), checkpoint)
    styles = {part.card: module_styles(model, hf_config, part) for part in plan.partitions
              if part.tensor_parallel > 1}
    total, done = sum(part.holds(name) for part in plan.partitions for name in shapes), [0]

    def step(name: str) -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    def read_stage(part: Partition) -> dict[str, torch.Tensor]:
        names = [name for name in shapes if part.holds(name)]
        return read_stage_tensors(files, sources, names, shapes, dtype, checkpoint, step)

    def write(staging: Path) -> Manifest:
        cards, shared = _write_cards(plan, staging, read_stage, lambda name: sources[name].keys[0],
                                     lambda part, name, tensor, rank: share(
                                         name, tensor, styles.get(part.card, {}), rank, part.tensor_parallel))
        shutil.copyfile(checkpoint / CONFIG, staging / CONFIG)
        return Manifest(plan_fingerprint(plan), plan.model.fingerprint, file_sha256(staging / CONFIG), dtype, cards,
                        shared, source="hf")

    return _written_whole(out, write)


def _check_out_folder(folder: Path) -> Path:
    """A new folder, an empty one, or an earlier shard folder (its manifest and card files only), to replace
    whole; anything else holds the user's files, which a swap would lose."""
    if not folder.parent.is_dir():
        raise InputError(f"cannot write shards to {folder}: folder {folder.parent} does not exist")
    if folder.exists() and not folder.is_dir():
        raise InputError(f"cannot write shards to {folder}: it exists and is not a folder")
    if folder.is_dir():
        others = [p.name for p in folder.iterdir()
                  if p.name not in (MANIFEST, CONFIG) and not SHARD_FILE.match(p.name)]
        if others:
            raise InputError(f"{folder} holds other files than shards ({', '.join(sorted(others)[:3])}): give a "
                             "new or empty folder")
    return folder


def _swap_in(staging: Path, folder: Path) -> None:
    """Replace ``folder`` by ``staging`` whole (the old one, if any, is removed only after the swap)."""
    if not folder.exists():
        staging.rename(folder)
        return
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    folder.rename(old)
    staging.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    try:
        save_file(tensors, str(path), metadata=metadata)
    except (OSError, SafetensorError) as error:           # a full disk: name the file, exit 2
        raise InputError(f"cannot write shard {path}: {getattr(error, 'strerror', None) or error}") from error


def _own_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor contiguous and in storage of its own: a card holding both ends of a tied weight (the embedding
    and the head on one card) stores it under both names, which safetensors only writes as separate tensors."""
    seen: set[int] = set()
    owned = {}
    for name, tensor in tensors.items():
        tensor = tensor.contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        owned[name] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return owned
