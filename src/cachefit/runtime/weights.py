"""Checkpoints of the reference model: deterministic, seeded, safetensors (no pickle), with the spec inside."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cachefit.core.errors import InputError
from cachefit.core.files import atomic_output, check_output
from cachefit.core.records import ModelInfo
from cachefit.core.spec import ModelSpec, SpecRecord, Workload, dtype_bytes
from cachefit.nn import build_model
from cachefit.nn.model import TORCH_DTYPES

__all__ = ["METADATA_KEY", "checkpoint_spec", "init_weights", "plan_spec", "read_checkpoint_info"]

METADATA_KEY = "cachefit"
TRAINABLE_DTYPES = ("float32", "float16", "bfloat16")


def init_weights(spec: ModelSpec, work: Workload, out: str | Path, seed: int = 0) -> dict[str, Any]:
    """Write the seeded reference model of ``spec`` to ``out`` (safetensors). A tied weight is stored once; the
    metadata keeps the spec, seed and dtype. Returns the metadata."""
    dtype = dtype_bytes(work.dtype)[0]
    if dtype not in TRAINABLE_DTYPES:
        raise InputError(f"init-weights draws weights in {', '.join(TRAINABLE_DTYPES)}; dtype {dtype} would round "
                         "them to nothing useful: store float weights", parameters=("dtype",))
    model = build_model(spec, dtype=TORCH_DTYPES[dtype], device="cpu", seed=seed)
    info = {"spec": SpecRecord(spec, work.attention).to_dict(), "seed": seed, "dtype": dtype}
    check_output(out, "checkpoint")
    # Tied parameters are stored once, under their first name in state-dict order; one metadata key, so the
    # file is the same byte for byte in every process (safetensors' save_model orders aliases by hash seed).
    stored: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            stored[name] = tensor.detach().contiguous()
    with atomic_output(out, "checkpoint") as temporary:
        try:
            save_file(stored, str(temporary), metadata={METADATA_KEY: json.dumps(info, sort_keys=True)})
        except SafetensorError as error:
            raise InputError(f"cannot write checkpoint {out}: {error}") from error
    return info


def read_checkpoint_info(path: str | Path) -> dict[str, Any]:
    """The metadata ``init_weights`` wrote; ValueError for a file that is not such a checkpoint."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (OSError, SafetensorError) as error:
        raise InputError(f"cannot read checkpoint {path}: {error}") from error
    if METADATA_KEY not in metadata:
        raise InputError(f"{path} is not a cachefit checkpoint (no '{METADATA_KEY}' metadata); make one with "
                         "cachefit init-weights")
    info: dict[str, Any] = json.loads(metadata[METADATA_KEY])
    return info


def tensor_sources(spec: ModelSpec, stored: set[str]) -> dict[str, str]:
    """{state-dict name: name stored in the checkpoint}: tied parameters appear under every name they have,
    pointing at the one name the file keeps."""
    model = build_model(spec, device="meta")
    names: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), []).append(name)
    sources = {}
    for aliases in names.values():
        kept = [name for name in aliases if name in stored]
        if not kept:
            raise InputError(f"the checkpoint lacks {aliases[0]}: it does not match this plan's model")
        sources.update({name: kept[0] for name in aliases})
    return sources


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """{state-dict name: shape} of the reference model of ``spec`` (built on meta: no memory)."""
    return {name: tuple(tensor.shape) for name, tensor in build_model(spec, device="meta").state_dict().items()}


def plan_spec(model: ModelInfo) -> ModelSpec:
    """The reference model a plan's model record names; InputError for plans of tables or torch/HF profiles."""
    if model.spec is None:
        raise InputError("this plan's model has no dense/llama spec to build (it came from a layer table or a "
                         "torch/HF profile); use plans made from a preset or a .toml spec")
    return model.spec.spec


def checkpoint_spec(info: Mapping[str, Any], path: str | Path) -> ModelSpec:
    """The spec a checkpoint's metadata records."""
    return SpecRecord.read(info.get("spec"), f"checkpoint {path}: metadata spec").spec
