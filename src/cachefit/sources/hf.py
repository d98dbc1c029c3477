"""Hugging Face models from a local ``config.json``, built on the meta device with transformers (extra ``hf``).

No network: the config is a file (or a bundled preset, ``data/hf/*.json``), never a hub id. The model is built
with ``AutoModelForCausalLM.from_config`` under ``torch.device("meta")`` and profiled by torch_profile: prefill
runs the prompt (logits for the last position only, as generation does); decode runs one token against a
pre-allocated ``StaticCache`` of ``seq`` tokens. ``device="cpu"`` builds the same model for real (random weights,
seeded) and runs it with this host's kernels: what ``profile --verify`` measures against the estimate.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cachefit.core.errors import InputError
from cachefit.core.files import read_json_object
from cachefit.core.layers import LayerTable
from cachefit.core.spec import Workload, dtype_bytes
from cachefit.nn.model import TORCH_DTYPES
from cachefit.sources.hf_splits import ExpertSplit, with_tp_splits
from cachefit.sources.torch_profile import Granularity, profile_module

__all__ = ["build_hf_model", "cache_argument", "hf_presets", "hf_table", "kv_heads", "read_hf_config"]



def hf_presets() -> dict[str, dict[str, Any]]:
    """Bundled public configs by preset name (``hf/llama-3-8b`` ...)."""
    found = {}
    for entry in resources.files("cachefit").joinpath("data/hf").iterdir():
        if entry.name.endswith(".json"):
            found[f"hf/{entry.name.removesuffix('.json')}"] = json.loads(entry.read_text(encoding="utf-8"))
    return dict(sorted(found.items()))


def read_hf_config(path: Path) -> dict[str, Any]:
    file = path / "config.json" if path.is_dir() else path
    document: Any = read_json_object(file, "Hugging Face config")
    if not isinstance(document, dict) or "model_type" not in document:
        raise InputError(f"{file}: a Hugging Face config.json needs a model_type")
    return document


def hf_table(config: dict[str, Any], name: str, work: Workload, granularity: Granularity = "block",
             experts: ExpertSplit = "tensor", device: str = "meta", prefill_chunk: int | None = None) -> LayerTable:
    """The model's layer table for ``work``. ``prefill_chunk`` (decode): each layer also holds what a pass of
    that many prompt tokens per sequence holds at the end of the context (the larger activations and workspace
    of the two), so a run may send prompts in such chunks."""
    if prefill_chunk is not None and (work.phase != "decode" or not 1 <= prefill_chunk <= work.seq):
        raise InputError(f"prefill_chunk needs phase='decode' and 1 <= chunk <= seq ({work.seq}), got "
                         f"{prefill_chunk} for {work.phase}", parameters=("prefill_chunk", "phase"))
    if granularity != "block" and experts != "tensor":
        raise InputError("experts='parallel' works on whole decoder blocks: use granularity 'block'",
                         parameters=("experts", "granularity"))
    table, model, hf_config = _hf_pass(config, name, work, granularity, device, 1)
    if prefill_chunk is not None and prefill_chunk > 1:
        chunk, _, _ = _hf_pass(config, name, work, granularity, device, prefill_chunk)
        table = replace(table, prefill_chunk=prefill_chunk, layers=tuple(
            replace(layer, activation_bytes=max(layer.activation_bytes, other.activation_bytes),
                    workspace_bytes=max(layer.workspace_bytes, other.workspace_bytes))
            for layer, other in zip(table.layers, chunk.layers)))
    # Tensor groups from the model's own tensor-parallel plan (blocks are the unit it is written for).
    return with_tp_splits(table, model, hf_config, experts) if granularity == "block" else table


def _hf_pass(config: dict[str, Any], name: str, work: Workload, granularity: Granularity, device: str,
             tokens: int) -> tuple[LayerTable, nn.Module, Any]:
    """One measured forward of ``tokens`` new tokens per sequence (in decode: at the end of a full context); the
    table, and the model and config it was measured from."""
    model, hf_config = build_hf_model(config, work.dtype, device, eager=work.attention == "eager")
    if work.phase == "decode" and _bidirectional(model):
        raise _cannot_decode(name, hf_config.model_type)
    args, kwargs = _inputs(model, hf_config, work, device, tokens)
    # The KV cache each decoder layer holds is the part of the pre-allocated cache it writes: sliding-window layers
    # (Mistral, Phi-3) keep only their window, which a formula from the config would miss. No fallback: a model
    # that writes none (an encoder) cannot decode.
    table = profile_module(model, args, kwargs, name=name, batch=work.batch, seq=work.seq, phase=work.phase,
                           dtype=dtype_bytes(work.dtype)[0], granularity=granularity,
                           kv_cache_bytes=lambda module: 0, fused=work.attention == "flash")
    if work.phase == "decode" and not any(layer.kv_cache_bytes for layer in table.layers):
        raise _cannot_decode(name, hf_config.model_type)
    return table, model, hf_config


def _bidirectional(model: nn.Module) -> bool:
    """An encoder: transformers marks each attention module ``is_causal``, and none of them is."""
    flags = [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return bool(flags) and not any(flags)


def _cannot_decode(name: str, model_type: str) -> InputError:
    return InputError(f"{name}: this {model_type} model is an encoder (its attention sees the whole input, and it "
                      "keeps no KV cache), so it cannot decode token by token: profile phase prefill, or set "
                      "is_decoder true in its config if the architecture has a decoder form (BERT does)",
                      parameters=("phase",))


def build_hf_model(config: dict[str, Any], dtype: str, device: str = "meta", eager: bool = False
           ) -> tuple[nn.Module, Any]:
    """The model on ``device``; ``eager``: its own attention code (transformers' ``attn_implementation``), else
    transformers' default (SDPA where the architecture has it)."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as error:
        raise InputError("profiling Hugging Face configs needs transformers: pip install 'cachefit[hf]'") from error
    fields = {key: value for key, value in config.items() if not key.startswith("_")}
    model_type = fields.pop("model_type")
    if not isinstance(model_type, str):
        raise InputError(f"model_type must be a string, got {model_type!r}")
    try:
        hf_config = AutoConfig.for_model(model_type, **fields)
    except (ValueError, KeyError) as error:
        raise InputError(f"transformers does not know model_type {model_type!r}: {error}") from error
    except Exception as error:      # transformers' own config validation (strict dataclasses): the user's config
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise InputError(f"transformers rejects this {model_type} config: {' '.join(lines[:2])}") from error
    _check_dimensions(hf_config, model_type)
    try:
        torch.manual_seed(0)                 # a real build (device "cpu"): the same random weights every time
        with torch.device(device):
            chosen = {"attn_implementation": "eager"} if eager else {}
            model = AutoModelForCausalLM.from_config(hf_config, dtype=TORCH_DTYPES[dtype_bytes(dtype)[0]], **chosen)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, AssertionError) as error:
        raise InputError(f"transformers cannot build a {model_type} model from this config: "
                         f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from error
    return model.eval(), hf_config


_DIMENSIONS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "intermediate_size",
               "vocab_size", "head_dim")


