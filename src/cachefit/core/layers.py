"""The layer table: what every model source produces and every planner consumes (DESIGN.md, "Layer table").

Layers are numbered 0..n-1 in execution order; sizes are exact integer bytes for one batch, sequence and phase.
Files are validated here, at the edge, so everything past :func:`LayerTable.read` can trust its input.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, cast

import numpy as np
from pydantic import ConfigDict, Field, GetCoreSchemaHandler, ValidationError
from pydantic_core import core_schema

from cachefit.core.columns import LayerColumns
from cachefit.core.errors import InputError
from cachefit.core.files import (
    adapter,
    atomic_write_text,
    decode_text,
    describe_validation_error,
    json_text,
    read_bytes,
    read_json_object,
)
from cachefit.core.spec import Phase, SpecRecord
from cachefit.core.table_io import CSV_COLUMNS, columns_from_csv, columns_from_rows
from cachefit.core.units import INT64_MAX

__all__ = ["CSV_COLUMNS", "SCHEMA", "Layer", "LayerTable", "Phase", "SharedTensor", "Split"]

SCHEMA = "cachefit.layers/v1"
_STRICT = ConfigDict(extra="forbid", strict=True)
# Strict: no float for an integer, no string for a number; sizes are exact 64-bit integers.
Bytes = Annotated[int, Field(ge=0, le=INT64_MAX)]
_Name = Annotated[str, Field(min_length=1)]
_Flops = Annotated[float, Field(ge=0, allow_inf_nan=False)]


@dataclass(frozen=True, slots=True)
class SharedTensor:
    """A weight this layer uses but an earlier layer (its first user, ``owner``) counts, e.g. a tied embedding.

    A partition that holds this layer but not the owner must hold the tensor too; the memory models add it there.
    """

    __pydantic_config__ = _STRICT
    tensor: _Name
    owner: _Name
    bytes: Bytes


@dataclass(frozen=True, slots=True)
class Split:
    """What one card of a tensor group holds and does when the layer is split ``ways`` ways (Megatron-style:
    attention by heads, the MLP by hidden columns then rows; Shoeybi et al. 2019, sec. 3). Per-card bytes; the
    layer's output activation is not split (every card holds the all-reduced output), so it is not repeated here.
    ``allreduces``: the all-reduces each card takes part in per pass, each of the layer's whole output (one after
    attention, one after the MLP); ``allreduce_bytes``: their bytes in all."""

    __pydantic_config__ = _STRICT
    ways: Annotated[int, Field(ge=2)]
    weight_bytes: Bytes
    workspace_bytes: Bytes
    kv_cache_bytes: Bytes = 0
    flops: _Flops = 0.0
    allreduce_bytes: Bytes = 0
    allreduces: Annotated[int, Field(ge=0)] = 0
    allgathers: Annotated[int, Field(ge=0)] = 0     # all-gathers of the whole output (a vocab-parallel head's logits)
    experts: Annotated[int, Field(ge=0)] = 0        # whole experts a card holds (expert parallel); 0: not so
    read_bytes: Bytes | None = None     # weight bytes a pass reads when fewer than held (experts not taken)

    @property
    def bytes_read(self) -> int:
        """Weight bytes one pass reads: ``read_bytes`` where set, else every byte held."""
        return self.read_bytes if self.read_bytes is not None else self.weight_bytes


@dataclass(frozen=True, slots=True)
class Layer:
    __pydantic_config__ = _STRICT
    name: _Name
    weight_bytes: Bytes
    activation_bytes: Bytes
    workspace_bytes: Bytes
    kv_cache_bytes: Bytes = 0
    flops: _Flops = 0.0
    modules: tuple[str, ...] = ()
    shared: tuple[SharedTensor, ...] = ()
    splits: tuple[Split, ...] = ()      # the tensor splits the layer's shapes allow (ways > 1); none: whole only
    read_bytes: Bytes | None = None     # weight bytes one pass reads, when fewer than it holds (a mixture of
                                        # experts reads only the experts its tokens take); None: all of them

    def split(self, ways: int) -> Split | None:
        """The layer split ``ways`` ways (1: whole), or None when its shapes do not allow it."""
        if ways == 1:
            return Split(1, self.weight_bytes, self.workspace_bytes, self.kv_cache_bytes, self.flops,
                         read_bytes=self.read_bytes)
        return next((s for s in self.splits if s.ways == ways), None)


class _Columns:
    """Pydantic validates a table's header; its rows arrive already read into columns (core/table_io.py checks
    them), as an instance, or in JSON mode through the validation context (LayerTable.from_dict)."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.json_or_python_schema(
            json_schema=core_schema.with_info_plain_validator_function(_columns_from_context),
            python_schema=core_schema.is_instance_schema(LayerColumns))


