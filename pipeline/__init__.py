"""Loaders that decode, mix and augment: the reference (torch), DALI and FFCV backends.

All yield ``BackMixBatch`` and draw their randomness from ``BackMixSampler``; the
mix itself is ``mix_backgrounds`` (``top_k_mask`` picks the foreground cells).
"""
from .augment import IMAGENET_MEAN, IMAGENET_STD, BackMix, Normalize, RandomCropFlip, crop_flip, fill_value, normalize
from .backmix import backmix, box_size, mix_backgrounds, top_k_mask
from .batch import BackMixBatch, BatchTransform
from .config import LoaderConfig, choose_device
from .loaders import BACKENDS, make_loader
from .reference import ReferenceLoader
from .sampling import BackMixSampler, BatchParams, EpochSampler

__all__ = [
    "BACKENDS", "IMAGENET_MEAN", "IMAGENET_STD", "BackMix", "BackMixBatch", "BackMixSampler",
    "BatchParams", "BatchTransform", "EpochSampler", "LoaderConfig", "Normalize", "RandomCropFlip",
    "ReferenceLoader", "backmix", "box_size", "choose_device", "crop_flip", "fill_value",
    "make_loader", "mix_backgrounds", "normalize", "top_k_mask",
]
