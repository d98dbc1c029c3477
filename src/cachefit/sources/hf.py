"""Hugging Face models from a local ``config.json``, built on the meta device with transformers (extra ``hf``).

No network: the config is a file (or a bundled preset, ``data/hf/*.json``), never a hub id. The model is built
with ``AutoModelForCausalLM.from_config`` under ``torch.device("meta")`` and profiled by torch_profile: prefill
runs the prompt (logits for the last position only, as generation does); decode runs one token against a
pre-allocated ``StaticCache`` of ``seq`` tokens.
"""

from __future__ import annotations

import inspect
import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cachefit.core.errors import InputError
from cachefit.core.layers import LayerTable
from cachefit.core.spec import Workload, dtype_bytes
from cachefit.nn.model import TORCH_DTYPES
from cachefit.sources.torch_profile import Granularity, find_blocks, profile_module

__all__ = ["hf_presets", "hf_table", "read_hf_config"]



def hf_presets() -> dict[str, dict[str, Any]]:
    """Bundled public configs by preset name (``hf/llama-3-8b`` ...)."""
    found = {}
    for entry in resources.files("cachefit").joinpath("data/hf").iterdir():
        if entry.name.endswith(".json"):
            found[f"hf/{entry.name.removesuffix('.json')}"] = json.loads(entry.read_text(encoding="utf-8"))
    return dict(sorted(found.items()))


def read_hf_config(path: Path) -> dict[str, Any]:
    file = path / "config.json" if path.is_dir() else path
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except OSError as error:
        raise InputError(f"cannot read Hugging Face config {file}: {error.strerror or error}") from error
    except json.JSONDecodeError as error:
        raise InputError(f"{file}: not valid JSON ({error.msg})") from error
    if not isinstance(document, dict) or "model_type" not in document:
        raise InputError(f"{file}: a Hugging Face config.json needs a model_type")
    return document


def hf_table(config: dict[str, Any], name: str, work: Workload, granularity: Granularity = "block") -> LayerTable:
    model, hf_config = _build(config, work.dtype)
    args, kwargs = _inputs(model, hf_config, work)
    blocks = find_blocks(model)
    # The KV cache each decoder layer holds, read off the pre-allocated cache itself: sliding-window layers
    # (Mistral, Phi-3) keep only their window, which a formula from the config would miss.
    held = _cache_bytes(kwargs.get(_cache_argument(model))) if work.phase == "decode" else []
    index = {id(block): position for position, block in enumerate(blocks[1])} if blocks else {}
    return profile_module(model, args, kwargs, name=name, batch=work.batch, seq=work.seq, phase=work.phase,
                          dtype=dtype_bytes(work.dtype)[0], granularity=granularity,
                          kv_cache_bytes=lambda module: held[index[id(module)]] if id(module) in index else 0)


def _cache_bytes(cache: Any) -> list[int]:
    """Bytes of keys and values per layer of an initialised transformers cache."""
    return [sum(t.numel() * t.element_size() for t in (layer.keys, layer.values)) for layer in cache.layers]


def _build(config: dict[str, Any], dtype: str) -> tuple[nn.Module, Any]:
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as error:
        raise InputError("profiling Hugging Face configs needs transformers: pip install 'cachefit[hf]'") from error
    fields = {key: value for key, value in config.items() if not key.startswith("_")}
    model_type = fields.pop("model_type")
    try:
        hf_config = AutoConfig.for_model(model_type, **fields)
    except (ValueError, KeyError) as error:
        raise InputError(f"transformers does not know model_type {model_type!r}: {error}") from error
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=TORCH_DTYPES[dtype_bytes(dtype)[0]])
    return model.eval(), hf_config


def _inputs(model: nn.Module, hf_config: Any, work: Workload) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if work.phase == "prefill":
        from transformers import DynamicCache

        ids = torch.zeros(work.batch, work.seq, dtype=torch.long, device="meta")
        # With an empty cache transformers neither looks for packed sequences nor reads a padding mask, both of
        # which call .item() (impossible on meta). The keys and values the prompt leaves in the cache are what a
        # prefill before decoding holds; they show as each layer's workspace (the prefill table has no KV column).
        return (ids,), {_cache_argument(model): DynamicCache(config=hf_config), "use_cache": True,
                        "logits_to_keep": 1}
    from transformers import StaticCache

    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    cache = StaticCache(config=hf_config, max_cache_len=work.seq)
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    cache.early_initialization(work.batch, heads, head_dim, TORCH_DTYPES[dtype_bytes(work.dtype)[0]],
                               torch.device("meta"))
    ids = torch.zeros(work.batch, 1, dtype=torch.long, device="meta")
    position = torch.tensor([work.seq - 1], device="meta")
    return (ids,), {_cache_argument(model): cache, "cache_position": position, "use_cache": True,
                    "logits_to_keep": 1}


def _cache_argument(model: nn.Module) -> str:
    """transformers 5.x is renaming ``past_key_values`` to ``cache``, model by model: use the one it declares."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
