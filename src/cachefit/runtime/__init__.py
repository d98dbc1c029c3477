"""Running a plan: checkpoints of the reference model, per-card shards (and, later, the pipeline itself)."""

from cachefit.runtime.shard import Manifest, plan_fingerprint, shard_checkpoint, verify_card
from cachefit.runtime.weights import init_weights, plan_spec, read_checkpoint_info

__all__ = [
           "Manifest",
           "init_weights",
           "plan_fingerprint",
           "plan_spec",
           "read_checkpoint_info",
           "shard_checkpoint",
           "verify_card",
]
