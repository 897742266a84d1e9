"""The one normalisation of model input, shared by the loaders and the CAM pass.

Both feed the model ``normalize(canvas)`` of the same uint8 pixels with the same
arithmetic, so a CAM is taken on exactly the input the model trains on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# torchvision's ImageNet statistics: every stage's default.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def new_batch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised batch tensor. In a DataLoader worker, in shared memory from the start, as torch's
    ``default_collate`` allocates: handing it to the loading process then copies nothing (a tensor
    made in ordinary memory is copied into shared memory when the worker sends it)."""
    if device.type == "cpu" and torch.utils.data.get_worker_info() is not None:
        storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
        return torch.empty(0, dtype=dtype).set_(storage).view(shape)
    return torch.empty(shape, dtype=dtype, device=device)


def normalize_constants(mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
    """(scale, shift) float32 [C]: ``normalize`` computes x * scale - shift."""
    return 1.0 / (255.0 * std), mean / std


def normalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 or float32 [B, C, H, W] (0..255) -> float32 ((x / 255) - mean) / std, as x * (1 / 255 std) - mean / std.
    A float32 input is overwritten (the loaders hand over a fresh one)."""
    scale, shift = normalize_constants(mean, std)
    scale, shift = scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)
    # In place on the one float copy: the batch is the largest tensor of the loader's hot path.
    if not images.is_floating_point():
        images = new_batch(tuple(images.shape), torch.float32, images.device).copy_(images)
    return images.float().mul_(scale).sub_(shift)


@dataclass(frozen=True)
class Normalize:
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __call__(self, images: Tensor) -> Tensor:
        dev = images.device
        return normalize(images, torch.tensor(self.mean, device=dev), torch.tensor(self.std, device=dev))
