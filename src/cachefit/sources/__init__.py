"""Model sources: everything that turns a MODEL argument into a :class:`~cachefit.core.layers.LayerTable`.

MODEL (DESIGN.md): a layer table (``.json``/``.csv``), a spec (``.toml``), a bundled preset name, a Hugging Face
``config.json`` (or a folder holding one, or a bundled ``hf/NAME``), or ``package.module:factory``. The last three
and ``measure=True`` need torch (and transformers for HF); they are imported only then.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from cachefit.core.errors import InputError
from cachefit.core.layers import LayerTable
from cachefit.core.records import ModelInfo, Verification
from cachefit.core.spec import DTYPE_BYTES, ExpertSplit, ModelSpec, Workload
from cachefit.sources.spec import build_table, parse_spec_text, read_spec

__all__ = [
    "WORKLOAD_OPTIONS",
    "Granularity",
    "Preset",
    "TorchOptions",
    "hf_preset_names",
    "is_hf_model",
    "load_model",
    "plan_table",
    "presets",
    "rebuild_table",
    "spec_of",
    "verify_model",
]

WORKLOAD_OPTIONS = ("batch", "seq", "phase", "dtype", "attention")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True, slots=True)
class Preset:
    name: str
    description: str
    spec: ModelSpec
    workload: Workload


Granularity = Literal["block", "sublayer", "leaf"]


@dataclass(frozen=True, slots=True)
class TorchOptions:
    """How to profile a torch-backed source: layer granularity, factory inputs, and measuring specs' modules."""

    granularity: Granularity = "block"
    input_shape: tuple[int, ...] | None = None
    input_dtype: str = "int64"
    measure: bool = False
    prefill_chunk: int | None = None
    experts: ExpertSplit = "tensor"     # a mixture of experts in tensor groups: experts split, or placed whole


# Hugging Face models run SDPA, whose fused kernels (CPU and GPU) are what a real forward uses: flash by default.
HF_WORKLOAD = Workload(batch=1, seq=4096, phase="decode", dtype="bfloat16", attention="flash")


def hf_preset_names() -> list[str]:
    """The bundled Hugging Face configs (``data/hf/*.json``), as MODEL names ``hf/NAME``."""
    folder = resources.files("cachefit").joinpath("data/hf")
    return sorted(f"hf/{entry.name.removesuffix('.json')}" for entry in folder.iterdir()
                  if entry.name.endswith(".json"))


@cache
def presets() -> dict[str, Preset]:
    """The bundled presets by name (``data/presets/*.toml``)."""
    found = {}
    for entry in resources.files("cachefit").joinpath("data/presets").iterdir():
        if entry.name.endswith(".toml"):
            spec, work, description = parse_spec_text(entry.read_text(encoding="utf-8"), f"preset {entry.name}")
            found[spec.name] = Preset(spec.name, description, spec, work)
    return dict(sorted(found.items()))


def load_model(model: str | Path | LayerTable, *, input_bytes: int | None = None,
               torch_options: TorchOptions | None = None, **workload: Any) -> LayerTable:
    """Any MODEL the CLI takes, as a layer table. ``workload``: batch, seq, phase, dtype, attention (None = the
    model's default); they apply to presets and specs, whose sizes depend on them, not to fixed layer tables."""
    options = torch_options or TorchOptions()
    unknown = set(workload) - set(WORKLOAD_OPTIONS)
    if unknown:
        raise InputError(f"unknown model option(s) {', '.join(sorted(unknown))}; known: {', '.join(WORKLOAD_OPTIONS)}")
    chosen = {key: value for key, value in workload.items() if value is not None}
    if isinstance(model, LayerTable):
        _refuse_options(chosen, "a LayerTable")
        return model
    text = str(model)
    path = Path(text)
    suffix = path.suffix.lower()
    hf = _hf_source(text, path)
    spec_source = suffix == ".toml" or text in presets()
    if options.measure and not spec_source:
        raise InputError("measure applies to presets and .toml specs (torch models and Hugging Face configs are "
                         "always measured)", parameters=("measure",))
    if options.prefill_chunk and not (spec_source or hf is not None):
        raise InputError("prefill_chunk applies to presets, .toml specs and Hugging Face configs",
                         parameters=("prefill_chunk",))
    if options.experts != "tensor" and hf is None and not (suffix == ".toml" or text in presets()):
        raise InputError("experts='parallel' is for mixture-of-experts models (such as mixtral-8x7b or "
                         "hf/mixtral-8x7b); this model is not one", parameters=("experts",))
    if hf is not None:
        document, name = hf
        table: LayerTable = _torch().profile_hf(document, name, _hf_workload(document, chosen),
                                                _torch_granularity(options), options.experts, options.prefill_chunk)
        return table
    if suffix in (".json", ".csv"):
        return _load_table_file(path, input_bytes, chosen)
    if input_bytes is not None:
        raise InputError("input_bytes applies to CSV layer tables only", parameters=("input_bytes",))
    if suffix == ".toml" or text in presets():
        spec, work = spec_of(text)
        return _spec_table(spec, work, chosen, options)
    if _FACTORY.match(text):
        _refuse_options({k: v for k, v in chosen.items() if k != "phase"}, f"factory {text}")
        table = _torch().profile_factory(text, options.input_shape, options.input_dtype, chosen.get("phase"),
                                         _torch_granularity(options))
        return table
    raise InputError(f"model {text!r} is not a file, nor a preset; presets: {', '.join(presets())}, "
                     f"{', '.join(hf_preset_names())} (or a layer table .json/.csv, a model spec .toml, a Hugging "
                     "Face config.json, or package.module:factory)")


def verify_model(model: str | Path, limit_bytes: int, **workload: Any) -> Verification:
    """A Hugging Face MODEL's or a factory's profile checked against a real forward on this host
    (sources/verify.py)."""
    unknown = set(workload) - set(WORKLOAD_OPTIONS)
    if unknown:
        raise InputError(f"unknown model option(s) {', '.join(sorted(unknown))}; known: {', '.join(WORKLOAD_OPTIONS)}")
    chosen = {key: value for key, value in workload.items() if value is not None}
    text = str(model)
    hf = _hf_source(text, Path(model))
    if hf is None and not _FACTORY.match(text):
        raise InputError(f"verify builds a model for real (a Hugging Face config.json, a folder holding one, "
                         f"hf/NAME, or package.module:factory); {text!r} is not one (presets and specs: profile "
                         "with measure)", parameters=("verify",))
    try:
        from cachefit.sources.verify import verify_factory, verify_hf
    except ImportError as error:
        raise InputError(f"verify needs torch and transformers: pip install 'cachefit[hf]' ({error})") from error
    if hf is None:
        _refuse_options({k: v for k, v in chosen.items() if k != "phase"}, f"factory {text}")
        return verify_factory(text, chosen.get("phase"), limit_bytes)
    document, name = hf
    return verify_hf(document, name, _hf_workload(document, chosen), limit_bytes)


def is_hf_model(model: str | Path) -> bool:
    """Whether ``model`` names a Hugging Face config: a bundled ``hf/NAME``, a config.json, a folder holding one."""
    return _hf_source(str(model), Path(model)) is not None


def _hf_source(text: str, path: Path) -> tuple[dict[str, Any], str] | None:
    """A Hugging Face config (a bundled ``hf/NAME``, a config.json, a folder holding one) and its name; None when
    ``text`` names none."""
    if text in hf_preset_names():
        from cachefit.sources.hf import hf_presets
        return hf_presets()[text], text
    if (path.is_dir() and (path / "config.json").exists()) or _is_hf_config(path):
        from cachefit.sources.hf import read_hf_config
        return read_hf_config(path), path.stem if path.is_file() else path.name
    return None


def _hf_workload(document: dict[str, Any], chosen: dict[str, Any]) -> Workload:
    """The workload of a Hugging Face model: the options given, the config's own element type (``dtype``, or
    ``torch_dtype`` before transformers 5) unless one is given, else bfloat16."""
    stored = document.get("dtype") or document.get("torch_dtype")
    if "dtype" not in chosen and isinstance(stored, str) and stored in DTYPE_BYTES:
        chosen = {**chosen, "dtype": stored}
    return replace(HF_WORKLOAD, **chosen)


def rebuild_table(model: ModelInfo) -> LayerTable:
    """The closed-form table of a plan's model (its record: spec, batch, seq, phase, dtype), for the figures a
    plan does not keep (FLOPs, per-layer activations)."""
    if model.spec is None:
        raise InputError(f"the plan's model {model.name!r} keeps no dense/llama spec (it came from a layer table or "
                         "a torch/HF profile): give the model it was planned from (predict --model PATH)")
    work = Workload(batch=model.batch or 1, seq=model.seq or 1, phase=model.phase or "decode",
                    dtype=model.dtype or "float16", attention=model.spec.attention)
    return build_table(model.spec.spec, work, model.spec.sublayers, experts=model.spec.experts)


