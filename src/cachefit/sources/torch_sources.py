"""Model sources that need torch: the reference module of a spec, a ``pkg.module:factory``, a HF config.

Imported only when such a source is asked for, so planning from tables and specs never imports torch.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cachefit.core.errors import InputError
from cachefit.core.layers import Layer, LayerTable, Split
from cachefit.core.spec import EMBED, HEAD, ModelSpec, SpecRecord, Workload, block_index, dtype_bytes
from cachefit.nn.model import TORCH_DTYPES
from cachefit.sources.families import split_ways, vocab_parallel_workspace
from cachefit.sources.hf import hf_table
from cachefit.sources.hf_splits import ExpertSplit
from cachefit.sources.torch_profile import Granularity, profile_module

__all__ = ["measure_spec", "profile_factory", "profile_hf"]


def measure_spec(spec: ModelSpec, work: Workload, granularity: Granularity = "block",
                 prefill_chunk: int | None = None) -> LayerTable:
    """Profile the reference module (cachefit.nn) of ``spec`` on meta, for the same workload as its closed form.

    ``prefill_chunk`` (decode only): also measure a pass of that many prompt tokens per sequence at the end of the
    context, and keep each layer's larger activations and workspace, so a run may send prompts in such chunks.
    """
    if work.attention == "flash":
        raise InputError("measure profiles the reference module, whose attention is naive; drop attention",
                         parameters=("measure", "attention"))
    if prefill_chunk is not None and (work.phase != "decode" or not 1 <= prefill_chunk <= work.seq):
        raise InputError(f"prefill_chunk needs phase='decode' and 1 <= chunk <= seq ({work.seq}), got "
                         f"{prefill_chunk} for {work.phase}", parameters=("prefill_chunk", "phase"))
    table = _measure_with_chunk(spec, work, granularity, prefill_chunk, 1)
    record = SpecRecord(spec, work.attention, measured=True,
                        prefill_chunk=prefill_chunk if prefill_chunk is not None and prefill_chunk > 1 else None)
    if granularity == "block":
        table = _with_measured_splits(table, spec, work, prefill_chunk)
    return replace(table, spec=record)


def _measure_with_chunk(spec: ModelSpec, work: Workload, granularity: Granularity, prefill_chunk: int | None,
                        ways: int) -> LayerTable:
    table = _measure_pass(spec, work, granularity, work.new_tokens, ways)
    if prefill_chunk is None or prefill_chunk <= 1:
        return table
    chunk = _measure_pass(spec, work, granularity, prefill_chunk, ways)
    return replace(table, layers=tuple(
        replace(layer, activation_bytes=max(layer.activation_bytes, other.activation_bytes),
                workspace_bytes=max(layer.workspace_bytes, other.workspace_bytes))
        for layer, other in zip(table.layers, chunk.layers)))


def _with_measured_splits(table: LayerTable, spec: ModelSpec, work: Workload, prefill_chunk: int | None
                          ) -> LayerTable:
    """Each layer's splits, measured on one card's share of the module (cachefit.nn, tensor_parallel=t)."""
    from cachefit.nn.model import ModelConfig

    config = ModelConfig.of(spec)
    ways = split_ways(config.heads, config.kv_heads, config.mlp_hidden)
    shares = {t: _measure_with_chunk(spec, work, "block", prefill_chunk, t) for t in ways}
    p = dtype_bytes(work.dtype)[1]
    tokens = work.batch * max(work.new_tokens, prefill_chunk or 1)
    layers = []
    for index, layer in enumerate(table.layers):
        splits = tuple(_measured_split(layer.name, share.layers[index], t, config.vocab, tokens, work.batch,
                                       config.hidden, p) for t, share in shares.items())
        layers.append(replace(layer, splits=splits))
    return replace(table, layers=tuple(layers))


def _measured_split(name: str, share: Layer, ways: int, vocab: int, tokens: int, batch: int, hidden: int, p: int
                    ) -> Split:
    """A layer's split at ``ways`` from its measured share, with the collectives the runtime adds: a block
    all-reduces its attention and MLP outputs (cachefit.nn Block.reduce); a vocab-parallel embedding its partial
    lookups, a vocab-parallel head all-gathers its logits (runtime/stage.py), which the meta forward of the share
    does not run, so their buffers are added as the closed form counts them."""
    allreduces = 2 if block_index(name) is not None else 0
    allgathers, extra = 0, 0
    if name in (EMBED, HEAD) and vocab % ways == 0:
        allreduces, allgathers = (1, 0) if name == EMBED else (0, 1)
        extra = vocab_parallel_workspace(name, tokens, batch, vocab, ways, p)
    return Split(ways, share.weight_bytes, share.workspace_bytes + extra, share.kv_cache_bytes, share.flops,
                 allreduces * tokens * hidden * p, allreduces, allgathers)


def _measure_pass(spec: ModelSpec, work: Workload, granularity: Granularity, tokens: int, ways: int = 1
                  ) -> LayerTable:
    """One measured forward of ``tokens`` new tokens per sequence; in decode, at the end of a full context.
    ``ways`` > 1: of one card's share of every block in a tensor group of that width."""
    from cachefit.nn import KVCache, build_model

    torch_dtype = TORCH_DTYPES[dtype_bytes(work.dtype)[0]]
    model = build_model(spec, dtype=torch_dtype, device="meta", tensor_parallel=ways)
    config = model.config
    shape = (work.batch, tokens) if config.vocab else (work.batch, tokens, config.hidden)
    inputs = torch.zeros(shape, dtype=torch.long if config.vocab else torch_dtype, device="meta")
    kwargs: dict[str, Any] = {}
    if work.phase == "decode":
        kwargs = {"caches": [KVCache(work.batch, config.kv_heads, work.seq, config.head_dim, torch_dtype, "meta")
                             for _ in range(config.layers)], "position": work.seq - tokens}
    return profile_module(model, (inputs,), kwargs, name=spec.name, batch=work.batch, seq=work.seq,
                          phase=work.phase, dtype=dtype_bytes(work.dtype)[0], granularity=granularity)


def profile_factory(target: str, input_shape: tuple[int, ...] | None, input_dtype: str, phase: str | None,
                    granularity: Granularity = "block", device: str = "meta") -> LayerTable:
    """``pkg.module:factory`` returns a module, or (module, inputs) with inputs a tuple of args or a dict of
    kwargs. It is called under ``torch.device("meta")``, so its weights take no memory. This imports and runs the
    user's module: its code, its errors. ``device="cpu"``: built and run for real (seeded random weights), as
    ``profile --verify`` measures it."""
    model, inputs = _call_factory(target, device)
    if not isinstance(model, nn.Module):
        raise InputError(f"{target} must return a torch.nn.Module (or a module and its inputs), got "
                         f"{type(model).__name__}")
    args, kwargs = _inputs(target, inputs, input_shape, input_dtype, device)
    first = next(iter(args), None)
    batch = int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else None
    seq = int(first.shape[1]) if isinstance(first, torch.Tensor) and first.dim() > 1 else None
    dtype = next((str(p.dtype).removeprefix("torch.") for p in model.parameters()), None)
    return profile_module(model.eval(), args, kwargs, name=target, batch=batch, seq=seq,
                          phase=phase if phase in ("prefill", "decode") else None,  # type: ignore[arg-type]
                          dtype=dtype, granularity=granularity, fused=True)   # SDPA as the fused kernel runs it


def _call_factory(target: str, device: str = "meta") -> tuple[Any, Any]:
    """Import ``pkg.module`` and call ``factory()`` on ``device``; whatever goes wrong in the user's code (an import or
    syntax error, a missing argument, a raise, even sys.exit) is one line naming the target."""
    module_name, _, attribute = target.partition(":")
    sys.path.insert(0, str(Path.cwd()))
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (Exception, SystemExit) as error:
        raise InputError(f"cannot import {target}: {type(error).__name__}: {error}") from error
    finally:
        sys.path.pop(0)
    if not callable(factory):
        raise InputError(f"{target} is not callable (a factory returning a torch.nn.Module)")
    try:
        torch.manual_seed(0)                 # a real build: the same random weights every time
        with torch.device(device):
            made = factory()
    except (Exception, SystemExit) as error:
        raise InputError(f"{target}() raised {type(error).__name__}: {error}") from error
    return made if isinstance(made, tuple) and len(made) == 2 else (made, None)


def _inputs(target: str, inputs: Any, shape: tuple[int, ...] | None, dtype: str, device: str = "meta"
            ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if inputs is None:
        if shape is None:
            raise InputError(f"{target} returned no example inputs: give input_shape (e.g. 1,128) and "
                             "input_dtype (default int64)", parameters=("input_shape", "input_dtype"))
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise InputError(f"input_dtype must be a torch dtype such as int64 or float16, got {dtype!r}",
                             parameters=("input_dtype",))
        return (torch.zeros(shape, dtype=torch_dtype, device=device),), {}
    if isinstance(inputs, dict):
        return (), inputs
    return (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), {}


def profile_hf(config: dict[str, Any], name: str, work: Workload, granularity: Granularity,
               experts: ExpertSplit = "tensor", prefill_chunk: int | None = None) -> LayerTable:
    return hf_table(config, name, work, granularity, experts, prefill_chunk=prefill_chunk)
