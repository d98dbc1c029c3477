"""Running a plan: checkpoints of the reference model, per-card shards, the ranks of a run and what they measure.

The public names load on first use (PEP 562): the launcher imports ``cachefit.runtime.launch`` without torch, so it
checks every shard and starts the ranks before importing it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cachefit.core.lazy import lazy_names

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


__getattr__, __dir__ = lazy_names(__name__, _HOMES, __all__)
