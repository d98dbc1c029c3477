"""Model sources: everything that turns a MODEL argument into a :class:`~cachefit.layers.LayerTable`.

MODEL (DESIGN.md): a layer table (``.json``/``.csv``), a spec (``.toml``), or a bundled preset name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from cachefit.layers import LayerTable
from cachefit.sources.families import Workload
from cachefit.sources.spec import ModelSpec, build_table, parse_spec_text, read_spec

__all__ = ["WORKLOAD_OPTIONS", "Preset", "load_model", "presets"]

WORKLOAD_OPTIONS = ("batch", "seq", "phase", "dtype", "attention")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True, slots=True)
class Preset:
    name: str
    description: str
    spec: ModelSpec
    workload: Workload


@cache
def presets() -> dict[str, Preset]:
    """The bundled presets by name (``data/presets/*.toml``)."""
    found = {}
    for entry in resources.files("cachefit").joinpath("data/presets").iterdir():
        if entry.name.endswith(".toml"):
            spec, work, description = parse_spec_text(entry.read_text(encoding="utf-8"), f"preset {entry.name}")
            found[spec.name] = Preset(spec.name, description, spec, work)
    return dict(sorted(found.items()))


def load_model(model: str | Path | LayerTable, *, input_bytes: int | None = None, **workload: Any) -> LayerTable:
    """Any MODEL the CLI takes, as a layer table. ``workload``: batch, seq, phase, dtype, attention (None = the
    model's default); they apply to presets and specs, whose sizes depend on them, not to fixed layer tables."""
    unknown = set(workload) - set(WORKLOAD_OPTIONS)
    if unknown:
        raise ValueError(f"unknown model option(s) {', '.join(sorted(unknown))}; known: {', '.join(WORKLOAD_OPTIONS)}")
    chosen = {key: value for key, value in workload.items() if value is not None}
    if isinstance(model, LayerTable):
        _refuse_options(chosen, "a LayerTable")
        return model
    text = str(model)
    path = Path(text)
    suffix = path.suffix.lower()
    if suffix in (".json", ".csv") or (path.is_dir() and (path / "config.json").exists()):
        return _load_table_file(path, input_bytes, chosen)
    if input_bytes is not None:
        raise ValueError("--input-bytes applies to CSV layer tables only")
    if suffix == ".toml":
        spec, work, _ = read_spec(path)
        return build_table(spec, work, **chosen)
    if text in presets():
        preset = presets()[text]
        return build_table(preset.spec, preset.workload, **chosen)
    if _FACTORY.match(text):
        raise ValueError(f"{text}: profiling torch modules (package.module:factory) is not available in this "
                         "version; describe the model as a .toml spec or a layer table")
    raise ValueError(f"model {text!r} is not a file, nor a preset; presets: {', '.join(presets())} "
                     "(or give a layer table .json/.csv or a model spec .toml)")


def _load_table_file(path: Path, input_bytes: int | None, chosen: dict[str, Any]) -> LayerTable:
    if path.is_dir() or _is_hf_config(path):
        raise ValueError(f"{path}: Hugging Face configs are not supported in this version; describe the model as a "
                         ".toml spec (family = \"llama\") or a layer table")
    if not path.exists():
        raise ValueError(f"layer table {path} does not exist")
    _refuse_options(chosen, f"layer table {path}")
    return LayerTable.read(path, input_bytes=input_bytes)


def _is_hf_config(path: Path) -> bool:
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and "schema" not in document and (
        "model_type" in document or "architectures" in document)


def _refuse_options(chosen: dict[str, Any], what: str) -> None:
    if chosen:
        options = ", ".join(f"--{key}" for key in sorted(chosen))
        raise ValueError(f"{options}: {what} has fixed sizes; these options apply to presets and .toml specs")
