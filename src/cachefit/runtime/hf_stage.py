"""One card's stage of a Hugging Face model: transformers' own modules, only this card's layers materialised.

The model is built from its config on meta (``AutoModelForCausalLM.from_config``), then cut to the stage, as
torchtitan cuts a model into pipeline chunks: the decoder-block list keeps only this card's blocks (their
``layer_idx`` renumbered, so the stage's cache holds only its own layers), and only the modules the plan put on
this card leave the meta device, loaded from the card's shard. Each pass runs the model's own forward, so masks,
rotary tables and position embeddings are made as transformers makes them:

- a stage after the first is given the received hidden state as ``inputs_embeds``, and a pre-hook hands it to
  its first block unchanged (what the model does to embeddings before the blocks, Gemma's scaling or GPT-2's
  position embeddings, belongs to the first stage; those modules elsewhere are stand-ins that add nothing);
- a stage before the last ends at its last block: a hook takes that block's output and stops the forward, so the
  final norm and head (still on meta) never run.
What flows between stages is the hidden state, as transformers' ``base_model_pp_plan`` says for every
architecture that has one ("layers": hidden_states in, hidden_states out).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from safetensors.torch import load
from torch import nn

from cachefit.core.errors import InputError
from cachefit.core.records import Partition, Plan
from cachefit.runtime.hf_tensor_parallel import local
from cachefit.sources.hf import build_hf_model, cache_argument, kv_heads
from cachefit.sources.torch_profile import find_blocks

__all__ = ["HFStage"]


class _Handoff(Exception):
    """The stage's last block is done: its output is what the next stage receives."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


