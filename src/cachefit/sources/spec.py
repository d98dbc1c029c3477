"""Model spec files (``.toml``): a family, its dimensions, and optional workload defaults.

    family = "llama"
    name = "my-model"
    layers = 32
    hidden = 4096
    heads = 32
    kv_heads = 8
    ffn_hidden = 14336
    vocab = 128256
    [workload]          # defaults; --batch --seq --phase --dtype --attention override them
    batch = 1
    seq = 8192
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cachefit.core.errors import InputError
from cachefit.core.files import describe_validation_error
from cachefit.core.layers import LayerTable
from cachefit.sources.families import DenseSpec, LlamaSpec, Workload, dense_table, llama_table

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["ModelSpec", "build_table", "parse_spec", "parse_spec_text", "read_spec"]

ModelSpec = DenseSpec | LlamaSpec
_Positive = Annotated[int, Field(ge=1, strict=True)]
_Dim = Annotated[int, Field(ge=0, strict=True)]


class _WorkloadModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch: _Positive | None = None
    seq: _Positive | None = None
    phase: Literal["prefill", "decode"] | None = None
    dtype: str | None = None
    attention: Literal["naive", "flash"] | None = None


class _DenseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    family: Literal["dense"]
    name: Annotated[str, Field(min_length=1)]
    description: str = ""
    layers: _Positive
    heads: _Positive
    head_dim: _Positive
    mlp_hidden: _Positive
    hidden: _Dim = 0
    vocab: _Dim = 0
    tie_embeddings: bool = False
    workload: _WorkloadModel = _WorkloadModel()


class _LlamaModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    family: Literal["llama"]
    name: Annotated[str, Field(min_length=1)]
    description: str = ""
    layers: _Positive
    hidden: _Positive
    heads: _Positive
    kv_heads: _Positive
    ffn_hidden: _Positive
    vocab: _Positive
    head_dim: _Dim = 0
    tie_embeddings: bool = False
    workload: _WorkloadModel = _WorkloadModel()


def read_spec(path: Path) -> tuple[ModelSpec, Workload, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise InputError(f"cannot read model spec {path}: {error.strerror or error}") from error
    return parse_spec_text(text, str(path))


def parse_spec_text(text: str, source: str) -> tuple[ModelSpec, Workload, str]:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise InputError(f"{source}: not valid TOML ({error})") from error
    return parse_spec(document, source)


def parse_spec(document: dict[str, Any], source: str) -> tuple[ModelSpec, Workload, str]:
    """The spec, its workload defaults, and its description."""
    family = document.get("family")
    models: dict[str, type[_DenseModel] | type[_LlamaModel]] = {"dense": _DenseModel, "llama": _LlamaModel}
    if family not in models:
        raise InputError(f"{source}: family must be 'dense' or 'llama', got {family!r}")
    try:
        model = models[family].model_validate(document)
    except ValidationError as error:
        raise InputError(describe_validation_error(error, source)) from error
    fields = model.model_dump(exclude={"family", "description", "workload"})
    spec: ModelSpec = DenseSpec(**fields) if family == "dense" else LlamaSpec(**fields)
    defaults = {key: value for key, value in model.workload.model_dump().items() if value is not None}
    return spec, Workload(**defaults), model.description


def build_table(spec: ModelSpec, work: Workload, sublayers: bool = False, **overrides: Any) -> LayerTable:
    """The layer table of ``spec`` under ``work`` with any non-None ``overrides`` (batch, seq, ...) applied;
    ``sublayers``: attention and MLP as separate layers."""
    chosen = {key: value for key, value in overrides.items() if value is not None}
    work = replace(work, **chosen)
    if isinstance(spec, DenseSpec):
        return dense_table(spec, work, sublayers)
    return llama_table(spec, work, sublayers)