def _columns_from_context(value: Any, info: core_schema.ValidationInfo) -> LayerColumns:
    columns = (info.context or {}).get("columns")
    if not isinstance(columns, LayerColumns):
        raise TypeError("a layer table's rows are read by LayerTable.from_dict; this is a bug")
    return columns


@dataclass(frozen=True, slots=True)
class LayerTable:
    """``layers``: any sequence of Layer records; the table keeps them as :class:`LayerColumns` (``columns``),
    which is still a sequence of Layer."""

    __pydantic_config__ = _STRICT
    name: _Name
    layers: Annotated[Sequence[Layer], _Columns]
    input_bytes: Bytes = 0
    dtype: str | None = None
    batch: Annotated[int, Field(ge=1)] | None = None
    seq: Annotated[int, Field(ge=1)] | None = None
    phase: Phase | None = None
    spec: SpecRecord | None = field(default=None, compare=False)   # the model it was made from, if known
    prefill_chunk: Annotated[int, Field(ge=2)] | None = None   # decode tables that also counted a pass of this many
                                                               # prompt tokens per sequence (Hugging Face profiles)

    def __post_init__(self) -> None:
        if not isinstance(self.layers, LayerColumns):
            object.__setattr__(self, "layers", LayerColumns.of(self.layers))
        _check_table(self)

    @property
    def columns(self) -> LayerColumns:
        """The layers as columns (what planners and memory models read)."""
        return cast(LayerColumns, self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def fingerprint(self) -> str:
        """The identity of the model a plan was made for (version 2, ``columns-sha256:``): sha256 over the table's
        header as canonical JSON, its names, its byte columns as little-endian int64 and its FLOPs as float64
        (the same on every platform), and the per-layer records few layers have (modules, shared tensors,
        splits, read bytes) as canonical JSON. Hashing columns, not the whole table's JSON, is what keeps a
        million-layer plan fast (issue 15)."""
        header = _canonical(self.to_dict_header())
        return "columns-sha256:" + self.columns.cached_digest(header, lambda: fingerprint_digest(self))

    @property
    def legacy_fingerprint(self) -> str:
        """Version 1, which plans made before version 2 carry: sha256 of the whole table's canonical JSON."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()

    def has_fingerprint(self, fingerprint: str) -> bool:
        """Whether ``fingerprint``, of either version, is this table's."""
        return fingerprint == (self.legacy_fingerprint if fingerprint.startswith("sha256:") else self.fingerprint)

    def to_dict(self) -> dict[str, Any]:
        document = self.to_dict_header()
        document["layers"] = [_layer_dict(x) for x in self.layers]
        return document

    def to_dict_header(self) -> dict[str, Any]:
        """The table's JSON document without its layers."""
        document: dict[str, Any] = {
            "schema": SCHEMA, "name": self.name, "dtype": self.dtype, "batch": self.batch, "seq": self.seq,
            "phase": self.phase, "input_bytes": self.input_bytes,
        }
        if self.spec is not None:
            document["spec"] = self.spec.to_dict()
        if self.prefill_chunk is not None:          # written only when set: older tables keep their fingerprints
            document["prefill_chunk"] = self.prefill_chunk
        return document

    def to_json(self) -> str:
        return json_text(self.to_dict())

    @property
    def split_ways(self) -> tuple[int, ...]:
        """Every tensor-split width some layer allows, with 1 (whole layers), ascending."""
        return tuple(sorted({1, *(s.ways for layer in self.columns.extras.values() for s in layer.splits)}))

    def to_csv(self) -> str:
        """DESIGN.md's CSV columns. ``modules`` lists and tensor splits are left out (a table read back plans whole
        layers only); shared tensors change footprints, so a table with them is refused rather than written wrong."""
        if self.columns.any_shared:
            raise InputError(f"layer table {self.name!r} has shared tensors (tied weights), which CSV cannot hold; "
                             "write it as JSON")
        rows = [[name, *sizes, _format_flops(flops)] for name, sizes, flops
                in zip(self.columns.names, self.columns.sizes.tolist(), self.columns.flops.tolist())]
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([CSV_COLUMNS, *rows])    # quotes a name with a comma
        return out.getvalue()

    def write(self, path: str | Path) -> None:
        """Write JSON, or CSV when ``path`` ends in ``.csv``; whole or not at all."""
        text = self.to_csv() if str(path).lower().endswith(".csv") else self.to_json()
        atomic_write_text(path, text)

    @classmethod
    def read(cls, path: str | Path, input_bytes: int | None = None) -> LayerTable:
        """Read a ``.json`` or ``.csv`` layer table; ``input_bytes`` is for CSV, which cannot carry it."""
        path = Path(path)
        if path.suffix.lower() == ".csv":
            data = read_bytes(path, "layer table")
            text = data if data.isascii() else decode_text(data, path, "layer table")
            return cls.from_csv(text, name=path.stem, input_bytes=input_bytes or 0, source=str(path))
        if input_bytes is not None:
            raise InputError(f"input_bytes is for CSV layer tables; {path} is JSON and carries its own",
                             parameters=("input_bytes",))
        return cls.from_dict(read_json_object(path, "layer table"), source=str(path))

    @classmethod
    def from_dict(cls, document: Mapping[str, Any], source: str = "layer table") -> LayerTable:
        body = dict(document)
        schema = body.pop("schema", None)
        if schema != SCHEMA:
            raise InputError(f"{source}: schema must be '{SCHEMA}', got {schema!r}")
        spec = None if body.get("spec") is None else SpecRecord.read(body["spec"], f"{source}: spec")
        body["spec"] = None
        _count_legacy_allreduces(body)
        if "layers" not in body:
            raise InputError(f"{source}: layers is required")
        columns = columns_from_rows(body["layers"], source, _validate_layer)
        body["layers"] = None
        try:
            table = adapter(LayerTable).validate_json(json.dumps(body), context={"columns": columns})
        except ValidationError as error:
            raise InputError(describe_validation_error(error, source)) from error
        return replace(table, spec=spec)

    @classmethod
    def from_csv(cls, text: str | bytes, name: str, input_bytes: int = 0, source: str = "CSV") -> LayerTable:
        """``text``: the file's text, or its bytes when they are ASCII (read without a decoded copy)."""
        columns = columns_from_csv(text, source, Layer)
        try:
            return cls(name=name, layers=columns, input_bytes=input_bytes)
        except ValueError as error:
            raise InputError(f"{source}: {error}") from error


_LATER = ("experts", "read_bytes")


def fingerprint_digest(table: LayerTable) -> str:
    """sha256 of the table in columns (LayerTable.fingerprint); each part preceded by its length."""
    columns = table.columns
    extras = [[index, _layer_dict(layer)] for index, layer in sorted(columns.extras.items())]
    # The arrays as buffers (no copy where they are already contiguous little-endian, as on every host we know).
    parts = (_canonical(table.to_dict_header()), "\0".join(columns.names).encode(),
             np.ascontiguousarray(columns.sizes, dtype="<i8").data.cast("B"),
             np.ascontiguousarray(columns.flops, dtype="<f8").data.cast("B"), _canonical(extras))
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))         # bytes (a memoryview cast to "B" counts them)
        digest.update(part)
    return digest.hexdigest()


def _canonical(document: Any) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def _layer_dict(layer: Layer) -> dict[str, Any]:
    document: dict[str, Any] = {
        "name": layer.name, "weight_bytes": layer.weight_bytes, "activation_bytes": layer.activation_bytes,
        "workspace_bytes": layer.workspace_bytes, "kv_cache_bytes": layer.kv_cache_bytes, "flops": layer.flops,
    }
    if layer.modules:
        document["modules"] = list(layer.modules)
    if layer.shared:
        document["shared"] = [{"tensor": s.tensor, "owner": s.owner, "bytes": s.bytes} for s in layer.shared]
    if layer.read_bytes is not None:
        document["read_bytes"] = layer.read_bytes
    if layer.splits:
        # Fields that came later are left out at their defaults, so older tables keep their fingerprints.
        document["splits"] = [{key: value for key, value in asdict(s).items() if key not in _LATER or value}
                              for s in layer.splits]
    return document


def _check_table(table: LayerTable) -> None:
    """Invariants every table keeps, whatever made it: unique names, owners earlier, totals within int64. Column
    checks run on arrays; per-record ones only on the layers that have more than columns."""
    columns = table.columns
    if not len(columns):
        raise InputError("layers must list at least one layer")
    if len(set(columns.names)) != len(columns.names):
        _raise_repeated_name(columns.names)
    index = {name: i for i, name in enumerate(columns.names)} if columns.any_shared else {}
    for position, layer in sorted(columns.extras.items()):
        for shared in layer.shared:
            if index.get(shared.owner, position) >= position:
                raise InputError(f"layers[{position}].shared: owner {shared.owner!r} must be an earlier layer")
        reads = [(layer.read_bytes, layer.weight_bytes), *((s.read_bytes, s.weight_bytes) for s in layer.splits)]
        if any(read is not None and read > held for read, held in reads):
            raise InputError(f"layers[{position}]: read_bytes cannot exceed the weight_bytes held")
        ways = [s.ways for s in layer.splits]
        if any(w < 2 for w in ways) or len(set(ways)) != len(ways):
            raise InputError(f"layers[{position}].splits: ways must be distinct integers >= 2, got {ways}")
    if index:
        _check_owners_count_shared(table, index)
    shared_bytes = [s.bytes for layer in columns.extras.values() for s in layer.shared]
    if table.input_bytes < 0 or (columns.sizes < 0).any() or any(size < 0 for size in shared_bytes):
        raise InputError("byte sizes must be non-negative")
    # A float sum far below 2**63 cannot hide an overflow; near it, add exactly.
    rough = float(columns.sizes.sum(dtype=np.float64)) + table.input_bytes + sum(shared_bytes)
    total = rough if rough < 2.0**62 else table.input_bytes + sum(shared_bytes) + sum(columns.sizes.ravel().tolist())
    if total > INT64_MAX:
        raise InputError(f"the table's sizes add up to {int(total)} bytes, beyond int64 (2**63-1); "
                         "cachefit plans in exact 64-bit integers: split the model or use a smaller batch")


def _raise_repeated_name(names: Sequence[str]) -> None:
    seen: dict[str, int] = {}
    for position, name in enumerate(names):
        if name in seen:
            raise InputError(f"layers[{position}].name {name!r} repeats layers[{seen[name]}]; "
                             "layer names must be unique")
        seen[name] = position


def _check_owners_count_shared(table: LayerTable, index: dict[str, int]) -> None:
    """The owner counts a shared tensor in its weight_bytes (so footprints grow with the partition)."""
    owned: dict[str, dict[str, int]] = {}
    for position, layer in sorted(table.columns.extras.items()):
        for shared in layer.shared:
            size = owned.setdefault(shared.owner, {}).setdefault(shared.tensor, shared.bytes)
            if size != shared.bytes:
                raise InputError(f"layers[{position}].shared: tensor {shared.tensor!r} of {shared.owner!r} is "
                                 f"{shared.bytes} bytes here but {size} bytes in an earlier layer")
    for owner, tensors in owned.items():
        owner_layer = table.layers[index[owner]]
        if sum(tensors.values()) > owner_layer.weight_bytes:
            raise InputError(f"layers[{index[owner]}] ({owner!r}) shares {sum(tensors.values())} bytes of tensors "
                             f"but its weight_bytes is {owner_layer.weight_bytes}: the owner must count them")


def _format_flops(flops: float) -> str:
    return str(int(flops)) if flops.is_integer() else repr(flops)


def _count_legacy_allreduces(body: dict[str, Any]) -> None:
    """Tables written before splits carried ``allreduces`` (cachefit 0.1): each all-reduce was of one whole output."""
    rows = body.get("layers")
    for layer in rows if isinstance(rows, list) else ():
        if type(layer) is not dict or "splits" not in layer or not isinstance(layer["splits"], list):
            continue
        activation = layer.get("activation_bytes")
        for split in layer["splits"]:
            if isinstance(split, dict) and "allreduces" not in split and isinstance(activation, int) and activation:
                total = split.get("allreduce_bytes", 0)
                split["allreduces"] = round(total / activation) if isinstance(total, int) else 0


def _validate_layer(row: Any) -> Layer:
    """One row of a JSON table, strictly (JSON mode: a list is a tuple there)."""
    return adapter(Layer).validate_json(json.dumps(row))