class _Nothing(nn.Module):
    """A position embedding that belongs to the first stage: elsewhere it adds nothing."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros(())


class _Same(nn.Module):
    """A projection of embeddings that belongs to the first stage (OPT's project_in): elsewhere it passes on."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x


class HFStage(nn.Module):
    """Partition ``part`` of ``plan``'s Hugging Face model (its ``config.json`` document), on ``device``."""

    def __init__(self, document: dict[str, Any], plan: Plan, part: Partition, device: str = "cpu",
                 dtype: str = "float32", group: Any = None) -> None:
        super().__init__()
        model, config = build_hf_model(document, dtype, "meta")
        self.causal: Any = model
        self.hf_config: Any = config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.vocab, self.hidden = int(text.vocab_size), int(text.hidden_size)
        self.heads, self.head_dim = kv_heads(model, text), int(
            getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
        owned = set(part.modules or part.layers)
        self.first, self.last = part.first == 0, part.last == plan.model.layers - 1
        self._cache_name = cache_argument(model)
        self.blocks = self._keep_own_blocks(owned)
        order = [name for p in plan.partitions for name in (p.modules or p.layers)]
        self._stand_ins(owned, order)
        if part.tensor_parallel > 1:            # a tensor group: DTensor over the group, still on meta
            from cachefit.runtime.hf_tensor_parallel import module_styles, parallelize

            parallelize(self.causal, module_styles(model, config, part), group, device)
            self.heads //= part.tensor_parallel
        self._materialise(owned, torch.device(device))
        self._hooks(owned, order)

    def _keep_own_blocks(self, owned: set[str]) -> list[nn.Module]:
        found = find_blocks(self.causal)
        if found is None:
            raise InputError(f"{type(self.causal).__name__} has no list of decoder blocks to cut into stages")
        path, blocks = found
        self._block_path, self._block_names = path, {f"{path}.{key}" for key, _ in blocks}
        mine = [(index, block) for index, (key, block) in enumerate(blocks) if f"{path}.{key}" in owned]
        self._layer_indices = [index for index, _ in mine]
        for number, (_, block) in enumerate(mine):
            for module in block.modules():            # the stage's cache holds its own layers, numbered from 0
                if isinstance(getattr(module, "layer_idx", None), int):
                    setattr(module, "layer_idx", number)  # noqa: B010 (an int attribute, not a submodule)
        parent_name, _, attribute = path.rpartition(".")
        parent: Any = self.causal.get_submodule(parent_name)
        kept = nn.ModuleList()
        for index, block in mine:
            kept.add_module(blocks[index][0], block)    # under its own key: the shard's tensor names load as they are
        setattr(parent, attribute, kept)
        # The block loop of some architectures reads config.layer_types by position in the list (Qwen2, Gemma-2).
        local: Any = copy.copy(parent.config) if hasattr(parent, "config") else None
        if local is not None:
            types = getattr(local, "layer_types", None)
            if types is not None:
                local.layer_types = [types[i] for i in self._layer_indices]
            local.num_hidden_layers = len(mine)
            parent.config = local
        return [block for _, block in mine]

    def _stand_ins(self, owned: set[str], order: list[str]) -> None:
        """Modules another stage holds that this stage's forward would run anyway: before the blocks (see the
        module doc), and, on a stage after the blocks (the final norm's or the head's own card), those after the
        blocks that come before this stage's first module. Stand-ins that add nothing, or pass on."""
        if self.first:
            return
        first_block = next(i for i, name in enumerate(order) if name in self._block_names)
        last_block = max(i for i, name in enumerate(order) if name in self._block_names)
        mine = min(i for i, name in enumerate(order) if name in owned)
        skipped = order[:first_block] + (order[last_block + 1:mine] if not self.blocks else [])
        for name in skipped:
            if name in owned or name == "":
                continue
            module = self.causal.get_submodule(name)
            if any(True for _ in module.parameters()) and module is not self.causal.get_input_embeddings():
                stand_in = _Nothing() if isinstance(module, nn.Embedding) and name in order[:first_block] else _Same()
                parent_name, _, attribute = name.rpartition(".")
                setattr(self.causal.get_submodule(parent_name), attribute, stand_in)

    def _materialise(self, owned: set[str], device: torch.device) -> None:
        """This card's modules, and every stage's parameter-less helpers (rotary tables), leave meta; their
        non-persistent buffers are computed by transformers' own initialisation (shards carry none)."""
        keep = [m for name, m in self.causal.named_modules() if name in owned]
        keep += [m for m in self.causal.modules() if not any(True for _ in m.parameters())
                 and any(True for _ in m.buffers(recurse=False))]
        for module in keep:
            module.to_empty(device=device, recurse=True)
            for inner in module.modules():
                if getattr(inner, "_non_persistent_buffers_set", None):
                    self.causal._init_weights(inner)
        self.device = device

    def _hooks(self, owned: set[str], order: list[str]) -> None:
        """Where the received hidden state enters (the first block; a stage without blocks: its first module
        after them, the final norm) and where the stage's output leaves (the last block's output; without blocks:
        what enters the first module after the blocks)."""
        after = order[max(i for i, n in enumerate(order) if n in self._block_names) + 1:]
        if not self.first:
            entry = self.blocks[0] if self.blocks else self.causal.get_submodule(
                next(name for name in after if name in owned))
            entry.register_forward_pre_hook(self._enter, with_kwargs=True)
        if not self.last:
            if self.blocks:
                self.blocks[-1].register_forward_hook(self._leave)
            else:                                   # what enters the module after this stage's last one
                following = order[max(i for i, n in enumerate(order) if n in owned) + 1]
                following = after[0] if following in self._block_names else following
                self.causal.get_submodule(following).register_forward_pre_hook(self._leave_before)
        self._received: torch.Tensor | None = None

    def _enter(self, module: nn.Module, args: Any, kwargs: Any) -> tuple[Any, Any]:
        if args:
            return (self._received, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self._received}

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        raise _Handoff(output[0] if isinstance(output, tuple) else output)

    def _leave_before(self, module: nn.Module, args: Any) -> None:
        raise _Handoff(args[0])

    def set_collectives(self, reduce: Any, gather: Any) -> None:
        """A tensor group's collectives are DTensor's own (runtime/hf_tensor_parallel.py)."""

    def held(self) -> dict[str, torch.Tensor]:
        """This card's tensors by name (a tensor group's: its shares)."""
        return {n: local(t) for n, t in self.causal.state_dict(keep_vars=True).items()
                if local(t).device.type != "meta"}

    def load_shard(self, data: bytes, name: str) -> None:
        tensors = load(data)
        targets = self.held()
        missing, unexpected = set(targets) - set(tensors), set(tensors) - set(targets)
        if missing or unexpected:
            raise InputError(f"{name} does not fit this card's layers: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}")
        with torch.no_grad():
            for key, tensor in tensors.items():
                if targets[key].shape != tensor.shape:
                    raise InputError(f"{name}: {key} has shape {tuple(tensor.shape)}, this card holds "
                                     f"{tuple(targets[key].shape)}")
                targets[key].copy_(tensor)
        # A tied head on the card of its embedding is the same tensor again, as the plan counted it once.
        embedding, head = self.causal.get_input_embeddings(), self.causal.get_output_embeddings()
        if (getattr(self.hf_config, "tie_word_embeddings", False) and head is not None
                and local(embedding.weight).device.type != "meta" and local(head.weight).device.type != "meta"):
            head.weight = embedding.weight

    def micro_caches(self, batch: int, micro: int, seq: int, dtype: torch.dtype) -> list[Any]:
        """One transformers StaticCache per micro-batch, holding this stage's layers only, allocated now."""
        from transformers import StaticCache

        size = batch // micro
        caches = []
        for _ in range(micro):
            cache: Any = StaticCache(config=self.hf_config, max_cache_len=seq)
            cache.layers = [cache.layers[i] for i in self._layer_indices]
            probe = torch.empty(size, self.heads, 1, self.head_dim, dtype=dtype, device=self.device)
            for layer in cache.layers:
                layer.lazy_initialization(probe, probe)
            caches.append(cache)
        return caches

    @staticmethod
    def cache_tensors(caches: list[Any]) -> list[torch.Tensor]:
        return [t for cache in caches for layer in cache.layers for t in (layer.keys, layer.values)]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, cache: Any, position: int) -> torch.Tensor:
        """Tokens (first stage) or the hidden state (the others) at ``position``; the hidden state after this
        stage's last block, or (the last stage) the logits of the last position."""
        for layer in cache.layers:                  # the cache's fill is where this pass writes
            layer.cumulative_length.fill_(position)
            if hasattr(layer, "cumulative_length_int"):
                layer.cumulative_length_int = position
        length = x.shape[1]
        positions = torch.arange(position, position + length, device=x.device).unsqueeze(0)
        inputs = {"input_ids": x} if self.first else {"inputs_embeds": x}
        self._received = None if self.first else x
        try:
            out = self.causal(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1 if self.last else 0,
                              **{self._cache_name: cache})
        except _Handoff as handoff:
            return handoff.hidden
        finally:
            self._received = None
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits
