"""The precompute stage: foreground maps (CAMs with momentum) in a versioned Arrow cache."""
from typing import TYPE_CHECKING

from backmix._lazy import lazy_exports

_EXPORTS = {
    "ArrayMaps": ".maps", "ForegroundMaps": ".maps", "UniformMaps": ".maps",
    "ARCHS": ".models", "build_model": ".models", "features_and_head": ".models", "load_model": ".models",
    "save_checkpoint": ".models",
    "build_generation": ".precompute", "class_activation_maps": ".precompute", "compute_cams": ".precompute",
    "publish_generation": ".precompute",
    "ForegroundCache": ".store", "cache_info": ".store", "init_cache": ".store",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

if TYPE_CHECKING:
    from .maps import ArrayMaps, ForegroundMaps, UniformMaps
    from .models import ARCHS, build_model, features_and_head, load_model, save_checkpoint
    from .precompute import build_generation, class_activation_maps, compute_cams, publish_generation
    from .store import ForegroundCache, cache_info, init_cache
