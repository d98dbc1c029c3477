"""The reference transformer (torch): the same families and dimensions as the analytical tables."""

from cachefit.nn.model import KVCache, ModelConfig, Transformer, build_model

__all__ = ["KVCache", "ModelConfig", "Transformer", "build_model"]
