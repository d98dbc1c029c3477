"""One card's partition of the reference model: only its layers, loaded from its shard, with its KV cache."""

from __future__ import annotations

from collections.abc import Callable

import torch
from safetensors.torch import load
from torch import nn

from cachefit.core.errors import InputError
from cachefit.core.records import Partition
from cachefit.core.spec import EMBED, HEAD, ModelSpec, block_index
from cachefit.nn.model import Block, Head, KVCache, ModelConfig

__all__ = ["Stage"]


class Stage(nn.Module):
    """Layers ``first..last`` of the plan's model (on a tensor group: one card's share of each block). Module names
    follow the full model (``embed``, ``layers.N``, ``head``), so the shard's tensor names load as they are."""

    def __init__(self, spec: ModelSpec, part: Partition, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, group_rank: int = 0) -> None:
        super().__init__()
        config = ModelConfig.of(spec, part.tensor_parallel)
        self.config = config
        # Vocab-parallel (config.vocab_ways > 1): this card's rows of the embedding and columns of the head.
        self.vocab_start = group_rank * config.vocab if config.vocab_ways > 1 else 0
        self.reduce: Callable[[torch.Tensor], torch.Tensor] = _whole
        self.gather: Callable[[torch.Tensor], torch.Tensor] = _whole
        names = set(part.modules or part.layers)
        with torch.device(device):
            self.embed = nn.Embedding(config.vocab, config.hidden) if EMBED in names else None
            self.layers = nn.ModuleDict({str(block_index(name)): Block(config) for name in part.layers
                                         if block_index(name) is not None})
            self.head = Head(config, None) if HEAD in names else None
        self.to(dtype)
        self.first = part.first == 0
        self.last = self.head is not None
        self.vocab, self.hidden, self.device = spec.vocab, config.hidden, device

    def set_collectives(self, reduce: Callable[[torch.Tensor], torch.Tensor],
                        gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """A tensor group's all-reduce (summing attention's, the MLP's and a vocab-parallel embedding's partial
        outputs) and its all-gather (a vocab-parallel head's logits, in rank order along the vocabulary)."""
        self.reduce, self.gather = reduce, gather
        for block in self.layers.values():
            assert isinstance(block, Block)
            block.reduce = reduce

    def held(self) -> dict[str, torch.Tensor]:
        """This card's tensors by name."""
        return dict(self.state_dict())

    def load_shard(self, data: bytes, name: str) -> None:
        """Load this card's tensors from its shard's bytes (as hashed: runtime.shard.read_card)."""
        tensors = load(data)
        missing, unexpected = self.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise InputError(f"{name} does not fit this card's layers: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")

    def make_caches(self, batch: int, length: int, dtype: torch.dtype, device: str = "cpu") -> dict[str, KVCache]:
        """KV caches of this card's blocks for ``batch`` sequences of ``length`` tokens, allocated now."""
        config = self.config
        return {index: KVCache(batch, config.kv_heads, length, config.head_dim, dtype, device)
                for index in self.layers}

    def micro_caches(self, batch: int, micro: int, seq: int, dtype: torch.dtype) -> list[dict[str, KVCache]]:
        """Each micro-batch's rows of the caches (views of one allocation, made now)."""
        caches, size = self.make_caches(batch, seq, dtype, self.device), batch // micro
        return [{index: cache.rows(m * size, (m + 1) * size) for index, cache in caches.items()}
                for m in range(micro)]

    @staticmethod
    def cache_tensors(micro_caches: list[dict[str, KVCache]]) -> list[torch.Tensor]:
        return [t for caches in micro_caches for cache in caches.values() for t in (cache.keys, cache.values)]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, caches: dict[str, KVCache] | None, position: int) -> torch.Tensor:
        hidden = self._embed(x) if self.embed is not None else x
        for index, block in self.layers.items():
            hidden = block(hidden, caches[index] if caches is not None else None, position)
        if self.head is None:
            return hidden
        logits = self.head(hidden)
        return self.gather(logits) if self.config.vocab_ways > 1 else logits

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The embedding, or (vocab-parallel) this card's rows of it: ids outside them look up zeros, and the
        group's all-reduce sums the partial lookups (Megatron-LM's VocabParallelEmbedding)."""
        assert self.embed is not None
        if self.config.vocab_ways == 1:
            return self.embed(ids)
        local = ids - self.vocab_start
        inside = (local >= 0) & (local < self.config.vocab)
        found = self.embed(torch.where(inside, local, 0))
        found.mul_(inside.unsqueeze(-1))
        return self.reduce(found)


def _whole(x: torch.Tensor) -> torch.Tensor:
    return x