def _check_dimensions(hf_config: Any, model_type: str) -> None:
    """The dimensions a config gives are positive integers that divide as attention needs (transformers checks
    few of them, and fails deep inside a forward, or not at all)."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    values = {name: getattr(text, name, None) for name in _DIMENSIONS}
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"{model_type} config: {name} must be a positive integer, got {value!r}")
    hidden, heads, kv_heads = values["hidden_size"], values["num_attention_heads"], values["num_key_value_heads"]
    if hidden and heads and not values["head_dim"] and hidden % heads:
        raise InputError(f"{model_type} config: hidden_size ({hidden}) must be a multiple of num_attention_heads "
                         f"({heads}), or give head_dim")
    if heads and kv_heads and heads % kv_heads:
        raise InputError(f"{model_type} config: num_attention_heads ({heads}) must be a multiple of "
                         f"num_key_value_heads ({kv_heads})")


def _inputs(model: nn.Module, hf_config: Any, work: Workload, device: str = "meta", tokens: int = 1
            ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if work.phase == "prefill":
        from transformers import DynamicCache

        ids = torch.zeros(work.batch, work.seq, dtype=torch.long, device=device)
        # With an empty cache transformers neither looks for packed sequences nor reads a padding mask, both of
        # which call .item() (impossible on meta). The keys and values the prompt leaves in the cache are what a
        # prefill before decoding holds; they show as each layer's workspace (the prefill table has no KV column).
        return (ids,), {cache_argument(model): DynamicCache(config=hf_config), "use_cache": True,
                        "logits_to_keep": 1}
    from transformers import StaticCache

    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    cache = StaticCache(config=hf_config, max_cache_len=work.seq)
    heads = kv_heads(model, text)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    cache.early_initialization(work.batch, heads, head_dim, TORCH_DTYPES[dtype_bytes(work.dtype)[0]],
                               torch.device(device))
    # The step decodes the last ``tokens`` of the context after the ones cached. Models that ask the cache how far
    # it is filled (OPT) get that number: a static cache on meta would answer with a tensor, whose .item() meta
    # cannot give.
    cache.get_seq_length = lambda layer_idx=0: work.seq - tokens    # type: ignore[method-assign]
    ids = torch.zeros(work.batch, tokens, dtype=torch.long, device=device)
    position = torch.arange(work.seq - tokens, work.seq, device=device)
    return (ids,), {cache_argument(model): cache, "cache_position": position, "use_cache": True,
                    "logits_to_keep": 1}


def kv_heads(model: nn.Module, text: Any) -> int:
    """Key/value heads per layer, as the attention modules themselves group them (a config may carry a
    ``num_key_value_heads`` its architecture ignores); Falcon's multi-query attention has one (its config keeps
    num_kv_heads at the query heads unless the new decoder architecture is used)."""
    groups = next((m.num_key_value_groups for m in model.modules() if hasattr(m, "num_key_value_groups")), None)
    if isinstance(groups, int) and groups >= 1:
        return int(text.num_attention_heads // groups)
    if getattr(text, "multi_query", False) and not getattr(text, "new_decoder_architecture", False):
        return 1
    kv = getattr(text, "num_kv_heads", None) if getattr(text, "new_decoder_architecture", False) else None
    return int(kv or text.num_attention_heads)


def cache_argument(model: nn.Module) -> str:
    """transformers 5.x is renaming ``past_key_values`` to ``cache``, model by model: use the one it declares."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
