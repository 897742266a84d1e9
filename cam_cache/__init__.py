"""The precompute stage: foreground maps (CAMs with momentum) in a versioned Arrow cache.

Of a model the cache needs only its last feature map [B, C, h, w] and the linear head over
that map's average; ``backmix.models.features_and_head`` gives both for every supported
family (or refuses in one line). The cache never builds models, nor imports the trainer.
"""
from typing import TYPE_CHECKING

from backmix._lazy import lazy_exports

_EXPORTS = {
    "ArrayMaps": ".maps", "ForegroundMaps": ".maps", "UniformMaps": ".maps",
    "class_activation_maps": ".cams", "compute_cams": ".cams",
    "GenerationWriter": ".precompute", "build_generation": ".precompute", "publish_generation": ".precompute",
    "rebuild_cache": ".rebuild", "stage_generation": ".rebuild", "publish_staged": ".rebuild",
    "InLoopRebuild": ".recorder",
    "ForegroundCache": ".store", "cache_info": ".store", "init_cache": ".store", "start_cache": ".store",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

if TYPE_CHECKING:
    from .cams import class_activation_maps, compute_cams
    from .maps import ArrayMaps, ForegroundMaps, UniformMaps
    from .precompute import GenerationWriter, build_generation, publish_generation
    from .rebuild import publish_staged, rebuild_cache, stage_generation
    from .recorder import InLoopRebuild
    from .store import ForegroundCache, cache_info, init_cache, start_cache
