"""What a rank holds: persistent tensors by kind, and the peak of what its forward allocates on top."""

from __future__ import annotations

from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["PeakTracker", "tensor_bytes"]


def tensor_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages among ``tensors`` (views of one storage count once)."""
    storages: dict[int, int] = {}
    for leaf in tree_leaves(tensors):
        if isinstance(leaf, torch.Tensor):
            storage = leaf.untyped_storage()
            storages[StorageWeakRef(storage).cdata] = storage.nbytes()
    return sum(storages.values())


class PeakTracker(TorchDispatchMode):
    """Peak bytes of the storages ops create while active (freed ones leave: storage weak references)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps a mode's __torch_dispatch__ in torch._dynamo.disable unless this says no; the wrapper imports
        # torch._dynamo on the first op (1.6 s of a rank's start-up here). Nothing runs compiled under this mode.
        return False

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        known = {StorageWeakRef(leaf.untyped_storage()).cdata for leaf in tree_leaves((args, kwargs))
                 if isinstance(leaf, torch.Tensor)}
        result = func(*args, **(kwargs or {}))
        for key in [key for key, (reference, _) in self.live.items() if reference.expired()]:
            self.current -= self.live.pop(key)[1]
        for leaf in tree_leaves(result):
            if isinstance(leaf, torch.Tensor):
                reference = StorageWeakRef(leaf.untyped_storage())
                if reference.cdata not in known and reference.cdata not in self.live:
                    size = leaf.untyped_storage().nbytes()
                    self.live[reference.cdata] = (reference, size)
                    self.current += size
        self.peak = max(self.peak, self.current)
        return result
