"""Model spec files (``.toml``): a family, its dimensions, and optional workload defaults.

    family = "llama"
    name = "my-model"
    layers = 32
    hidden = 4096
    heads = 32
    kv_heads = 8
    ffn_hidden = 14336
    vocab = 128256
    [workload]          # defaults; batch, seq, phase, dtype, attention given to a verb override them
    batch = 1
    seq = 8192

The fields are those of :class:`~cachefit.core.spec.DenseSpec` / :class:`~cachefit.core.spec.LlamaSpec` and
:class:`~cachefit.core.spec.Workload`, validated directly.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cachefit.core.errors import InputError
from cachefit.core.files import adapter, describe_validation_error, read_text
from cachefit.core.layers import LayerTable
from cachefit.core.spec import DenseSpec, ExpertSplit, ModelSpec, Workload, parse_spec_fields
from cachefit.sources.families import dense_table, llama_table

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["build_table", "parse_spec", "parse_spec_text", "read_spec"]



def read_spec(path: Path) -> tuple[ModelSpec, Workload, str]:
    return parse_spec_text(read_text(path, "model spec"), str(path))


def parse_spec_text(text: str, source: str) -> tuple[ModelSpec, Workload, str]:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise InputError(f"{source}: not valid TOML ({error})") from error
    return parse_spec(document, source)


def parse_spec(document: dict[str, Any], source: str) -> tuple[ModelSpec, Workload, str]:
    """The spec, its workload defaults, and its description."""
    fields = dict(document)
    family = fields.pop("family", None)
    description = fields.pop("description", "")
    workload = fields.pop("workload", {})
    spec = parse_spec_fields(family, fields, source)
    if not isinstance(description, str):
        raise InputError(f"{source}: description must be a string, got {description!r}")
    if not isinstance(workload, dict):
        raise InputError(f"{source}: [workload] must be a table of batch, seq, phase, dtype, attention")
    try:
        work = adapter(Workload).validate_python(workload)
    except ValidationError as error:
        raise InputError(describe_validation_error(error, f"{source} [workload]")) from error
    return spec, work, description


def build_table(spec: ModelSpec, work: Workload, sublayers: bool = False, *, experts: ExpertSplit = "tensor",
                **overrides: Any) -> LayerTable:
    """The layer table of ``spec`` under ``work`` with any non-None ``overrides`` (batch, seq, ...) applied;
    ``sublayers``: attention and MLP as separate layers; ``experts``: how a mixture of experts splits."""
    chosen = {key: value for key, value in overrides.items() if value is not None}
    work = replace(work, **chosen)
    if isinstance(spec, DenseSpec):
        if experts != "tensor":
            raise InputError(f"experts='parallel': {spec.name} is a dense network", parameters=("experts",))
        return dense_table(spec, work, sublayers)
    return llama_table(spec, work, sublayers, experts=experts)
