"""Running a plan: checkpoints of the reference model, per-card shards, the ranks of a run and what they measure.

The public names load on first use (PEP 562): the launcher imports ``cachefit.runtime.launch`` without torch, so it
checks every shard and starts the ranks before importing it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cachefit.runtime.manifest import Manifest, plan_fingerprint, verify_card
    from cachefit.runtime.shard import shard_checkpoint
    from cachefit.runtime.weights import init_weights, plan_spec, read_checkpoint_info

__all__ = ["Manifest", "init_weights", "plan_fingerprint", "plan_spec", "read_checkpoint_info", "shard_checkpoint",
           "verify_card"]

_HOMES = {"Manifest": "cachefit.runtime.manifest", "plan_fingerprint": "cachefit.runtime.manifest",
          "verify_card": "cachefit.runtime.manifest", "shard_checkpoint": "cachefit.runtime.shard",
          "init_weights": "cachefit.runtime.weights", "plan_spec": "cachefit.runtime.weights",
          "read_checkpoint_info": "cachefit.runtime.weights"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'cachefit.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
