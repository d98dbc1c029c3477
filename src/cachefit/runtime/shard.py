"""Per-card shards: each card's safetensors file holds only its partition's tensors (on a tensor group, only its
share of them), and a manifest binds them to the plan (its fingerprint) and to their bytes (sha256), so a rank can
refuse a tampered or mismatched shard."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import torch
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from cachefit.core.errors import InputError
from cachefit.core.files import atomic_write_text, describe_validation_error, read_json_object
from cachefit.core.records import Plan
from cachefit.nn.model import ModelConfig, tensor_share
from cachefit.runtime.weights import checkpoint_spec, plan_spec, read_checkpoint_info, tensor_sources

__all__ = [
    "MANIFEST",
    "CardShard",
    "Manifest",
    "SharedWeight",
    "plan_fingerprint",
    "shard_checkpoint",
    "verify_card",
]

MANIFEST = "manifest.json"
SCHEMA = "cachefit.shards/v1"
_STRICT = ConfigDict(extra="forbid", strict=True)


@dataclass(frozen=True, slots=True)
class CardShard:
    __pydantic_config__ = _STRICT
    card: Annotated[int, Field(ge=0)]
    file: str
    sha256: str
    bytes: int
    tensors: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SharedWeight:
    """One stored tensor written to several cards (a tied embedding): its name in the checkpoint, the names it
    takes on each card, and the cards."""

    __pydantic_config__ = _STRICT
    tensor: str
    names: tuple[str, ...]
    cards: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Manifest:
    __pydantic_config__ = _STRICT
    plan_fingerprint: str
    model_fingerprint: str
    checkpoint_sha256: str
    dtype: str
    cards: tuple[CardShard, ...]
    shared: tuple[SharedWeight, ...] = ()

    def write(self, folder: Path) -> None:
        document = {"schema": SCHEMA, **asdict(self)}
        atomic_write_text(folder / MANIFEST, json.dumps(document, indent=1) + "\n")

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        source = str(folder / MANIFEST)
        body = read_json_object(folder / MANIFEST, "shard manifest")
        schema = body.pop("schema", None)
        if schema != SCHEMA:
            raise InputError(f"{source}: schema must be '{SCHEMA}', got {schema!r}")
        try:
            return _MANIFEST.validate_json(json.dumps(body))
        except ValidationError as error:
            raise InputError(describe_validation_error(error, source)) from error


def plan_fingerprint(plan: Plan) -> str:
    canonical = json.dumps(plan.to_dict(), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def shard_checkpoint(plan: Plan, checkpoint: str | Path, out: str | Path) -> Manifest:
    """Write ``out/card-K.safetensors`` for every card of ``plan`` and ``out/manifest.json``."""
    if not plan.partitions:
        raise InputError("the plan is not feasible: there are no partitions to shard")
    info = read_checkpoint_info(checkpoint)
    spec = plan_spec(plan.model)
    if checkpoint_spec(info, checkpoint) != spec:
        raise InputError(f"checkpoint {checkpoint} holds {info['spec'].get('name')!r} with other dimensions than "
                         f"the plan's model {plan.model.name!r}")
    if plan.model.dtype is not None and plan.model.dtype != info["dtype"]:
        raise InputError(f"the plan counted {plan.model.dtype} weights but the checkpoint holds {info['dtype']}; "
                         f"make one with init-weights and dtype {plan.model.dtype}", parameters=("dtype",))
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    config = ModelConfig.of(spec)
    with safe_open(str(checkpoint), framework="pt") as handle:
        sources = tensor_sources(spec, set(handle.keys()))
        cards: list[CardShard] = []
        users: dict[str, list[tuple[str, int]]] = {}
        for part in plan.partitions:
            names = [name for name in sources if any(name.startswith(prefix + ".") for prefix in part.modules)]
            full = {name: handle.get_tensor(sources[name]) for name in names}
            for rank, card in enumerate(part.cards):     # a tensor group: each card its share (model.tensor_share)
                tensors = _own_storage({name: tensor_share(name, tensor, config, rank, part.tensor_parallel)
                                        for name, tensor in full.items()})
                path = folder / f"card-{card}.safetensors"
                save_file(tensors, str(path), metadata={"card": str(card)})
                cards.append(CardShard(card, path.name, file_sha256(path), path.stat().st_size, tuple(names)))
                for name in names:
                    users.setdefault(sources[name], []).append((name, card))
    shared = tuple(SharedWeight(tensor, tuple(n for n, _ in uses), tuple(c for _, c in uses))
                   for tensor, uses in users.items() if len({card for _, card in uses}) > 1)
    manifest = Manifest(plan_fingerprint(plan), plan.model.fingerprint, file_sha256(Path(checkpoint)),
                        str(info["dtype"]), tuple(cards), shared)
    manifest.write(folder)
    return manifest


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


def verify_card(folder: str | Path, card: int, plan: Plan) -> CardShard:
    """Check, before any compute, that ``folder`` holds card ``card``'s shard of this very plan, untouched."""
    directory = Path(folder)
    manifest = Manifest.read(directory)
    if manifest.plan_fingerprint != plan_fingerprint(plan):
        raise InputError(f"{directory}/{MANIFEST} was made for another plan (fingerprint "
                         f"{manifest.plan_fingerprint[:19]}..., this plan {plan_fingerprint(plan)[:19]}...); "
                         "re-run cachefit shard with this plan")
    entry = next((shard for shard in manifest.cards if shard.card == card), None)
    if entry is None:
        raise InputError(f"{directory}/{MANIFEST} has no shard for card {card}")
    path = directory / entry.file
    if not path.is_file():
        raise InputError(f"card {card}: shard {path} is missing")
    digest = file_sha256(path)
    if digest != entry.sha256:
        raise InputError(f"card {card}: shard {path} does not match its manifest (sha256 {digest[:19]}..., expected "
                         f"{entry.sha256[:19]}...): tampered or truncated; re-run cachefit shard")
    return entry


_MANIFEST = TypeAdapter(Manifest)
