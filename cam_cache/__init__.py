"""The precompute stage: foreground maps (CAMs with momentum) in a versioned Arrow cache."""
from .maps import ArrayMaps, ForegroundMaps, UniformMaps
from .models import ARCHS, build_model, features_and_head, load_model, save_checkpoint

__all__ = ["ARCHS", "ArrayMaps", "ForegroundMaps", "UniformMaps", "build_model", "features_and_head",
           "load_model", "save_checkpoint"]
