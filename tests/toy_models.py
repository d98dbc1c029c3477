"""Factories for `cachefit profile package.module:factory` tests (called under torch.device("meta"))."""

from __future__ import annotations

import torch
from torch import nn


class Residual(nn.Module):
    """A block that passes two tensors on (hidden state and residual)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = hidden + residual
        return self.linear(total), total


class TwoStream(nn.Module):
    def __init__(self, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.stem = nn.Linear(width, width)
        self.blocks = nn.ModuleList(Residual(width) for _ in range(depth))
        self.out = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.stem(x)
        residual = torch.zeros_like(hidden)
        for block in self.blocks:
            hidden, residual = block(hidden, residual)
        return self.out(hidden + residual)


def two_stream() -> nn.Module:
    return TwoStream()


def two_stream_with_inputs() -> tuple[nn.Module, tuple[torch.Tensor]]:
    return TwoStream(), (torch.zeros(2, 5, 16),)


class DictBlocks(nn.Module):
    """torchtitan's layout: blocks in a ModuleDict the parent iterates (never called itself), beside a registered
    module the forward never uses and the root's own parameter and buffer."""

    def __init__(self, width: int = 16, depth: int = 3, root: bool = True) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(32, width)
        self.layers = nn.ModuleDict({str(i): nn.Linear(width, width) for i in range(depth)})
        self.unused = nn.Linear(width, 2)
        self.scale = nn.Parameter(torch.ones(width)) if root else None
        self.register_buffer("freqs", torch.ones(width) if root else None)
        self.output = nn.Linear(width, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.tok_embeddings(ids)
        if self.scale is not None and self.freqs is not None:
            hidden = hidden * self.scale + self.freqs
        for layer in self.layers.values():
            hidden = layer(hidden)
        return self.output(hidden)


def dict_blocks() -> tuple[nn.Module, tuple[torch.Tensor]]:
    return DictBlocks(), (torch.zeros(2, 5, dtype=torch.long),)


def dict_blocks_without_root_tensors() -> tuple[nn.Module, tuple[torch.Tensor]]:
    return DictBlocks(root=False), (torch.zeros(2, 5, dtype=torch.long),)


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def llama_with_a_mask() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A transformers model with its padding mask (transformers asks whether it is all ones: a .item())."""
    return _tiny_llama(), {"input_ids": torch.zeros(2, 16, dtype=torch.long),
                           "attention_mask": torch.ones(2, 16, dtype=torch.long)}


def llama_without_cache() -> tuple[nn.Module, dict[str, object]]:
    """use_cache=False (transformers asks whether the positions are packed sequences: a .item())."""
    return _tiny_llama(), {"input_ids": torch.zeros(2, 16, dtype=torch.long), "use_cache": False}


def _decoding(model: nn.Module, config: object, heads: int, head_dim: int) -> tuple[nn.Module, dict[str, object]]:
    """One decode step of batch 2 at position 31 against a StaticCache of 32 tokens allocated before the forward."""
    from transformers import StaticCache

    cache = StaticCache(config=config, max_cache_len=32)
    cache.early_initialization(2, heads, head_dim, torch.float32, torch.device("meta"))
    return model, {"input_ids": torch.zeros(2, 1, dtype=torch.long), "cache": cache,
                   "cache_position": torch.tensor([31]), "use_cache": True}


def gpt2_decoding() -> tuple[nn.Module, dict[str, object]]:
    """GPT-2 projects Q, K and V in one fused ``c_attn`` (no k_proj or v_proj to read sizes from)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return _decoding(GPT2LMHeadModel(config), config, heads=4, head_dim=16)


def mistral_decoding() -> tuple[nn.Module, dict[str, object]]:
    """Mistral keeps a sliding window of 8 tokens of its 32-token context."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    return _decoding(MistralForCausalLM(config), config, heads=2, head_dim=16)


class ConvBlock(nn.Module):
    """A ResNet basic block: two 3x3 convolutions with batch norm, and the shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(hidden)))


class SmallResNet(nn.Module):
    def __init__(self, channels: int = 16, depth: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                                  nn.ReLU())
        self.blocks = nn.ModuleList(ConvBlock(channels) for _ in range(depth))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.fc(self.pool(x).flatten(1))


def small_resnet() -> tuple[nn.Module, tuple[torch.Tensor]]:
    return SmallResNet().eval(), (torch.randn(2, 3, 32, 32),)