def plan_table(model: ModelInfo, source: str | Path | None = None,
               fix: str = "give the model it was planned from, or plan again") -> LayerTable:
    """The table a plan was made for: its spec's closed form (``source`` None), or ``source``, the Hugging Face
    folder or config (profiled again under the plan's workload) or the layer table file the plan was made from,
    checked against the plan's fingerprint; ``fix`` ends the line that refuses another model."""
    if source is None:
        return rebuild_table(model)
    if model.spec is not None:
        raise InputError(f"the plan keeps the spec of {model.name!r} and rebuilds its table from it: drop the "
                         f"model given ({source})")
    text, path = str(source), Path(source)
    if _hf_source(text, path) is not None:
        table = load_model(source, batch=model.batch, seq=model.seq, phase=model.phase, dtype=model.dtype,
                           torch_options=TorchOptions(prefill_chunk=model.prefill_chunk))
    elif path.suffix.lower() in (".json", ".csv"):
        table = load_model(source)
    else:
        raise InputError(f"model {text!r}: give the Hugging Face folder or config, or the layer table file, the plan "
                         "was made from")
    table = replace(table, name=model.name)          # a folder renamed or copied holds the same model
    if not table.has_fingerprint(model.fingerprint):
        raise InputError(f"the plan was made for another model than {text} (its table {model.fingerprint[:19]}..., "
                         f"this one's {table.fingerprint[:19]}... at batch {model.batch}, seq {model.seq}, "
                         f"{model.phase}, {model.dtype}): {fix}")
    return table


def spec_of(model: str | Path) -> tuple[ModelSpec, Workload]:
    """The spec and default workload of a preset name or a ``.toml`` spec file."""
    if str(model).lower().endswith(".toml"):
        spec, work, _ = read_spec(Path(model))
        return spec, work
    if str(model) in presets():
        return presets()[str(model)].spec, presets()[str(model)].workload
    raise InputError(f"expected a preset ({', '.join(presets())}) or a .toml spec, got {str(model)!r}")


def _spec_table(spec: ModelSpec, work: Workload, chosen: dict[str, Any], options: TorchOptions) -> LayerTable:
    if not options.measure:
        if options.prefill_chunk is not None:
            raise InputError("prefill_chunk measures a prompt chunk: use it with measure",
                             parameters=("prefill_chunk", "measure"))
        return build_table(spec, work, options.granularity == "sublayer", experts=options.experts, **chosen)
    if options.granularity == "sublayer":
        raise InputError("granularity='sublayer' splits the closed form's blocks; with measure use block or leaf",
                         parameters=("granularity", "measure"))
    if options.experts != "tensor":
        raise InputError("experts='parallel' places a closed form's experts; the reference model measure profiles "
                         "has none", parameters=("experts", "measure"))
    table: LayerTable = _torch().measure_spec(spec, replace(work, **chosen), options.granularity,
                                              options.prefill_chunk)
    return table


def _torch_granularity(options: TorchOptions) -> Literal["block", "leaf"]:
    if options.granularity == "sublayer":
        raise InputError("granularity='sublayer' is for presets and .toml specs (closed form); torch and Hugging "
                         "Face models take block or leaf", parameters=("granularity",))
    return "leaf" if options.granularity == "leaf" else "block"


def _torch() -> Any:
    """The torch-backed sources, imported on first use (planning from tables and specs never imports torch)."""
    try:
        from cachefit.sources import torch_sources
    except ImportError as error:
        raise InputError(f"this model source needs torch: pip install 'cachefit[torch]' ({error})") from error
    return torch_sources


def _load_table_file(path: Path, input_bytes: int | None, chosen: dict[str, Any]) -> LayerTable:
    if not path.exists():
        raise InputError(f"layer table {path} does not exist")
    _refuse_options(chosen, f"layer table {path}")
    return LayerTable.read(path, input_bytes=input_bytes)


_CONFIG_BYTES = 1 << 20


def _is_hf_config(path: Path) -> bool:
    if path.suffix.lower() != ".json" or not path.is_file() or path.stat().st_size > _CONFIG_BYTES:
        return False            # configs are a few KiB; a large file is a layer table, parsed once by its reader
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False            # not a config: the layer-table reader says what is wrong with it
    return isinstance(document, dict) and "schema" not in document and (
        "model_type" in document or "architectures" in document)


def _refuse_options(chosen: dict[str, Any], what: str) -> None:
    if chosen:
        options = ", ".join(sorted(chosen))
        raise InputError(f"{options}: {what} has fixed sizes; these options apply to presets and .toml specs",
                         parameters=tuple(chosen))
