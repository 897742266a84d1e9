"""Loaders that decode, mix and augment: the reference (torch), torchvision (decoding on the
device), DALI, FFCV and Ray backends.

All yield ``BackMixBatch`` and draw their randomness from ``BackMixSampler``; the
mix itself is ``mix_backgrounds`` (``top_k_mask`` picks the foreground cells).
"""
from typing import TYPE_CHECKING

from backmix._lazy import lazy_exports

_EXPORTS = {
    "IMAGENET_MEAN": "backmix.osr_data.normalize", "IMAGENET_STD": "backmix.osr_data.normalize",
    "Normalize": "backmix.osr_data.normalize", "normalize": "backmix.osr_data.normalize",
    "BackMix": ".augment", "RandomCropFlip": ".augment", "crop_flip": ".augment", "fill_value": ".augment",
    # (the function ``backmix.backmix`` is not exported here: importing the submodule of the same
    # name would shadow it; ``mix_backgrounds`` and ``top_k_mask`` are the kernel)
    "box_size": ".backmix", "mix_backgrounds": ".backmix", "top_k_mask": ".backmix",
    "BackMixBatch": ".batch", "BatchTransform": ".batch", "LoaderConfig": ".config", "choose_device": "backmix.device",
    "BACKENDS": ".loaders", "make_loader": ".loaders", "ReferenceLoader": ".reference",
    "BackMixSampler": ".sampling", "BatchParams": ".sampling", "EpochSampler": ".sampling",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

if TYPE_CHECKING:
    from backmix.device import choose_device
    from backmix.osr_data.normalize import IMAGENET_MEAN, IMAGENET_STD, Normalize, normalize

    from .augment import BackMix, RandomCropFlip, crop_flip, fill_value
    from .backmix import box_size, mix_backgrounds, top_k_mask
    from .batch import BackMixBatch, BatchTransform
    from .config import LoaderConfig
    from .loaders import BACKENDS, make_loader
    from .reference import ReferenceLoader
    from .sampling import BackMixSampler, BatchParams, EpochSampler
