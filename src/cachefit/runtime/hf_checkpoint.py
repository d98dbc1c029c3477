"""Hugging Face checkpoint folders (``save_pretrained``: config.json with model.safetensors, or shards listed by
model.safetensors.index.json), cut into one safetensors file per card of a plan made from the same config.

The plan must have been made from this very config: the folder is profiled again with the plan's workload and the
table's fingerprint compared with the plan's. Tensors are read one at a time from the stored files (safetensors
maps them; the whole checkpoint is never in memory), each card's file is written when its tensors are read, and
a tied weight stored once (GPT-2's head is its embedding) is written to every card whose layers use it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from cachefit.core.errors import InputError
from cachefit.core.records import Plan

__all__ = ["CONFIG", "RUNNABLE", "check_runnable", "is_hf_checkpoint", "matching_config", "model_tensors",
           "read_stage_tensors", "stored_names", "stored_tensors", "tensor_origins"]

CONFIG = "config.json"
# Architectures whose stages are checked token for token against transformers' generate (tests/test_hf_run.py).
RUNNABLE = ("llama", "qwen2", "qwen3", "mistral", "mixtral", "phi3", "gemma2", "gpt2", "opt", "gpt_neox")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def is_hf_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


def stored_tensors(folder: Path) -> dict[str, Path]:
    """{tensor name: the safetensors file in ``folder`` that holds it}."""
    if (folder / INDEX).is_file():
        from cachefit.core.files import read_json_object

        weight_map = read_json_object(folder / INDEX, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InputError(f"{folder / INDEX}: weight_map must map tensor names to file names")
        files = {name: folder / file for name, file in weight_map.items()}
        for file in set(files.values()):
            if file.parent != folder or not file.is_file():
                raise InputError(f"{folder / INDEX} names {file.name}, which is not a file in {folder}")
        return files
    if (folder / SINGLE).is_file():
        try:
            with safe_open(str(folder / SINGLE), framework="pt") as handle:
                return dict.fromkeys(handle.keys(), folder / SINGLE)
        except (OSError, SafetensorError) as error:
            raise InputError(f"cannot read {folder / SINGLE}: {error}") from error
    raise InputError(f"{folder} has neither {SINGLE} nor {INDEX}: save the model with save_pretrained "
                     "(safetensors; cachefit never loads pickled .bin weights)")


def matching_config(plan: Plan, folder: Path) -> dict[str, Any]:
    """The folder's config document, once its profile under the plan's workload is the table the plan was made
    for; otherwise one line saying how to make a plan that is."""
    from cachefit.sources import plan_table
    from cachefit.sources.hf import read_hf_config

    document = read_hf_config(folder)
    check_runnable(document)
    plan_table(plan.model, folder, f"plan again from {folder}, with the default attention and experts (a run "
                                   "computes as transformers' defaults do)")
    return document


def read_stage_tensors(files: dict[str, Path], sources: dict[str, Origin], names: list[str],
                       shapes: dict[str, tuple[int, ...]], dtype: str, folder: Path,
                       progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """One stage's tensors, read one by one (converted as transformers converts them while loading), each checked
    against the model's shape and the plan's dtype."""
    tensors: dict[str, Any] = {}
    with ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def read(key: str) -> Any:
            if files[key] not in handles:
                handles[files[key]] = stack.enter_context(safe_open(str(files[key]), framework="pt"))
            return handles[files[key]].get_tensor(key)

        for name in names:
            tensor = sources[name].read(read, name)
            stored = str(tensor.dtype).removeprefix("torch.")
            if tuple(tensor.shape) != shapes[name]:
                raise InputError(f"{folder}: {sources[name].keys[0]} makes {name} of shape {tuple(tensor.shape)}, "
                                 f"the config's model needs {shapes[name]}")
            if stored != dtype:
                raise InputError(f"{folder}: {sources[name].keys[0]} is stored in {stored} but the plan counted "
                                 f"{dtype}: plan with dtype {stored}", parameters=("dtype",))
            tensors[name] = tensor
            if progress is not None:
                progress(name)
    return tensors


@dataclass(frozen=True, slots=True)
class Origin:
    """Where one of the model's tensors is stored: one key, or (a layout transformers converts while loading,
    such as Mixtral's experts stored one by one) several keys and transformers' own converter for them."""

    keys: tuple[str, ...]
    patterns: tuple[str | None, ...] = ()
    converter: Any = None

    def read(self, read: Callable[[str], Any], name: str) -> Any:
        if self.converter is None:
            return read(self.keys[0])
        collected: dict[str, Any] = {}
        for key, pattern in zip(self.keys, self.patterns):
            collected.setdefault(str(pattern), []).append(read(key))
        for operation in self.converter.operations:
            collected = operation.convert(collected, source_patterns=self.converter.source_patterns,
                                          target_patterns=self.converter.target_patterns, full_layer_name=name)
        (tensor,) = collected.values()
        return tensor


def tensor_origins(model: Any, stored: set[str]) -> dict[str, Origin]:
    """{model tensor name: its Origin}: each stored key renamed as transformers renames it while loading (its
    conversion mapping for the architecture: renamings, then at most one converter), keys that make one tensor
    together kept in their natural order (experts 0, 1, ..., 10)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    meta = model.state_dict()
    found: dict[str, list[tuple[str, str | None]]] = {}
    for key in sorted(stored, key=dot_natural_key):
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        found.setdefault(name, []).append((key, pattern))
    origins = {}
    for name, entries in found.items():
        pattern = entries[0][1]
        converter = None if pattern is None else next(c for c in converters if pattern in c.source_patterns)
        origins[name] = Origin(tuple(k for k, _ in entries), tuple(p for _, p in entries), converter)
    return origins


def model_tensors(model: Any) -> tuple[dict[str, tuple[int, ...]], list[list[str]]]:
    """{state-dict name: shape} of the config's model (built on meta), and its names grouped by tensor (tied
    weights have several)."""
    groups: dict[int, list[str]] = {}
    shapes = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
        shapes[name] = tuple(tensor.shape)
    return shapes, list(groups.values())


def stored_names(groups: list[list[str]], origins: dict[str, Origin], folder: Path) -> dict[str, Origin]:
    """{state-dict name: its Origin}: a tied weight, stored once, serves all its names."""
    sources = {}
    for aliases in groups:
        kept = [name for name in aliases if name in origins]
        if not kept:
            raise InputError(f"{folder} lacks {aliases[0]}: it does not hold this config's model")
        sources.update(dict.fromkeys(aliases, origins[kept[0]]))
    return sources


def check_runnable(document: dict[str, Any]) -> None:
    kind = document.get("model_type")
    if kind not in RUNNABLE:
        raise InputError(f"cachefit runs Hugging Face models of types {', '.join(RUNNABLE)}; {kind!r} is not one "
                         "yet (plan, profile and export work for any type)")
