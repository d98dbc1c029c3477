"""A shard folder's manifest, and the checks that a card's file is this plan's, untouched: torch-free, so the
launcher can check every shard and start the ranks before it imports torch (1.3-1.7 s here)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError

from cachefit.core.errors import InputError
from cachefit.core.files import adapter, atomic_write_text, describe_validation_error, read_json_object
from cachefit.core.records import Plan
from cachefit.runtime.hf_checkpoint import CONFIG

__all__ = ["MANIFEST", "CardShard", "Manifest", "SharedWeight", "file_sha256", "plan_fingerprint",
           "read_card", "read_hf_config_copy", "verify_card"]

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
    source: Literal["cachefit", "hf"] = "cachefit"     # hf: a Hugging Face folder; its config.json is copied here

    def __post_init__(self) -> None:
        numbers = [card.card for card in self.cards]
        if len(set(numbers)) != len(numbers):
            raise InputError(f"a shard manifest lists each card once, got cards {numbers}")

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
            return adapter(Manifest).validate_json(json.dumps(body))
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


def read_hf_config_copy(folder: str | Path, manifest: Manifest) -> dict[str, Any]:
    """The config.json ``cachefit shard`` copied beside a Hugging Face model's cards, as its manifest hashed it
    (a Hugging Face folder's ``checkpoint_sha256`` is its config's; each card's file has its own hash)."""
    path = Path(folder) / CONFIG
    if not path.is_file() or path.is_symlink() or file_sha256(path) != manifest.checkpoint_sha256:
        raise InputError(f"{path} is missing or does not match its manifest: re-run cachefit shard")
    document: dict[str, Any] = json.loads(path.read_text())
    return document


SHARD_FILE = re.compile(r"^card-\d+\.safetensors$")



def verify_card(folder: str | Path, card: int, plan: Plan) -> CardShard:
    """Check, before any compute, that ``folder`` holds card ``card``'s shard of this very plan, untouched."""
    return read_card(folder, card, plan)[0]


def read_card(folder: str | Path, card: int, plan: Plan) -> tuple[CardShard, bytes]:
    """Card ``card``'s shard of this very plan, untouched, and its bytes: hashed from the bytes it is then loaded
    from (no window between the check and the use). The file must be the manifest's own ``card-N.safetensors`` in
    ``folder`` itself, a regular file, not a link leading elsewhere."""
    directory = Path(folder)
    manifest = Manifest.read(directory)
    if manifest.plan_fingerprint != plan_fingerprint(plan):
        raise InputError(f"{directory}/{MANIFEST} was made for another plan (fingerprint "
                         f"{manifest.plan_fingerprint[:19]}..., this plan {plan_fingerprint(plan)[:19]}...); "
                         "re-run cachefit shard with this plan")
    entry = next((shard for shard in manifest.cards if shard.card == card), None)
    if entry is None:
        raise InputError(f"{directory}/{MANIFEST} has no shard for card {card}")
    if not SHARD_FILE.match(entry.file):
        raise InputError(f"{directory}/{MANIFEST}: card {card}'s file must be a card-N.safetensors in the folder "
                         f"itself, got {entry.file!r}")
    path = directory / entry.file
    if path.is_symlink() or not path.is_file():
        raise InputError(f"card {card}: shard {path} is missing, or a link (shards are plain files in the folder)")
    data = path.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if digest != entry.sha256:
        raise InputError(f"card {card}: shard {path} does not match its manifest (sha256 {digest[:19]}..., expected "
                         f"{entry.sha256[:19]}...): tampered or truncated; re-run cachefit shard")
    return entry, data


