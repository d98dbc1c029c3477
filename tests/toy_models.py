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
