"""Test scaffolding shared by the loader tests: a stream compared field by field, random maps, and
``PilSource``, a backend added the way a user adds one (one class and one registry line)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from backmix.cam_cache import ArrayMaps
from backmix.osr_data.decode import DecodeError, to_canvas
from backmix.pipeline.loaders import register_backend
from backmix.pipeline.reference import WorkerSource

FIELDS = ("canvas", "images", "mixed", "labels", "dataset_labels", "indices")


class PilSource(WorkerSource):
    """A backend that only decodes: PIL reads each file in the DataLoader workers. Plan, position and
    resume, shards, maps, on_error, labels, the mix and the device are the loader core's."""

    name = "pil"

    def decode(self, path: str, size: int, mode: str) -> torch.Tensor:
        try:
            with Image.open(path) as im:
                rgb = np.array(im.convert("RGB"))
        except (OSError, ValueError) as e:   # PIL's UnidentifiedImageError is an OSError
            raise DecodeError(path, str(e)) from None
        return to_canvas(torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), size, mode)


register_backend("pil", PilSource)


def maps_for(index, seed: int = 2) -> ArrayMaps:
    return ArrayMaps(np.random.default_rng(seed).random((len(index), 8, 8), dtype=np.float32))


def epochs_of(loader, epochs=(0, 1)) -> list[tuple]:
    out = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        out += [tuple(batch) for batch in loader]
    return out


def assert_same_stream(got, want) -> None:
    """Every batch and every field equal, bit for bit (None where both have none)."""
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        for name, x, y in zip(FIELDS, g, w):
            assert (x is None and y is None) or torch.equal(x, y), name


def state_after(loader, epoch: int, cut: int) -> dict:
    """The state of ``loader`` after it yielded ``cut`` batches of ``epoch`` (what a checkpoint saves)."""
    loader.set_epoch(epoch)
    it = iter(loader)
    for _ in range(cut):
        next(it)
    return loader.state_dict()


def random_image_root(root, classes, train_per_class: int, test_per_class: int, seed: int = 0):
    """root/train and root/test of random 32x32 RGB images, ``*_per_class`` a class of ``classes``."""
    from backmix.osr_data.split_folder import write_split

    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(len(classes)), per_class)
        write_split(root / split, rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8), labels, classes)
    return root
