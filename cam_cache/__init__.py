"""The precompute stage: foreground maps (CAMs with momentum) in a versioned Arrow cache.

Of a model the cache needs only its last feature map [B, C, h, w] and the linear head over
that map's average; ``backmix.models.features_and_head`` gives both for every supported
family (or refuses in one line). The cache never builds models, nor imports the trainer.
"""
from .maps import ArrayMaps, ForegroundMaps, UniformMaps
from .precompute import build_generation, class_activation_maps, compute_cams, publish_generation
from .store import ForegroundCache, cache_info, init_cache

__all__ = ["ArrayMaps", "ForegroundCache", "ForegroundMaps", "UniformMaps", "build_generation", "cache_info",
           "class_activation_maps", "compute_cams", "init_cache", "publish_generation"]
