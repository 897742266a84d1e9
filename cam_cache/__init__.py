"""The precompute stage: foreground maps (CAMs with momentum) in a versioned Arrow cache."""
from .maps import ArrayMaps, ForegroundMaps, UniformMaps
from .models import ARCHS, build_model, features_and_head, load_model, save_checkpoint
from .precompute import (GenerationWriter, build_generation, class_activation_maps, compute_cams,
                         publish_generation, rebuild_cache)
from .store import ForegroundCache, cache_info, init_cache

__all__ = ["ARCHS", "ArrayMaps", "ForegroundCache", "ForegroundMaps", "GenerationWriter", "UniformMaps",
           "build_generation",
           "build_model", "cache_info", "class_activation_maps", "compute_cams", "features_and_head",
           "init_cache", "load_model", "publish_generation", "rebuild_cache", "save_checkpoint"]
